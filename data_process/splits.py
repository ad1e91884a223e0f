"""The split files of a folder as one set: {train,val,test}_data.csv and train_augmented.csv.

- Read and written whole. Commands that write them (make_splits.py, augment_data.py) take
  turns and replace them as one (`writing`, `write`); a command that reads them reads all of
  them at once, under the same lock (`read`): each sees the old set or the new one.
- `SplitSet.of(dataset, dataset_dir)` gives one dataset's rows: its registry aliases read as its
  name, names read as paths under its images/ and masks/ (`within`), and checked to be a
  partition: no image, and no copy of one (by its origin), in two splits.
"""

from __future__ import annotations

import posixpath
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from common.csv_reader import read_csv
from common.errors import SHOW, CoTexNetError
from common.shared_files import publish, taking_turns
from data_process import layout
from data_process.layout import AUGMENTED_COLUMNS, SPLIT_COLUMNS, SPLITS
from data_process.registry import get_spec

SET = "split_files"  # the lock and journal of the set: <split_dir>/.split_files.lock
KINDS = (*SPLITS, "augmented")
FILES = [layout.split_csv("", kind).name for kind in KINDS]
MISSING = "make it with data_process/make_splits.py"


def within(name: str, folder: Path, where: str) -> str:
    """`name` as a path relative to `folder`: "./a.jpg" and "sub/../a.jpg" are "a.jpg", and so is an
    absolute path to the file inside `folder`; a name that leaves the folder is refused (`where`
    names the row)."""
    if posixpath.isabs(name):
        absolute = posixpath.normpath(name)
        for root in dict.fromkeys((posixpath.normpath(folder.absolute()), str(folder.resolve()))):
            if absolute.startswith(root.rstrip("/") + "/"):
                return absolute[len(root.rstrip("/")) + 1:]
        raise CoTexNetError(f"{where}: {name!r} is not under {folder}; split rows name files relative to it")
    tidy = posixpath.normpath(name)
    if tidy == "." or tidy == ".." or tidy.startswith("../"):
        raise CoTexNetError(f"{where}: {name!r} leaves the folder it is relative to ({folder})")
    return tidy


def dataset_rows(table: pd.DataFrame, path: Path, name: str, dataset_dir: Path) -> pd.DataFrame:
    """The rows of split table `table` (read from `path`) for dataset `name`, possibly none.

    Rows named by an alias of the dataset in the registry (the paper's published Kvasir
    val_data.csv says kvasir_polyp) count as the dataset's, with one warning line. Image and mask
    names are read as paths under `dataset_dir`'s images/ and masks/ (`within`). Repeated rows
    are dropped with a warning; one image listed with two masks is an error."""
    aliases = [alias for alias in get_spec(name).aliases if (table["dataset"] == alias).any()]
    if aliases:
        print(f"warning: {path}: rows named {', '.join(map(repr, aliases))} read as {name!r} "
              "(an alias in dataset_config/datasets.yaml)", file=sys.stderr)
        table = table.assign(dataset=table["dataset"].replace(dict.fromkeys(aliases, name)))
    rows = table[table["dataset"] == name]
    for column, sub in (("img_name", "images"), ("mask_name", "masks")):
        rows = rows.assign(**{column: [within(value, dataset_dir / sub, f"{path}: {column} of {name}")
                                       for value in rows[column]]})
    # A repeated row would weigh an image twice (in training) or count it twice (in metrics).
    repeated = rows.duplicated(SPLIT_COLUMNS)
    if repeated.any():
        print(f"warning: {path}: {repeated.sum()} repeated rows of {name} dropped, e.g. "
              f"{rows.loc[repeated, 'img_name'].tolist()[:SHOW]}", file=sys.stderr)
        rows = rows[~repeated]
    clash = rows["img_name"][rows["img_name"].duplicated()].tolist()
    if clash:
        raise CoTexNetError(f"{path}: image {clash[0]!r} of {name} is listed with two different masks")
    return rows.reset_index(drop=True)


@dataclass
class DatasetSplits:
    """One dataset's rows in a set of split files (see `SplitSet.of`)."""

    name: str
    paths: dict[str, Path]                  # kind (train, val, test, augmented) -> its file
    tables: dict[str, pd.DataFrame | None]  # kind -> the whole file (None: no such file)
    rows: dict[str, pd.DataFrame]           # kind -> this dataset's rows (maybe none)

    def split(self, kind: str) -> pd.DataFrame:
        """This dataset's rows of one split, or an error naming the file."""
        table = self.tables[kind]
        if table is None:
            raise CoTexNetError(f"{self.paths[kind]}: no such file ({MISSING})")
        if self.rows[kind].empty:
            raise CoTexNetError(f"{self.paths[kind]}: no rows for dataset {self.name!r}; it holds "
                                f"{sorted(set(table['dataset'])) or 'no rows at all'}")
        return self.rows[kind]

    def union(self, split_dir) -> pd.DataFrame:
        """The three splits together, each image once (a dataset kept for cross-dataset
        evaluation often has rows in one split only)."""
        frames = [self.rows[kind] for kind in SPLITS if not self.rows[kind].empty]
        if not frames:
            raise CoTexNetError(f"{split_dir}: no split CSV ({', '.join(FILES[:3])}) has rows for dataset {self.name!r}")
        frame = pd.concat(frames, ignore_index=True).drop_duplicates(["img_name", "mask_name"])
        clash = frame["img_name"][frame["img_name"].duplicated()].tolist()
        if clash:
            raise CoTexNetError(f"{split_dir}: image {clash[0]!r} of {self.name} is listed with two different masks "
                                "in different splits")
        return frame.reset_index(drop=True)

    def copies_of(self, train: pd.DataFrame) -> pd.DataFrame:
        """The copies of the images of `train` (this dataset's train rows, or a subset of them)."""
        copies = self.rows["augmented"]
        stale = copies[~copies["origin"].isin(self.rows["train"]["img_name"])]
        if not stale.empty:
            print(f"warning: {self.paths['augmented']}: {len(stale)} copies of images no longer in "
                  f"{self.paths['train'].name} left out, e.g. {stale['img_name'].tolist()[:SHOW]}; rerun "
                  "data_process/augment_data.py", file=sys.stderr)
        return copies[copies["origin"].isin(train["img_name"])].reset_index(drop=True)

    def check_partition(self, switch: str) -> None:
        """No image in two splits, and no copy in training of an image of val or test: the first
        found is named with both files, and the count; `switch` says how to allow it."""
        where: dict[str, str] = {}
        twice: list[tuple[str, str, str]] = []  # image, first split, second split
        for kind in SPLITS:
            for image in self.rows[kind]["img_name"]:
                if image in where and where[image] != kind:
                    twice.append((image, where[image], kind))
                where.setdefault(image, kind)
        copies = self.rows["augmented"]
        leaks = [(copy, origin, where[origin]) for copy, origin in zip(copies["img_name"], copies["origin"], strict=True)
                 if where.get(origin, "train") != "train"]
        fix = f"fix the split files (data_process/make_splits.py), or {switch} if you mean it"
        if twice:
            image, first, second = sorted(twice)[0]
            count = f"{len(twice)} image{'s' if len(twice) > 1 else ''} in two splits"
            raise CoTexNetError(f"{self.paths[second]}: image {image!r} of {self.name} is also in {self.paths[first]} "
                                f"({count}); an image belongs to one split: {fix}")
        if leaks:
            copy, origin, split = sorted(leaks)[0]
            raise CoTexNetError(f"{self.paths['augmented']}: {copy!r} is a training copy of {origin!r}, which is in "
                                f"{self.paths[split]} ({len(leaks)} such cop{'ies' if len(leaks) > 1 else 'y'}); rerun data_process/augment_data.py "
                                f"(it copies train images only), or {switch} if you mean it")


@dataclass
class SplitSet:
    """The split files of a folder as read at one moment."""

    folder: Path
    tables: dict[str, pd.DataFrame | None]  # kind -> the file's table (None: no such file)

    def path(self, kind: str) -> Path:
        return layout.split_csv(self.folder, kind)

    def of(self, name: str, dataset_dir, allow_overlap: bool = False,
           switch: str = "DATASET.allow_split_overlap=true") -> DatasetSplits:
        """Dataset `name`'s rows (names relative to `dataset_dir`'s images/ and masks/; the copies'
        to its augmented/ folder), checked to be a partition unless `allow_overlap`."""
        dataset_dir = Path(dataset_dir)
        rows = {}
        for kind, table in self.tables.items():
            columns = AUGMENTED_COLUMNS if kind == "augmented" else SPLIT_COLUMNS
            if table is None:
                rows[kind] = pd.DataFrame(columns=columns)
                continue
            folder = layout.augmented_dir(dataset_dir) if kind == "augmented" else dataset_dir
            found = dataset_rows(table, self.path(kind), name, folder)
            if kind == "augmented":  # the origin is an image of the dataset folder itself
                found = found.assign(origin=[within(o, dataset_dir / "images", f"{self.path(kind)}: origin of {name}")
                                             for o in found["origin"]])
            rows[kind] = found
        found = DatasetSplits(name, {kind: self.path(kind) for kind in KINDS}, self.tables, rows)
        if not allow_overlap:
            found.check_partition(switch)
        return found


def _read(folder: Path, kind: str) -> pd.DataFrame | None:
    path = layout.split_csv(folder, kind)
    if not path.exists():
        return None
    columns = AUGMENTED_COLUMNS if kind == "augmented" else SPLIT_COLUMNS
    return read_csv(path, columns, missing_hint=MISSING)[columns]


def read(split_dir) -> SplitSet:
    """Every split file of `split_dir`, read at one moment (under the set's lock)."""
    folder = Path(split_dir)
    with taking_turns(folder, SET, FILES):
        return SplitSet(folder, {kind: _read(folder, kind) for kind in KINDS})


def writing(split_dir):
    """The lock of `split_dir`'s split files, held by a command that rewrites them (a context manager)."""
    return taking_turns(split_dir, SET, FILES, create=True)


def write(split_dir, tables: dict[str, pd.DataFrame | None]) -> None:
    """Replace split files of `split_dir` as one (None: remove the file); under `writing`."""
    publish(split_dir, SET, {layout.split_csv(split_dir, kind).name:
                             None if table is None else table.to_csv(index=False).encode("utf-8")
                             for kind, table in tables.items()})
