"""A run folder's state on disk: its exclusive creation, best/ and crash-safe last/ checkpoints,
every RNG, resuming a run exactly where its last/ left it, and loading a trained run for
evaluation or prediction.

Checkpoints are written by the main process only.
"""

from __future__ import annotations

import contextlib
import pickle
import random
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from common.atomic import atomic_path, stop_point
from common.errors import CoTexNetError
from common.output_folders import OutputFolder, claim_folder
from data_process import layout
from model.checkpoint import load_checkpoint, load_weights_into, save_checkpoint
from train_utils.config import Config, load_config
from train_utils.early_stopping import EarlyStopping

if TYPE_CHECKING:
    from train_utils.loops import Training

STATE_FILE = "training_state.pt"


def run_folder(cfg: Config) -> Path:
    """The folder of a new run, TRAIN.run_dir/TRAIN.run_name (default: <datasets>_<date-time>),
    checked before anything is written: a name that stays in TRAIN.run_dir, outside every
    dataset's images/ and masks/, and a given name free."""
    t = cfg.TRAIN
    inputs = [layout.dataset_dir(cfg.DATASET.root_dir, name) / sub for name in cfg.datasets() for sub in ("images", "masks")]
    run = OutputFolder(t.run_dir, "TRAIN.run_dir", input_folders=inputs).path(
        t.run_name or f"{'+'.join(cfg.datasets())}_{time.strftime('%Y%m%d-%H%M%S')}")
    if t.run_name and run.exists() and not run.is_dir():
        raise CoTexNetError(f"{run}: exists and is a file, not a run folder; choose another TRAIN.run_name")
    if t.run_name and run.exists() and any(run.iterdir()):
        raise CoTexNetError(f"{run}: exists and is not empty; choose another TRAIN.run_name, or --resume {run}")
    return run


def create_run(run: Path, config_yaml: str, accelerator: Accelerator, default_name: bool) -> Path:
    """Claim the run folder with its config.yaml (`common.output_folders.claim_folder`): of two runs started
    at once, with a default name the second takes <name>-2; with a given name it stops. Every
    process gets the folder the main process claimed."""
    claimed = [str(claim_folder(run, "config.yaml", config_yaml.encode("utf-8"), default_name))
               if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(claimed)
    return Path(claimed[0])


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


def save_best(run: Path, model, accelerator: Accelerator, epoch: int, scores: dict) -> None:
    """best/: the weights, with the epoch and the validation scores that made it the best."""
    save_checkpoint(accelerator.unwrap_model(model), run / "best", dict(epoch=epoch, **scores))


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
    stop_point("save_last:written")
    shutil.rmtree(old, ignore_errors=True)
    if last.exists():
        last.rename(old)
    # A kill here leaves no last/ but two complete folders: .last.tmp (this epoch) and .last.old.
    stop_point("save_last:moved")
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


def run_config(run: str | Path, checkpoint: str | None = None) -> Config:
    """The resolved config of a run folder of train.py, checked to hold `checkpoint` (best, last) if given."""
    run = Path(run)
    if not (run / "config.yaml").is_file() or checkpoint and not (run / checkpoint / "config.json").is_file():
        raise CoTexNetError(f"{run}: not a run folder of train.py (needs config.yaml"
                            + (f" and {checkpoint}/)" if checkpoint else ")"))
    return load_config(run / "config.yaml")


def _schedule_steps(state: dict, run: Path) -> int:
    """The optimiser steps a saved schedule (timm's CosineLRScheduler) spans, its warm-up included."""
    if "t_initial" not in state:
        raise CoTexNetError(f"--resume {run}: its last/ holds the learning-rate schedule of an earlier train.py (a torch "
                            "scheduler), which this version cannot continue: start a new run, or resume with that version")
    return state["t_initial"] + (state["warmup_t"] if state["warmup_prefix"] else 0)


def resume(training: Training) -> int:
    """Restore a run from its last/: weights, optimizer, schedule, grad scaler, early stopping,
    every RNG, and the log cut to the epochs last/ holds. Returns the last finished epoch,
    0 when the run has no last/ yet (killed during its first epoch: it starts over)."""
    run, accelerator = training.run, training.accelerator
    state = load_training_state(run)
    if state is None:
        if accelerator.is_main_process:
            print(f"{run}: no last/ checkpoint (stopped during its first epoch): starting over from "
                  "epoch 1 with its config.yaml")
        return 0
    built_for, now = _schedule_steps(state["scheduler"], run), _schedule_steps(training.scheduler.state_dict(), run)
    if built_for != now:
        raise CoTexNetError(f"--resume {run}: its learning-rate schedule was built for {built_for} steps, the "
                            f"training split now gives {now} ({len(training.train_loader)} per epoch); the split "
                            "changed since the run started, so the schedule would not end where it should: start a "
                            "new run (or restore the split)")
    load_weights_into(accelerator.unwrap_model(training.model), run / "last")
    training.optimizer.load_state_dict(state["optimizer"])
    training.scheduler.load_state_dict(state["scheduler"])
    if accelerator.scaler is not None and state["scaler"] is not None:
        accelerator.scaler.load_state_dict(state["scaler"])
    training.stopper.load_state_dict(state["early_stopping"])
    training.log.rows = [row for row in training.log.rows if row["epoch"] <= state["epoch"]]  # logged, not saved
    set_rng_state(state["rng"], training.generator)  # last: building the model above draws from the RNGs
    return state["epoch"]


def load_run(run: str | Path, which: str = "best", clipseg: str | None = None):
    """(config, model, extra) of a run folder's `which` checkpoint (best, or last)."""
    cfg = run_config(run, which)
    model, extra = load_checkpoint(Path(run) / which, clipseg, num_classes=cfg.DATASET.num_classes)
    return cfg, model.eval(), extra
