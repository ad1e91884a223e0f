"""The optimiser and the learning-rate schedule of a run.

Both schedules are timm's `CosineLRScheduler` (the paper's `main.py` builds one), set per
optimiser step and decaying to 0 at the end of the run; they differ only after a warm-up
(`TRAIN.warmup_epoch` > 0, a linear rise from `TRAIN.warmup_lr`):
- `warmup_cosine` (ours): the warm-up ends at `TRAIN.lr`, then a cosine spans the steps left;
- `paper`: the cosine of the whole run, read at the global step (timm's arguments of the
  paper's main.py), so the warm-up ends below `TRAIN.lr`, which the run never reaches.

The training loop calls `scheduler.step_update(t)` after the t-th optimiser step of the run:
the paper's `epoch * len(loader) + i`.
"""

from __future__ import annotations

import torch
from timm.scheduler.cosine_lr import CosineLRScheduler

from train_utils.config import Config


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]  # CLIP is frozen
    return torch.optim.AdamW(params, lr=cfg.TRAIN.lr, weight_decay=cfg.TRAIN.weight_decay)


def build_scheduler(optimizer, cfg: Config, steps_per_epoch: int) -> CosineLRScheduler:
    """The schedule of `TRAIN.lr_schedule`; `steps_per_epoch`: the optimiser steps of one epoch in
    one process, i.e. the length of the training loader after `accelerator.prepare` (with N
    processes each steps its own optimiser and schedule once per batch of the global batch)."""
    t = cfg.TRAIN
    total, warmup = t.epochs * steps_per_epoch, t.warmup_epoch * steps_per_epoch
    restart = t.lr_schedule == "warmup_cosine"  # the cosine starts at the end of the warm-up
    return CosineLRScheduler(optimizer, t_initial=total - warmup if restart else total, warmup_lr_init=t.warmup_lr,
                             warmup_t=warmup, warmup_prefix=restart, cycle_limit=1, t_in_epochs=False)

