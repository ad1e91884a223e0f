"""Multi-class datasets given as one binary mask per category (mask_layout per_category):
masks/<k or keyword>/<name>, the paper README's way."""

import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from common.errors import CoTexNetError
from data_process import registry
from data_process import splits as split_files
from data_process.decoding import category_masks, read_image, read_mask
from data_process.layout import roi_name
from data_process.make_synthetic import make_synthetic
from data_process.my_dataset import SegDataset
from data_process.pairing import pair_files
from data_process.registry import get_spec
from data_process.transforms import eval_transform

REPO = Path(__file__).resolve().parents[1]
SPEC = get_spec("synthetic_percategory")


def run(script, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, REPO / "data_process" / script, *map(str, args)],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def percategory_root(tmp_path_factory) -> Path:
    """6 images, seed 2: the same layouts as conftest's synthetic_multiclass (seed 2), as per-category PNGs."""
    root = tmp_path_factory.mktemp("percat")
    make_synthetic(root, count=6, seed=2, per_category=True)
    return root


@pytest.fixture
def dataset(percategory_root, tmp_path) -> Path:
    return Path(shutil.copytree(percategory_root / "synthetic_percategory", tmp_path / "synthetic_percategory"))


def test_layout_and_label_map_equal_the_label_map_variant(percategory_root, synthetic_root):
    folder = percategory_root / "synthetic_percategory"
    assert sorted(p.name for p in (folder / "masks").iterdir()) == ["1", "2"]
    assert SPEC.mask_layout == "per_category" and SPEC.num_classes == 3
    pairing = pair_files(folder, SPEC)
    assert pairing.pairs == [(f"syn_{i:04d}.jpg", f"syn_{i:04d}.png") for i in range(6)]
    for _, mask_name in pairing.pairs:
        label = read_mask(folder / "masks" / mask_name, SPEC)
        same = read_mask(synthetic_root / "synthetic_multiclass" / "masks" / mask_name, get_spec("synthetic_multiclass"))
        assert label.dtype == np.uint8 and (label == same).all()
    truth = pd.read_csv(folder / "truth.csv")
    assert len(truth) == 12 and set(truth["mask_name"]) == {name for _, name in pairing.pairs}


def test_overlap_later_category_wins_and_keyword_folders(tmp_path):
    masks = tmp_path / "masks"
    first, second = np.zeros((20, 30), np.uint8), np.zeros((10, 15), np.uint8)  # category 2 at half size
    first[2:12, 2:20], second[4:8, 5:14] = 255, 255  # they overlap
    (masks / "1" / "sub").mkdir(parents=True)
    (masks / "lesion area" / "sub").mkdir(parents=True)
    cv2.imwrite(str(masks / "1" / "sub" / "a.png"), first)
    cv2.imwrite(str(masks / "lesion area" / "sub" / "a.png"), second)  # a keyword folder, names with "/"
    label = read_mask(masks / "sub" / "a.png", SPEC)
    big_second = cv2.resize(second, (30, 20), interpolation=cv2.INTER_NEAREST) > 0
    assert label.shape == (20, 30) and (label[big_second] == 2).all()
    assert ((label == 1) == ((first > 0) & ~big_second)).all()
    one, two = category_masks(masks / "sub" / "a.png", SPEC, size=(60, 40))
    assert one.shape == (40, 60) and one.sum() == 4 * (first > 0).sum()  # ROIs keep each mask whole
    (masks / "2").mkdir()
    with pytest.raises(CoTexNetError, match=r"both 2/ and lesion area/ exist"):
        read_mask(masks / "sub" / "a.png", SPEC)
    shutil.rmtree(masks / "2")
    cv2.imwrite(str(masks / "1" / "sub" / "b.png"), first)
    with pytest.raises(CoTexNetError, match=r"lesion area/sub/b.png: no such file"):
        read_mask(masks / "sub" / "b.png", SPEC)
    with pytest.raises(CoTexNetError, match=r"x.png: no folder of each category \(1/ or polyp area/, 2/ or lesion"):
        read_mask(tmp_path / "elsewhere" / "x.png", SPEC)


def test_per_category_layout_needs_binary_categories(monkeypatch):
    table = {"defaults": {"keyword": "x area", "image_ext": "", "mask_ext": "", "mask_encoding": "binary"},
             "datasets": {"flat": {"mask_layout": "per_category"}, "odd": {"mask_layout": "folders"},
                          "both": {"mask_layout": "per_category", "mask_encoding": "labelmap", "categories": ["a"]}}}
    monkeypatch.setattr(registry, "_registry", lambda: table)
    for name, message in [("flat", "needs categories"), ("both", "mask_encoding binary"), ("odd", "single or per_category")]:
        with pytest.raises(CoTexNetError, match=f"{name}: mask_layout .*{message}"):
            get_spec(name)


def test_rois_splits_and_dataset_end_to_end(dataset, tmp_path):
    done = run("make_ROI_img.py", "--dataset-name", "synthetic_percategory", "--dataset-path", dataset, "--workers", 2)
    assert done.returncode == 0, done.stderr
    assert "6 images done" in done.stdout and len(list((dataset / "ROIs").iterdir())) == 12
    for image_name, mask_name in pair_files(dataset, SPEC).pairs:
        image = read_image(dataset / "images" / image_name).astype(int)
        for k, category in enumerate(SPEC.categories, start=1):
            inside = cv2.imread(str(dataset / "masks" / str(k) / mask_name), cv2.IMREAD_GRAYSCALE) >= 128
            roi = read_image(dataset / "ROIs" / roi_name(Path(image_name).stem, category)).astype(int)
            assert np.abs(roi - image * inside[:, :, None]).mean() < 2.0
    splits = run("make_splits.py", "--dataset-name", "synthetic_percategory", "--dataset-path", dataset,
                 "--ratios", "4", "1", "1", "--out-dir", tmp_path)
    assert splits.returncode == 0, splits.stderr
    split = split_files.read(tmp_path).of("synthetic_percategory", dataset).split("train")
    assert len(split) == 4 and (split["mask_name"].str.replace(".png", ".jpg") == split["img_name"]).all()
    data = SegDataset(dataset.parent, "synthetic_percategory", split, SPEC, eval_transform(64))
    labels = np.stack([data[i]["label"].numpy() for i in range(len(data))])
    assert set(np.unique(labels)) <= {0, 1, 2} and labels.max() == 2


def test_incomplete_and_orphan_category_masks(dataset):
    (dataset / "masks" / "2" / "syn_0004.png").unlink()  # one category missing: warned, listed, left out
    done = run("make_ROI_img.py", "--dataset-name", "synthetic_percategory", "--dataset-path", dataset, "--workers", 1)
    assert done.returncode == 0, done.stderr
    assert "1 images without a mask in every category folder, left out: syn_0004.jpg" in done.stderr
    assert "5 images done" in done.stdout and not list((dataset / "ROIs").glob("syn_0004*"))
    (dataset / "images" / "syn_0005.jpg").unlink()  # its category masks now have no image: stop
    bad = run("make_ROI_img.py", "--dataset-name", "synthetic_percategory", "--dataset-path", dataset, "--overwrite")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert f"{dataset / 'masks' / '1' / 'syn_0005.png'}: no image with its stem" in bad.stderr
    assert "(and 1 more masks without image)" in bad.stderr
    shutil.rmtree(dataset / "masks" / "2")
    gone = run("make_splits.py", "--dataset-name", "synthetic_percategory", "--dataset-path", dataset,
               "--out-dir", dataset)
    assert gone.returncode == 2 and "no folder of each category (1/ or polyp area/, 2/ or lesion area/)" in gone.stderr


def test_synthetic_cli_per_category_jpeg_masks(tmp_path):
    done = run("make_synthetic.py", "--root", tmp_path, "--count", "2", "--seed", "2", "--per-category-masks",
               "--mask-format", "jpg")
    assert done.returncode == 0, done.stderr
    folder = tmp_path / "synthetic_percategory"
    assert sorted(p.relative_to(folder / "masks").as_posix() for p in (folder / "masks").rglob("*.jpg")) == \
        ["1/syn_0000.jpg", "1/syn_0001.jpg", "2/syn_0000.jpg", "2/syn_0001.jpg"]
    truth = pd.read_csv(folder / "truth.csv")
    for row in truth.itertuples():  # JPEG artefacts do not change the per-category blob counts
        inside = read_mask(folder / "masks" / row.mask_name, SPEC) == SPEC.categories.index(row.category) + 1
        assert cv2.connectedComponents(inside.astype(np.uint8))[0] - 1 == row.number
