"""The training loop: one epoch, evaluation, and `fit`, which runs the epochs until the end,
early stopping, or a stop request (Ctrl-C or SIGTERM).

Validation metrics are gathered from all processes, so every process takes the same
early-stopping decision; checkpoints and logs are written by the main process only.
"""

from __future__ import annotations

import enum
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from timm.scheduler.cosine_lr import CosineLRScheduler
from tqdm.auto import tqdm

from common.errors import CoTexNetError
from model.feature_cache import FeatureCache
from train_utils import gallery, multi, reporting
from train_utils.config import Config
from train_utils.early_stopping import EarlyStopping
from train_utils.inference import labels_at
from train_utils.metrics import (
    PAPER_KEYS,
    image_metrics,
    paper_batch,
    paper_image_dice,
    paper_image_stats,
    paper_summary,
)
from train_utils.run_state import save_best, save_last
from train_utils.trackers import Trackers


class Outcome(enum.Enum):
    """How `fit` ended."""

    FINISHED = "finished"  # all epochs ran
    EARLY_STOPPED = "early-stopped"
    INTERRUPTED = "interrupted"  # stopped on request after saving last/: --resume continues it


@dataclass
class Training:
    """What `fit` trains with (model, optimizer and loaders prepared by the accelerator; the
    schedule, timm's, over the prepared training loader), plus the early-stopping rule and the
    epoch log, which `run_state.resume` restores."""

    cfg: Config
    run: Path
    accelerator: Accelerator
    model: torch.nn.Module
    criterion: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: CosineLRScheduler  # train_utils.optim.build_scheduler
    train_loader: object
    val_loader: object
    generator: torch.Generator  # the training loader's shuffle
    class_names: list[str] | None = None
    stopper: EarlyStopping = field(init=False)
    log: reporting.EpochLog = field(init=False)

    def __post_init__(self):
        self.stopper = EarlyStopping(self.cfg.TRAIN.patience, self.cfg.TRAIN.epochs, self.cfg.TRAIN.early_stopping)
        self.log = reporting.EpochLog(self.run / "log.csv")


def train_one_epoch(model, loader, criterion, optimizer, scheduler, accelerator: Accelerator,
                    epoch: int, print_freq: int) -> dict:
    """One pass over the training loader; returns the image-weighted mean losses and the last lr."""
    model.train()
    sums = torch.zeros(4, device=accelerator.device)  # loss, seg, kl, images
    # The first step whose loss is not finite, kept on the device: no host sync per step.
    first_bad = torch.tensor(math.inf, device=accelerator.device)
    bar = tqdm(loader, desc=f"epoch {epoch} train", leave=False, disable=not accelerator.is_main_process)
    for step, batch in enumerate(bar):
        output = model(batch["pixel_values"], batch["roi_pixel_values"], batch["input_ids"], batch["attention_mask"])
        losses = criterion(output, batch["label"])
        first_bad = torch.where(torch.isfinite(losses["loss"].detach()), first_bad, first_bad.clamp(max=step + 1))
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(losses["loss"])
        optimizer.step()
        # The run's count of optimiser steps: the paper's epoch * len(loader) + i (its epoch 0-based, i 1-based).
        scheduler.step_update((epoch - 1) * len(loader) + step + 1)
        n = len(batch["label"])
        sums += torch.stack([losses["loss"].detach() * n, losses["seg"].detach() * n, losses["kl"].detach() * n,
                             torch.tensor(n, device=sums.device, dtype=sums.dtype)])
        if step % print_freq == 0:
            bar.set_postfix(loss=f"{losses['loss'].item():.4f}")
    sums = accelerator.reduce(sums, "sum")
    first_bad = accelerator.gather(first_bad[None]).min().item()  # every process stops alike
    if math.isfinite(first_bad):
        raise CoTexNetError(f"epoch {epoch}, step {int(first_bad)}: the training loss is not finite; stopped before "
                            "validation, so best/ and last/ keep the last finished epoch; lower TRAIN.lr "
                            f"({optimizer.param_groups[0]['initial_lr']:g}) or check the inputs")
    loss, seg, kl = (sums[:3] / sums[3].clamp(min=1)).tolist()
    return dict(train_loss=loss, train_seg=seg, train_kl=kl, lr=optimizer.param_groups[0]["lr"])


@torch.no_grad()
def evaluate(model, loader, accelerator: Accelerator, num_classes: int, class_names=None,
             cache: FeatureCache | None = None, hd95: bool = True, keep: int = 0, desc: str = "eval",
             pictures: Path | None = None):
    """Metrics of every image of `loader` on the evaluation path (images only, no text), at the
    size of its labels (the training input size).

    `cache`: frozen ViT features by image file, reused on later calls (validation every epoch);
    valid because the eval transform is deterministic and CLIP is frozen.
    `keep`: return the first `keep` (image, truth, prediction) of the main process for overlays.
    `pictures`: write every image's gallery picture (`gallery.write_picture`) into this folder.
    Returns (rows, summary, kept); rows hold one dict per image (with its name, and its dataset when
    the loader mixes several), from all processes; the summary of several datasets holds each one's.
    Binary: rows and summary also hold the paper's figures (`paper_*`), each batch being the
    images of one step over all processes.
    """
    core = accelerator.unwrap_model(model)
    core.eval()
    rows, kept, paper_batches = [], [], []
    bar = tqdm(loader, desc=desc, leave=False, disable=not accelerator.is_main_process)
    for batch in bar:
        pixels, labels = batch["pixel_values"], batch["label"]
        if cache is None:
            with accelerator.autocast():
                output = core(pixels)
        else:
            # The cache runs the encoder outside autocast, in its weights' dtype (bf16 once cast).
            features = cache.features(core, pixels, multi.image_paths(loader.dataset, batch))
            with accelerator.autocast():
                output = core.forward_features(features)
        pred = torch.stack(labels_at(output.logits, [labels.shape[-2:]] * len(labels)))
        tags = [dict(dataset=part) for part in batch["dataset"]] if "dataset" in batch else [{}] * len(pred)
        batch_rows = [dict(**tag, name=name, **m) for tag, name, m in
                      zip(tags, batch["name"], image_metrics(pred, labels, num_classes, class_names, hd95=hd95),
                          strict=True)]
        binary = num_classes == 2
        stats = paper_image_stats(torch.sigmoid(output.logits.float()), labels) if binary else [None] * len(pred)
        # Gathered per batch: accelerate then drops the samples it repeated to even out the last batch.
        gathered = accelerator.gather_for_metrics(list(zip(batch_rows, stats, strict=True)), use_gather_object=True)
        rows += [dict(row, paper_dice=paper_image_dice(stat)) if binary else row for row, stat in gathered]
        if binary:
            paper_batches.append(paper_batch([stat for _, stat in gathered]))
        for tag, name, pixel, label, one in zip(tags, batch["name"], pixels, labels, pred, strict=True) if pictures else ():
            gallery.write_picture(gallery.picture_path(pictures, name, tag.get("dataset")),
                                  reporting.denormalize(pixel), label.cpu().numpy(), one.cpu().numpy())
        for j in range(min(keep - len(kept), len(pixels))):
            kept.append((reporting.denormalize(pixels[j]), labels[j].cpu().numpy(), pred[j].cpu().numpy()))
    return rows, {**multi.summarize(rows), **paper_summary(paper_batches)}, kept


class StopOnRequest:
    """First Ctrl-C or SIGTERM: finish the epoch, save last/, stop (resuming is then exact).
    A second one: quit now."""

    SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}
    requested = False

    def __enter__(self):
        self.previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{self.SIGNALS[signum]}: finishing this epoch and saving last/ "
              f"({self.SIGNALS[signum]} again to quit at once)", flush=True)

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def fit(training: Training, start_epoch: int = 0) -> Outcome:
    """Train the epochs after `start_epoch` (0: a new run; else what `run_state.resume` returned)."""
    tr, t = training, training.cfg.TRAIN
    accelerator, stopper, main = tr.accelerator, tr.stopper, tr.accelerator.is_main_process
    cache = FeatureCache(accelerator.unwrap_model(tr.model), t.input_size, folder=tr.run / "feature_cache",
                         memory_mb=t.feature_cache_mb)
    # The trackers end however fit ends: finished, early-stopped, interrupted or failed.
    with StopOnRequest() as stop, Trackers(t.log_with, tr.run, tr.cfg.to_dict()) as trackers:
        for epoch in range(start_epoch + 1, t.epochs + 1):
            if stopper.should_stop:
                break
            began = time.time()
            row = dict(epoch=epoch, **train_one_epoch(tr.model, tr.train_loader, tr.criterion, tr.optimizer,
                                                       tr.scheduler, accelerator, epoch, t.print_freq))
            _, val, kept = evaluate(tr.model, tr.val_loader, accelerator, tr.cfg.DATASET.num_classes, tr.class_names,
                                    cache, hd95=False, keep=t.num_overlays, desc=f"epoch {epoch} val")
            score = multi.overall(val, t.select_overall)[t.select_metric]
            improved = stopper.update(epoch, score)
            row.update(val_dice=val["dice"], val_iou=val["iou"], **{f"val_{k}": val[k] for k in PAPER_KEYS if k in val},
                       **multi.log_columns(val), **{f"best_{t.select_metric}": stopper.best},
                       time_s=time.time() - began)
            if main:
                if improved and t.save_best:
                    save_best(tr.run, tr.model, accelerator, epoch, {f"val_{t.select_metric}": score})
                    for k, (image, truth, pred) in enumerate(kept):
                        reporting.write_overlay(tr.run / "overlays" / f"epoch{epoch:04d}_{k}.png", image, truth, pred)
                    if kept:
                        trackers.log_images({"overlays": [reporting.overlay(*picture) for picture in kept]}, epoch)
                tr.log.append(row)
                trackers.log({key: value for key, value in row.items() if key != "epoch"}, epoch)
                tr.log.plot(tr.run / "curves.png")
                save_last(tr.run, tr.model, tr.optimizer, tr.scheduler, accelerator, stopper, epoch, tr.generator)
                each = "".join(f"  {key.removeprefix('val_dice_')} {value:.4f}"
                               for key, value in multi.log_columns(val).items())
                paper = f"paper_dice {val['paper_dice']:.4f}  " if "paper_dice" in val else ""
                print(f"epoch {epoch}/{t.epochs}  loss {row['train_loss']:.4f}  val Dice {val['dice']:.4f}{each}  "
                      f"IoU {val['iou']:.4f}  {paper}best {t.select_metric} {stopper.best:.4f} "
                      f"(epoch {stopper.best_epoch})  {row['time_s']:.1f}s", flush=True)
            accelerator.wait_for_everyone()
            # Every process must agree to stop, or the others would wait for it forever.
            flag = torch.tensor(float(stop.requested), device=accelerator.device)
            if accelerator.reduce(flag, "sum").item() > 0:
                return Outcome.INTERRUPTED
    if stopper.should_stop:
        if main:
            print(f"early stop ({t.early_stopping} rule on {t.select_metric}): {t.patience} epochs without "
                  f"improvement after epoch {stopper.grace}")
        return Outcome.EARLY_STOPPED
    return Outcome.FINISHED
