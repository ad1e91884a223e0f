"""The optimiser and the learning-rate schedule of a run."""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

from train_utils.config import Config


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
