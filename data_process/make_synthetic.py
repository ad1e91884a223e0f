"""Write a synthetic segmentation dataset in the real layout, for the demo, tests and benchmarks.

<root>/<name>/images/syn_0000.jpg ...   non-square images (180..420 px a side), textured dark
                                         background, 0..3 bright polyp-like blobs (ellipses and
                                         irregular shapes) of varied colour, size and place
<root>/<name>/masks/syn_0000.jpg ...    0/255 masks: JPEG (with real JPEG artefacts) or PNG;
                                         --multiclass: PNG label maps, 1 = "polyp area" (warm
                                         colours), 2 = "lesion area" (cyan)
<root>/<name>/masks/<k>/syn_0000.png    --per-category-masks: the same two categories, one 0/255
                                         mask per image and category k = 1, 2 (registry:
                                         synthetic_percategory, mask_layout per_category)
<root>/<name>/truth.csv                 ground truth for stage 2: img_name, mask_name, number
                                         (separate blobs), cx, cy (centroid of the foreground,
                                         0..1 of width/height), area_fraction; --multiclass adds
                                         `category` (one row per image and category)

Image i depends only on (seed, i): --count 20 gives the first 20 images of --count 200.
Blobs never touch, and every centroid keeps 0.04 away from the lines 0.4 and 0.6, so that
"left / center / right" and "top / center / bottom" are unambiguous.
"""

import argparse
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from common.atomic import atomic_path, write_image
from common.errors import CoTexNetError, run_cli
from data_process.registry import get_spec

BLOB_COUNT_P = [0.05, 0.55, 0.28, 0.12]  # P(0), P(1), P(2), P(3) blobs
HUES = {1: [(0, 28), (165, 180)], 2: [(86, 100)]}  # OpenCV hue (0..180): warm polyps, cyan lesions
SIDE = (180, 420)
CENTROID_GAP = 0.04


def _colour(rng, hue_ranges, saturation, value) -> np.ndarray:
    low, high = hue_ranges[rng.integers(len(hue_ranges))]
    hsv = np.uint8([[[rng.integers(low, high), rng.integers(*saturation), rng.integers(*value)]]])
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _noise(rng, h, w, cells, amplitude) -> np.ndarray:
    """Smooth random texture: a coarse random grid upsampled with cubic interpolation."""
    grid = rng.normal(0, amplitude, (cells, cells, 3)).astype(np.float32)
    return cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)


def _background(rng, h, w) -> np.ndarray:
    image = _colour(rng, [(0, 180)], (20, 70), (70, 115)) + _noise(rng, h, w, 6, 14) + _noise(rng, h, w, 24, 5)
    for _ in range(rng.integers(2, 5)):  # a few darker vessel-like curves
        points = np.cumsum(rng.normal(0, 25, (6, 2)), axis=0) + [rng.integers(w), rng.integers(h)]
        cv2.polylines(image, [points.astype(np.int32)], False, (float(image.mean()) * 0.6,) * 3, int(rng.integers(1, 3)))
    return image


def _blob_mask(rng, h, w) -> np.ndarray:
    """One filled ellipse or irregular (radially wobbling) shape, fully inside the image."""
    radius = rng.uniform(0.12, 0.24) * min(h, w)
    centre = rng.uniform([radius + 2, radius + 2], [w - radius - 2, h - radius - 2])
    angle = np.linspace(0, 2 * np.pi, 72, endpoint=False)
    if rng.random() < 0.5:
        stretch, tilt = rng.uniform(0.65, 1.0), rng.uniform(0, np.pi)
        r = radius * stretch / np.sqrt((stretch * np.cos(angle - tilt)) ** 2 + np.sin(angle - tilt) ** 2)
    else:
        r = radius * (1 + sum(rng.uniform(0, 0.12) * np.sin(k * angle + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5)))
        r = np.minimum(r, radius)
    points = centre + np.stack([r * np.cos(angle), r * np.sin(angle)], axis=1)
    mask = np.zeros((h, w), np.uint8)
    cv2.fillPoly(mask, [points.round().astype(np.int32)], 1)
    return mask


def _centroid_ok(mask: np.ndarray) -> bool:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return True
    centre = (xs.mean() / mask.shape[1], ys.mean() / mask.shape[0])
    return all(abs(c - line) >= CENTROID_GAP for c in centre for line in (0.4, 0.6))


def _layout(rng, h, w, multiclass: bool) -> np.ndarray:
    """A label map of non-touching blobs (class 1, or 1/2 if multiclass) with clear centroids."""
    while True:
        label = np.zeros((h, w), np.uint8)
        wanted, placed = rng.choice(4, p=BLOB_COUNT_P), 0
        for _ in range(wanted * 20):
            blob = _blob_mask(rng, h, w)
            # 9 px apart: JPEG artefacts and nearest-neighbour resizing never merge two blobs
            if not (cv2.dilate(label, np.ones((19, 19), np.uint8)) & blob).any():
                label[blob > 0] = rng.integers(1, 3) if multiclass else 1
                placed += 1
                if placed == wanted:
                    break
        if placed == wanted and all(_centroid_ok(label == k) for k in (1, 2)):
            return label


def _render(rng, label: np.ndarray) -> np.ndarray:
    h, w = label.shape
    image = _background(rng, h, w)
    count, components = cv2.connectedComponents((label > 0).astype(np.uint8))
    for index in range(1, count):
        inside = components == index
        category = int(label[inside][0])
        shade = _colour(rng, HUES[category], (140, 230), (195, 250)) + _noise(rng, h, w, 8, 10)
        image[inside] = shade[inside]
    image += rng.normal(0, 3, image.shape).astype(np.float32)
    return cv2.GaussianBlur(np.clip(image, 0, 255), (3, 3), 0).astype(np.uint8)


def _truth_rows(img_name, mask_name, label, categories) -> list[dict]:
    rows = []
    for k, category in enumerate(categories, start=1):
        mask = (label == k).astype(np.uint8)
        ys, xs = np.nonzero(mask)
        row = dict(img_name=img_name, mask_name=mask_name, number=cv2.connectedComponents(mask)[0] - 1,
                   cx=round(xs.mean() / mask.shape[1], 4) if len(xs) else None,
                   cy=round(ys.mean() / mask.shape[0], 4) if len(ys) else None,
                   area_fraction=round(mask.mean(), 5))
        rows.append(row if len(categories) == 1 else {**row, "category": category})
    return rows


def make_synthetic(root, name: str | None = None, count: int = 60, seed: int = 0, mask_format: str | None = None,
                   multiclass: bool = False, overwrite: bool = False, per_category: bool = False) -> Path:
    """Write the dataset to `<root>/<name>` (built beside it, then renamed into place); return that folder.

    `per_category`: the multi-class dataset with one binary mask per category instead of label maps."""
    registry_name = "synthetic_percategory" if per_category else "synthetic_multiclass" if multiclass else "synthetic"
    name = name or registry_name
    multiclass = multiclass or per_category
    mask_format = mask_format or ("png" if multiclass else "jpg")
    if multiclass and not per_category and mask_format != "png":
        raise CoTexNetError("--mask-format: label maps (--multiclass) must be png, JPEG would blur the class ids")
    if count < 1:
        raise CoTexNetError(f"--count: must be at least 1, got {count}")
    out = Path(root) / name
    if out.exists() and not overwrite:
        raise CoTexNetError(f"{out}: exists; pass --overwrite to replace it")
    if out.exists() and not (out / "truth.csv").exists():
        raise CoTexNetError(f"{out}: exists and is not a synthetic dataset (no truth.csv); not replacing it")
    spec = get_spec(registry_name)
    categories = spec.categories or (spec.keyword,)
    build = out.with_name(f".{name}.building")
    shutil.rmtree(build, ignore_errors=True)
    rows = []
    try:
        for i in tqdm(range(count), desc=f"synthetic {name}", unit="img"):
            rng = np.random.default_rng([seed, i])
            while True:
                w, h = (int(side) for side in rng.integers(SIDE[0], SIDE[1] + 1, 2))
                if abs(w - h) >= 20:
                    break
            label = _layout(rng, h, w, multiclass)
            img_name, mask_name = f"syn_{i:04d}.jpg", f"syn_{i:04d}.{mask_format}"
            write_image(build / "images" / img_name, cv2.cvtColor(_render(rng, label), cv2.COLOR_RGB2BGR),
                   (cv2.IMWRITE_JPEG_QUALITY, 90))
            quality = (cv2.IMWRITE_JPEG_QUALITY, 75) if mask_format == "jpg" else ()
            if per_category:
                for k in range(1, len(categories) + 1):
                    write_image(build / "masks" / str(k) / mask_name, (label == k).astype(np.uint8) * 255, quality)
            else:
                write_image(build / "masks" / mask_name, label if multiclass else label * 255, quality)
            rows += _truth_rows(img_name, mask_name, label, categories)
        with atomic_path(build / "truth.csv") as tmp:
            pd.DataFrame(rows).to_csv(tmp, index=False)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    build.rename(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="data_process", help="folder that holds the datasets (default: data_process)")
    parser.add_argument("--name", help="dataset folder name (default: synthetic, synthetic_multiclass or synthetic_percategory)")
    parser.add_argument("--count", type=int, default=60, help="number of images (default: 60)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same files (default: 0)")
    parser.add_argument("--mask-format", choices=["jpg", "png"],
                        help="mask files: jpg (0/255 with JPEG artefacts, like Kvasir; the binary default) or png")
    parser.add_argument("--multiclass", action="store_true", help="PNG label maps with 2 categories instead of 0/255 masks")
    parser.add_argument("--per-category-masks", action="store_true",
                        help="multi-class, one 0/255 mask per image and category in masks/1/, masks/2/ "
                             "(the paper README's layout) instead of label maps")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing synthetic dataset of that name")
    args = parser.parse_args(argv)
    out = make_synthetic(args.root, args.name, args.count, args.seed, args.mask_format, args.multiclass, args.overwrite,
                         args.per_category_masks)
    print(f"{args.count} images written to {out} (ground truth: {out / 'truth.csv'})")


if __name__ == "__main__":
    run_cli(main)
