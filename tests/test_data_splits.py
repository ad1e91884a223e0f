"""make_splits.py: seeded 80/10/10, other datasets' rows kept (and a dataset's alias rows
replaced), given lists, bad CSVs; the three files replaced as one set, by one run at a time,
whatever stops it."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from common.errors import CoTexNetError
from data_process import splits as split_files
from data_process.make_splits import merge_split, split_pairs

SCRIPT = Path(__file__).resolve().parents[1] / "data_process" / "make_splits.py"
PAIRS = [(f"img{i:04d}.jpg", f"img{i:04d}_mask.png") for i in range(1000)]


def run_splits(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True, timeout=120)


def test_split_is_80_10_10_disjoint_and_seeded():
    splits = split_pairs(PAIRS[::-1], seed=3)  # input order does not matter
    assert [len(splits[s]) for s in ("train", "val", "test")] == [800, 100, 100]
    assert sorted(sum(splits.values(), [])) == PAIRS
    assert splits == split_pairs(PAIRS, seed=3) and splits != split_pairs(PAIRS, seed=4)
    assert [len(v) for v in split_pairs(PAIRS[:10], (0.6, 0.2, 0.2)).values()] == [6, 2, 2]
    with pytest.raises(CoTexNetError, match="--ratios"):
        split_pairs(PAIRS, (0.8, -0.1, 0.3))


def test_rewriting_one_dataset_keeps_the_others_and_replaces_its_alias_rows():
    table = pd.DataFrame({"dataset": ["isic", "kvasir", "kvasir_polyp"], "img_name": ["a.jpg", "old.jpg", "cju1.jpg"],
                          "mask_name": ["a_Segmentation.png", "old.jpg", "cju1.jpg"]})
    table = merge_split(table, "kvasir", PAIRS[:3])
    assert list(table.columns) == ["dataset", "img_name", "mask_name"]
    assert table["dataset"].tolist() == ["isic", "kvasir", "kvasir", "kvasir"]
    assert not {"old.jpg", "cju1.jpg"} & set(table["img_name"])


def test_cli_on_synthetic_then_second_dataset(synthetic_root, tmp_path):
    first = run_splits("--dataset-name", "synthetic", "--dataset-path", synthetic_root / "synthetic", "--out-dir", tmp_path)
    assert first.returncode == 0, first.stderr
    second = run_splits("--dataset-name", "synthetic_multiclass", "--dataset-path",
                        synthetic_root / "synthetic_multiclass", "--ratios", "2", "1", "1", "--out-dir", tmp_path)
    assert second.returncode == 0, second.stderr
    counts = {s: pd.read_csv(tmp_path / f"{s}_data.csv")["dataset"].value_counts().to_dict() for s in ("train", "val", "test")}
    assert counts["train"] == {"synthetic": 10, "synthetic_multiclass": 4}
    assert counts["val"]["synthetic"] + counts["test"]["synthetic"] == 2
    assert [p.name for p in tmp_path.glob(".*")] == [".split_files.lock"]  # no temporary, no journal


def test_from_list(synthetic_root, tmp_path):
    given = tmp_path / "given.csv"
    pd.DataFrame({"img_name": ["syn_0000.jpg", "syn_0001.jpg", "syn_0002.jpg"],
                  "split": ["test", "train", "val"]}).to_csv(given, index=False)
    done = run_splits("--dataset-name", "synthetic", "--dataset-path", synthetic_root / "synthetic",
                      "--from-list", given, "--out-dir", tmp_path)
    assert done.returncode == 0, done.stderr
    assert pd.read_csv(tmp_path / "test_data.csv")["img_name"].tolist() == ["syn_0000.jpg"]


def test_bad_existing_csv_exits_2_and_writes_nothing(synthetic_root, tmp_path):
    (tmp_path / "val_data.csv").write_text("name,mask\na.jpg,a.jpg\n")
    bad = run_splits("--dataset-name", "synthetic", "--dataset-path", synthetic_root / "synthetic", "--out-dir", tmp_path)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert "val_data.csv" in bad.stderr and "missing columns" in bad.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [".split_files.lock", "val_data.csv"]


def test_real_kvasir_800_100_100(kvasir_dir, tmp_path):
    done = run_splits("--dataset-name", "kvasir", "--dataset-path", kvasir_dir, "--out-dir", tmp_path)
    assert done.returncode == 0, done.stderr
    assert [len(pd.read_csv(tmp_path / f"{s}_data.csv")) for s in ("train", "val", "test")] == [800, 100, 100]


# ---------------------------------------------------------------- a partition, whatever runs or stops

def kvasir_like(synthetic_root, folder: Path, name: str = "kvasir") -> Path:
    """The synthetic pairs (.jpg images and masks) as a dataset of the registry's kvasir layout."""
    return shutil.copytree(synthetic_root / "synthetic", folder / name)


def rows_of(folder: Path) -> dict[str, set]:
    return {split: set(pd.read_csv(folder / f"{split}_data.csv", dtype=str).itertuples(index=False, name=None))
            for split in ("train", "val", "test")}


def test_resplit_over_alias_rows_leaves_a_partition(synthetic_root, tmp_path):
    """The paper's published Kvasir val_data.csv names its rows kvasir_polyp: a re-split of kvasir
    replaces them, and does not leave them beside the new rows (val would overlap train and test)."""
    dataset = kvasir_like(synthetic_root, tmp_path)
    names = sorted(os.listdir(dataset / "images"))
    for split, chunk in (("train", names[:8]), ("val", names[8:10]), ("test", names[10:])):
        pd.DataFrame(dict(dataset="kvasir_polyp" if split == "val" else "kvasir", img_name=chunk,
                          mask_name=chunk)).to_csv(tmp_path / f"{split}_data.csv", index=False)
    done = run_splits("--dataset-name", "kvasir", "--dataset-path", dataset, "--out-dir", tmp_path, "--seed", "1")
    assert done.returncode == 0, done.stderr
    rows = rows_of(tmp_path)
    assert not any(row[0] == "kvasir_polyp" for split in rows.values() for row in split)
    images = [{row[1] for row in rows[split]} for split in ("train", "val", "test")]
    assert sum(map(len, images)) == 12 and len(set.union(*images)) == 12  # each image in one split
    split_files.read(tmp_path).of("kvasir", dataset)  # and every reader agrees


def test_runs_started_together_keep_every_row_once(synthetic_root, tmp_path):
    """Five make_splits.py at once, each its own dataset, into one folder: nothing lost."""
    names = [f"set{i}" for i in range(5)]
    for name in names:
        kvasir_like(synthetic_root, tmp_path / "data", name)
    runs = [subprocess.Popen([sys.executable, SCRIPT, "--dataset-name", name, "--dataset-path", tmp_path / "data" / name,
                              "--out-dir", tmp_path / "splits", "--ratios", "2", "1", "1"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in names]
    results = [run.communicate(timeout=300) for run in runs]
    assert all(run.returncode == 0 for run in runs), [err for _, err in results]
    rows = rows_of(tmp_path / "splits")
    every = [row for split in rows.values() for row in split]
    assert len(every) == 5 * 12 and {row[:2] for row in every} == {(n, i) for n in names for i in os.listdir(
        tmp_path / "data" / names[0] / "images")}


def published(folder: Path) -> dict:
    """What a reader of the split files gets (the reader finishes an update a kill interrupted)."""
    found = split_files.read(folder)
    return {kind: set(table.itertuples(index=False, name=None)) for kind, table in found.tables.items()
            if table is not None and kind != "augmented"}


# `python -c KILL_AT_RENAME script.py args`: the script, killed (SIGKILL) as it is about to make its
# n-th rename (os.replace): between any two writes of the set, whichever way the script writes it.
KILL_AT_RENAME = """
import os, runpy, signal, sys
real, calls = os.replace, []
def replace(*args, **kwargs):
    calls.append(args)
    if len(calls) == int(os.environ["KILL_AT_RENAME"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
os.replace = replace
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("stop", ["SIGKILL at rename 1", "SIGKILL at rename 2", "SIGKILL at rename 3",
                                  "SIGKILL at rename 4", "SIGKILL at split_files:staged", "SIGTERM at once",
                                  "SIGTERM after 0.5 s", "SIGTERM after 1 s", "SIGTERM after 2 s"])
def test_stopped_anywhere_it_leaves_the_old_set_or_the_new(synthetic_root, tmp_path, stop):
    dataset = kvasir_like(synthetic_root, tmp_path)
    args = ["--dataset-name", "kvasir", "--dataset-path", dataset, "--out-dir", tmp_path / "splits"]
    assert run_splits(*args, "--seed", "1").returncode == 0
    old = published(tmp_path / "splits")
    assert run_splits(*args, "--seed", "2", "--out-dir", tmp_path / "new").returncode == 0
    new = published(tmp_path / "new")
    assert old != new
    command, env = [sys.executable, SCRIPT, *map(str, args), "--seed", "2"], dict(os.environ)
    if "rename" in stop:
        command, env = [sys.executable, "-c", KILL_AT_RENAME, *map(str, command[1:])], dict(env, KILL_AT_RENAME=stop[-1])
    elif stop.startswith("SIGKILL at "):
        env["COTEXNET_KILL_AT"] = stop.removeprefix("SIGKILL at ")
    run = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if stop.startswith("SIGTERM"):
        time.sleep(float(stop.split()[2]) if "after" in stop else 0)
        run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=120)
    assert run.returncode in ((-signal.SIGKILL,) if "SIGKILL" in stop else (0, 130, -signal.SIGTERM)), err
    assert published(tmp_path / "splits") in (old, new), stop
