"""A run folder: a new one named and claimed; an existing one read back (its config, its trained
model) and pointed at the dataset and split to evaluate.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from common.errors import CoTexNetError
from common.output_folders import OutputFolder, claim_folder
from data_process import layout
from model.checkpoint import read_extra
from model.CoTexNet import CoTexNet
from train_utils.config import Config, load_config


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
    """Claim the run folder with its config.yaml (`common.io.claim_folder`): of two runs started
    at once, with a default name the second takes <name>-2; with a given name it stops. Every
    process gets the folder the main process claimed."""
    claimed = [str(claim_folder(run, "config.yaml", config_yaml.encode("utf-8"), default_name))
               if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(claimed)
    return Path(claimed[0])


def run_config(run: str | Path, checkpoint: str | None = None) -> Config:
    """The resolved config of a run folder of train.py, checked to hold `checkpoint` (best, last) if given."""
    run = Path(run)
    if not (run / "config.yaml").is_file() or checkpoint and not (run / checkpoint / "config.json").is_file():
        raise CoTexNetError(f"{run}: not a run folder of train.py (needs config.yaml"
                            + (f" and {checkpoint}/)" if checkpoint else ")"))
    return load_config(run / "config.yaml")


def load_run(run: str | Path, which: str = "best", clipseg: str | None = None):
    """(config, model, extra) of a run folder's `which` checkpoint (best, or last)."""
    cfg = run_config(run, which)
    model = CoTexNet.from_pretrained(Path(run) / which, clipseg, num_classes=cfg.DATASET.num_classes)
    return cfg, model.eval(), read_extra(Path(run) / which)


def evaluation_target(cfg: Config, run, predicted: int, split: str, dataset: str | None = None, root: str | None = None,
                      split_dir: str | None = None, allow_split_overlap: bool = False) -> tuple[Config, str]:
    """(the config of `run` pointed at the dataset to evaluate, the name of its evaluation folder).

    The run's own dataset keeps the folder eval_<split>; another one, or one of a run trained on
    several, is named: eval_<dataset>_<split>. Another dataset needs no text, must have the
    classes the run `predicted`s, and the run's keyword does not stand for it."""
    own = cfg.datasets()
    name = dataset or own[0]
    if dataset is None and len(own) > 1:
        raise CoTexNetError(f"--dataset: {run} was trained on {', '.join(own)}; name the one to evaluate")
    d, ours = cfg.DATASET, name in own
    target = dataclasses.replace(cfg, DATASET=dataclasses.replace(
        d, dataset_name=name, text_csv="", keyword=d.keyword if ours else None, num_classes=d.num_classes if ours else None,
        root_dir=root or d.root_dir, split_dir=split_dir or d.split_dir, augmented=False,
        allow_split_overlap=d.allow_split_overlap or allow_split_overlap))
    if not ours:
        target.check_num_classes(predicted)
    return target, f"eval_{split}" if own == [name] else f"eval_{name}_{split}"
