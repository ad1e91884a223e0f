"""Stage 1: ROI images. Every pixel of an image outside its mask is set to 0.

    python data_process/make_ROI_img.py --dataset-name kvasir --dataset-path data_process/kvasir --img-format .jpg

reads <dataset-path>/images/* and <dataset-path>/masks/*, pairs them by stem (the dataset's
quirks, such as ISIC's "_Segmentation" suffix, come from dataset_config/datasets.yaml) and
writes <dataset-path>/ROIs/<stem>.jpg. Multi-class datasets (label-map masks) get one ROI per
image and category: ROIs/<stem>__<category>.jpg. Masks of another size than their image are
resized to it (nearest neighbour).

ROIs already there are skipped unless --overwrite. A mask without an image stops the run
before anything is written; images without a mask are listed and left out; an empty mask
gives an all-black ROI, kept and counted.
"""

import sys, pathlib; sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])  # noqa: E401,E702,I001

import argparse
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
from tqdm import tqdm

from common.errors import CoTexNetError, run_cli
from common.io import atomic_path
from data_process.registry import DatasetSpec, get_spec, known_datasets, pair_files, read_image, read_mask, roi_name

JPEG_QUALITY = 95
SHOW = 5  # names listed in warnings


def roi_paths(rois_dir: Path, image_name: str, spec: DatasetSpec) -> list[tuple[int, Path]]:
    """(label value, ROI path) for each ROI of one image: one, or one per category."""
    stem = str(Path(image_name).with_suffix(""))
    if spec.categories:
        return [(k, rois_dir / roi_name(stem, category)) for k, category in enumerate(spec.categories, start=1)]
    return [(1, rois_dir / roi_name(stem))]


def make_rois(image_path: Path, mask_path: Path, spec: DatasetSpec, outputs: list[tuple[int, Path]]) -> int:
    """Write the ROIs of one image; returns how many came out all black (empty mask or category)."""
    image = read_image(image_path)
    label = read_mask(mask_path, spec, size=(image.shape[1], image.shape[0]))
    empty = 0
    for value, out in outputs:
        inside = label == value
        empty += not inside.any()
        roi = cv2.cvtColor(image * inside[:, :, None], cv2.COLOR_RGB2BGR)
        with atomic_path(out) as tmp:
            if not cv2.imwrite(str(tmp), roi, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]):
                raise CoTexNetError(f"{out}: could not be written")
    return empty


def _run_one(job) -> int:
    return make_rois(*job)


def _listing(names: list[str]) -> str:
    return ", ".join(names[:SHOW]) + (f" ... ({len(names) - SHOW} more)" if len(names) > SHOW else "")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset-name", required=True,
                        help=f"a name of dataset_config/datasets.yaml ({', '.join(known_datasets())}); "
                             "another name pairs masks to images by identical stem")
    parser.add_argument("--dataset-path", required=True, type=Path, help="dataset folder holding images/ and masks/")
    parser.add_argument("--img-format", help="image extension, e.g. .jpg (default: the registry's, else any image)")
    parser.add_argument("--mask-format", help="mask extension, e.g. .png (default: the registry's, else any image)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="parallel processes (default: the CPU count, at most 8)")
    parser.add_argument("--overwrite", action="store_true", help="rewrite ROIs that already exist")
    args = parser.parse_args(argv)

    spec = get_spec(args.dataset_name)
    dataset = args.dataset_path
    fmt = [None if ext is None else "." + ext.lstrip(".") for ext in (args.img_format, args.mask_format)]
    pairing = pair_files(dataset, spec, *fmt)
    if pairing.masks_without_image:
        orphan = dataset / "masks" / pairing.masks_without_image[0]
        more = len(pairing.masks_without_image) - 1
        raise CoTexNetError(f"{orphan}: no image with its stem in {dataset / 'images'}"
                            + (f" (and {more} more masks without image)" if more else "")
                            + "; nothing written")
    if not pairing.pairs:
        raise CoTexNetError(f"{dataset / 'masks'}: no masks found")
    if pairing.images_without_mask:
        print(f"warning: {len(pairing.images_without_mask)} images without mask, left out: "
              f"{_listing(pairing.images_without_mask)}", file=sys.stderr)

    jobs, skipped = [], 0
    for image, mask in pairing.pairs:
        outputs = roi_paths(dataset / "ROIs", image, spec)
        if not args.overwrite and all(out.exists() for _, out in outputs):
            skipped += 1
            continue
        jobs.append((dataset / "images" / image, dataset / "masks" / mask, spec, outputs))

    cv2.setNumThreads(1)  # parallelism comes from the processes
    bar = dict(total=len(jobs), desc=f"ROIs {spec.name}", unit="img")
    if args.workers > 1 and len(jobs) > 1:
        pool = ProcessPoolExecutor(args.workers)
        try:
            empties = list(tqdm(pool.map(_run_one, jobs, chunksize=4), **bar))
        finally:
            pool.shutdown(cancel_futures=True)  # on a bad file: stop at once, not after the queue
    else:
        empties = [_run_one(job) for job in tqdm(jobs, **bar)]
    print(f"{spec.name}: {len(jobs)} images done, {skipped} skipped (ROIs already there), "
          f"{sum(empties)} empty ROIs (all black, kept), {len(pairing.images_without_mask)} images without mask; "
          f"ROIs in {dataset / 'ROIs'}")


if __name__ == "__main__":
    run_cli(main)
