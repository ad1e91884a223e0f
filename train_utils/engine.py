"""The training loop: one epoch, evaluation, early stopping, checkpoints and resumable state.

Runs under `accelerate` in every case: single process without its launcher (CPU or one GPU),
DDP with `accelerate launch --num_processes N train.py ...`. Checkpoints and logs are written
by the main process only; validation metrics are gathered from all processes, so every
process takes the same early-stopping decision.
"""

from __future__ import annotations

import contextlib
import math
import pickle
import random
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR
from tqdm.auto import tqdm

from common.errors import CoTexNetError
from common.io import atomic_path
from model.checkpoint import load_checkpoint, save_checkpoint
from model.feature_cache import FeatureCache
from train_utils import reporting
from train_utils.config import Config, load_config
from train_utils.metrics import image_metrics, predict_labels, summarize

STATE_FILE = "training_state.pt"


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX. Without them oneDNN emulates bf16 and the frozen ViT runs ~6x slower
    than in float32 (tools/bench.py --dtype bf16)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def make_accelerator(cfg: Config) -> Accelerator:
    """bf16 autocast where the hardware has it (recent GPUs, CPUs with AVX-512 BF16 or AMX),
    fp16 with a grad scaler on older GPUs, float32 elsewhere."""
    t = cfg.TRAIN
    if t.device == "cuda" and not torch.cuda.is_available():
        raise CoTexNetError("TRAIN.device: cuda requested but no GPU is visible; set TRAIN.device=cpu or auto")
    on_gpu = torch.cuda.is_available() and t.device != "cpu"
    if not t.amp or not (on_gpu or cpu_has_native_bf16()):
        precision = "no"
    else:
        precision = "fp16" if on_gpu and not torch.cuda.is_bf16_supported() else "bf16"
    if t.cpu_threads:
        torch.set_num_threads(t.cpu_threads)
    return Accelerator(cpu=not on_gpu, mixed_precision=precision)


def apply_precision(model, accelerator: Accelerator, compile: bool = False) -> None:
    """Under bf16 or fp16 autocast, the frozen CLIP's weights in that dtype, cast once here
    instead of by autocast at every call; the trained parts stay float32. `compile`
    (TRAIN.compile): torch.compile of the frozen encoder and the decoder."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)
    if dtype is not None and model.freeze_encoder:
        model.cast_frozen_encoder(dtype)
    if compile:
        model.compile_parts()


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]  # CLIP is frozen
    return torch.optim.AdamW(params, lr=cfg.TRAIN.lr, weight_decay=cfg.TRAIN.weight_decay)


def build_scheduler(optimizer, cfg: Config, steps_per_epoch: int):
    """Per-iteration cosine decay to 0, after a linear warm-up from `warmup_lr` when warmup_epoch > 0.

    `steps_per_epoch` is the single-process count: accelerate steps a prepared scheduler once
    per process at every optimizer step, so the schedule spans the run whatever N is.
    """
    t = cfg.TRAIN
    total, warmup = t.epochs * steps_per_epoch, t.warmup_epoch * steps_per_epoch
    if warmup == 0:
        return CosineAnnealingLR(optimizer, T_max=total)
    ramp = LinearLR(optimizer, start_factor=t.warmup_lr / t.lr, end_factor=1.0, total_iters=warmup)
    return SequentialLR(optimizer, [ramp, CosineAnnealingLR(optimizer, T_max=total - warmup)], milestones=[warmup])


class EarlyStopping:
    """The paper's rule: stop after `patience` epochs without a better validation Dice, where
    epochs in the first fifth of the run do not count (the model is still warming up)."""

    def __init__(self, patience: int, epochs: int):
        self.patience, self.grace = patience, epochs // 5
        self.best, self.best_epoch, self.bad_epochs = -math.inf, 0, 0

    def update(self, epoch: int, score: float) -> bool:
        """Record epoch `epoch` (1-based); True when it is the new best. A NaN score never is."""
        if score > self.best:  # -inf start: the first epoch is always a best, even at Dice 0
            self.best, self.best_epoch, self.bad_epochs = score, epoch, 0
            return True
        if epoch > self.grace:
            self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return dict(best=self.best, best_epoch=self.best_epoch, bad_epochs=self.bad_epochs)

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch, self.bad_epochs = state["best"], state["best_epoch"], state["bad_epochs"]


def train_one_epoch(model, loader, criterion, optimizer, scheduler, accelerator: Accelerator,
                    epoch: int, print_freq: int) -> dict:
    """One pass over the training loader; returns the image-weighted mean losses and the last lr."""
    model.train()
    sums = torch.zeros(4, device=accelerator.device)  # loss, seg, kl, images
    bar = tqdm(loader, desc=f"epoch {epoch} train", leave=False, disable=not accelerator.is_main_process)
    for step, batch in enumerate(bar):
        output = model(batch["pixel_values"], batch["roi_pixel_values"], batch["input_ids"], batch["attention_mask"])
        losses = criterion(output, batch["label"])
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(losses["loss"])
        optimizer.step()
        scheduler.step()
        n = len(batch["label"])
        sums += torch.stack([losses["loss"].detach() * n, losses["seg"].detach() * n, losses["kl"].detach() * n,
                             torch.tensor(n, device=sums.device, dtype=sums.dtype)])
        if step % print_freq == 0:
            bar.set_postfix(loss=f"{losses['loss'].item():.4f}")
    sums = accelerator.reduce(sums, "sum")
    loss, seg, kl = (sums[:3] / sums[3].clamp(min=1)).tolist()
    return dict(train_loss=loss, train_seg=seg, train_kl=kl, lr=optimizer.param_groups[0]["lr"])


@torch.no_grad()
def evaluate(model, loader, accelerator: Accelerator, num_classes: int, class_names=None,
             cache: FeatureCache | None = None, hd95: bool = True, keep: int = 0, desc: str = "eval"):
    """Metrics of every image of `loader` on the evaluation path (images only, no text).

    `cache`: frozen ViT features by image file, reused on later calls (validation every epoch);
    valid because the eval transform is deterministic and CLIP is frozen.
    `keep`: return the first `keep` (image, truth, prediction) of the main process for overlays.
    Returns (rows, summary, kept); rows hold one dict per image (with its name), from all processes.
    """
    core = accelerator.unwrap_model(model)
    core.eval()
    rows, kept = [], []
    bar = tqdm(loader, desc=desc, leave=False, disable=not accelerator.is_main_process)
    for batch in bar:
        pixels, labels = batch["pixel_values"], batch["label"]
        if cache is None:
            with accelerator.autocast():
                output = core(pixels)
        else:
            # The cache runs the encoder outside autocast, in its weights' dtype (bf16 once cast).
            features = cache.features(core, pixels, [loader.dataset.folder / "images" / n for n in batch["name"]])
            with accelerator.autocast():
                output = core.forward_features(features)
        logits = output.logits.float()
        if logits.shape[-2:] != labels.shape[-2:]:
            logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        pred = predict_labels(logits)
        batch_rows = [dict(name=name, **m) for name, m in
                      zip(batch["name"], image_metrics(pred, labels, num_classes, class_names, hd95=hd95), strict=True)]
        # Gathered per batch: accelerate then drops the samples it repeated to even out the last batch.
        rows += accelerator.gather_for_metrics(batch_rows, use_gather_object=True)
        for j in range(min(keep - len(kept), len(pixels))):
            kept.append((reporting.denormalize(pixels[j]), labels[j].cpu().numpy(), pred[j].cpu().numpy()))
    return rows, summarize(rows), kept


def rng_state(generator: torch.Generator) -> dict:
    """Every RNG the run draws from, in types that `torch.load(weights_only=True)` accepts."""
    state = np.random.get_state(legacy=False)
    return dict(python=random.getstate(), torch=torch.get_rng_state(), loader=generator.get_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                numpy_key=torch.from_numpy(state["state"]["key"].astype(np.int64)),
                numpy_pos=state["state"]["pos"], numpy_gauss=(state["has_gauss"], state["gauss"]))


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    generator.set_state(state["loader"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(dict(bit_generator="MT19937", state=dict(key=state["numpy_key"].numpy().astype(np.uint32),
                             pos=state["numpy_pos"]), has_gauss=state["numpy_gauss"][0], gauss=state["numpy_gauss"][1]))


def save_last(run: Path, model, optimizer, scheduler, accelerator: Accelerator, stopper: EarlyStopping,
              epoch: int, generator: torch.Generator) -> None:
    """last/: weights + the full training state, swapped in as a whole so that a crash while
    writing leaves a complete last/, or one that `recover_last` restores, rather than a mix.
    The state file is written last and atomically: a folder that holds it is complete."""
    tmp, last, old = run / ".last.tmp", run / "last", run / ".last.old"
    shutil.rmtree(tmp, ignore_errors=True)
    save_checkpoint(accelerator.unwrap_model(model), tmp, dict(epoch=epoch))
    scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
    with atomic_path(tmp / STATE_FILE) as path:
        torch.save(dict(epoch=epoch, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                        scaler=scaler, early_stopping=stopper.state_dict(), rng=rng_state(generator)), path)
    shutil.rmtree(old, ignore_errors=True)
    if last.exists():
        last.rename(old)
    # A kill here leaves no last/ but two complete folders: .last.tmp (this epoch) and .last.old.
    tmp.rename(last)
    shutil.rmtree(old, ignore_errors=True)


def recover_last(run: Path) -> None:
    """Undo a kill inside save_last: without last/, the newest complete one of .last.tmp and
    .last.old becomes last/; the leftovers of save_last are removed."""
    tmp, last, old = run / ".last.tmp", run / "last", run / ".last.old"
    if not last.exists():
        for candidate in (tmp, old):
            if (candidate / STATE_FILE).is_file():
                with contextlib.suppress(OSError):  # another process of a DDP run renamed it first
                    candidate.rename(last)
                break
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def load_training_state(run: Path) -> dict | None:
    """The training state of `run`'s last/ (recovered first when a kill hit save_last), or None
    when the run has none yet: killed during its first epoch, it starts over from epoch 1."""
    recover_last(run)
    path = run / "last" / STATE_FILE
    if not (run / "last").exists():
        return None
    if not path.is_file():
        raise CoTexNetError(f"{path}: missing; {run / 'last'} is incomplete")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CoTexNetError(f"{path}: holds pickled objects beyond tensors and plain values; refused "
                            "(loading it could run code); train.py never writes such a file") from err
    except (EOFError, RuntimeError, ValueError, KeyError, OSError) as err:  # what torch.load raises on damage
        reason = str(err).split(". ")[0].splitlines()[0] if str(err) else type(err).__name__
        raise CoTexNetError(f"{path}: truncated or corrupt training state ({reason})") from err


class StopOnInterrupt:
    """First Ctrl-C: finish the epoch, save last/, stop (resuming is then exact). Second: quit now."""

    requested = False

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: finishing this epoch and saving last/ (Ctrl-C again to quit at once)", flush=True)

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)


def fit(cfg: Config, run: Path, accelerator: Accelerator, model, criterion, optimizer, scheduler,
        train_loader, val_loader, generator: torch.Generator, state: dict | None, class_names=None) -> bool:
    """Train from epoch 1, or from `state` (a resumed run). Returns False when stopped by Ctrl-C."""
    t, main = cfg.TRAIN, accelerator.is_main_process
    stopper = EarlyStopping(t.patience, t.epochs)
    start = 0
    if state is not None:
        stopper.load_state_dict(state["early_stopping"])
        if accelerator.scaler is not None and state["scaler"] is not None:
            accelerator.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"], generator)
        start = state["epoch"]
    cache = FeatureCache(accelerator.unwrap_model(model), t.input_size, folder=run / "feature_cache",
                         memory_mb=t.feature_cache_mb)
    log = reporting.EpochLog(run / "log.csv")
    log.rows = [row for row in log.rows if row["epoch"] <= start]  # epochs logged but not saved in last/
    with StopOnInterrupt() as interrupt:
        for epoch in range(start + 1, t.epochs + 1):
            if stopper.should_stop:
                break
            began = time.time()
            row = dict(epoch=epoch, **train_one_epoch(model, train_loader, criterion, optimizer, scheduler,
                                                       accelerator, epoch, t.print_freq))
            _, val, kept = evaluate(model, val_loader, accelerator, cfg.DATASET.num_classes, class_names, cache,
                                    hd95=False, keep=t.num_overlays, desc=f"epoch {epoch} val")
            improved = stopper.update(epoch, val["dice"])
            row.update(val_dice=val["dice"], val_iou=val["iou"], best_dice=stopper.best, time_s=time.time() - began)
            if main:
                if improved and t.save_best:
                    save_checkpoint(accelerator.unwrap_model(model), run / "best", dict(epoch=epoch, val_dice=val["dice"]))
                    for k, (image, truth, pred) in enumerate(kept):
                        reporting.write_overlay(run / "overlays" / f"epoch{epoch:04d}_{k}.png", image, truth, pred)
                log.append(row)
                log.plot(run / "curves.png")
                save_last(run, model, optimizer, scheduler, accelerator, stopper, epoch, generator)
                print(f"epoch {epoch}/{t.epochs}  loss {row['train_loss']:.4f}  val Dice {val['dice']:.4f}  "
                      f"IoU {val['iou']:.4f}  best {stopper.best:.4f} (epoch {stopper.best_epoch})  "
                      f"{row['time_s']:.1f}s", flush=True)
            accelerator.wait_for_everyone()
            # Every process must agree to stop, or the others would wait for it forever.
            flag = torch.tensor(float(interrupt.requested), device=accelerator.device)
            if accelerator.reduce(flag, "sum").item() > 0:
                return False
    if main and stopper.should_stop:
        print(f"early stop: no better validation Dice for {t.patience} epochs after epoch {stopper.grace}")
    return True


def load_run(run: str | Path, which: str = "best", clipseg: str | None = None):
    """(config, model, extra) of a run folder's `which` checkpoint (best, or last)."""
    run = Path(run)
    if not (run / "config.yaml").is_file() or not (run / which / "config.json").is_file():
        raise CoTexNetError(f"{run}: not a run folder of train.py (needs config.yaml and {which}/)")
    cfg = load_config(run / "config.yaml")
    model, extra = load_checkpoint(run / which, clipseg, num_classes=cfg.DATASET.num_classes)
    return cfg, model.eval(), extra
