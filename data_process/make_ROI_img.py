"""Stage 1: ROI images. Every pixel of an image outside its mask is set to 0.

    python data_process/make_ROI_img.py --dataset-name kvasir --dataset-path data_process/kvasir --img-format .jpg

reads <dataset-path>/images/* and <dataset-path>/masks/*, pairs them by stem (the dataset's
quirks, such as ISIC's "_Segmentation" suffix, come from dataset_config/datasets.yaml) and
writes <dataset-path>/ROIs/<stem>.jpg; the same for the augmented copies of augment_data.py in
<dataset-path>/augmented/ (their ROIs in augmented/ROIs/). Multi-class datasets get one ROI per image and
category, ROIs/<stem>__<category>.jpg, from label-map masks (masks/<name>) or, with
mask_layout per_category in the registry, from one binary mask per category
(masks/<k or keyword>/<name>, each used as it is). Masks of another size than their image are
resized to it (nearest neighbour). Images may be 8- or 16-bit, gray, palette, RGB or RGBA.

ROIs already there are skipped unless --overwrite. A mask without an image stops the run
before anything is written; images without a mask are listed and left out; an empty mask
gives an all-black ROI, kept and counted.
"""

import argparse
import os
from pathlib import Path

import cv2

from common.atomic import remove_stale_temporaries, write_image
from common.errors import CoTexNetError, run_cli
from common.output_folders import OutputFolder
from common.workers import map_in_processes
from data_process import layout
from data_process.decoding import category_masks, read_image
from data_process.pairing import pair_files
from data_process.registry import DatasetSpec, get_spec, known_datasets


def make_rois(job: tuple[Path, Path, DatasetSpec, list[Path]]) -> int:
    """Write the ROIs of one image (image file, mask file, spec, ROI files); returns how many came
    out all black (empty mask or category)."""
    image_path, mask_path, spec, outputs = job
    image = read_image(image_path)
    masks = category_masks(mask_path, spec, size=(image.shape[1], image.shape[0]))
    empty = 0
    for inside, out in zip(masks, outputs, strict=True):
        empty += not inside.any()
        roi = cv2.cvtColor(image * inside[:, :, None], cv2.COLOR_RGB2BGR)
        write_image(out, roi, [cv2.IMWRITE_JPEG_QUALITY, layout.JPEG_QUALITY])
    return empty


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
    pairings = {}  # the dataset, then its augmented copies: every folder checked before any is written
    for folder in layout.data_folders(args.dataset_path):
        pairings[folder] = pair_files(folder, spec, args.img_format, args.mask_format)
        pairings[folder].check(folder, spec)

    jobs, skipped = [], 0
    for folder, pairing in pairings.items():
        # never the images or masks, even through a symlinked ROIs/
        rois = OutputFolder(folder / "ROIs", input_folders=[folder / "images", folder / "masks"])
        for image, mask in pairing.pairs:
            outputs = [rois.path(name) for name in layout.roi_names(image, spec.categories)]
            for out in outputs:
                if out.is_dir():  # would pass for a finished ROI, and get_text would find none
                    raise CoTexNetError(f"{out}: a folder where the ROI of {image} goes; move it away; nothing written")
            if not args.overwrite and all(out.exists() for out in outputs):
                skipped += 1
                continue
            jobs.append((folder / "images" / image, folder / "masks" / mask, spec, outputs))
    for folder in pairings:
        remove_stale_temporaries(folder / "ROIs")  # of a run that was killed mid-write

    empties = map_in_processes(make_rois, jobs, args.workers, f"ROIs {spec.name}")
    without = sum(len(pairing.images_without_mask) for pairing in pairings.values())
    print(f"{spec.name}: {len(jobs)} images done, {skipped} skipped (ROIs already there), "
          f"{sum(empties)} empty ROIs (all black, kept), {without} images without mask; "
          f"ROIs in {' and '.join(str(folder / 'ROIs') for folder in pairings)}")


if __name__ == "__main__":
    run_cli(main)
