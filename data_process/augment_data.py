"""Offline augmentation of the training split, as the paper's README recommends before training.

    python data_process/augment_data.py --dataset-name kvasir --dataset-path data_process/kvasir

For every image of the dataset's rows in <split-dir>/train_data.csv, and for each op of --ops
(default hflip,vflip,scale0.75,scale1.25), writes a copy of the image and of its mask into
<dataset-path>/images/ and masks/ as <stem>_aug-<op><ext> (scale0.75 -> _aug-scale75), in the
dataset's own formats, and adds its row to train_data.csv. val_data.csv and test_data.csv
are only read: a train image that is also there stops the run, nothing written.

hflip / vflip mirror the image; scale<f> zooms by f about the centre at the same size (f < 1:
black border around, f > 1: the rim cropped away). Masks follow with nearest neighbour.

Then make the copies' ROIs and text as for any image (make_ROI_img.py, get_text.py: the text of
a flipped polyp names its new place) and train: train.py reads them from train_data.csv.

Safe to rerun: the same ops write nothing; other ops add only their copies; a killed run
finishes where it stopped. <dataset-path>/augmented.json lists every copy; --undo removes
them all (rows, images, masks, their ROIs) and gives back train_data.csv as it was.
make_splits.py leaves the listed copies out of a new split (then rerun this script).
"""

import sys, pathlib; sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])  # noqa: E401,E702,I001

import argparse
import os
from pathlib import Path

from common.errors import run_cli
from data_process import augment, layout
from data_process.registry import get_spec, known_datasets


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset-name", required=True,
                        help=f"name in the split CSVs' dataset column ({', '.join(known_datasets())}, or another)")
    parser.add_argument("--dataset-path", required=True, type=Path, help="dataset folder holding images/ and masks/")
    parser.add_argument("--ops", default=augment.DEFAULT_OPS,
                        help=f"comma-separated: hflip, vflip, scale<factor> (default: {augment.DEFAULT_OPS})")
    parser.add_argument("--split-dir", type=Path, default=Path(layout.DEFAULT_SPLIT_DIR),
                        help=f"folder of the split CSVs (default: {layout.DEFAULT_SPLIT_DIR}/)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="parallel processes (default: the CPU count, at most 8)")
    parser.add_argument("--dry-run", action="store_true", help="print what would be written or removed, write nothing")
    parser.add_argument("--undo", action="store_true", help="remove every copy and row this script made")
    args = parser.parse_args(argv)

    spec = get_spec(args.dataset_name)
    if args.undo:
        done = augment.undo(args.dataset_path, spec, args.split_dir, args.dry_run)
        if done is None:
            print(f"{args.dataset_path}: no {layout.AUGMENT_MANIFEST}, nothing to undo")
            return
        verb = "would remove" if args.dry_run else "removed"
        state = "as before the first run, byte for byte" if done.identical else "changed since by something else"
        print(f"{spec.name}: {verb} {done.copies} copies (images, masks, ROIs) and {done.rows} rows of "
              f"{done.split_file} ({state})")
        return

    plan = augment.plan(args.dataset_path, spec, args.split_dir, augment.parse_ops(args.ops))
    if plan.empty:
        print(f"{spec.name}: nothing to do, every copy of the {plan.sources} train images "
              "is there with its row")
        return
    if args.dry_run:
        for copy in plan.write:
            print(f"would write {' '.join(map(str, augment.copy_files(plan.dataset_dir, copy, spec)))}")
        for copy in plan.stale:
            print(f"would remove {copy['image']} (its source {copy['source']} is no longer in train)")
        print(f"{spec.name}: would write {len(plan.write)} copies, add {len(plan.add_rows)} rows to "
              f"{plan.splits.train_path}, remove {len(plan.stale)} copies")
        return
    empty = augment.run(plan, args.workers)
    print(f"{spec.name}: {len(plan.write)} copies written, {len(plan.add_rows)} rows added to {plan.splits.train_path}, "
          f"{len(plan.stale)} copies of images no longer in train removed, {empty} copies with an empty mask (kept); "
          f"listed in {layout.augment_manifest(plan.dataset_dir)}")


if __name__ == "__main__":
    run_cli(main)
