"""Experiment trackers: TensorBoard's event file holds what was logged; one-line errors."""

from importlib.util import find_spec

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from common.errors import CoTexNetError
from train_utils.trackers import Trackers, check_trackers, flatten

CONFIG = {"MODEL": {"clipseg_hf_api": "tiny"}, "TRAIN": {"lr": 3e-4, "epochs": 2, "amp": True, "log_with": ["tensorboard"]}}


def test_tensorboard_event_file_holds_the_scalars_and_images(tmp_path):
    run = tmp_path / "runs" / "demo"
    picture = np.zeros((16, 32, 3), np.uint8)
    picture[:, :16] = (0, 255, 0)
    with Trackers(["TensorBoard"], run, CONFIG) as trackers:
        for epoch, loss in ((1, 0.9), (2, 0.5)):
            trackers.log(dict(train_loss=loss, lr=1e-3 / epoch, val_dice=0.1 * epoch, hd95=None, val_iou=float("nan")),
                         step=epoch)
        trackers.log_images({"overlays": [picture, picture]}, step=2)
    folder = run / "trackers" / "demo"
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    assert {"train_loss", "lr", "val_dice"} <= set(tags["scalars"])
    assert "hd95" not in tags["scalars"] and "val_iou" not in tags["scalars"]
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("train_loss")] == [(1, 0.9), (2, 0.5)]
    assert [round(e.value, 6) for e in events.Scalars("val_dice")] == [0.1, 0.2]
    assert set(tags["images"]) == {"overlays/0", "overlays/1"}
    image = events.Images("overlays/0")[0]
    assert (image.step, image.width, image.height) == (2, 32, 16)


def test_no_tracker_writes_nothing(tmp_path):
    with Trackers([], tmp_path / "run", CONFIG) as trackers:
        trackers.log({"train_loss": 1.0}, step=1)
        trackers.log_images({"overlays": [np.zeros((4, 4, 3), np.uint8)]}, step=1)
    assert not (tmp_path / "run").exists()


def test_config_is_flattened_for_hyperparameter_tables():
    assert flatten(CONFIG) == {"MODEL.clipseg_hf_api": "tiny", "TRAIN.lr": 3e-4, "TRAIN.epochs": 2, "TRAIN.amp": True,
                               "TRAIN.log_with": "['tensorboard']"}


def test_bad_tracker_lists_get_one_line():
    with pytest.raises(CoTexNetError, match=r"TRAIN.log_with: unknown tracker 'tensorbord' \(known: .*tensorboard"):
        check_trackers(["tensorbord"])
    with pytest.raises(CoTexNetError, match="not a list"):
        check_trackers("tensorboard")
    assert check_trackers(["TensorBoard", "tensorboard"]) == ["tensorboard"]


def test_a_tracker_not_installed_names_the_package():
    missing = [name for name in ("wandb", "mlflow", "comet_ml", "aim") if find_spec(name) is None]
    if not missing:
        pytest.skip("wandb, mlflow, comet_ml and aim are all installed here")
    package = {"comet_ml": "comet-ml"}.get(missing[0], missing[0])
    with pytest.raises(CoTexNetError, match=rf"tracker '{missing[0]}' is not installed \(pip install {package}\)"):
        check_trackers(["tensorboard", missing[0]])
    # reading a run's config (evaluate, predict) does not need the tracker it was trained with
    assert check_trackers([missing[0]], installed=False) == [missing[0]]
