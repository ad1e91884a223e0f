"""Split a dataset into train / val / test and record it in the split CSVs.

    python data_process/make_splits.py --dataset-name kvasir --dataset-path data_process/kvasir

pairs <dataset-path>/images with <dataset-path>/masks (as make_ROI_img.py does), shuffles the
pairs with --seed and writes <out-dir>/train_data.csv, val_data.csv and test_data.csv, columns
dataset,img_name,mask_name. Only this dataset's rows are replaced (those under a registry alias
of its name too); rows of other datasets in the same files stay. Default ratios 0.8 0.1 0.1
(1000 images: 800/100/100).

mask_name is relative to <dataset-path>/masks; for a dataset with one mask per category
(mask_layout per_category in dataset_config/datasets.yaml) it is the name the masks share in
masks/<k or keyword>/. A mask without an image stops the run (nothing written); images
without a mask are listed and left out.

The files are replaced as one set, by one command at a time: a second make_splits.py or
augment_data.py on the same folder waits for the first, and a kill at any moment leaves the old
set or the new one. Augmented copies (<out-dir>/train_augmented.csv) follow their origin: the
copies of images that leave the train split are dropped from it; rerun augment_data.py for the
copies of the new train images.

--from-list FILE takes a given split instead: a CSV with columns img_name,split
(split = train, val or test), such as a published split.
"""

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from common.csv_reader import read_csv
from common.errors import SHOW, CoTexNetError, run_cli
from data_process import layout, splits
from data_process.augmented_copies import refuse_earlier_copies
from data_process.layout import SPLIT_COLUMNS, SPLITS
from data_process.pairing import pair_files
from data_process.registry import get_spec


def split_pairs(pairs: list[tuple[str, str]], ratios=(0.8, 0.1, 0.1), seed: int = 666) -> dict[str, list]:
    """Shuffle `pairs` (sorted first, so the file system's order does not matter) and cut by `ratios`."""
    if len(ratios) != 3 or not all(math.isfinite(r) and r >= 0 for r in ratios) or sum(ratios) <= 0:
        raise CoTexNetError(f"--ratios: three non-negative finite numbers for train val test, not all 0; got {list(ratios)}")
    if seed < 0:
        raise CoTexNetError(f"--seed: must be >= 0, got {seed}")
    pairs = sorted(pairs)
    order = np.random.default_rng(seed).permutation(len(pairs))
    n_train, n_val = (round(len(pairs) * ratio / sum(ratios)) for ratio in ratios[:2])
    cuts = {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    splits = {split: [pairs[i] for i in sorted(index)] for split, index in cuts.items()}
    empty = [split for split, ratio in zip(SPLITS, ratios, strict=True) if ratio > 0 and not splits[split]]
    if empty:
        print(f"warning: {len(pairs)} pairs at ratios {'/'.join(f'{r:g}' for r in ratios)} leave the "
              f"{' and '.join(empty)} split empty; train.py needs rows in train, val and test", file=sys.stderr)
    return splits


def pairs_from_list(pairs: list[tuple[str, str]], list_csv: Path) -> dict[str, list]:
    """The split of a given list (columns img_name, split). Every listed image must have a mask
    and be listed once (an image in two splits would leak); pairs the list leaves out are named."""
    table = read_csv(list_csv, ["img_name", "split"])
    bad = sorted(set(table["split"]) - set(SPLITS))
    if bad:
        raise CoTexNetError(f"{list_csv}: split must be train, val or test, found {bad[:SHOW]}")
    mask_of = dict(pairs)
    missing = [name for name in table["img_name"] if name not in mask_of]
    if missing:
        raise CoTexNetError(f"{list_csv}: {len(missing)} listed images have no image/mask pair, e.g. {missing[:SHOW]}")
    twice = table[table["img_name"].duplicated(keep=False)]
    if not twice.empty:
        name = twice["img_name"].iloc[0]
        where = sorted(twice.loc[twice["img_name"] == name, "split"])
        raise CoTexNetError(f"{list_csv}: {twice['img_name'].nunique()} images listed more than once, e.g. "
                            f"{name!r} in {' and '.join(where)}; an image belongs to one split")
    left_out = sorted(set(mask_of) - set(table["img_name"]))
    if left_out:
        print(f"warning: {list_csv}: {len(left_out)} image/mask pairs are not in the list and are left out of "
              f"every split, e.g. {left_out[:SHOW]}", file=sys.stderr)
    return {split: [(name, mask_of[name]) for name in table.loc[table["split"] == split, "img_name"]]
            for split in SPLITS}


def merge_split(table: pd.DataFrame | None, dataset_name: str, pairs: list[tuple[str, str]]) -> pd.DataFrame:
    """Split table `table` (None: no file yet) with `dataset_name`'s rows, and those under its
    registry aliases, replaced by `pairs`."""
    rows = pd.DataFrame([(dataset_name, image, mask) for image, mask in pairs], columns=SPLIT_COLUMNS)
    if table is None:
        return rows
    names = {dataset_name, *get_spec(dataset_name).aliases}
    return pd.concat([table[~table["dataset"].isin(names)], rows], ignore_index=True)


def follow_origins(table: pd.DataFrame | None, dataset_name: str, train: list[tuple[str, str]]):
    """The copies' table without this dataset's copies of images no longer in `train`; and how
    many were dropped."""
    if table is None:
        return None, 0
    names = {dataset_name, *get_spec(dataset_name).aliases}
    stale = table["dataset"].isin(names) & ~table["origin"].isin({image for image, _ in train})
    return table[~stale], int(stale.sum())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset-name", required=True, help="name written in the CSVs' dataset column (registry name)")
    parser.add_argument("--dataset-path", required=True, type=Path, help="dataset folder holding images/ and masks/")
    parser.add_argument("--img-format", help="image extension, e.g. .jpg (default: the registry's, else any image)")
    parser.add_argument("--mask-format", help="mask extension, e.g. .png (default: the registry's, else any image)")
    parser.add_argument("--ratios", type=float, nargs=3, default=(0.8, 0.1, 0.1), metavar=("TRAIN", "VAL", "TEST"),
                        help="split fractions, normalised to sum 1 (default: 0.8 0.1 0.1)")
    parser.add_argument("--seed", type=int, default=666, help="shuffle seed (default: 666, the paper's seed)")
    parser.add_argument("--from-list", type=Path, help="CSV with columns img_name,split to use instead of shuffling")
    parser.add_argument("--out-dir", type=Path, default=Path(layout.DEFAULT_SPLIT_DIR),
                        help=f"folder of the split CSVs (default: {layout.DEFAULT_SPLIT_DIR}/)")
    args = parser.parse_args(argv)

    spec = get_spec(args.dataset_name)
    refuse_earlier_copies(args.dataset_path)
    pairing = pair_files(args.dataset_path, spec, args.img_format, args.mask_format)
    pairing.check(args.dataset_path, spec)
    chosen = (pairs_from_list(pairing.pairs, args.from_list) if args.from_list
              else split_pairs(pairing.pairs, args.ratios, args.seed))
    with splits.writing(args.out_dir):
        now = splits.read(args.out_dir)
        name = args.dataset_name
        tables = {split: merge_split(now.tables[split], name, chosen[split]) for split in SPLITS}
        tables["augmented"], dropped = follow_origins(now.tables["augmented"], name, chosen["train"])
        splits.SplitSet(now.folder, tables).of(name, args.dataset_path)  # a partition, copies included
        splits.write(args.out_dir, tables if dropped else {split: tables[split] for split in SPLITS})
    counts = "/".join(str(len(chosen[split])) for split in SPLITS)
    print(f"{args.dataset_name}: {counts} train/val/test pairs written to {args.out_dir}/{{train,val,test}}_data.csv"
          + (f"; {dropped} augmented copies of images now in val or test dropped from "
             f"{layout.split_csv(args.out_dir, 'augmented').name} (rerun augment_data.py)" if dropped else ""))


if __name__ == "__main__":
    run_cli(main)
