"""Experiment trackers (TensorBoard, W&B, MLflow, ... : any tracker accelerate knows), for `fit`.

`Trackers(names, run, config)` starts accelerate's tracker classes on the main process only
(every other process, and an empty list, get a tracker that does nothing), stores the resolved
config, and then takes per-epoch scalars (`log`), overlay pictures where the tracker takes
images (`log_images`) and `end()`. Files go under `<run>/trackers/` (TensorBoard:
`<run>/trackers/<run name>/`); a service such as W&B is contacted only when it is named.
"""

from __future__ import annotations

import math
from importlib.util import find_spec
from pathlib import Path

import numpy as np
from accelerate import PartialState
from accelerate.tracking import LOGGER_TYPE_TO_CLASS

from common.errors import CoTexNetError

# pip names that differ from the tracker's (module) name.
PACKAGES = {"comet_ml": "comet-ml"}
# The project of services that group runs (W&B, MLflow); the run is named after its folder.
PROJECT = "cotexnet"


def check_trackers(names, key: str = "TRAIN.log_with", installed: bool = True) -> list[str]:
    """The tracker names, lower case, checked: known to accelerate and, with `installed`, installed
    here (else one line). A config is read without the second check: evaluating a run trained with
    W&B needs no W&B."""
    if isinstance(names, str) or not isinstance(names, list | tuple):
        raise CoTexNetError(f"{key}: {names!r} is not a list (e.g. [tensorboard])")
    checked = []
    for name in names:
        name = str(name).lower()
        if name not in LOGGER_TYPE_TO_CLASS:
            raise CoTexNetError(f"{key}: unknown tracker {name!r} (known: {', '.join(sorted(LOGGER_TYPE_TO_CLASS))})")
        if installed and find_spec(name) is None:
            raise CoTexNetError(f"{key}: tracker {name!r} is not installed (pip install {PACKAGES.get(name, name)})")
        checked.append(name)
    return list(dict.fromkeys(checked))


def flatten(config: dict, prefix: str = "") -> dict:
    """{"TRAIN": {"lr": 3e-4}} -> {"TRAIN.lr": 3e-4}; lists and other values as text (what
    every tracker's hyperparameter table takes)."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value if value is None or isinstance(value, bool | int | float | str) else str(value)
    return flat


class Trackers:
    """The trackers of one run. `names` as `check_trackers` takes them; `config`: the resolved config."""

    def __init__(self, names, run: str | Path, config: dict):
        names = check_trackers(names)
        run = Path(run)
        self.trackers = []
        if not names or not PartialState().is_main_process:
            return
        logging_dir = run / "trackers"
        for name in names:
            cls = LOGGER_TYPE_TO_CLASS[name]
            # As accelerate's init_trackers builds them; W&B's local files and MLflow's
            # artifacts stay in the run folder.
            if cls.requires_logging_directory:
                tracker = cls(run.name, logging_dir)
            elif name == "wandb":
                tracker = cls(PROJECT, name=run.name, dir=str(logging_dir))
            elif name == "mlflow":
                tracker = cls(PROJECT, logging_dir=str(logging_dir / "mlflow"), run_name=run.name)
            else:
                tracker = cls(run.name)
            tracker.start()
            tracker.store_init_configuration(flatten(config))
            self.trackers.append(tracker)

    def log(self, values: dict, step: int) -> None:
        """Scalars (losses, lr, validation metrics) of one epoch; None and NaN are left out."""
        values = {k: float(v) for k, v in values.items()
                  if isinstance(v, int | float | np.number) and not isinstance(v, bool) and not math.isnan(v)}
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def log_images(self, images: dict[str, list[np.ndarray]], step: int) -> None:
        """Pictures (HxWx3 uint8 RGB) to the trackers that take images."""
        for tracker in self.trackers:
            if tracker.name == "tensorboard":
                for key, pictures in images.items():
                    for k, picture in enumerate(pictures):
                        tracker.tracker.add_image(f"{key}/{k}", picture, global_step=step, dataformats="HWC")
                tracker.tracker.flush()
            elif hasattr(tracker, "log_images"):
                tracker.log_images(images, step=step)

    def end(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, *exc) -> None:
        self.end()
