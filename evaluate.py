"""Evaluate a trained run on a split at the ORIGINAL image resolution.

  python evaluate.py --run runs/kvasir_20260101-120000 [--split test] [--checkpoint best]
  python evaluate.py --run runs/kvasir_20260101-120000 --dataset clinicdb --split all   # cross-dataset
  python evaluate.py --run runs/kvasir_20260101-120000 --describe   # + the concept the model sees, per image

The prediction (made at the training input size) is resized back to each image's own size
before the metrics, so the figures compare with work that evaluates at full resolution.
Writes to RUN_DIR/eval_<split>/ (another dataset: RUN_DIR/eval_<dataset>_<split>/; or --out):
masks/<image stem>.png (sub-folders kept), overlays/ (the first --overlays images: image | truth | prediction),
per_image.csv, metrics.json, and report.html (train_utils/report_page.py: every image's picture from gallery/,
the metrics with confidence intervals; it also rewrites the run's report.html). Evaluation uses the images only: another dataset needs no text. Binary runs
also get the paper's figures (paper_dice, ...: soft Dice on probabilities, means over batches).
--describe adds concept.csv (model/concept_readout.py: the attribute sentence the model sees, from
the image and its PREDICTED mask) and, in metrics.json and the printout, each attribute's agreement
with the geometry describer on the TRUE mask, beside chance and the majority rate.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list
from tqdm.auto import tqdm

from common.atomic import write_json
from common.errors import CoTexNetError, run_cli
from common.output_folders import OutputFolder, folder_replaced
from data_process import layout
from data_process.decoding import read_image, read_mask
from data_process.layout import SPLITS
from data_process.registry import get_spec
from data_process.splits import KINDS
from model.concept_readout import CSV_COLUMNS, agreement, predicted_foreground, readout, write_csv
from train_utils import data, gallery, report_page, reporting
from train_utils.config import PROTOCOLS, apply_protocol
from train_utils.inference import predict_batches
from train_utils.metrics import (
    class_names,
    image_metrics,
    paper_batch,
    paper_image_dice,
    paper_image_stats,
    paper_summary,
    summarize,
)
from train_utils.precision import apply_precision, make_accelerator
from train_utils.run_state import load_run
from train_utils.tokenizer import load_tokenizer

SPLIT_CHOICES = (*SPLITS, "all")  # all: the three splits together, each image once


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run folder written by train.py")
    parser.add_argument("--split", default="test", choices=SPLIT_CHOICES,
                        help="split to evaluate (default: test); all: the union of the three")
    parser.add_argument("--dataset", help="a registered dataset to evaluate on, if not the run's own (it must "
                        "have the run's classes); its images under --root, its rows in the --split-dir CSVs")
    parser.add_argument("--root", help="folder of the dataset folders (default: the run's DATASET.root_dir)")
    parser.add_argument("--split-dir", help="folder of the split CSVs (default: the run's DATASET.split_dir)")
    parser.add_argument("--checkpoint", default="best", choices=["best", "last"], help="which checkpoint (default: best)")
    parser.add_argument("--clipseg", help="CLIPSeg base folder or hub id, if not the one the run recorded")
    parser.add_argument("--out", help="output folder, replaced as a whole (default: RUN/eval_<split>, another "
                        "dataset: RUN/eval_<dataset>_<split>)")
    parser.add_argument("--allow-split-overlap", action="store_true", help="evaluate even if an image is in two "
                        "splits (a benchmark whose val and test are the same files); default: the run's setting")
    parser.add_argument("--protocol", choices=PROTOCOLS,
                        help="read the truth masks as this protocol does (paper: DATASET.binarize paper); "
                             "default: as the run was trained")
    parser.add_argument("--overlays", type=int, default=8, help="number of overlay pictures (default: 8)")
    parser.add_argument("--describe", action="store_true", help="also read back the concept the model sees in each "
                        "image (concept.csv) and its agreement with the geometry describer on the true masks")
    return parser.parse_args(argv)


def target(cfg, args):
    """(the run's config pointed at the dataset to evaluate, the default output folder's name).

    The run's own dataset keeps the folder eval_<split>; another one, or one of a run trained on
    several, is named: eval_<dataset>_<split>."""
    own = cfg.datasets()
    name = args.dataset or own[0]
    if args.dataset is None and len(own) > 1:
        raise CoTexNetError(f"--dataset: {args.run} was trained on {', '.join(own)}; name the one to evaluate")
    d = cfg.DATASET
    if name not in own:
        classes = get_spec(name).num_classes
        if classes != d.num_classes:
            raise CoTexNetError(f"--dataset {name}: it has {classes} classes (categories + 1 background) but the run "
                                f"predicts {d.num_classes}; evaluate it with a run trained for its classes")
    keyword = d.keyword if name in own else None  # the run's keyword may stand for its own dataset only
    d = dataclasses.replace(d, dataset_name=name, text_csv="", keyword=keyword, root_dir=args.root or d.root_dir,
                            split_dir=args.split_dir or d.split_dir, augmented=False,
                            allow_split_overlap=d.allow_split_overlap or args.allow_split_overlap)
    folder = f"eval_{args.split}" if own == [name] else f"eval_{name}_{args.split}"
    return dataclasses.replace(cfg, DATASET=d), folder


@contextlib.contextmanager
def staged_output(target: OutputFolder, accelerator):
    """The output folder as a whole: every process writes into one hidden folder, which then
    replaces `target` in one step (the old evaluation, or the new one, never a mix)."""
    with contextlib.ExitStack() as stack:
        where = [str(stack.enter_context(folder_replaced(target, "metrics.json")).folder)
                 if accelerator.is_main_process else None]
        if accelerator.num_processes > 1:
            broadcast_object_list(where)
        yield OutputFolder(where[0])
        accelerator.wait_for_everyone()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg, model, extra = load_run(args.run, args.checkpoint, args.clipseg)
    if args.protocol:
        cfg = apply_protocol(cfg, args.protocol)
    cfg, folder_name = target(cfg, args)
    accelerator = make_accelerator(cfg)
    apply_precision(model, accelerator, cfg.TRAIN.compile)
    split = data.dataset(cfg, args.split)
    masks_of = dict(split.rows)  # image name -> mask name
    layout.check_unique_stems([image for image, _ in split.rows], f"{args.split} split of {cfg.DATASET.dataset_name}")
    folder, spec, k = split.folder, data.spec(cfg), cfg.DATASET.num_classes
    # Never an input, whatever the paths: the images and masks, the split files, the run's config and checkpoint.
    run = Path(args.run)
    target_folder = OutputFolder(args.out or run / folder_name, "--out",
                                 [folder / "images", folder / "masks", run / args.checkpoint],
                                 [run / "config.yaml", *(layout.split_csv(cfg.DATASET.split_dir, s) for s in KINDS)])
    names = class_names(k, spec.categories)
    model = model.to(accelerator.device)
    loader = accelerator.prepare(data.readable_loader(cfg, split, num_processes=accelerator.num_processes))
    tokenizer = load_tokenizer(args.clipseg or cfg.MODEL.clipseg_hf_api) if args.describe else None

    with staged_output(target_folder, accelerator) as out:
        rows, concepts, unreadable, overlays, paper_batches = [], [], [], 0, []
        batches = tqdm(loader, desc=f"evaluate {args.split}", disable=not accelerator.is_main_process)
        for batch, preds, logits in predict_batches(model, batches, accelerator):
            # Every process gathers every batch, even one of unreadable images only: a process that
            # skipped a gather would leave the others waiting in it.
            unreadable += accelerator.gather_for_metrics(batch["errors"], use_gather_object=True)
            batch_rows, stats = [], []
            for name, pred, full in zip(batch["name"], preds, logits, strict=True):
                h, w = pred.shape
                truth = torch.from_numpy(read_mask(folder / "masks" / masks_of[name], spec, size=(w, h),
                                                   binarize=cfg.DATASET.binarize))
                batch_rows.append(dict(name=name, **image_metrics(pred[None], truth[None], k, names)[0]))
                if k == 2:  # the paper's figures, from this image's probabilities at its size
                    stats.append(paper_image_stats(torch.sigmoid(full), truth[None])[0])
                    batch_rows[-1]["paper_dice"] = paper_image_dice(stats[-1])
                stem = layout.stem(name)  # with its sub-folder: sub/a.jpg and other/a.jpg write apart
                reporting.write_mask(out.path(f"masks/{stem}.png"), pred.numpy(), k)
                gallery.write_picture(out.path(gallery.picture_path("gallery", name).as_posix()),
                                      read_image(folder / "images" / name), truth.numpy(), pred.numpy())
                if accelerator.is_main_process and overlays < args.overlays:
                    image = read_image(folder / "images" / name)
                    reporting.write_overlay(out.path(f"overlays/{stem}.png"), image, truth.numpy(), pred.numpy())
                    overlays += 1
            gathered = accelerator.gather_for_metrics(list(zip(batch_rows, stats or [None] * len(batch_rows), strict=True)),
                                                      use_gather_object=True)
            rows += [row for row, _ in gathered]
            if k == 2 and any(stat for _, stat in gathered):
                paper_batches.append(paper_batch([stat for _, stat in gathered if stat]))
            if args.describe:
                found = []
                if batch["name"]:  # the model's own prediction at its input size; the true mask is not read
                    pixels = batch["pixel_values"].to(accelerator.device)
                    found = readout(model, tokenizer, pixels, predicted_foreground(model, pixels), spec.keyword,
                                    batch_size=len(pixels), progress=False)
                concepts += accelerator.gather_for_metrics([dict(name=name, **{key: f[key] for key in CSV_COLUMNS[1:]})
                                                            for name, f in zip(batch["name"], found, strict=True)],
                                                           use_gather_object=True)
        # Unreadable images leave the batches uneven, so accelerate's trimming of the samples it
        # repeated to even out the last batch can miss one: each image counts once, by name.
        rows = list({row["name"]: row for row in rows}.values())
        concepts = list({row["name"]: row for row in concepts}.values())
        unreadable = list(dict.fromkeys(unreadable))

        if accelerator.is_main_process:
            data.report_unreadable(unreadable, out.path("unreadable.txt"))
            summary = {**summarize(rows), **paper_summary(paper_batches)}
            described = {}
            if args.describe:
                names = [row["name"] for row in concepts]
                write_csv(out.path("concept.csv"), names, concepts)
                # One image at a time (a split of full-size images need not fit in memory), its mask at its size.
                images = (read_image(folder / "images" / name) for name in names)
                pairs = ((read_mask(folder / "masks" / masks_of[name], spec, size=image.shape[1::-1],
                                    binarize=cfg.DATASET.binarize), image)
                         for name, image in zip(names, images, strict=True))
                truths, pictures = itertools.tee(pairs)
                described = dict(concept=agreement(concepts, (mask for mask, _ in truths),
                                                   (image for _, image in pictures)))
            write_json(out.path("metrics.json"), dict(run=str(args.run), checkpoint=args.checkpoint,
                                                      epoch=extra.get("epoch"), dataset=cfg.DATASET.dataset_name,
                                                      split=args.split, resolution="original", **summary,
                                                      **described))
            reporting.write_csv(out.path("per_image.csv"), rows)
        if not rows:  # nothing replaces an earlier evaluation
            raise CoTexNetError(f"{args.split} split of {cfg.DATASET.dataset_name}: no images evaluated")
    if accelerator.is_main_process:
        out = target_folder.folder
        print(f"report: {report_page.write_report(out, args.run)} (the run's: {report_page.write_report(args.run)})")
        print(reporting.format_table({args.split: summary}))
        if described:
            print("\n" + reporting.format_agreement(described["concept"]) + f"\nper image: {out / 'concept.csv'}")
        print(f"\nmasks: {out / 'masks'}  overlays: {out / 'overlays'}  per image: {out / 'per_image.csv'}  "
              f"summary: {out / 'metrics.json'}")


if __name__ == "__main__":
    run_cli(main)
