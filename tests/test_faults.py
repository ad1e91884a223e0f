"""Faults: kill -9 of get_text.py, train.py and evaluate.py at chosen moments (named steps of
their writes too), then a rerun or --resume; trainings started together; a full disk. Nothing
finished is lost, nothing half-written passes for complete, a killed write leaves the old files
or the new ones."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from tests.text_fixtures import synthetic  # noqa: F401 (session fixture: 50 ROIs)
from tests.train_fixtures import REPO, train_setup  # noqa: F401 (session fixture)

pytestmark = pytest.mark.slow


def env() -> dict:
    """Offline, no progress bars; built at call time so that it carries conftest's network guard."""
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1")


def get_text(dataset, out, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, REPO / "get_text.py", "--dataset-name", "synthetic", "--dataset-path",
                             dataset, "--describer", "geometry", "--out", out], cwd=REPO, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **popen)


def rows(path) -> set[tuple]:
    return set(pd.read_csv(path, dtype=str, keep_default_na=False).itertuples(index=False, name=None))


def kill_after_rows(dataset, out, target: int, extra_delay: float) -> int | None:
    """Start get_text, kill -9 it once its partial CSV holds `target` rows (+ `extra_delay` s);
    returns the rows the partial file had when killed (None if it finished first)."""
    partial = out.with_name(f"{out.stem}.partial.csv")
    proc = get_text(dataset, out)
    while proc.poll() is None:
        if partial.exists() and partial.read_bytes().count(b"\n") - 1 >= target:
            time.sleep(extra_delay)
            if proc.poll() is not None:  # it finished during the delay: no kill landed
                break
            proc.send_signal(signal.SIGKILL)
            proc.communicate()
            return partial.read_bytes().count(b"\n") - 1 if partial.exists() else 0
        time.sleep(0.001)
    proc.communicate()
    return None


def test_get_text_killed_repeatedly_then_rerun_gives_the_uninterrupted_rows(synthetic, tmp_path):  # noqa: F811
    """Three rounds; in each, two kill -9 at random points of the writing (seeded), then a rerun
    to the end: the final CSV has the uninterrupted run's rows, each once, and no partial file."""
    reference = tmp_path / "reference.csv"
    assert get_text(synthetic, reference).wait(timeout=300) == 0
    total = len(rows(reference))
    assert total == 50
    rng = np.random.default_rng(7)
    killed_at = []
    for round_ in range(3):
        out = tmp_path / f"round{round_}" / "text.csv"
        for target in sorted(rng.integers(0, 45, size=2)):
            killed_at.append(kill_after_rows(synthetic, out, int(target), float(rng.uniform(0, 0.02))))
            # A kill never leaves a final CSV that only looks complete: where there is one (the kill
            # came after its atomic rename, during the exit), it holds every row.
            assert not out.exists() or rows(out) == rows(reference)
        done = get_text(synthetic, out)
        _, err = done.communicate(timeout=300)
        assert done.returncode == 0, err
        assert rows(out) == rows(reference)
        assert len(pd.read_csv(out)) == total and not list(out.parent.glob("*.partial*"))
    # the kills really landed while rows were being written (not before the start or after the end)
    assert sum(k is not None and 0 < k < total for k in killed_at) >= 3, killed_at


def test_get_text_on_a_full_disk_says_so_and_a_rerun_continues(synthetic, tmp_path):  # noqa: F811
    """A file size limit (what a full disk looks like to the writer): one line naming the file,
    exit 2, the rows written so far kept; with space again, the rerun finishes them."""
    out = tmp_path / "text.csv"

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (3000, 3000))  # Python ignores SIGXFSZ: writes fail with EFBIG

    proc = get_text(synthetic, out, preexec_fn=small_files)
    _, err = proc.communicate(timeout=300)
    partial = tmp_path / "text.partial.csv"
    assert proc.returncode == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith(f"error: {partial}: could not be written (File too large)")
    assert not out.exists()
    kept = partial.read_bytes().count(b"\n") - 1  # the header; the row cut by the failed write has no newline
    assert 0 < kept < 50
    assert get_text(synthetic, out).wait(timeout=300) == 0
    assert len(pd.read_csv(out)) == 50


def test_make_roi_on_a_full_disk_leaves_no_half_written_roi(synthetic_root, tmp_path):
    data = shutil.copytree(synthetic_root / "synthetic", tmp_path / "synthetic")
    proc = subprocess.run([sys.executable, REPO / "data_process" / "make_ROI_img.py", "--dataset-name", "synthetic",
                           "--dataset-path", data, "--workers", "1"], env=env(), capture_output=True, text=True,
                          timeout=120, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000)))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {data / 'ROIs'}/syn_0000.jpg: could not be written")
    assert not list((data / "ROIs").iterdir())  # neither the ROI nor its temporary file


def test_train_killed_mid_epoch_resumes_from_the_last_finished_epoch(train_setup, tmp_path):  # noqa: F811
    """kill -9 during epoch 2 (epoch 1 finished and saved), then --resume: the run goes on from
    epoch 2 with the same config, and the log holds each epoch once."""
    cfg = yaml.safe_load(train_setup["config"].read_text())
    cfg["TRAIN"].update(epochs=3, input_size=32, amp=False, device="cpu", cpu_threads=1, num_overlays=0,
                        run_name="killed", run_dir=str(tmp_path / "runs"))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    run = tmp_path / "runs" / "killed"
    stderr = tmp_path / "train.stderr"
    with open(stderr, "w") as err:
        proc = subprocess.Popen([sys.executable, "train.py", "--config", tmp_path / "config.yaml"], cwd=REPO,
                                env={k: v for k, v in env().items() if k != "TQDM_DISABLE"}, stdout=subprocess.PIPE, stderr=err, text=True)
        deadline = time.time() + 240
        # the bar of epoch 2 shows that epoch 1 is finished, saved and logged
        while "epoch 2 train" not in stderr.read_text() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, stderr.read_text()[-3000:]
    config_before = (run / "config.yaml").read_text()
    log_before = pd.read_csv(run / "log.csv")
    finished = len(log_before)  # 1, or 2 on a machine fast enough to finish epoch 2 within the poll
    assert list(log_before["epoch"]) == list(range(1, finished + 1)) and finished < 3
    assert not (run / "metrics.json").exists()

    resumed = subprocess.run([sys.executable, "train.py", "--resume", run], cwd=REPO, env=env(), capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (run / "config.yaml").read_text() == config_before
    log = pd.read_csv(run / "log.csv")
    assert list(log["epoch"]) == [1, 2, 3]
    pd.testing.assert_frame_equal(log.iloc[:finished], log_before)  # finished epochs were not trained again
    assert f"epoch {finished}/3" not in resumed.stdout and f"epoch {finished + 1}/3" in resumed.stdout
    assert (run / "metrics.json").is_file()


# ---------------------------------------------------------------- kills at named steps, and runs at once

def tiny_config(train_setup, tmp_path, **changes) -> Path:  # noqa: F811
    cfg = yaml.safe_load(train_setup["config"].read_text())
    cfg["TRAIN"].update(dict(epochs=3, input_size=32, amp=False, device="cpu", cpu_threads=1, num_overlays=0,
                             run_dir=str(tmp_path / "runs")), **changes)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path / "config.yaml"


def train(*args, **extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *map(str, args)], cwd=REPO, env=dict(env(), **extra),
                          capture_output=True, text=True, timeout=600)


def test_train_killed_inside_save_last_resumes_from_the_newest_whole_epoch(train_setup, tmp_path):  # noqa: F811
    """kill -9 after last/'s new state is written (epoch 1), then, resumed, between moving the
    old last/ away and putting the new one in place (epoch 2): each resume starts after the
    newest whole epoch, and the log holds each epoch once."""
    config, run = tiny_config(train_setup, tmp_path, run_name="steps"), tmp_path / "runs" / "steps"
    first = train("--config", config, COTEXNET_KILL_AT="save_last:written")
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    assert not (run / "last").exists() and (run / ".last.tmp" / "training_state.pt").is_file()
    assert list(pd.read_csv(run / "log.csv")["epoch"]) == [1]
    second = train("--resume", run, COTEXNET_KILL_AT="save_last:moved")
    assert second.returncode == -signal.SIGKILL, second.stderr[-2000:]
    assert list(pd.read_csv(run / "log.csv")["epoch"]) == [1, 2]  # epoch 1 was not trained again
    assert not (run / "last").exists() and {p.name for p in run.glob(".last.*")} == {".last.tmp", ".last.old"}
    third = train("--resume", run)
    assert third.returncode == 0, third.stderr[-2000:]
    assert "epoch 3/3" in third.stdout and "epoch 2/3" not in third.stdout  # from the newest whole epoch, 2
    assert list(pd.read_csv(run / "log.csv")["epoch"]) == [1, 2, 3] and not list(run.glob(".last.*"))


def test_trainings_started_together_with_default_names_get_a_folder_each(train_setup, tmp_path):  # noqa: F811
    config = tiny_config(train_setup, tmp_path, epochs=1, run_name="")
    runs = [subprocess.Popen([sys.executable, "train.py", "--config", config], cwd=REPO, env=env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [run.communicate(timeout=600) for run in runs]
    assert all(run.returncode == 0 for run in runs), [err[-2000:] for _, err in results]
    folders = sorted((tmp_path / "runs").iterdir())
    assert len(folders) == 2, folders
    for folder in folders:  # each its own run: one config, one epoch logged, its own test figures
        assert list(pd.read_csv(folder / "log.csv")["epoch"]) == [1]
        assert (folder / "metrics.json").is_file() and (folder / "config.yaml").read_text() == folders[0].joinpath(
            "config.yaml").read_text()


@pytest.fixture(scope="module")
def untrained_run(train_setup, tmp_path_factory):  # noqa: F811
    """A run folder with an untrained best/ checkpoint of the tiny model, and a test split of 18
    synthetic images: enough batches of 2 to be stopped among."""
    from data_process.make_synthetic import make_synthetic
    from model.CoTexNet import CoTexNet

    top = tmp_path_factory.mktemp("eval")
    names = sorted(p.name for p in (make_synthetic(top / "data", count=22, seed=5) / "images").iterdir())
    for split, chunk in (("train", names[:2]), ("val", names[2:4]), ("test", names[4:])):
        pd.DataFrame(dict(dataset="synthetic", img_name=chunk, mask_name=chunk)).to_csv(top / f"{split}_data.csv",
                                                                                      index=False)
    cfg = yaml.safe_load(train_setup["config"].read_text())
    cfg["DATASET"].update(root_dir=str(top / "data"), split_dir=str(top))
    cfg["TRAIN"].update(input_size=32, batch_size=2, amp=False, device="cpu", cpu_threads=1, num_workers=0)
    CoTexNet.from_clipseg(cfg["MODEL"]["clipseg_hf_api"]).save_pretrained(top / "run" / "best", {"epoch": 1})
    (top / "run" / "config.yaml").write_text(yaml.safe_dump(cfg))
    return top / "run"


def evaluate(run, **extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "evaluate.py", "--run", run, "--overlays", "1"], cwd=REPO,
                            env=dict(env(), **extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def an_earlier_evaluation(out) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    (out / "masks").mkdir(parents=True)
    (out / "masks" / "earlier.png").write_bytes(b"an earlier evaluation's mask")
    (out / "metrics.json").write_text('{"earlier": true}')
    return {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}


def a_whole_new_evaluation(out) -> bool:
    metrics = json.loads((out / "metrics.json").read_text())
    masks = sorted(p.name for p in (out / "masks").iterdir())
    return metrics.get("images") == 18 and len(masks) == 18 and len(pd.read_csv(out / "per_image.csv")) == 18


def test_evaluate_stopped_anywhere_leaves_the_earlier_evaluation_or_the_new(untrained_run):
    out = untrained_run / "eval_test"
    for stop, new in (("eval_test:staged", False), ("eval_test:replaced", True), ("SIGTERM", False)):
        earlier = an_earlier_evaluation(out)
        left = set(untrained_run.glob(".eval_test.*.tmp"))  # by the kill after the swap: removed by the next run
        proc = evaluate(untrained_run, **({"COTEXNET_KILL_AT": stop} if stop != "SIGTERM" else {}))
        if stop == "SIGTERM":  # once it writes its outputs
            deadline = time.monotonic() + 300
            while not [p for p in untrained_run.glob(".eval_test.*.tmp/masks/*.png") if p.parents[1] not in left] \
                    and proc.poll() is None:
                assert time.monotonic() < deadline
                time.sleep(0.005)
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == (130 if stop == "SIGTERM" else -signal.SIGKILL), err[-2000:]
        if new:
            assert a_whole_new_evaluation(out), stop
        else:
            assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == earlier, stop
        if stop == "SIGTERM":
            assert not list(untrained_run.glob(".eval_test.*.tmp"))  # its hidden folder went with it
    rerun = evaluate(untrained_run)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err[-2000:]
    assert a_whole_new_evaluation(out) and not list(untrained_run.glob(".eval_test.*.tmp"))
