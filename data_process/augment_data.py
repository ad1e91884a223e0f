"""Offline augmentation of the training split, as the paper's README recommends before training.

    python data_process/augment_data.py --dataset-name kvasir --dataset-path data_process/kvasir

For every image of the dataset's rows in <split-dir>/train_data.csv, and for each op of --ops
(default hflip,vflip,scale0.75,scale1.25), writes a copy of the image and of its mask into
<dataset-path>/augmented/images/ and masks/ as <stem>_aug-<op><ext> (scale0.75 -> _aug-scale75),
in the dataset's own formats, and lists it in <split-dir>/train_augmented.csv with its origin.
The dataset's own folders and split files are only read; a train image that is also in val or
test stops the run, nothing written.

hflip / vflip mirror the image; scale<f> zooms by f about the centre at the same size (f < 1:
black border around, f > 1: the rim cropped away). Masks follow with nearest neighbour.

Then make the copies' ROIs and text with the same commands as for the originals
(make_ROI_img.py and get_text.py on the dataset folder take its augmented/ folder too; the text
of a flipped polyp names its new place) and train: train.py reads train_augmented.csv beside
train_data.csv (DATASET.augmented: false leaves the copies out).

Safe to rerun: the same ops write nothing; other ops add only their copies; copies of images
no longer in train go; a killed run finishes where it stopped; two runs take turns. --undo
removes every copy: the dataset's rows of train_augmented.csv, then <dataset-path>/augmented/.
"""

import argparse
import os
from pathlib import Path

from common.errors import run_cli
from data_process import augmented_copies, layout, splits
from data_process.registry import get_spec, known_datasets


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset-name", required=True,
                        help=f"name in the split CSVs' dataset column ({', '.join(known_datasets())}, or another)")
    parser.add_argument("--dataset-path", required=True, type=Path, help="dataset folder holding images/ and masks/")
    parser.add_argument("--ops", default=augmented_copies.DEFAULT_OPS,
                        help=f"comma-separated: hflip, vflip, scale<factor> (default: {augmented_copies.DEFAULT_OPS})")
    parser.add_argument("--split-dir", type=Path, default=Path(layout.DEFAULT_SPLIT_DIR),
                        help=f"folder of the split CSVs (default: {layout.DEFAULT_SPLIT_DIR}/)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="parallel processes (default: the CPU count, at most 8)")
    parser.add_argument("--allow-split-overlap", action="store_true",
                        help="copy train images that are also in val or test (a benchmark that means it)")
    parser.add_argument("--dry-run", action="store_true", help="print what would be written or removed, write nothing")
    parser.add_argument("--undo", action="store_true", help="remove every copy (the rows, then the folder)")
    args = parser.parse_args(argv)

    spec = get_spec(args.dataset_name)
    split_file = layout.split_csv(args.split_dir, "augmented")
    with splits.writing(args.split_dir):
        if args.undo:
            rows, files = augmented_copies.undo(args.dataset_path, spec, args.split_dir, args.dry_run)
            verb = "would remove" if args.dry_run else "removed"
            print(f"{spec.name}: {verb} {rows} rows of {split_file} and {files} files "
                  f"({layout.augmented_dir(args.dataset_path)}: copies, masks, ROIs)" if rows or files
                  else f"{spec.name}: no copies, nothing to undo")
            return
        ops = augmented_copies.parse_ops(args.ops)
        plan = augmented_copies.plan(args.dataset_path, spec, args.split_dir, ops, args.allow_split_overlap)
        if plan.empty:
            print(f"{spec.name}: nothing to do, the {plan.copies} copies of the {plan.sources} train images "
                  f"are there and listed in {split_file}")
            return
        written = [files for *_, outputs in plan.jobs for _, files in outputs]
        if args.dry_run:
            for files in written:
                print(f"would write {' '.join(map(str, files))}")
            for path in plan.remove:
                print(f"would remove {path} (no longer a copy of a train image)")
            print(f"{spec.name}: would write {len(written)} copies, list {plan.copies} in {split_file}, "
                  f"remove {len(plan.remove)} files")
            return
        empty = augmented_copies.run(plan, args.workers)
    print(f"{spec.name}: {len(written)} copies written to {layout.augmented_dir(args.dataset_path)}, {plan.copies} listed in "
          f"{split_file}, {len(plan.remove)} files of copies no longer in train removed, {empty} copies with an "
          "empty mask (kept)")


if __name__ == "__main__":
    run_cli(main)
