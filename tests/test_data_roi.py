"""make_ROI_img.py end to end: ROI = image * mask, multi-class naming, skipping, bad input."""

import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from data_process.decoding import read_image, read_mask
from data_process.layout import roi_name
from data_process.pairing import pair_files
from data_process.registry import get_spec

SCRIPT = Path(__file__).resolve().parents[1] / "data_process" / "make_ROI_img.py"


def run_roi(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True, timeout=120)


def assert_roi_matches(roi_path: Path, image: np.ndarray, inside: np.ndarray):
    """ROI == image * inside, up to JPEG error (which is largest along the mask's edge)."""
    roi = read_image(roi_path).astype(int)
    expected = image.astype(int) * inside[:, :, None]
    error = np.abs(roi - expected)
    edge = cv2.dilate(inside.astype(np.uint8), np.ones((9, 9))) != cv2.erode(inside.astype(np.uint8), np.ones((9, 9)))
    assert error.mean() < 2.0
    assert np.percentile(error[~edge], 99.5) <= 12, roi_path.name
    assert roi[cv2.dilate(inside.astype(np.uint8), np.ones((9, 9))) == 0].max() <= 12  # outside stays black


@pytest.fixture
def synthetic_copy(synthetic_root, tmp_path) -> Path:
    return Path(shutil.copytree(synthetic_root / "synthetic", tmp_path / "synthetic"))


def test_binary_rois_skip_and_overwrite(synthetic_copy):
    spec = get_spec("synthetic")
    blank = synthetic_copy / "masks" / "syn_0003.jpg"
    cv2.imwrite(str(blank), np.zeros(cv2.imread(str(blank)).shape, np.uint8))  # an empty mask: kept, counted
    truth = pd.read_csv(synthetic_copy / "truth.csv")
    empty = sum((truth["number"] == 0) | (truth["img_name"] == "syn_0003.jpg"))
    done = run_roi("--dataset-name", "synthetic", "--dataset-path", synthetic_copy, "--img-format", ".jpg", "--workers", 2)
    assert done.returncode == 0, done.stderr
    assert "12 images done, 0 skipped" in done.stdout and f"{empty} empty ROIs" in done.stdout
    for image_name, mask_name in pair_files(synthetic_copy, spec).pairs:
        image = read_image(synthetic_copy / "images" / image_name)
        label = read_mask(synthetic_copy / "masks" / mask_name, spec)
        assert_roi_matches(synthetic_copy / "ROIs" / roi_name(Path(image_name).stem), image, label > 0)
    assert read_image(synthetic_copy / "ROIs" / "syn_0003.jpg").max() == 0
    again = run_roi("--dataset-name", "synthetic", "--dataset-path", synthetic_copy, "--workers", 1)
    assert "0 images done, 12 skipped" in again.stdout
    (synthetic_copy / "ROIs" / "syn_0000.jpg").unlink()
    assert "1 images done, 11 skipped" in run_roi("--dataset-name", "synthetic", "--dataset-path", synthetic_copy).stdout
    forced = run_roi("--dataset-name", "synthetic", "--dataset-path", synthetic_copy, "--overwrite", "--workers", 1)
    assert "12 images done, 0 skipped" in forced.stdout


def test_multiclass_one_roi_per_category(synthetic_root, tmp_path):
    folder = Path(shutil.copytree(synthetic_root / "synthetic_multiclass", tmp_path / "mc"))
    spec = get_spec("synthetic_multiclass")
    done = run_roi("--dataset-name", "synthetic_multiclass", "--dataset-path", folder, "--workers", 1)
    assert done.returncode == 0, done.stderr
    rois = sorted(p.name for p in (folder / "ROIs").iterdir())
    assert len(rois) == 8 * 2 and "syn_0000__polyp area.jpg" in rois and "syn_0000__lesion area.jpg" in rois
    image = read_image(folder / "images" / "syn_0000.jpg")
    label = read_mask(folder / "masks" / "syn_0000.png", spec)
    for k, category in enumerate(spec.categories, start=1):
        assert_roi_matches(folder / "ROIs" / roi_name("syn_0000", category), image, label == k)


def test_mask_without_image_stops_before_writing(synthetic_copy):
    (synthetic_copy / "images" / "syn_0005.jpg").unlink()
    bad = run_roi("--dataset-name", "synthetic", "--dataset-path", synthetic_copy)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert "syn_0005.jpg" in bad.stderr and "masks" in bad.stderr
    assert not (synthetic_copy / "ROIs").exists()


def test_image_without_mask_is_listed_and_left_out(synthetic_copy):
    (synthetic_copy / "masks" / "syn_0007.jpg").unlink()
    done = run_roi("--dataset-name", "synthetic", "--dataset-path", synthetic_copy, "--workers", 2)
    assert done.returncode == 0 and "syn_0007.jpg" in done.stderr and "1 images without mask" in done.stdout
    assert len(list((synthetic_copy / "ROIs").iterdir())) == 11


def test_truncated_image_exits_2_naming_it(synthetic_copy):
    victim = synthetic_copy / "images" / "syn_0002.jpg"
    victim.write_bytes(victim.read_bytes()[:600])
    bad = run_roi("--dataset-name", "synthetic", "--dataset-path", synthetic_copy, "--workers", 2)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "syn_0002.jpg" in bad.stderr and "truncated" in bad.stderr
    assert not list((synthetic_copy / "ROIs").glob(".*"))  # no temporary files left


def test_real_kvasir_rois(kvasir_dir, tmp_path):
    names = sorted(p.name for p in (kvasir_dir / "images").iterdir())[::100]  # 10 real pairs, varied sizes
    for folder in ("images", "masks"):
        (tmp_path / folder).mkdir()
        for name in names:
            shutil.copy(kvasir_dir / folder / name, tmp_path / folder / name)
    done = run_roi("--dataset-name", "kvasir", "--dataset-path", tmp_path, "--img-format", ".jpg", "--workers", 2)
    assert done.returncode == 0, done.stderr
    for name in names:
        image = read_image(tmp_path / "images" / name)
        mask = cv2.imread(str(tmp_path / "masks" / name), cv2.IMREAD_GRAYSCALE)
        assert_roi_matches(tmp_path / "ROIs" / name, image, mask >= 128)
