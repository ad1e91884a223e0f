"""train.py, evaluate.py and predict.py end to end on the tiny model and 12 synthetic images:
outputs, resume, bad input, and a 2-process run. Training runs as a user runs it (a subprocess);
evaluate/predict and the error paths call the scripts' `main` in-process (the same code path
minus ~10 s of imports per call on 2 cores)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from safetensors.torch import load_file

import evaluate
import predict
import train
from common.errors import CoTexNetError
from tests.train_fixtures import REPO, run_script, train_setup  # noqa: F401

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained_run(train_setup):  # noqa: F811
    """One uninterrupted 3-epoch run, shared by the tests that read its folder."""
    result = run_script("train.py", "--config", train_setup["config"], "TRAIN.run_name=full")
    return train_setup["runs"] / "full", result


def test_train_writes_the_run_folder(trained_run):
    run, result = trained_run
    for name in ("config.yaml", "log.csv", "curves.png", "metrics.json", "test_per_image.csv",
                 "best/model.safetensors", "best/config.json", "last/model.safetensors", "last/training_state.pt"):
        assert (run / name).is_file(), name
    log = pd.read_csv(run / "log.csv")
    assert list(log["epoch"]) == [1, 2, 3]
    assert {"train_loss", "train_seg", "train_kl", "lr", "val_dice", "val_iou", "time_s"} <= set(log.columns)
    assert list((run / "overlays").glob("epoch0001_*.png"))  # the first epoch is always a best
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test"]["images"] == 2 and metrics["val"]["images"] == 2
    assert len(pd.read_csv(run / "test_per_image.csv")) == 2
    assert "test" in result.stdout and "dice" in result.stdout and str(run) in result.stdout


def test_existing_run_folder_is_not_overwritten(trained_run, train_setup):  # noqa: F811
    with pytest.raises(CoTexNetError, match="exists and is not empty.*--resume"):
        train.main(["--config", str(train_setup["config"]), "TRAIN.run_name=full"])


def test_config_typo_names_the_key(train_setup):  # noqa: F811
    with pytest.raises(CoTexNetError, match=r"unknown config key 'TRAIN.epoch'.*did you mean TRAIN.epochs"):
        train.main(["--config", str(train_setup["config"]), "TRAIN.epoch=5"])


def test_evaluate_at_original_resolution(trained_run, train_setup, capsys):  # noqa: F811
    run, _ = trained_run
    evaluate.main(["--run", str(run), "--split", "test", "--overlays", "1"])
    out = run / "eval_test"
    rows = pd.read_csv(out / "per_image.csv")
    assert sorted(rows["name"]) == train_setup["names"][10:]
    for name in rows["name"]:
        mask = cv2.imread(str(out / "masks" / name.replace(".jpg", ".png")), cv2.IMREAD_UNCHANGED)
        image = cv2.imread(str(train_setup["root"] / "synthetic" / "images" / name))
        assert mask.shape == image.shape[:2]  # the original size, not the 64x64 input
        assert set(np.unique(mask)) <= {0, 255}
    assert len(list((out / "overlays").glob("*.png"))) == 1
    assert json.loads((out / "metrics.json").read_text())["resolution"] == "original"
    assert "test" in capsys.readouterr().out


def test_predict_new_images_lists_unreadable_ones(trained_run, train_setup, tmp_path, capsys):  # noqa: F811
    run, _ = trained_run
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in train_setup["names"][:3]:
        shutil.copy(train_setup["root"] / "synthetic" / "images" / name, inputs / name)
    (inputs / "broken.png").write_bytes(b"not an image")
    (inputs / "notes.txt").write_text("ignored: not an image suffix")
    predict.main(["--run", str(run), "--input", str(inputs), "--output", str(tmp_path / "out"), "--overlay",
                  "--batch-size", "2"])
    out = capsys.readouterr().out
    assert "broken.png" in out and "3 mask(s) written" in out
    for name in train_setup["names"][:3]:
        mask = cv2.imread(str(tmp_path / "out" / name.replace(".jpg", ".png")), cv2.IMREAD_UNCHANGED)
        assert mask.shape == cv2.imread(str(inputs / name)).shape[:2]
        assert (tmp_path / "out" / "overlays" / name.replace(".jpg", ".png")).is_file()
    assert "broken.png" in (tmp_path / "out" / "unreadable.txt").read_text()
    with pytest.raises(CoTexNetError, match="inside the input folder"):
        predict.main(["--run", str(run), "--input", str(inputs), "--output", str(inputs / "masks")])
    with pytest.raises(CoTexNetError, match="not a run folder"):
        predict.main(["--run", str(tmp_path), "--input", str(inputs), "--output", str(tmp_path / "o2")])


def stop_in_first_epoch(train_setup, run_name: str, signum) -> tuple[Path, int, str, str]:  # noqa: F811
    """train.py in a subprocess, sent `signum` once epoch 1 is training: (run folder, exit code, stdout, stderr)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    stderr = train_setup["work"] / f"{run_name}.stderr"
    with open(stderr, "w") as err:
        proc = subprocess.Popen([sys.executable, "train.py", "--config", str(train_setup["config"]),
                                 f"TRAIN.run_name={run_name}"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=err, text=True)
        deadline = time.time() + 240
        while "epoch 1 train" not in stderr.read_text() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)  # the progress bar's title: the stop handler is installed
        proc.send_signal(signum)
        out, _ = proc.communicate(timeout=240)
    return train_setup["runs"] / run_name, proc.returncode, out, stderr.read_text()


def test_resume_after_ctrl_c_reaches_the_same_weights(trained_run, train_setup):  # noqa: F811
    """Ctrl-C during epoch 1 finishes that epoch and saves last/; --resume then runs the rest.
    Exact: the optimizer, schedule, every RNG and the loader's shuffle generator are restored."""
    full, _ = trained_run
    run, returncode, out, err = stop_in_first_epoch(train_setup, "interrupted", signal.SIGINT)
    assert returncode == 130, out + err
    assert "--resume" in out
    assert len(pd.read_csv(run / "log.csv")) < 3  # stopped early: there is something left to resume
    run_script("train.py", "--resume", run)
    for folder in ("last", "best"):
        a, b = load_file(full / folder / "model.safetensors"), load_file(run / folder / "model.safetensors")
        assert a.keys() == b.keys()
        assert all((a[k] == b[k]).all() for k in a), folder
    columns = ["epoch", "train_loss", "val_dice", "lr"]
    pd.testing.assert_frame_equal(pd.read_csv(full / "log.csv")[columns], pd.read_csv(run / "log.csv")[columns])


def test_sigterm_saves_last_and_exits_130(train_setup):  # noqa: F811
    """SIGTERM (a scheduler's stop) is a Ctrl-C: the epoch finishes, last/ is saved, exit 130."""
    run, returncode, out, err = stop_in_first_epoch(train_setup, "terminated", signal.SIGTERM)
    assert returncode == 130, out + err
    assert "SIGTERM: finishing this epoch" in out and f"--resume {run}" in out
    assert (run / "last" / "training_state.pt").is_file() and not (run / "metrics.json").exists()
    assert "Traceback" not in err


def test_a_second_stop_request_quits_at_once():
    from train_utils.loops import StopOnRequest

    before = signal.getsignal(signal.SIGTERM)
    with StopOnRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)  # the handler runs in the main thread at its next bytecode
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
    assert signal.getsignal(signal.SIGTERM) is before


def test_labels_at_gives_each_image_its_own_size():
    import torch
    import torch.nn.functional as F

    from model.CoTexNet import predict_labels
    from train_utils.evaluation import logits_at

    def labels_at(logits, sizes):
        return [predict_labels(one[None])[0] for one in logits_at(logits, sizes)]

    logits = torch.randn(2, 1, 8, 8)
    small, large = labels_at(logits, [(8, 8), (20, 12)])
    assert small.equal((logits[0, 0] > 0).long())  # at its own size: no resampling
    resized = F.interpolate(logits[1:], size=(20, 12), mode="bilinear", align_corners=False)
    assert large.shape == (20, 12) and large.equal((resized[0, 0] > 0).long())
    three = labels_at(torch.randn(1, 3, 4, 4), [(6, 5)])[0]
    assert three.shape == (6, 5) and set(three.unique().tolist()) <= {0, 1, 2}


def test_resume_of_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(CoTexNetError, match="not a run folder"):
        train.main(["--resume", str(tmp_path)])


def test_train_data_ratio_takes_a_seeded_subset(train_setup):  # noqa: F811
    from train_utils import data
    from train_utils.config import load_config

    cfg = load_config(train_setup["config"], ["TRAIN.train_data_ratio=0.5"])
    half = data.split_frame(cfg, "train")
    assert len(half) == 4 and set(half["img_name"]) < set(train_setup["names"][:8])
    assert half.equals(data.split_frame(cfg, "train"))  # the same subset every time (and on every process)
    assert len(data.split_frame(cfg, "val")) == 2  # validation is never subsampled


def test_two_process_accelerate_run(train_setup):  # noqa: F811
    """DDP on 2 CPU processes: every val/test image counted once, one set of checkpoints."""
    port = 29500 + os.getpid() % 1000
    result = run_script("-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu", "--num_machines", "1",
                        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port,
                        "train.py", "--config", train_setup["config"], "TRAIN.run_name=ddp", "TRAIN.epochs=2",
                        "TRAIN.cpu_threads=1")
    run = train_setup["runs"] / "ddp"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["val"]["images"] == 2 and metrics["test"]["images"] == 2
    assert sorted(pd.read_csv(run / "test_per_image.csv")["name"]) == train_setup["names"][10:]
    assert list(pd.read_csv(run / "log.csv")["epoch"]) == [1, 2]
    assert result.stdout.count("best epoch") == 1  # printed by the main process only


def test_multiclass_run_reports_each_class(train_setup, tmp_path, capsys):  # noqa: F811
    """One epoch on the 3-class synthetic set (in-process): softmax head, per-class metrics."""
    import yaml

    from data_process.layout import roi_name
    from data_process.registry import get_spec

    root = train_setup["root"]
    spec = get_spec("synthetic_multiclass")
    names = sorted(p.name for p in (root / "synthetic_multiclass" / "images").iterdir())
    masks = sorted(p.name for p in (root / "synthetic_multiclass" / "masks").iterdir())
    for split, part in (("train", slice(0, 4)), ("val", slice(4, 6)), ("test", slice(6, 8))):
        pd.DataFrame(dict(dataset="synthetic_multiclass", img_name=names[part], mask_name=masks[part])).to_csv(
            tmp_path / f"{split}_data.csv", index=False)
    rois = [roi_name(os.path.splitext(n)[0], c) for n in names for c in spec.categories]
    pd.DataFrame(dict(roi_name=rois, text="{}", text_prompt="1 round small area, located in the center of the image.")
                 ).to_csv(tmp_path / "text.csv", index=False)
    config = yaml.safe_load(train_setup["config"].read_text())
    config["DATASET"].update(dataset_name="synthetic_multiclass", num_classes=len(spec.categories) + 1,
                             split_dir=str(tmp_path), text_csv=str(tmp_path / "text.csv"))
    config["TRAIN"].update(epochs=1, run_dir=str(tmp_path / "runs"), run_name="mc")
    (tmp_path / "mc.yaml").write_text(yaml.safe_dump(config))
    train.main(["--config", str(tmp_path / "mc.yaml")])
    metrics = json.loads((tmp_path / "runs" / "mc" / "metrics.json").read_text())
    for category in spec.categories:
        assert f"dice_{category}" in metrics["test"]
    assert "test" in capsys.readouterr().out


def test_save_last_survives_a_kill_between_its_renames(train_setup, tmp_path, monkeypatch):  # noqa: F811
    """save_last moves last/ to .last.old, then .last.tmp to last/: a kill between the two leaves
    no last/; --resume must still find the newest complete state (and never a half-written one)."""
    import torch
    from accelerate import Accelerator

    from model.checkpoint import read_extra
    from model.CoTexNet import CoTexNet
    from train_utils import run_state
    from train_utils.config import load_config
    from train_utils.loops import Training
    from train_utils.optim import build_optimizer, build_scheduler

    cfg = load_config(train_setup["config"])
    model = CoTexNet.from_clipseg(train_setup["work"] / "tiny_clipseg")
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, 2)
    run = tmp_path / "run"
    training = Training(cfg, run, Accelerator(cpu=True), model, None, optimizer, scheduler, [], [], torch.Generator())

    def state(epoch: int) -> dict:
        training.epoch = epoch
        return training.state_dict()

    run_state.save_last(run, model, state(1))
    rename = Path.rename

    def killed_before_the_second_rename(self, target):
        if self.name == ".last.tmp":
            raise KeyboardInterrupt
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", killed_before_the_second_rename)
    with pytest.raises(KeyboardInterrupt):
        run_state.save_last(run, model, state(2))
    monkeypatch.undo()
    assert not (run / "last").exists() and (run / ".last.tmp").is_dir() and (run / ".last.old").is_dir()
    assert run_state.load_training_state(run)["epoch"] == 2  # the newer complete folder wins
    assert read_extra(run / "last")["epoch"] == 2
    assert sorted(p.name for p in run.iterdir()) == ["last"]

    # Killed while writing .last.tmp (no state file yet) right after the first rename: .last.old it is.
    (run / "last").rename(run / ".last.old")
    (run / ".last.tmp").mkdir()
    (run / ".last.tmp" / "model.safetensors").write_bytes(b"half")
    assert run_state.load_training_state(run)["epoch"] == 2 and sorted(p.name for p in run.iterdir()) == ["last"]

    state = run / "last" / run_state.STATE_FILE
    state.write_bytes(state.read_bytes()[:1000])
    with pytest.raises(CoTexNetError, match=r"last/training_state.pt: truncated or corrupt"):
        run_state.load_training_state(run)


def test_resume_of_a_run_killed_in_its_first_epoch(train_setup, tmp_path, capsys):  # noqa: F811
    """Killed before any last/ exists, a run folder holds only config.yaml: a fresh run refuses
    the folder, so --resume starts it over from epoch 1 with that config."""
    from train_utils.config import load_config

    run = tmp_path / "killed"
    run.mkdir()
    cfg = load_config(train_setup["config"], ["TRAIN.epochs=1", "TRAIN.num_overlays=0", f"TRAIN.run_dir={tmp_path}",
                                              "TRAIN.run_name=killed"])
    (run / "config.yaml").write_text(cfg.to_yaml())
    train.main(["--resume", str(run)])
    assert "starting over from epoch 1" in capsys.readouterr().out
    assert list(pd.read_csv(run / "log.csv")["epoch"]) == [1]
    assert (run / "last" / "training_state.pt").is_file() and (run / "metrics.json").is_file()


def test_resume_refuses_a_training_split_that_grew(train_setup, tmp_path):  # noqa: F811
    """The cosine schedule spans epochs x steps of the split the run started with: a resumed run on
    a larger split would run its lr past the end of the schedule."""
    splits, data = tmp_path / "splits", tmp_path / "data" / "synthetic"
    shutil.copytree(train_setup["work"], splits, ignore=shutil.ignore_patterns("runs", "tiny_clipseg"))
    shutil.copytree(train_setup["root"] / "synthetic", data)
    extra = [f"extra_{n}" for n in train_setup["names"][:4]]  # 8 -> 12 images: 3 steps of 4; never in val or test
    for name, source in zip(extra, train_setup["names"], strict=False):
        for sub in ("images", "masks"):
            shutil.copy(data / sub / source, data / sub / name)
    text = pd.read_csv(splits / "text.csv")
    pd.concat([text, text.iloc[:4].assign(roi_name=extra)]).to_csv(splits / "text.csv", index=False)
    overrides = [f"DATASET.split_dir={splits}", f"DATASET.root_dir={data.parent}", f"DATASET.text_csv={splits / 'text.csv'}",
                 f"TRAIN.run_dir={tmp_path}", "TRAIN.run_name=grow", "TRAIN.epochs=2", "TRAIN.num_overlays=0"]
    run_script("train.py", "--config", train_setup["config"], *overrides)
    train_csv = splits / "train_data.csv"
    table = pd.read_csv(train_csv)
    pd.concat([table, pd.DataFrame(dict(dataset="synthetic", img_name=extra, mask_name=extra))]).to_csv(train_csv,
                                                                                                     index=False)
    result = run_script("train.py", "--resume", tmp_path / "grow", check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: --resume {tmp_path / 'grow'}: its learning-rate schedule was built for 4 steps, the training split "
        "now gives 6 (3 per epoch); the split changed since the run started, so the schedule would not end where it "
        "should: start a new run (or restore the split)")
