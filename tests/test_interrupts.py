"""SIGTERM (kill, a job scheduler) stops make_ROI_img.py and get_text.py as Ctrl-C does: exit 130,
"interrupted", no half-written file under any name, and the rerun finishes with what a run
that was never stopped writes. SIGTERM or kill -9 during an --overwrite leaves each ROI, and the
text CSV, old or new. Real subprocesses, signalled while they write."""

from __future__ import annotations

import filecmp
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from data_process.make_synthetic import make_synthetic
from tests.train_fixtures import REPO

pytestmark = pytest.mark.slow
TEMPORARY = re.compile(r"\..+\.tmp(\.\w+)?")  # atomic_path's names


def env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1")


def start(script: str, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, REPO / script, *map(str, args)], cwd=REPO, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def terminate_when(proc: subprocess.Popen, ready, what: str) -> tuple[int, str]:
    """SIGTERM once `ready()` holds; the exit status and stderr."""
    deadline = time.monotonic() + 240
    while not ready():
        assert proc.poll() is None, f"{what} ended before it was signalled: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, f"{what} never got going"
        time.sleep(0.002)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if TEMPORARY.fullmatch(p.name)]


def roi_ids(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    """200 synthetic image/mask pairs (no ROIs): enough work to be stopped half-way."""
    return make_synthetic(tmp_path_factory.mktemp("big"), count=200, seed=3)


@pytest.fixture(scope="module")
def clean(big, tmp_path_factory) -> Path:
    """The same dataset with ROIs and text from runs never stopped."""
    folder = tmp_path_factory.mktemp("clean") / "synthetic"
    shutil.copytree(big, folder)
    assert start("data_process/make_ROI_img.py", "--dataset-name", "synthetic", "--dataset-path", folder,
                 "--workers", 2).wait(timeout=300) == 0
    assert start("get_text.py", "--dataset-name", "synthetic", "--dataset-path", folder, "--describer", "geometry",
                 "--out", folder / "text.csv").wait(timeout=300) == 0
    return folder


def test_sigterm_stops_make_roi_like_ctrl_c_and_the_rerun_finishes(big, clean, tmp_path):
    data = tmp_path / "synthetic"
    shutil.copytree(big, data)
    rois = data / "ROIs"
    args = ("--dataset-name", "synthetic", "--dataset-path", data, "--workers", 2)
    proc = start("data_process/make_ROI_img.py", *args)
    rc, err = terminate_when(proc, lambda: len(roi_ids(rois)) >= 30, "make_ROI_img")
    assert rc == 130 and err.strip().splitlines()[-1] == "interrupted", err[-2000:]
    assert "Traceback" not in err
    done = roi_ids(rois)
    assert 30 <= len(done) < 200, len(done)  # stopped half-way
    assert not temporaries(data)
    for name in done:  # every ROI written is whole
        assert cv2.imread(str(rois / name)) is not None, name
    rerun = start("data_process/make_ROI_img.py", *args)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err[-2000:]
    assert f"{200 - len(done)} images done, {len(done)} skipped" in out
    assert roi_ids(rois) == roi_ids(clean / "ROIs")
    match, mismatch, errors = filecmp.cmpfiles(rois, clean / "ROIs", roi_ids(rois), shallow=False)
    assert not mismatch and not errors


def test_sigterm_stops_get_text_like_ctrl_c_and_the_rerun_finishes(clean, tmp_path):
    data = tmp_path / "synthetic"
    shutil.copytree(clean, data, ignore=shutil.ignore_patterns("text*"))
    out = tmp_path / "text" / "text.csv"
    partial = out.with_name("text.partial.csv")
    args = ("--dataset-name", "synthetic", "--dataset-path", data, "--describer", "geometry", "--out", out)
    proc = start("get_text.py", *args)
    rc, err = terminate_when(proc, lambda: partial.exists() and partial.read_bytes().count(b"\n") > 30, "get_text")
    assert rc == 130 and err.strip().splitlines()[-1] == "interrupted", err[-2000:]
    assert "Traceback" not in err
    assert not out.exists() and not temporaries(out.parent)
    kept = partial.read_bytes()
    earlier = kept.count(b"\n") - 1
    assert kept.endswith(b"\n") and 30 <= earlier < 200  # whole rows only, stopped half-way
    rerun = start("get_text.py", *args)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err[-2000:]
    assert f"200 rows ({earlier} from earlier runs)" in err
    assert out.read_bytes() == (clean / "text.csv").read_bytes()
    assert not partial.exists() and not temporaries(out.parent)


def test_overwrite_stopped_then_rerun_without_it_never_mixes_settings(clean, tmp_path):
    """--overwrite with other keywords, stopped half-way, then the same command without
    --overwrite: every row has the new keyword (the old CSV's rows are not taken back)."""
    data = tmp_path / "synthetic"
    shutil.copytree(clean, data, ignore=shutil.ignore_patterns("text*"))
    out = data / "text.csv"
    shutil.copy(clean / "text.csv", out)
    shutil.copy(clean / "text.settings.json", data / "text.settings.json")
    args = ("--dataset-name", "synthetic", "--dataset-path", data, "--describer", "geometry", "--out", out,
            "--keywords", "lesion")
    refused = start("get_text.py", *args)
    _, err = refused.communicate(timeout=300)
    assert refused.returncode == 2 and "rerun with --overwrite" in err.splitlines()[-1], err[-2000:]
    partial = out.with_name("text.partial.csv")
    proc = start("get_text.py", *args, "--overwrite")
    rc, err = terminate_when(proc, lambda: partial.exists() and partial.read_bytes().count(b"\n") > 30, "get_text")
    assert rc == 130, err[-2000:]
    rerun = start("get_text.py", *args)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err[-2000:]
    prompts = out.read_text().splitlines()[1:]
    assert len(prompts) == 200 and all("lesion" in line and "polyp" not in line for line in prompts)


# ---------------------------------------------------------------- kill -9 and SIGTERM over an earlier set

def earlier_rois(data: Path) -> dict[str, bytes]:
    """ROIs/ as an earlier run with other masks left it: a grey picture per image."""
    shutil.rmtree(data / "ROIs", ignore_errors=True)
    (data / "ROIs").mkdir()
    grey = cv2.imencode(".jpg", 128 * np.ones((8, 8, 3), np.uint8))[1].tobytes()
    for name in roi_ids(data / "images"):
        (data / "ROIs" / name).write_bytes(grey)
    return {name: grey for name in roi_ids(data / "ROIs")}


@pytest.mark.parametrize("stop", ["SIGKILL", "SIGTERM"])
def test_make_roi_overwrite_stopped_leaves_each_roi_old_or_new(big, clean, tmp_path, stop):
    data = tmp_path / "synthetic"
    shutil.copytree(big, data)
    new = {name: (clean / "ROIs" / name).read_bytes() for name in roi_ids(clean / "ROIs")}
    for target in (1, 40, 120) if stop == "SIGKILL" else (40,):
        old = earlier_rois(data)
        proc = start("data_process/make_ROI_img.py", "--dataset-name", "synthetic", "--dataset-path", data,
                     "--workers", 2, "--overwrite")
        while proc.poll() is None and sum((data / "ROIs" / n).read_bytes() != old[n] for n in old) < target:
            time.sleep(0.002)
        proc.send_signal(getattr(signal, stop))
        proc.communicate(timeout=120)
        assert proc.returncode == (-signal.SIGKILL if stop == "SIGKILL" else 130)
        now = {name: (data / "ROIs" / name).read_bytes() for name in roi_ids(data / "ROIs") if name[0] != "."}
        assert set(now) == set(old) and all(now[n] in (old[n], new[n]) for n in now)  # each ROI old or new
        assert 0 < sum(now[n] == new[n] for n in now) < 200  # stopped half-way
    rerun = start("data_process/make_ROI_img.py", "--dataset-name", "synthetic", "--dataset-path", data,
                  "--workers", 2, "--overwrite")
    assert rerun.wait(timeout=300) == 0 and not temporaries(data)
    assert {name: (data / "ROIs" / name).read_bytes() for name in roi_ids(data / "ROIs")} == new


@pytest.mark.parametrize("stop", ["SIGKILL", "SIGTERM"])
def test_get_text_overwrite_stopped_keeps_the_earlier_csv_until_the_new_one_replaces_it(clean, tmp_path, stop):
    data = tmp_path / "synthetic"
    shutil.copytree(clean, data)
    out, earlier = data / "text.csv", (data / "text.csv").read_bytes()
    partial = out.with_name("text.partial.csv")
    args = ("--dataset-name", "synthetic", "--dataset-path", data, "--describer", "geometry", "--out", out,
            "--keywords", "lesion")
    proc = start("get_text.py", *args, "--overwrite")
    deadline = time.monotonic() + 240
    while not (partial.exists() and partial.read_bytes().count(b"\n") > 30):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.002)
    proc.send_signal(getattr(signal, stop))
    proc.communicate(timeout=120)
    assert proc.returncode == (-signal.SIGKILL if stop == "SIGKILL" else 130)
    assert out.read_bytes() == earlier  # the old CSV, whole, for whoever reads it now
    rerun = start("get_text.py", *args)  # goes on with the new rows only
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err[-2000:]
    prompts = out.read_text().splitlines()[1:]
    assert len(prompts) == 200 and all("lesion" in line and "polyp" not in line for line in prompts)
