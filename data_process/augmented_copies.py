"""Augmented copies of a dataset's TRAIN split (the paper README's "Important" step).

The copies are a dataset folder of their own, `<dataset>/augmented/` (images/, masks/, and the
ROIs/ that stage 1 writes there), listed in a split file of their own,
`<split_dir>/train_augmented.csv`: the split columns, plus `origin` (the image copied) and `op`.
Its guarantees come from that:
- Train only: copies are made of the train split's images, and a copy follows its origin
  (make_splits.py drops the rows of copies whose origin leaves train; every reader of the split
  files refuses a copy of a val or test image; training reads the copies of the images it uses).
- Nothing of the researcher's is written: not the dataset's folders, not its split files.
  Removing the copies is deleting the folder and the file (`undo`).
- Idempotent, whole, safe together: a copy is written whole (temporary name, then rename) and
  only if missing; the split file is replaced in one step once every file it names exists; runs
  on one split folder take turns (the split files' lock).

Ops (`parse_ops`):
- hflip, vflip: mirror left-right, top-bottom.
- scale<f> (tag `scale<100 f>`, e.g. scale0.75 -> `_aug-scale75`): zoom about the image centre
  by f at the same image size. f < 1 shrinks the content onto a black border, f > 1 enlarges
  it and crops the rim away. A whole-image resize would change nothing that training sees: the
  training transform resizes every image to the input size anyway.
The image is interpolated bilinearly and the mask with nearest neighbour through the same map,
so both stay aligned pixel for pixel.

Files keep the dataset's formats: the image and mask extensions of the source; masks as the
registry reads them (binary 0/255, label maps 0..K; per_category layout: each category's file,
0/255, transformed alike), at the size of their image. A copy is named `<stem>_aug-<tag><ext>`
(`layout.augmented_stem`), so that its ROI and its text row never take an original's name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import cv2
import numpy as np
import pandas as pd
from PIL import Image

from common.atomic import create_exclusive, remove_stale_temporaries, stop_point, write_image
from common.errors import CoTexNetError
from common.output_folders import OutputFolder
from common.workers import map_in_processes
from data_process import layout, splits
from data_process.decoding import category_masks, read_image, read_mask
from data_process.pairing import mask_files
from data_process.registry import DatasetSpec

DEFAULT_OPS = "hflip,vflip,scale0.75,scale1.25"  # the paper's three kinds: flips and scaling
EARLIER_MANIFEST = "augmented.json"  # an earlier version's list of copies inside images/
_SCALE = re.compile(r"scale(\d+(?:\.\d+)?)")


@dataclass(frozen=True)
class Op:
    name: str           # as on the command line and in the split file: "hflip", "scale0.75"
    tag: str            # in file names, without a dot: "hflip", "scale75"
    factor: float = 1.0

    def apply(self, array: np.ndarray, nearest: bool) -> np.ndarray:
        if self.name == "hflip":
            return cv2.flip(array, 1)
        if self.name == "vflip":
            return cv2.flip(array, 0)
        h, w = array.shape[:2]
        s = self.factor  # x' = s (x - c) + c about the centre c of the pixel grid
        if nearest:  # labels: the same map by PIL's NEAREST (cv2 breaks exact ties, centres on a pixel edge, otherwise)
            inverse = (1 / s, 0, (1 - 1 / s) * w / 2, 0, 1 / s, (1 - 1 / s) * h / 2)  # output -> input, pixel-edge coordinates
            return np.array(Image.fromarray(array).transform((w, h), Image.Transform.AFFINE, inverse, Image.Resampling.NEAREST))
        matrix = np.float32([[s, 0, (1 - s) * (w - 1) / 2], [0, s, (1 - s) * (h - 1) / 2]])
        return cv2.warpAffine(array, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def parse_ops(text: str) -> list[Op]:
    """"hflip,vflip,scale0.75" -> the ops, repeats dropped."""
    ops: dict[str, Op] = {}
    for name in (part.strip() for part in text.split(",")):
        match = _SCALE.fullmatch(name)
        percent = float(match[1]) * 100 if match else 0.0
        if name in ("hflip", "vflip"):
            op = Op(name, name)
        elif match and 10 <= percent <= 400 and percent != 100 and abs(percent - round(percent)) < 1e-6:
            op = Op(f"scale{float(match[1]):g}", f"scale{round(percent)}", float(match[1]))
        else:
            raise CoTexNetError(f"--ops: {name!r} is not an op; use hflip, vflip or scale<factor> (factor 0.1..4 "
                                f"in steps of 0.01, not 1), comma-separated, e.g. {DEFAULT_OPS}")
        ops.setdefault(op.tag, op)
    return list(ops.values())


def copy_names(image: str, mask: str, op: Op, spec: DatasetSpec) -> tuple[str, str]:
    """The image and mask names of a copy; the mask keeps the registry's prefix and suffix, so
    that it pairs with its image as the original does ("a_Segmentation.png" -> "a_aug-hflip_Segmentation.png")."""
    image_path, mask_path = PurePosixPath(image), PurePosixPath(mask)
    base = layout.stem(mask_path.name)
    suffix = spec.mask_suffix
    end = len(base) - len(suffix) if suffix and base.lower().endswith(suffix.lower()) else len(base)
    return (str(image_path.with_name(layout.augmented_stem(layout.stem(image_path.name), op.tag) + image_path.suffix)),
            str(mask_path.with_name(layout.augmented_stem(base[:end], op.tag) + base[end:] + mask_path.suffix)))


def refuse_earlier_copies(dataset_dir: Path) -> None:
    """Copies of an earlier version live among the originals: a split would take them for images."""
    if (dataset_dir / EARLIER_MANIFEST).is_file():
        raise CoTexNetError(f"{dataset_dir / EARLIER_MANIFEST}: copies made by an earlier augment_data.py are in "
                            f"{dataset_dir / 'images'} and the train split; remove them first: "
                            "python data_process/augment_data.py --undo (same --dataset-name, --dataset-path, --split-dir)")


def copies_folder(dataset_dir: Path, name: str, split_file: Path, create: bool) -> Path:
    """The dataset's copies folder, checked to be augment_data.py's, listed in `split_file`;
    with `create`, made (with its record) if it is not there."""
    folder = layout.augmented_dir(dataset_dir)
    record = folder / layout.AUGMENTED_RECORD
    if create:
        folder.mkdir(exist_ok=True)
        if not any(folder.iterdir()):  # the record claims the folder, once
            made = {"made_by": "data_process/augment_data.py", "dataset": name,
                    "split_file": os.path.relpath(split_file.resolve(), folder.resolve())}
            create_exclusive(record, json.dumps(made, indent=2).encode())
    if not folder.exists():
        return folder
    try:
        made = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CoTexNetError(f"{folder}: exists and is not a folder of copies made by augment_data.py (no readable "
                            f"{layout.AUGMENTED_RECORD}); move it away; nothing written") from err
    listed = (folder / str(made.get("split_file"))).resolve()
    if made.get("dataset") != name or listed != split_file.resolve():
        raise CoTexNetError(f"{folder}: its copies are of dataset {made.get('dataset')!r}, listed in {listed}; this run "
                            f"is for {name!r} and {split_file}: undo them there first (augment_data.py --undo); "
                            "nothing written")
    return folder


@dataclass
class Plan:
    dataset_dir: Path
    spec: DatasetSpec
    split_file: Path
    table: pd.DataFrame | None   # the copies' split file as it will be (every dataset's rows)
    changed: bool                # the split file changes
    copies: int                  # this dataset's copies, listed
    sources: int                 # its train images
    jobs: list                   # (image, mask, spec, [(op, files)]) per origin of the copies whose files are missing
    remove: list[Path]           # files of copies no longer listed

    @property
    def empty(self) -> bool:
        return not (self.jobs or self.remove or self.changed)


def plan(dataset_dir, spec: DatasetSpec, split_dir, ops: list[Op], allow_overlap: bool = False) -> Plan:
    """What a run must do to reach: a copy per op of every train image (copies that earlier runs
    made with other ops kept), each with its files, listed, and nothing else in the folder.
    Checks all that could stop the run before anything is written; under `splits.writing`."""
    dataset_dir = Path(dataset_dir)
    refuse_earlier_copies(dataset_dir)
    if not (dataset_dir / "images").is_dir():
        raise CoTexNetError(f"{dataset_dir / 'images'}: no such folder")
    now = splits.read(split_dir)
    mine = now.of(spec.name, dataset_dir, allow_overlap, switch="--allow-split-overlap")
    train = dict(zip(mine.split("train")["img_name"], mine.split("train")["mask_name"], strict=True))
    folder = copies_folder(dataset_dir, spec.name, now.path("augmented"), create=False)
    earlier = mine.rows["augmented"]
    rows = {row["img_name"]: row for row in earlier[earlier["origin"].isin(list(train))].to_dict("records")}
    for image, mask in train.items():
        for op in ops:
            copy_image, copy_mask = copy_names(image, mask, op, spec)
            rows.setdefault(copy_image, dict(dataset=spec.name, img_name=copy_image, mask_name=copy_mask, origin=image,
                                             op=op.name))
    originals = {layout.stem(name): name for name in layout.list_files(dataset_dir / "images")}
    # never in the dataset's images/ or masks/, even through a symlink
    output = OutputFolder(folder, input_folders=[dataset_dir / "images", dataset_dir / "masks"])
    jobs, kept = {}, set()
    for copy in rows.values():
        if layout.stem(copy["img_name"]) in originals:
            raise CoTexNetError(f"{dataset_dir / 'images' / originals[layout.stem(copy['img_name'])]}: an original "
                                f"image named like the {copy['op']} copy of {copy['origin']}; rename it; nothing written")
        mask = dataset_dir / "masks" / train[copy["origin"]]
        sources = [dataset_dir / "images" / copy["origin"], *mask_files(mask, spec)]
        names = [copy["img_name"]] + [copy["mask_name"]] * (len(sources) - 1)
        # each file beside where its source is, under the copy's name (per_category: in the same category folder)
        files = [output.path((source.relative_to(dataset_dir).parent / PurePosixPath(name).name).as_posix())
                 for source, name in zip(sources, names, strict=True)]
        kept.update(files, (folder / "ROIs" / name for name in layout.roi_names(copy["img_name"], spec.categories)))
        if all(path.exists() for path in files):
            continue
        for path in sources:  # a missing source would stop the run half-way
            if not path.exists():
                raise CoTexNetError(f"{path}: no such file (listed in {now.path('train')}); nothing written")
        jobs.setdefault(copy["origin"], (sources[0], mask, spec, []))[3].append((parse_ops(copy["op"])[0], files))
    remove = [path for sub in ("images", "masks", "ROIs") for path in sorted((folder / sub).rglob("*"))
              if path.is_file() and path not in kept and not layout.is_hidden(path.relative_to(folder))]
    table, names = now.tables["augmented"], {spec.name, *spec.aliases}
    ours = pd.DataFrame(rows.values(), columns=layout.AUGMENTED_COLUMNS)
    before = set() if table is None else set(table[table["dataset"].isin(names)].itertuples(index=False))
    new = pd.concat([None if table is None else table[~table["dataset"].isin(names)], ours], ignore_index=True)
    return Plan(dataset_dir, spec, now.path("augmented"), new if len(new) else None,
                before != set(ours.itertuples(index=False)), len(rows), len(train), list(jobs.values()), remove)


def _params(path: Path) -> list[int]:
    return [cv2.IMWRITE_JPEG_QUALITY, layout.JPEG_QUALITY] if path.suffix.lower() in (".jpg", ".jpeg") else []


def make_copies(job) -> int:
    """Write the copies of one source image; returns how many have an empty mask (zoomed out of view)."""
    image_path, mask_path, spec, outputs = job
    image = read_image(image_path)
    size = (image.shape[1], image.shape[0])
    masks = ([read_mask(mask_path, spec, size)] if spec.mask_encoding == "labelmap"  # one file of labels 0..K
             else [inside.astype(np.uint8) * 255 for inside in category_masks(mask_path, spec, size)])
    empty = 0
    for op, files in outputs:
        copied = [op.apply(mask, nearest=True) for mask in masks]
        empty += not any(mask.any() for mask in copied)
        for mask, path in zip(copied, files[1:], strict=True):
            write_image(path, mask, _params(path))
        write_image(files[0], cv2.cvtColor(op.apply(image, nearest=False), cv2.COLOR_RGB2BGR), _params(files[0]))
    return empty


def run(plan: Plan, workers: int = 1) -> int:
    """Carry out `plan`: the missing files, then the split file, then the files no longer listed
    go. Returns the copies with an empty mask."""
    folder = copies_folder(plan.dataset_dir, plan.spec.name, plan.split_file, create=True)
    for sub in ("images", "masks"):  # what a killed run left
        remove_stale_temporaries(folder / sub)
    empties = sum(map_in_processes(make_copies, plan.jobs, workers, f"augment {plan.spec.name}"))
    stop_point("augment:copies written")
    if plan.changed:
        splits.write(plan.split_file.parent, {"augmented": plan.table})
    for path in plan.remove:
        path.unlink(missing_ok=True)
    return empties


def undo(dataset_dir, spec: DatasetSpec, split_dir, dry_run: bool = False) -> tuple[int, int]:
    """Remove the dataset's copies: their rows, then their folder (and copies of an earlier version,
    among the originals). Returns (rows removed, files removed); under `splits.writing`."""
    dataset_dir = Path(dataset_dir)
    now = splits.read(split_dir)
    table, names = now.tables["augmented"], {spec.name, *spec.aliases}
    folder = layout.augmented_dir(dataset_dir)
    files = [path for path in folder.rglob("*") if path.is_file()] if folder.exists() else []
    if files:
        copies_folder(dataset_dir, spec.name, now.path("augmented"), create=False)
    earlier_rows, earlier_files = _earlier_copies(dataset_dir, spec, now)
    rows = (0 if table is None else int(table["dataset"].isin(names).sum())) + len(earlier_rows)
    if dry_run:
        return rows, len(files) + len(earlier_files)
    if rows:
        rest = None if table is None else table[~table["dataset"].isin(names)]
        splits.write(split_dir, {"augmented": rest if rest is not None and len(rest) else None,
                                 **({"train": now.tables["train"].drop(earlier_rows)} if len(earlier_rows) else {})})
    for sub in ("images", "masks", "ROIs"):  # images/ first: a folder without it is no copies folder to stage 1
        shutil.rmtree(folder / sub, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)
    for path in earlier_files:
        path.unlink(missing_ok=True)
    (dataset_dir / EARLIER_MANIFEST).unlink(missing_ok=True)
    return rows, len(files) + len(earlier_files)


def _earlier_copies(dataset_dir: Path, spec: DatasetSpec, now: splits.SplitSet) -> tuple[pd.Index, list[Path]]:
    """The train rows (index) and the files (images, masks, ROIs) of the copies an earlier version
    listed in <dataset>/augmented.json."""
    path = dataset_dir / EARLIER_MANIFEST
    if not path.is_file():
        return pd.Index([]), []
    try:
        copies = json.loads(path.read_text(encoding="utf-8"))["copies"]
    except (OSError, ValueError, KeyError) as err:
        raise CoTexNetError(f"{path}: not a readable list of copies ({err}); delete the copies it names by hand") from err
    images = {copy["image"] for copy in copies}
    train = now.tables["train"]
    rows = pd.Index([]) if train is None else train.index[train["dataset"].isin({spec.name, *spec.aliases})
                                                          & train["img_name"].isin(images)]
    files = [path for copy in copies for path in (dataset_dir / "images" / copy["image"],
                                                  *mask_files(dataset_dir / "masks" / copy["mask"], spec),
                                                  *(dataset_dir / "ROIs" / name for name in layout.roi_names(copy["image"], spec.categories)))]
    return rows, [path for path in files if path.exists()]
