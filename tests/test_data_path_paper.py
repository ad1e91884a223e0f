"""The paper's data path, exactly: every resize of a label map samples pixel centres as PIL's
NEAREST does, and the dataset's items are those of the paper's DriveDataset and transforms.py,
re-stated here from METHOD.md ("The paper's protocol, exactly"): `convert("RGB")`,
`convert("L")`, the 128 threshold, `/255`, `Image.fromarray`, torchvision's functional resize
on PIL images (the image bilinear, antialiased by PIL; the mask NEAREST), zero padding at the
right and bottom, the crop, `to_tensor`, ImageNet normalisation.

Masks are real-looking (smooth blobs, JPEG artefacts) at odd sizes, below and above the input
size, and real Kvasir-SEG pairs where ../shared has them."""

from __future__ import annotations

import contextlib
from pathlib import Path
from unittest import mock

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TVF

from data_process import augment_data, layout
from data_process.decoding import read_mask
from data_process.registry import get_spec
from data_process.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, train_scale_range, train_transform
from train_utils import data
from train_utils.config import load_config

REPO = Path(__file__).resolve().parents[1]
KVASIR = (REPO / ".." / "shared" / "data" / "kvasir-seg").resolve()
# (height, width): upscaled to 224 (ties between two source pixels), square below the train
# sizes' top (padded), and larger, with odd sides.
ODD_SIZES = [(97, 150), (250, 250), (333, 517), (601, 389), (529, 622)]
pytestmark = pytest.mark.usefixtures("one_thread")  # many small resizes (conftest.py)


def blob_mask(h: int, w: int, seed: int) -> np.ndarray:
    """A polyp-like 0/255 mask: overlapping ellipses and a jagged polygon."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((h, w), np.uint8)
    for _ in range(2):
        centre = (int(rng.integers(w // 4, 3 * w // 4)), int(rng.integers(h // 4, 3 * h // 4)))
        axes = (int(rng.integers(w // 10, w // 4)) + 1, int(rng.integers(h // 10, h // 4)) + 1)
        cv2.ellipse(mask, centre, axes, float(rng.integers(0, 180)), 0, 360, 255, -1)
    angles = np.sort(rng.uniform(0, 2 * np.pi, 9))
    radii = rng.uniform(0.05, 0.2, 9) * min(h, w)
    cx, cy = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h
    points = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1).astype(np.int32)
    cv2.fillPoly(mask, [points], 255)
    return mask


def write_pair(folder: Path, stem: str, h: int, w: int, seed: int, mask_ext: str = ".jpg") -> tuple[str, str]:
    """An RGB JPEG (smooth colours and noise) and its mask (JPEG: artefacts at the outline)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.stack([120 + 80 * np.sin(xx / 17 + c) * np.cos(yy / 23 - c) for c in range(3)], -1)
    image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / "images" / f"{stem}.jpg", quality=90)
    Image.fromarray(blob_mask(h, w, seed)).save(folder / "masks" / f"{stem}{mask_ext}", quality=75)
    return f"{stem}.jpg", f"{stem}{mask_ext}"


def image_hw(path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.height, image.width


def kvasir_pairs(count: int = 6) -> list[str]:
    """Real Kvasir-SEG names: the smallest, a middle and the largest image, and the first ones."""
    if not (KVASIR / "images").is_dir():
        return []
    names = sorted(p.name for p in (KVASIR / "images").iterdir())
    by_area = sorted(names, key=lambda n: np.prod(image_hw(KVASIR / "images" / n)))
    picked = [by_area[0], by_area[len(by_area) // 2], by_area[-1], *names]
    return list(dict.fromkeys(picked))[:count]


def paper_label_array(mask_path) -> np.ndarray:
    """The paper's reading of a 0/255 mask: 8-bit grey, 1 where >= 128."""
    return (np.array(Image.open(mask_path).convert("L")) >= 128).astype(np.uint8)


@contextlib.contextmanager
def draws(*values: int):
    """torch.randint answers `values` in turn (the train transform's shorter side, then its crop
    top and left where the padded image exceeds the crop), each checked to be within the bounds
    the transform asked for."""
    queue = list(values)

    def randint(low, high, *args, **kwargs):
        value = queue.pop(0)
        assert low <= value < high, f"draw {value} outside [{low}, {high})"
        return torch.tensor(value)

    with mock.patch.object(torch, "randint", randint):
        yield
    assert not queue, f"draws left over: {queue}"


def crop_draws(resized_hw: tuple[int, int], size: int, top: int, left: int) -> list[int]:
    """The crop draws the transform makes: one per side longer than the crop."""
    return [value for side, value in zip(resized_hw, (top, left), strict=True) if side > size]


def resized_hw(hw: tuple[int, int], shorter: int) -> tuple[int, int]:
    """torchvision's size for a shorter side (the longer one truncated), the paper's F.resize(img, int)."""
    h, w = hw
    return (shorter, int(shorter * w / h)) if h <= w else (int(shorter * h / w), shorter)


# ---------------------------------------------------------------- the paper's inputs, re-stated

def paper_pad(img: Image.Image, size: int) -> Image.Image:
    """transforms.py's padding: zeros at the right and bottom, only where a side is short."""
    w, h = img.size
    if min(w, h) >= size:
        return img
    return TVF.pad(img, [0, 0, max(size - w, 0), max(size - h, 0)], fill=0)


def paper_item(image_path, mask_path, size: int = 224, box: tuple[int, int, int] | None = None):
    """(image, label, ROI) as DriveDataset.__getitem__ with SegmentationPresetEval (box None) or
    SegmentationPresetTrain at shorter side s and crop (top, left) (box = (s, top, left))."""
    img = Image.open(image_path).convert("RGB")
    mask = np.array(Image.open(mask_path).convert("L"))
    mask[mask < 128] = 0
    mask[mask >= 128] = 255
    mask = Image.fromarray(mask / 255)  # float64: a mode "F" image of 0.0 and 1.0
    if box is None:
        img = TVF.resize(img, [size, size])
        mask = TVF.resize(mask, [size, size], interpolation=InterpolationMode.NEAREST)
    else:
        shorter, top, left = box
        img = TVF.resize(img, shorter)
        mask = TVF.resize(mask, shorter, interpolation=InterpolationMode.NEAREST)
        img, mask = paper_pad(img, size), paper_pad(mask, size)
        img, mask = TVF.crop(img, top, left, size, size), TVF.crop(mask, top, left, size, size)
    img = TVF.normalize(TVF.to_tensor(img), list(IMAGENET_MEAN), list(IMAGENET_STD))
    label = torch.as_tensor(np.array(mask), dtype=torch.int64)
    return img, label, img.masked_fill(~label[None].bool(), 0)


def levels(ours: torch.Tensor, paper: torch.Tensor) -> torch.Tensor:
    """The difference of two normalised images in 8-bit levels."""
    return ((ours - paper) * torch.tensor(IMAGENET_STD)[:, None, None] * 255).abs()


def assert_same_item(item: dict, paper, what: str) -> None:
    image, label, roi = paper
    assert torch.equal(item["label"], label), (f"{what}: {(item['label'] != label).sum().item()} label pixels "
                                               "differ from the paper's")
    assert levels(item["pixel_values"], image).max() <= 1 + 1e-3, f"{what}: image more than one level off"
    assert levels(item["roi_pixel_values"], roi).max() <= 1 + 1e-3, f"{what}: ROI more than one level off"


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def synthetic_kvasir(tmp_path_factory) -> tuple[Path, list[tuple[str, str]]]:
    """A `kvasir` dataset folder (JPEG images and masks) of odd sizes: (root, pairs)."""
    root = tmp_path_factory.mktemp("paper_path")
    pairs = [write_pair(root / "kvasir", f"odd_{h}x{w}", h, w, seed) for seed, (h, w) in enumerate(ODD_SIZES)]
    return root, pairs


def masks_under_test(synthetic_kvasir) -> list[Path]:
    root, pairs = synthetic_kvasir
    return [root / "kvasir" / "masks" / mask for _, mask in pairs] + [KVASIR / "masks" / n for n in kvasir_pairs()]


def project_set(root: Path, name: str, pairs, split: str, tmp_path: Path):
    """The project's dataset of `split` under `--protocol paper`, from its config and split file."""
    split_dir = tmp_path / "splits"
    split_dir.mkdir(exist_ok=True)
    pd.DataFrame(dict(dataset=name, img_name=[i for i, _ in pairs], mask_name=[m for _, m in pairs])).to_csv(
        layout.split_csv(split_dir, split), index=False)
    cfg = load_config(None, [f"DATASET.root_dir={root}", f"DATASET.dataset_name={name}",
                             f"DATASET.split_dir={split_dir}"], protocol="paper")
    return data.dataset(cfg, split)


def datasets_under_test(synthetic_kvasir) -> list[tuple[Path, str, list[tuple[str, str]]]]:
    root, pairs = synthetic_kvasir
    real = [(n, n) for n in kvasir_pairs()]
    return [(root, "kvasir", pairs)] + ([(KVASIR.parent, KVASIR.name, real)] if real else [])


# ---------------------------------------------------------------- label maps: every resize as PIL's

@pytest.mark.parametrize("size", [224, 352, 64])
def test_eval_transform_resizes_labels_as_pil_nearest(synthetic_kvasir, size):
    for path in masks_under_test(synthetic_kvasir):
        label = paper_label_array(path)
        ours = eval_transform(size)(tv_tensors.Mask(torch.from_numpy(label)))
        pil = np.array(Image.fromarray(label).resize((size, size), Image.NEAREST))
        assert (ours.numpy() != pil).sum() == 0, f"{path.name} at {size}: {(ours.numpy() != pil).sum()} pixels differ"


def test_train_transform_resizes_labels_as_pil_nearest_at_every_drawn_size(synthetic_kvasir):
    """Every shorter side the train transform draws (212..268), each crop at the top left and at
    the bottom right of the resized (and padded) label."""
    low, high = train_scale_range(224)
    for path in masks_under_test(synthetic_kvasir):
        label = paper_label_array(path)
        for shorter in range(low, high + 1):
            h, w = resized_hw(label.shape, shorter)
            pil = np.array(Image.fromarray(label).resize((w, h), Image.NEAREST))
            pil = np.pad(pil, ((0, max(224 - h, 0)), (0, max(224 - w, 0))))
            for top, left in ((0, 0), (pil.shape[0] - 224, pil.shape[1] - 224)):
                with draws(shorter, *crop_draws(pil.shape, 224, top, left)):
                    ours = train_transform(224)(tv_tensors.Mask(torch.from_numpy(label)))
                differ = (ours.numpy() != pil[top:top + 224, left:left + 224]).sum()
                assert differ == 0, f"{path.name}, shorter side {shorter}, crop {(top, left)}: {differ} pixels differ"


@pytest.mark.parametrize("scale", [0.5, 0.77, 1.6])
def test_mask_stored_at_another_scale_is_resized_as_pil_nearest(synthetic_kvasir, tmp_path, scale):
    """read_mask(size=...) of a mask saved at another scale than its image (registry._resize)."""
    for path in masks_under_test(synthetic_kvasir):
        label = paper_label_array(path)
        h, w = label.shape
        stored = np.array(Image.fromarray(label * 255).resize((round(w * scale), round(h * scale)), Image.BILINEAR))
        file = tmp_path / f"{path.stem}.png"
        Image.fromarray(stored).save(file)
        ours = read_mask(file, get_spec("clinicdb"), size=(w, h))
        pil = np.array(Image.fromarray((stored >= 128).astype(np.uint8)).resize((w, h), Image.NEAREST))
        assert (ours != pil).sum() == 0, f"{path.name} stored at x{scale}: {(ours != pil).sum()} pixels differ"


def test_augment_scale_copies_resample_labels_as_pil_nearest(synthetic_kvasir, tmp_path):
    """augment_data.py's scale<f> zooms about the centre; its mask copy is PIL's NEAREST through
    the same map (output pixel centre u <- (u - c) / f + c), exact ties included."""
    dataset, splits = tmp_path / "clinicdb", tmp_path / "splits"
    sources = {}
    for k, path in enumerate(masks_under_test(synthetic_kvasir)):
        label = paper_label_array(path)
        (dataset / "images").mkdir(parents=True, exist_ok=True)
        (dataset / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.repeat(label[:, :, None] * 200, 3, 2)).save(dataset / "images" / f"m{k}.png")
        Image.fromarray(label * 255).save(dataset / "masks" / f"m{k}.png")
        sources[f"m{k}"] = label * 255
    splits.mkdir()
    pd.DataFrame(dict(dataset="clinicdb", img_name=[f"{s}.png" for s in sources],
                      mask_name=[f"{s}.png" for s in sources])).to_csv(layout.split_csv(splits, "train"), index=False)
    ops = {"scale0.75": 0.75, "scale1.25": 1.25, "scale1.5": 1.5}
    augment_data.main(["--dataset-name", "clinicdb", "--dataset-path", str(dataset), "--split-dir", str(splits),
                       "--workers", "1", "--ops", ",".join(ops)])
    for stem, mask in sources.items():
        h, w = mask.shape
        for op, f in ops.items():
            copy = np.array(Image.open(layout.augmented_dir(dataset) / "masks" / f"{stem}_aug-scale{round(f * 100)}.png"))
            inverse = (1 / f, 0, (1 - 1 / f) * w / 2, 0, 1 / f, (1 - 1 / f) * h / 2)
            pil = np.array(Image.fromarray(mask).transform((w, h), Image.Transform.AFFINE, inverse,
                                                           Image.Resampling.NEAREST))
            assert (copy != pil).sum() == 0, f"{stem} ({h}x{w}) {op}: {(copy != pil).sum()} pixels differ"


# ---------------------------------------------------------------- dataset items: the paper's

def test_eval_items_are_the_papers(synthetic_kvasir, tmp_path):
    for root, name, pairs in datasets_under_test(synthetic_kvasir):
        items = project_set(root, name, pairs, "val", tmp_path)
        for index, (image, mask) in enumerate(pairs):
            paper = paper_item(root / name / "images" / image, root / name / "masks" / mask)
            assert_same_item(items[index], paper, f"{name}/{image}")


def test_train_items_are_the_papers_at_a_fixed_size_and_crop(synthetic_kvasir, tmp_path):
    """The train transform's draws set to a shorter side and a crop box (the smallest side, which
    pads a 250 x 250 image; a middle one; the largest, cropped at its far corner)."""
    low, high = train_scale_range(224)
    for root, name, pairs in datasets_under_test(synthetic_kvasir):
        items = project_set(root, name, pairs, "train", tmp_path)
        for index, (image, mask) in enumerate(pairs):
            hw = image_hw(root / name / "images" / image)
            for shorter in (low, 240, high):
                h, w = resized_hw(hw, shorter)
                top, left = max(h - 224, 0), max(w - 224, 0) // 3
                with draws(shorter, *crop_draws((max(h, 224), max(w, 224)), 224, top, left)):
                    item = items[index]
                paper = paper_item(root / name / "images" / image, root / name / "masks" / mask, box=(shorter, top, left))
                assert_same_item(item, paper, f"{name}/{image} at {shorter}, crop {(top, left)}")


def test_a_mask_at_another_scale_parts_from_the_papers_only_on_its_outline(tmp_path):
    """The paper resizes such a mask once, to the input size; here it is read at its image's size
    first (README, "What differs"): a few outline pixels of the label map differ."""
    image, mask = write_pair(tmp_path / "kvasir", "half", 333, 517, seed=11, mask_ext=".png")
    full = np.array(Image.open(tmp_path / "kvasir" / "masks" / mask))
    Image.fromarray(full).resize((259, 167), Image.NEAREST).save(tmp_path / "kvasir" / "masks" / mask)
    item = project_set(tmp_path, "kvasir", [(image, mask)], "val", tmp_path)[0]
    _, paper, _ = paper_item(tmp_path / "kvasir" / "images" / image, tmp_path / "kvasir" / "masks" / mask)
    differ = (item["label"] != paper).numpy()
    outline = cv2.dilate(paper.numpy().astype(np.uint8), np.ones((3, 3))) != cv2.erode(
        paper.numpy().astype(np.uint8), np.ones((3, 3)))
    assert 0 < differ.sum() and not differ[~outline].any() and differ.mean() < 0.005
