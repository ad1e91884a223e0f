"""A run folder's last/: the weights and the training state of the last finished epoch, swapped
in whole, so that a kill while writing leaves a complete last/ or one that `recover_last`
restores, never a mix. Written by the main process only.
"""

from __future__ import annotations

import contextlib
import pickle
import shutil
from pathlib import Path

import torch

from common.atomic import atomic_path, stop_point
from common.errors import CoTexNetError

STATE_FILE = "training_state.pt"


def save_last(run: Path, model, state: dict) -> None:
    """last/: the weights of `model` (a CoTexNet) and the training `state` (`loops.Training.state_dict`).
    The state file is written last and atomically: a folder that holds it is complete."""
    tmp, last, old = run / ".last.tmp", run / "last", run / ".last.old"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, dict(epoch=state["epoch"]))
    with atomic_path(tmp / STATE_FILE) as path:
        torch.save(state, path)
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
