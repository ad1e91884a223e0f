"""make_synthetic.py: the real layout, determinism, ground truth that matches the masks."""

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from common.errors import CoTexNetError
from data_process.decoding import read_image, read_mask
from data_process.make_synthetic import make_synthetic
from data_process.pairing import pair_files
from data_process.registry import get_spec

REPO = Path(__file__).resolve().parents[1]


def test_layout_sizes_and_jpeg_masks(synthetic_root):
    folder = synthetic_root / "synthetic"
    spec = get_spec("synthetic")
    pairing = pair_files(folder, spec)
    assert len(pairing.pairs) == 12 and not pairing.images_without_mask
    sizes = set()
    for image_name, mask_name in pairing.pairs:
        image = read_image(folder / "images" / image_name)
        h, w = image.shape[:2]
        assert 180 <= h <= 420 and 180 <= w <= 420 and h != w
        sizes.add((h, w))
        raw = cv2.imread(str(folder / "masks" / mask_name), cv2.IMREAD_GRAYSCALE)
        assert raw.shape == (h, w) and mask_name.endswith(".jpg")
    assert len(sizes) == 12
    assert len(np.unique(raw)) > 2  # a real JPEG mask: grey artefacts at the edges


def test_truth_matches_masks_and_keeps_centroids_clear(synthetic_root):
    folder = synthetic_root / "synthetic"
    truth = pd.read_csv(folder / "truth.csv")
    assert list(truth.columns) == ["img_name", "mask_name", "number", "cx", "cy", "area_fraction"]
    for row in truth.itertuples():
        label = read_mask(folder / "masks" / row.mask_name, get_spec("synthetic"))
        assert cv2.connectedComponents(label)[0] - 1 == row.number <= 3
        assert abs(label.mean() - row.area_fraction) < 0.01
        if row.number:
            ys, xs = np.nonzero(label)
            assert abs(xs.mean() / label.shape[1] - row.cx) < 0.01 and abs(ys.mean() / label.shape[0] - row.cy) < 0.01
            for c in (row.cx, row.cy):
                assert abs(c - 0.4) >= 0.04 and abs(c - 0.6) >= 0.04


def test_blobs_differ_in_colour_from_background(synthetic_root):
    folder = synthetic_root / "synthetic"
    for image_name, mask_name in pair_files(folder, get_spec("synthetic")).pairs[:4]:
        image = read_image(folder / "images" / image_name).astype(float)
        label = read_mask(folder / "masks" / mask_name, get_spec("synthetic"))
        if label.any():
            inside = image[cv2.erode(label, np.ones((5, 5))) > 0].max(axis=1).mean()
            outside = image[cv2.dilate(label, np.ones((5, 5))) == 0].max(axis=1).mean()
            assert inside - outside > 60


def test_multiclass_label_maps_and_truth_per_category(synthetic_root):
    folder = synthetic_root / "synthetic_multiclass"
    spec = get_spec("synthetic_multiclass")
    truth = pd.read_csv(folder / "truth.csv")
    assert len(truth) == 8 * 2 and set(truth["category"]) == set(spec.categories)
    seen = set()
    for row in truth.itertuples():
        label = read_mask(folder / "masks" / row.mask_name, spec)
        k = spec.categories.index(row.category) + 1
        assert cv2.connectedComponents((label == k).astype(np.uint8))[0] - 1 == row.number
        seen |= set(np.unique(label).tolist())
    assert seen == {0, 1, 2}


def test_same_seed_same_files_and_prefix_property(tmp_path, synthetic_root):
    make_synthetic(tmp_path, count=3, seed=1)
    for name in ("syn_0000.jpg", "syn_0002.jpg"):
        for folder in ("images", "masks"):
            assert (tmp_path / "synthetic" / folder / name).read_bytes() == \
                (synthetic_root / "synthetic" / folder / name).read_bytes()
    with pytest.raises(CoTexNetError, match="--overwrite"):
        make_synthetic(tmp_path, count=3, seed=1)
    make_synthetic(tmp_path, count=2, seed=5, mask_format="png", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "synthetic" / "masks").iterdir()) == ["syn_0000.png", "syn_0001.png"]
    assert [p.name for p in tmp_path.iterdir()] == ["synthetic"]  # no build folder left behind


def test_cli_count_and_bad_options(tmp_path):
    script = REPO / "data_process" / "make_synthetic.py"
    ok = subprocess.run([sys.executable, script, "--root", tmp_path, "--count", "2", "--mask-format", "png"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert len(list((tmp_path / "synthetic" / "images").iterdir())) == 2
    bad = subprocess.run([sys.executable, script, "--root", tmp_path, "--multiclass", "--mask-format", "jpg"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--mask-format" in bad.stderr
