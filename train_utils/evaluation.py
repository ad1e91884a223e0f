"""The one evaluation path of training's validation and test, evaluate.py and predict.py.

`evaluate` runs the model's evaluation path (the images only: no text, no ROI) over a loader
and, per image, scores its prediction against the truth where the loader has masks: at the
input size (the labels of the batch) or at each image's original size (the prediction's logits
resized to it, the truth read from its file). It writes what `Outputs` names and, given a
`Readout`, reads back the concept the model sees in each image from its predicted mask.

Figures are gathered from every process per batch, each image once: a loader of
`data.readable_loader` keeps an unreadable file's place in its batch, so accelerate's trimming
of the samples it repeated to even out the last batch drops exactly those.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from tqdm.auto import tqdm

from common.atomic import write_json, write_text
from common.output_folders import OutputFolder, folder_replaced
from data_process.decoding import read_image, read_mask
from data_process.my_dataset import SegDataset
from model.CoTexNet import predict_labels
from model.feature_cache import FeatureCache
from train_utils import data, pictures, reporting
from train_utils.concept_readout import CSV_COLUMNS, agreement, readout, true_attributes, write_csv
from train_utils.metrics import image_metrics, summarize
from train_utils.paper_metrics import paper_batch, paper_image_dice, paper_image_stats, paper_summary


@dataclass
class Outputs:
    """Files written per image, each where its function puts image `name` (of `dataset`); None: not written."""

    mask: Callable[[str], Path] | None = None  # the predicted label map (`pictures.write_mask`)
    overlay: Callable[[str], Path] | None = None  # image | truth | prediction, full size
    overlays: int = 0  # how many overlays: the first images of the main process
    picture: Callable[[str, str | None], Path] | None = None  # the report's gallery (`pictures.write_picture`)


@dataclass
class Readout:
    """Read back the concept each image's prediction carries (`concept_readout.readout`)."""

    tokenizer: object
    keyword: str


@dataclass
class Evaluated:
    """What `evaluate` found, gathered from every process."""

    rows: list[dict]  # one per image with a truth: its name (and dataset), metrics, paper_dice (binary)
    summary: dict  # over the rows (`metrics.summarize`), with the paper's figures (binary)
    images: int  # images evaluated
    unreadable: list[str]  # the messages of the files that could not be read
    concepts: list[dict] = field(default_factory=list)  # with a Readout: per image, its name and CSV_COLUMNS
    agreement: dict | None = None  # with a Readout and a truth: `concept_readout.agreement`
    kept: list[tuple] = field(default_factory=list)  # this process's first `keep` (image, truth, prediction)


def logits_at(logits: torch.Tensor, sizes) -> list[torch.Tensor]:
    """One (C, h, w) float map per image of (B,C,H',W') `logits`, resized to that image's (h, w)
    in `sizes`: the logits are resized, not the labels (a smooth upsampling, then the decision)."""
    maps = []
    for one, (h, w) in zip(logits.float(), sizes, strict=True):
        size = (int(h), int(w))
        maps.append(one if one.shape[-2:] == size else
                    F.interpolate(one[None], size=size, mode="bilinear", align_corners=False)[0])
    return maps


class _Originals:
    """The images and true labels of a dataset at their original sizes, read from their files."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.masks = dict(dataset.rows) if isinstance(dataset, SegDataset) else None  # image -> mask name

    def image(self, name: str):
        d = self.dataset
        return read_image(d.paths[name] if isinstance(d, data.ImageFiles) else d.folder / "images" / name)

    def truth(self, name: str, size) -> torch.Tensor | None:
        """The labels at (h, w) `size`; None for a dataset without masks."""
        if self.masks is None:
            return None
        d, (h, w) = self.dataset, size
        return torch.from_numpy(read_mask(d.folder / "masks" / self.masks[name], d.spec, size=(int(w), int(h)),
                                          binarize=d.binarize))


@dataclass
class _Prediction:
    """One image's prediction, with what scoring and writing it needs."""

    name: str
    dataset: str | None  # of a loader of several datasets
    logits: torch.Tensor  # (C, h, w) on the CPU, at the size it is scored at
    truth: torch.Tensor | None  # (h, w) labels, where the loader has masks
    image: Callable[[], object]  # HxWx3 uint8 RGB at that size, made on the first call only
    concept: dict | None  # with a Readout: name and CSV_COLUMNS


@torch.no_grad()
def evaluate(model, loader, accelerator: Accelerator, num_classes: int, class_names=None, *,
             original_size: bool = False, cache: FeatureCache | None = None, hd95: bool = True, keep: int = 0,
             outputs: Outputs | None = None, readout_with: Readout | None = None, desc: str = "evaluate") -> Evaluated:
    """Evaluate `model` on every image of `loader` (prepared by `accelerator` under DDP).

    `original_size`: score and write each prediction at its image's own size (the loader's
    dataset a SegDataset or `data.ImageFiles`, in `data.readable_loader`); else at the input size.
    `cache`: frozen ViT features by image file, reused on later calls (validation every epoch);
    valid because the eval transform is deterministic and CLIP is frozen.
    Binary: rows and summary also hold the paper's figures (`paper_*`), each batch being the
    images of one step over all processes.
    """
    core = accelerator.unwrap_model(model)
    core.eval()
    outputs, source = outputs or Outputs(), getattr(loader.dataset, "dataset", loader.dataset)  # data.SkipUnreadable
    originals = _Originals(source) if original_size else None
    records, paper_batches, kept, overlays = [], [], [], 0

    def score(found: _Prediction) -> dict:
        nonlocal overlays
        record, pred, truth = {}, predict_labels(found.logits[None])[0], found.truth
        if truth is not None:
            row = dict(**({"dataset": found.dataset} if found.dataset else {}), name=found.name,
                       **image_metrics(pred[None], truth[None], num_classes, class_names, hd95=hd95)[0])
            if num_classes == 2:  # the paper's figures, from this image's probabilities at its size
                record["stats"] = paper_image_stats(torch.sigmoid(found.logits), truth[None])[0]
                row["paper_dice"] = paper_image_dice(record["stats"])
            record["row"], truth = row, truth.numpy()
        pred = pred.numpy()
        if outputs.mask:
            pictures.write_mask(outputs.mask(found.name), pred, num_classes)
        if outputs.picture:
            pictures.write_picture(outputs.picture(found.name, found.dataset), found.image(), truth, pred)
        if outputs.overlay and accelerator.is_main_process and overlays < outputs.overlays:
            pictures.write_overlay(outputs.overlay(found.name), found.image(), truth, pred)
            overlays += 1
        if len(kept) < keep:
            kept.append((found.image(), truth, pred))
        if found.concept is not None:
            record["concept"] = found.concept
            if truth is not None:
                record["truth"] = true_attributes(truth, found.image())
        return record

    for batch in tqdm(loader, desc=desc, leave=False, disable=not accelerator.is_main_process):
        found = iter(_predict(core, batch, accelerator, source, originals, cache, readout_with))
        mine = [dict(error=error) if error else score(next(found))
                for error in batch.get("errors") or [None] * len(batch["name"])]
        # Every process gathers every batch, even one of unreadable files only: a process that
        # skipped a gather would leave the others waiting in it.
        gathered = accelerator.gather_for_metrics(mine, use_gather_object=True)
        if any("stats" in record for record in gathered):
            paper_batches.append(paper_batch([record["stats"] for record in gathered if "stats" in record]))
        records += gathered
    rows = [record["row"] for record in records if "row" in record]
    described = [record for record in records if "truth" in record]
    return Evaluated(rows=rows, summary={**summarize(rows), **paper_summary(paper_batches)},
                     images=sum("error" not in record for record in records),
                     unreadable=[record["error"] for record in records if "error" in record],
                     concepts=[record["concept"] for record in records if "concept" in record],
                     agreement=agreement([r["concept"] for r in described], [r["truth"] for r in described])
                     if described else None, kept=kept)


def _predict(core, batch: dict, accelerator: Accelerator, source, originals: _Originals | None,
             cache: FeatureCache | None, readout_with: Readout | None) -> list[_Prediction]:
    """The predictions of the readable images of a batch, at their original sizes with `originals`."""
    if not batch["name"]:
        return []
    pixels = batch["pixel_values"].to(accelerator.device)
    if cache is None:
        with accelerator.autocast():
            logits = core(pixels).logits
    else:
        # The cache runs the encoder outside autocast, in its weights' dtype (bf16 once cast).
        features = cache.features(core, pixels, data.image_paths(source, batch))
        with accelerator.autocast():
            logits = core.forward_features(features).logits
    sizes = batch["orig_size"] if originals else [pixels.shape[-2:]] * len(pixels)
    concepts = [None] * len(pixels)
    if readout_with:  # from the model's own prediction at its input size; no true mask is read
        concepts = [dict(name=name, **{key: found[key] for key in CSV_COLUMNS[1:]}) for name, found in zip(
            batch["name"], readout(core, readout_with.tokenizer, pixels, predict_labels(logits) > 0,
                                   readout_with.keyword, batch_size=len(pixels), progress=False), strict=True)]
    found = []
    for i, (name, full) in enumerate(zip(batch["name"], logits_at(logits, sizes), strict=True)):
        if originals:
            truth, image = originals.truth(name, sizes[i]), functools.cache(lambda name=name: originals.image(name))
        else:
            truth = batch["label"][i].cpu() if "label" in batch else None
            image = functools.cache(lambda pixel=pixels[i]: pictures.denormalize(pixel))
        found.append(_Prediction(name, batch["dataset"][i] if "dataset" in batch else None, full.cpu(), truth, image,
                                 concepts[i]))
    return found


@contextlib.contextmanager
def staged_output(target: OutputFolder, accelerator: Accelerator):
    """`target` as a whole: every process writes into one hidden folder, which then replaces it
    in one step, once it holds metrics.json (the old evaluation, or the new one, never a mix)."""
    with contextlib.ExitStack() as stack:
        where = [str(stack.enter_context(folder_replaced(target, "metrics.json")).folder)
                 if accelerator.is_main_process else None]
        if accelerator.num_processes > 1:
            broadcast_object_list(where)
        yield OutputFolder(where[0])
        accelerator.wait_for_everyone()


def write_results(out: OutputFolder, result: Evaluated, **metadata) -> None:
    """An evaluation's files in `out`: unreadable.txt and concept.csv where there are any; with
    rows, per_image.csv and metrics.json (`metadata`, the summary, the concept agreement)."""
    if result.unreadable:
        path = out.path("unreadable.txt")
        print(f"{len(result.unreadable)} unreadable file(s) skipped (listed in {path}):\n  "
              + "\n  ".join(result.unreadable[:10]))
        write_text(path, "\n".join(result.unreadable) + "\n")
    if result.concepts:
        write_csv(out.path("concept.csv"), [row["name"] for row in result.concepts], result.concepts)
    if result.rows:
        concept = dict(concept=result.agreement) if result.agreement else {}
        write_json(out.path("metrics.json"), dict(**metadata, **result.summary, **concept))
        reporting.write_csv(out.path("per_image.csv"), result.rows)
