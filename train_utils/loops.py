"""The training loop: `Training` (what a run trains, and its state), one epoch, and `fit`, which
runs the epochs until the end, early stopping, or a stop request (Ctrl-C or SIGTERM).

Validation metrics are gathered from all processes (`train_utils.evaluation`), so every process
takes the same early-stopping decision; checkpoints and logs are written by the main process only.
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
from train_utils import pictures, reporting
from train_utils.config import Config
from train_utils.early_stopping import EarlyStopping
from train_utils.evaluation import evaluate
from train_utils.metrics import overall
from train_utils.paper_metrics import PAPER_KEYS
from train_utils.rng import rng_state, set_rng_state
from train_utils.run_state import load_training_state, save_last
from train_utils.trackers import Trackers


class Outcome(enum.Enum):
    """How `fit` ended."""

    FINISHED = "finished"  # all epochs ran
    EARLY_STOPPED = "early-stopped"
    INTERRUPTED = "interrupted"  # stopped on request after saving last/: --resume continues it


@dataclass
class Training:
    """What `fit` trains with (model, optimizer and loaders prepared by the accelerator; the
    schedule, timm's, over the prepared training loader), the early-stopping rule, the epoch log
    and the last finished epoch. Its state (`state_dict`) is what last/ holds beside the weights."""

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
    epoch: int = 0  # the last finished one
    stopper: EarlyStopping = field(init=False)
    log: reporting.EpochLog = field(init=False)

    def __post_init__(self):
        self.stopper = EarlyStopping(self.cfg.TRAIN.patience, self.cfg.TRAIN.epochs, self.cfg.TRAIN.early_stopping)
        self.log = reporting.EpochLog(self.run / "log.csv")

    def state_dict(self) -> dict:
        """The epoch, optimizer, schedule, grad scaler, early stopping and every RNG (not the weights)."""
        scaler = self.accelerator.scaler
        return dict(epoch=self.epoch, optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                    scaler=scaler.state_dict() if scaler is not None else None,
                    early_stopping=self.stopper.state_dict(), rng=rng_state(self.generator))

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict`'s, the log cut to its epoch; refused when the schedule it continues
        spans another number of steps than this training split gives."""
        built_for, now = _schedule_steps(state["scheduler"], self.run), _schedule_steps(self.scheduler.state_dict(), self.run)
        if built_for != now:
            raise CoTexNetError(f"--resume {self.run}: its learning-rate schedule was built for {built_for} steps, the "
                                f"training split now gives {now} ({len(self.train_loader)} per epoch); the split "
                                "changed since the run started, so the schedule would not end where it should: start "
                                "a new run (or restore the split)")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.accelerator.scaler is not None and state["scaler"] is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.stopper.load_state_dict(state["early_stopping"])
        self.log.rows = [row for row in self.log.rows if row["epoch"] <= state["epoch"]]  # logged, not saved
        self.epoch = state["epoch"]
        set_rng_state(state["rng"], self.generator)  # last: building the model drew from the RNGs

    def resume(self) -> None:
        """Continue from the run's last/: its weights and state. A run without one yet (stopped during
        its first epoch) starts over."""
        state = load_training_state(self.run)
        if state is None:
            if self.accelerator.is_main_process:
                print(f"{self.run}: no last/ checkpoint (stopped during its first epoch): starting over from "
                      "epoch 1 with its config.yaml")
            return
        self.accelerator.unwrap_model(self.model).load_weights(self.run / "last")
        self.load_state_dict(state)


def _schedule_steps(state: dict, run: Path) -> int:
    """The optimiser steps a saved schedule (timm's CosineLRScheduler) spans, its warm-up included."""
    if "t_initial" not in state:
        raise CoTexNetError(f"--resume {run}: its last/ holds the learning-rate schedule of an earlier train.py (a torch "
                            "scheduler), which this version cannot continue: start a new run, or resume with that version")
    return state["t_initial"] + (state["warmup_t"] if state["warmup_prefix"] else 0)


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


def fit(training: Training) -> Outcome:
    """Train the epochs after `training.epoch` (0: a new run; a resumed one continues)."""
    tr, t = training, training.cfg.TRAIN
    accelerator, stopper, main = tr.accelerator, tr.stopper, tr.accelerator.is_main_process
    model = accelerator.unwrap_model(tr.model)
    cache = FeatureCache(model, t.input_size, folder=tr.run / "feature_cache", memory_mb=t.feature_cache_mb)
    # The trackers end however fit ends: finished, early-stopped, interrupted or failed.
    with StopOnRequest() as stop, Trackers(t.log_with, tr.run, tr.cfg.to_dict()) as trackers:
        for epoch in range(tr.epoch + 1, t.epochs + 1):
            if stopper.should_stop:
                break
            began = time.time()
            row = dict(epoch=epoch, **train_one_epoch(tr.model, tr.train_loader, tr.criterion, tr.optimizer,
                                                       tr.scheduler, accelerator, epoch, t.print_freq))
            result = evaluate(tr.model, tr.val_loader, accelerator, model.num_classes, tr.class_names, cache=cache,
                              hd95=False, keep=t.num_overlays, desc=f"epoch {epoch} val")
            val, kept, tr.epoch = result.summary, result.kept, epoch
            score = overall(val, t.select_overall)[t.select_metric]
            improved = stopper.update(epoch, score)
            # Several datasets: each one's Dice and their mean.
            each = {f"val_dice_{name}": part.get("dice") for name, part in val.get("datasets", {}).items()}
            if each:
                each["val_dice_datasets"] = val["mean_over_datasets"]["dice"]
            row.update(val_dice=val["dice"], val_iou=val["iou"], **{f"val_{k}": val[k] for k in PAPER_KEYS if k in val},
                       **each, **{f"best_{t.select_metric}": stopper.best}, time_s=time.time() - began)
            if main:
                if improved and t.save_best:
                    model.save_pretrained(tr.run / "best", dict(epoch=epoch, **{f"val_{t.select_metric}": score}))
                    for k, (image, truth, pred) in enumerate(kept):
                        pictures.write_overlay(tr.run / "overlays" / f"epoch{epoch:04d}_{k}.png", image, truth, pred)
                    if kept:
                        trackers.log_images({"overlays": [pictures.overlay(*picture) for picture in kept]}, epoch)
                tr.log.append(row)
                trackers.log({key: value for key, value in row.items() if key != "epoch"}, epoch)
                tr.log.plot(tr.run / "curves.png")
                save_last(tr.run, model, tr.state_dict())
                shown = "".join(f"  {key.removeprefix('val_dice_')} {value:.4f}" for key, value in each.items())
                paper = f"paper_dice {val['paper_dice']:.4f}  " if "paper_dice" in val else ""
                print(f"epoch {epoch}/{t.epochs}  loss {row['train_loss']:.4f}  val Dice {val['dice']:.4f}{shown}  "
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
