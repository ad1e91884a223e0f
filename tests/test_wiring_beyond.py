"""The beyond-the-paper features through the scripts, on the tiny model and 12 synthetic images:
TRAIN.log_with=[tensorboard] in train.py, and --readout (the concept readout) in evaluate.py
and predict.py. Training runs as a subprocess; evaluate/predict call `main` in-process, as in
test_train_scripts.py (same default TRAIN.amp)."""

import json
import shutil

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import evaluate
import predict
import train
from tests.train_fixtures import run_script, train_setup  # noqa: F401
from train_utils import loops
from train_utils.concept_readout import CSV_COLUMNS, DICTIONARY

pytestmark = pytest.mark.slow

LOGGED = ("train_loss", "train_seg", "train_kl", "lr", "val_dice", "val_iou", "best_dice", "time_s")


@pytest.fixture(scope="module")
def tracked_run(train_setup):  # noqa: F811
    run_script("train.py", "--config", train_setup["config"], "TRAIN.run_name=tracked", "TRAIN.epochs=2",
               "TRAIN.log_with=[tensorboard]")
    return train_setup["runs"] / "tracked"


def test_tensorboard_event_file_holds_each_epochs_log_row(tracked_run):
    log = pd.read_csv(tracked_run / "log.csv")
    events = EventAccumulator(str(tracked_run / "trackers" / "tracked"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    assert set(LOGGED) <= set(events.Tags()["scalars"])
    for key in LOGGED:
        logged = events.Scalars(key)
        assert [e.step for e in logged] == log["epoch"].tolist()
        assert [e.value for e in logged] == pytest.approx(log[key].tolist(), rel=1e-6)
    # Epoch 1 always improves on nothing: its overlays (image | truth | prediction) are logged.
    overlays = [tag for tag in events.Tags()["images"] if tag.startswith("overlays/")]
    assert len(overlays) == 2 and events.Images(overlays[0])[0].step == 1
    config = yaml.safe_load(next((tracked_run / "trackers" / "tracked").rglob("hparams.yml")).read_text())
    assert config["TRAIN.epochs"] == 2 and config["TRAIN.log_with"] == "['tensorboard']"
    assert yaml.safe_load((tracked_run / "config.yaml").read_text())["TRAIN"]["log_with"] == ["tensorboard"]


def test_trackers_end_however_fit_ends(train_setup, monkeypatch):  # noqa: F811
    """A second Ctrl-C (KeyboardInterrupt) in the middle of an epoch still closes the trackers."""
    ended = []

    class Recorded(loops.Trackers):
        def end(self):
            ended.append([tracker.name for tracker in self.trackers])
            super().end()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loops, "Trackers", Recorded)
    monkeypatch.setattr(loops, "train_one_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train.main(["--config", str(train_setup["config"]), "TRAIN.run_name=tracked_stop",
                    "TRAIN.log_with=[tensorboard]"])
    assert ended == [["tensorboard"]]
    assert next((train_setup["runs"] / "tracked_stop" / "trackers").rglob("hparams.yml"))


def _moved_masks(root, work):
    """A copy of the synthetic dataset whose true masks are one square in a corner instead."""
    alt = work / "moved_masks"
    shutil.copytree(root / "synthetic", alt / "synthetic")
    for path in (alt / "synthetic" / "masks").iterdir():
        h, w = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE).shape
        mask = np.zeros((h, w), np.uint8)
        mask[: h // 4, : w // 4] = 255
        cv2.imwrite(str(path), mask)
    return alt


def test_evaluate_readout_uses_no_ground_truth_and_reports_agreement(tracked_run, train_setup, capsys):  # noqa: F811
    evaluate.main(["--run", str(tracked_run), "--split", "all", "--readout", "--overlays", "0"])
    out = tracked_run / "eval_all"
    concept = pd.read_csv(out / "concept.csv", keep_default_na=False)
    assert tuple(concept.columns) == CSV_COLUMNS
    assert sorted(concept["name"]) == train_setup["names"]
    metrics = json.loads((out / "metrics.json").read_text())
    figures = metrics["concept"]
    assert figures["images"] + figures["no_region"] == 12
    for key, words in DICTIONARY.items():
        assert figures[key]["chance"] == pytest.approx(1 / len(words))
        assert 0 <= figures[key]["agreement"] <= 1 and 0 < figures[key]["majority"] <= 1
    printed = capsys.readouterr().out
    assert "concept readout vs the geometry describer on the true masks" in printed
    assert f"{'number':<10}{figures['number']['agreement']:>11.2f}" in printed

    # Other true masks: other metrics, the same readout.
    alt = _moved_masks(train_setup["root"], train_setup["work"])
    evaluate.main(["--run", str(tracked_run), "--split", "all", "--readout", "--overlays", "0", "--root", str(alt),
                   "--out", str(train_setup["work"] / "eval_moved")])
    moved = train_setup["work"] / "eval_moved"
    assert not pd.read_csv(moved / "per_image.csv")["dice"].equals(pd.read_csv(out / "per_image.csv")["dice"])
    assert json.loads((moved / "metrics.json").read_text())["concept"] != figures
    pd.testing.assert_frame_equal(pd.read_csv(moved / "concept.csv", keep_default_na=False), concept)


def test_predict_readout_writes_the_same_readout(tracked_run, train_setup, tmp_path):  # noqa: F811
    predict.main(["--run", str(tracked_run), "--input", str(train_setup["root"] / "synthetic" / "images"),
                  "--output", str(tmp_path / "pred"), "--readout"])
    concept = pd.read_csv(tmp_path / "pred" / "concept.csv", keep_default_na=False)
    assert tuple(concept.columns) == CSV_COLUMNS and concept["name"].tolist() == train_setup["names"]
    evaluated = tracked_run / "eval_all" / "concept.csv"
    if not evaluated.exists():
        evaluate.main(["--run", str(tracked_run), "--split", "all", "--readout", "--overlays", "0"])
    # No mask was read, yet the same sentences as evaluate.py (same batches of the same images).
    expected = pd.read_csv(evaluated, keep_default_na=False).sort_values("name", ignore_index=True)
    assert concept["sentence"].tolist() == expected["sentence"].tolist()
