"""make_splits.py: seeded 80/10/10, other datasets' rows kept, given lists, bad CSVs."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from common.errors import CoTexNetError
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


def test_rewriting_one_dataset_keeps_the_others(tmp_path):
    path = tmp_path / "train_data.csv"
    pd.DataFrame({"dataset": ["isic", "kvasir"], "img_name": ["a.jpg", "old.jpg"],
                  "mask_name": ["a_Segmentation.png", "old.jpg"]}).to_csv(path, index=False)
    table = merge_split(path, "kvasir", PAIRS[:3])
    assert list(table.columns) == ["dataset", "img_name", "mask_name"]
    assert table["dataset"].tolist() == ["isic", "kvasir", "kvasir", "kvasir"] and "old.jpg" not in table["img_name"].tolist()


def test_cli_on_synthetic_then_second_dataset(synthetic_root, tmp_path):
    first = run_splits("--dataset-name", "synthetic", "--dataset-path", synthetic_root / "synthetic", "--out-dir", tmp_path)
    assert first.returncode == 0, first.stderr
    second = run_splits("--dataset-name", "synthetic_multiclass", "--dataset-path",
                        synthetic_root / "synthetic_multiclass", "--ratios", "2", "1", "1", "--out-dir", tmp_path)
    assert second.returncode == 0, second.stderr
    counts = {s: pd.read_csv(tmp_path / f"{s}_data.csv")["dataset"].value_counts().to_dict() for s in ("train", "val", "test")}
    assert counts["train"] == {"synthetic": 10, "synthetic_multiclass": 4}
    assert counts["val"]["synthetic"] + counts["test"]["synthetic"] == 2
    assert not list(tmp_path.glob(".*"))


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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["val_data.csv"]


def test_real_kvasir_800_100_100(kvasir_dir, tmp_path):
    done = run_splits("--dataset-name", "kvasir", "--dataset-path", kvasir_dir, "--out-dir", tmp_path)
    assert done.returncode == 0, done.stderr
    assert [len(pd.read_csv(tmp_path / f"{s}_data.csv")) for s in ("train", "val", "test")] == [800, 100, 100]
