"""Offline augmentation of a dataset's TRAIN split (the paper README's "Important" step).

For every image of the train split, each op writes a copy of the image and of its mask beside
the originals, named `<stem>_aug-<tag><ext>` (`layout.augmented_stem`), and adds its row to the
train split file. Validation and test images never get a copy: a train image that is also in
val or test stops the run before anything is written.

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
0/255, transformed alike), at the size of their image; JPEG quality 95.

Order of writes, so that a run killed at any moment (even kill -9) leaves no split row naming
a missing file and its rerun finishes the job: the manifest `<dataset>/augmented.json` lists
the copies first, then the files are written (each atomically), then the train split file
gets all the new rows in one atomic write. Undo goes the other way: rows, files, manifest.
The split file is edited as text: other rows keep their bytes, so undo gives back the file
byte for byte when nothing else changed it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from common.errors import CoTexNetError
from common.io import atomic_path, leftovers, not_utf8, read_csv, write_image, write_json
from data_process import layout
from data_process.registry import DatasetSpec, category_files, category_masks, read_image, read_mask

DEFAULT_OPS = "hflip,vflip,scale0.75,scale1.25"  # the paper's three kinds: flips and scaling
JPEG_QUALITY = 95
MANIFEST_FORMAT = 1
SHOW = 5  # names listed in messages
_SCALE = re.compile(r"scale(\d+(?:\.\d+)?)")


@dataclass(frozen=True)
class Op:
    name: str           # as on the command line and in the manifest: "hflip", "scale0.75"
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


def copy_files(dataset_dir: Path, copy: dict, spec: DatasetSpec) -> list[Path]:
    """The image and mask file(s) of a copy (per_category layout: one mask per category folder)."""
    mask = dataset_dir / "masks" / copy["mask"]
    masks = category_files(mask, spec) if spec.mask_layout == "per_category" else [mask]
    return [dataset_dir / "images" / copy["image"], *masks]


def roi_files(dataset_dir: Path, copy: dict, spec: DatasetSpec) -> list[Path]:
    """The ROIs make_ROI_img.py writes for a copy: stale once the copy is rewritten or removed."""
    image_stem = layout.stem(copy["image"])
    return [dataset_dir / "ROIs" / layout.roi_name(image_stem, category) for category in spec.categories or (None,)]


# ---------------------------------------------------------------- the split files and the manifest

@dataclass
class Splits:
    train_path: Path
    train_bytes: bytes
    train: dict[str, str]        # this dataset's train rows: image -> mask
    held_out: dict[str, Path]    # this dataset's val and test images -> their split file


def read_splits(split_dir, dataset_name: str) -> Splits:
    train_path = layout.split_csv(split_dir, "train")
    table = read_csv(train_path, layout.SPLIT_COLUMNS, missing_hint="make it with data_process/make_splits.py")
    rows = table[table["dataset"] == dataset_name]
    if rows.empty:
        held = sorted(set(table["dataset"]))
        raise CoTexNetError(f"{train_path}: no rows for dataset {dataset_name!r}; it holds {held or 'no rows at all'}")
    held_out: dict[str, Path] = {}
    for split in layout.SPLITS[1:]:
        path = layout.split_csv(split_dir, split)
        if path.exists():
            other = read_csv(path, layout.SPLIT_COLUMNS)
            for image in other.loc[other["dataset"] == dataset_name, "img_name"]:
                held_out.setdefault(image, path)
    return Splits(train_path, train_path.read_bytes(), dict(zip(rows["img_name"], rows["mask_name"], strict=True)),
                  held_out)


def fingerprint(data: bytes) -> dict:
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def read_manifest(dataset_dir) -> dict | None:
    """The manifest of a dataset folder, or None when it has none."""
    path = layout.augment_manifest(dataset_dir)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except UnicodeDecodeError as err:
        raise not_utf8(path, err, "restore it, or delete it together with the copies it lists") from err
    except (OSError, json.JSONDecodeError) as err:
        raise CoTexNetError(f"{path}: not a readable manifest ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise CoTexNetError(f"{path}: not a manifest of augment_data.py (format {MANIFEST_FORMAT})")
    return manifest


def augmented_images(dataset_dir) -> set[str]:
    """The images of a dataset folder that are augmented copies (relative to images/)."""
    manifest = read_manifest(dataset_dir)
    return {copy["image"] for copy in manifest["copies"]} if manifest else set()


def _manifest_for(dataset_dir: Path, dataset_name: str, train_path: Path) -> dict | None:
    manifest = read_manifest(dataset_dir)
    if manifest is None:
        return None
    path = layout.augment_manifest(dataset_dir)
    if manifest["dataset"] != dataset_name:
        raise CoTexNetError(f"{path}: made for dataset {manifest['dataset']!r}, not {dataset_name!r}")
    split_file = (dataset_dir / manifest["split_file"]).resolve()
    if split_file != train_path.resolve():
        raise CoTexNetError(f"{path}: its rows are in {split_file}, not {train_path.resolve()}; "
                            f"pass --split-dir {split_file.parent}")
    return manifest


def edit_rows(data: bytes, dataset_name: str, drop: set[str], add: list[tuple[str, str]]) -> bytes:
    """Split file `data` without this dataset's rows of images `drop`, with rows `add` appended
    (image, mask); every other byte stays, line endings and column order included."""
    lines = data.splitlines(keepends=True)
    header = next(csv.reader([lines[0].decode("utf-8")]))
    at_dataset, at_image = header.index("dataset"), header.index("img_name")

    def ours(line: bytes) -> bool:
        cells = next(csv.reader([line.decode("utf-8")]), [])
        return len(cells) == len(header) and cells[at_dataset] == dataset_name and cells[at_image] in drop

    kept = [lines[0], *(line for line in lines[1:] if not ours(line))]
    if not add:
        return b"".join(kept)
    end = "\r\n" if lines[0].endswith(b"\r\n") else "\n"
    if not kept[-1].endswith((b"\n", b"\r")):
        kept[-1] += end.encode()
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator=end)
    for image, mask in add:
        values = {"dataset": dataset_name, "img_name": image, "mask_name": mask}
        writer.writerow([values.get(column, "") for column in header])
    return b"".join(kept) + buffer.getvalue().encode("utf-8")


def _write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


# ---------------------------------------------------------------- augment

@dataclass
class Plan:
    dataset_dir: Path
    spec: DatasetSpec
    splits: Splits
    manifest: dict                                        # every copy, the stale ones included
    sources: int                                          # train images that are no copy
    new_copies: list[dict] = field(default_factory=list)  # not yet in the manifest
    write: list[dict] = field(default_factory=list)       # copies whose files are missing
    add_rows: list[dict] = field(default_factory=list)    # copies without a train row
    stale: list[dict] = field(default_factory=list)       # copies of images no longer in train

    @property
    def empty(self) -> bool:
        return not (self.new_copies or self.write or self.add_rows or self.stale)


def plan(dataset_dir, spec: DatasetSpec, split_dir, ops: list[Op]) -> Plan:
    """What a run must do to reach: every train image has a copy per op (and keeps the copies
    earlier runs made with other ops), each with its files and its train row. Checks everything
    that could stop the run before anything is written."""
    dataset_dir = Path(dataset_dir)
    if not (dataset_dir / "images").is_dir():
        raise CoTexNetError(f"{dataset_dir / 'images'}: no such folder")
    splits = read_splits(split_dir, spec.name)
    # the split file relative to the dataset folder: the manifest stays valid when the project moves
    split_file = Path(os.path.relpath(splits.train_path.resolve(), dataset_dir.resolve())).as_posix()
    manifest = _manifest_for(dataset_dir, spec.name, splits.train_path) or {
        "format": MANIFEST_FORMAT, "dataset": spec.name, "split_file": split_file,
        "split_before": fingerprint(splits.train_bytes), "copies": []}
    known = {copy["image"]: copy for copy in manifest["copies"]}
    originals = {image: mask for image, mask in splits.train.items() if image not in known}
    _check_leaks(dataset_dir, splits, originals, known)

    wanted = {image: copy for image, copy in known.items() if copy["source"] in originals}
    new = []
    for image, mask in originals.items():
        for op in ops:
            copy_image, copy_mask = copy_names(image, mask, op, spec)
            if copy_image not in wanted:
                wanted[copy_image] = dict(source=image, op=op.name, image=copy_image, mask=copy_mask)
                new.append(wanted[copy_image])
    _check_collisions(dataset_dir, spec, new, splits)
    write = [copy for copy in wanted.values() if not all(path.exists() for path in copy_files(dataset_dir, copy, spec))]
    for source in dict.fromkeys(copy["source"] for copy in write):  # a missing source would stop the run half-way
        for path in copy_files(dataset_dir, dict(image=source, mask=splits.train[source]), spec):
            if not path.exists():
                raise CoTexNetError(f"{path}: no such file (listed in {splits.train_path}); nothing written")
    manifest = {**manifest, "copies": [*manifest["copies"], *new]}
    return Plan(dataset_dir, spec, splits, manifest, len(originals), new, write=write,
                add_rows=[copy for copy in wanted.values() if copy["image"] not in splits.train],
                stale=[copy for copy in known.values() if copy["source"] not in originals])


def _check_leaks(dataset_dir: Path, splits: Splits, originals: dict, known: dict) -> None:
    both = [image for image in originals if image in splits.held_out]
    if both:
        raise CoTexNetError(f"{splits.held_out[both[0]]}: {both[0]} is also in {splits.train_path} "
                            f"({len(both)} train images are in val or test); a copy would leak it into training. "
                            "Fix the splits (data_process/make_splits.py); nothing written")
    copies = [image for image in known if image in splits.held_out]
    if copies:
        raise CoTexNetError(f"{splits.held_out[copies[0]]}: {copies[0]} is an augmented copy "
                            f"({layout.augment_manifest(dataset_dir)}), listed outside train ({len(copies)} in all). "
                            "Remake the splits (make_splits.py leaves copies out); nothing written")


def _check_collisions(dataset_dir: Path, spec: DatasetSpec, new: list[dict], splits: Splits) -> None:
    listed = set(splits.train) | set(splits.held_out)
    for copy in new:
        if copy["image"] in listed:
            raise CoTexNetError(f"{splits.train_path}: {copy['image']} is an original image, named like the "
                                f"{copy['op']} copy of {copy['source']}; rename one; nothing written")
        for path in copy_files(dataset_dir, copy, spec):
            if path.exists():
                raise CoTexNetError(f"{path}: exists and is not a copy made by augment_data.py (not in "
                                    f"{layout.augment_manifest(dataset_dir)}); rename or remove it; nothing written")


def _encode(masks: list[np.ndarray], spec: DatasetSpec) -> list[np.ndarray]:
    if spec.mask_encoding == "labelmap" and spec.mask_layout != "per_category":
        return masks
    return [(mask > 0).astype(np.uint8) * 255 for mask in masks]


def _params(path: Path) -> list[int]:
    return [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY] if path.suffix.lower() in (".jpg", ".jpeg") else []


def make_copies(job) -> int:
    """Write the copies of one source image; returns how many have an empty mask (zoomed out of view)."""
    image_path, mask_path, spec, outputs = job
    image = read_image(image_path)
    size = (image.shape[1], image.shape[0])
    if spec.mask_layout == "per_category":
        masks = _encode(category_masks(mask_path, spec, size), spec)
    else:
        masks = _encode([read_mask(mask_path, spec, size)], spec)
    empty = 0
    for op_name, files, rois in outputs:
        op = parse_ops(op_name)[0]
        for roi in rois:
            roi.unlink(missing_ok=True)
        copied = [op.apply(mask, nearest=True) for mask in masks]
        empty += not any(mask.any() for mask in copied)
        for mask, path in zip(copied, files[1:], strict=True):
            write_image(path, mask, _params(path))
        write_image(files[0], cv2.cvtColor(op.apply(image, nearest=False), cv2.COLOR_RGB2BGR), _params(files[0]))
    return empty


def run(plan: Plan, workers: int = 1) -> int:
    """Carry out `plan` (manifest, files, rows, then the stale copies); returns the copies with an empty mask."""
    dataset_dir, spec, splits = plan.dataset_dir, plan.spec, plan.splits
    manifest_path = layout.augment_manifest(dataset_dir)
    if plan.new_copies:
        write_json(manifest_path, plan.manifest)
    jobs: dict[str, list] = {}
    for copy in plan.write:
        jobs.setdefault(copy["source"], []).append(
            (copy["op"], copy_files(dataset_dir, copy, spec), roi_files(dataset_dir, copy, spec)))
    for path in leftovers(path for copy in plan.write for path in copy_files(dataset_dir, copy, spec)):
        path.unlink(missing_ok=True)
    job_list = [(dataset_dir / "images" / source, dataset_dir / "masks" / splits.train[source], spec, outputs)
                for source, outputs in jobs.items()]
    empties = 0
    cv2.setNumThreads(1)  # parallelism comes from the processes
    pool = ProcessPoolExecutor(workers) if workers > 1 and len(job_list) > 1 else None
    try:
        with tqdm(total=len(plan.write), desc=f"augment {spec.name}", unit="copy") as bar:
            for job, empty in zip(job_list, pool.map(make_copies, job_list, chunksize=2) if pool
                                  else map(make_copies, job_list), strict=True):
                empties += empty
                bar.update(len(job[3]))
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    if plan.add_rows or plan.stale:
        _write_bytes(splits.train_path, edit_rows(
            splits.train_bytes, spec.name, {copy["image"] for copy in plan.stale},
            [(copy["image"], copy["mask"]) for copy in plan.add_rows]))
    if plan.stale:
        _remove_files(dataset_dir, spec, plan.stale)
        stale = {copy["image"] for copy in plan.stale}
        write_json(manifest_path, {**plan.manifest, "copies": [c for c in plan.manifest["copies"] if c["image"] not in stale]})
    return empties


def _remove_files(dataset_dir: Path, spec: DatasetSpec, copies: list[dict]) -> None:
    files = [path for copy in copies for path in copy_files(dataset_dir, copy, spec)]
    for path in [*files, *leftovers(files), *(path for copy in copies for path in roi_files(dataset_dir, copy, spec))]:
        try:
            path.unlink(missing_ok=True)
        except OSError as err:
            raise CoTexNetError(f"{path}: cannot be removed ({err.strerror})") from err


# ---------------------------------------------------------------- undo

@dataclass
class Undone:
    copies: int
    rows: int
    identical: bool     # the split file is byte for byte what it was before the first run
    split_file: Path


def undo(dataset_dir, spec: DatasetSpec, split_dir, dry_run: bool = False) -> Undone | None:
    """Remove every copy the manifest lists: their train rows, then their files and ROIs, then
    the manifest. None when the dataset has no manifest."""
    dataset_dir = Path(dataset_dir)
    train_path = layout.split_csv(split_dir, "train")
    manifest = _manifest_for(dataset_dir, spec.name, train_path)
    if manifest is None:
        return None
    copies = manifest["copies"]
    data = train_path.read_bytes() if train_path.exists() else b""
    restored = data
    if data:
        read_csv(train_path, layout.SPLIT_COLUMNS)  # one-line errors for a file that is no split file any more
        restored = edit_rows(data, spec.name, {copy["image"] for copy in copies}, [])
        before = manifest["split_before"]
        head = restored[:before["bytes"]]
        # our first run ended the file's last line if it had no line end: take that back too
        if restored[before["bytes"]:] in (b"", b"\n", b"\r\n") and fingerprint(head) == before:
            restored = head
    rows = len(data.splitlines()) - len(restored.splitlines())
    if not dry_run:
        if restored != data:
            _write_bytes(train_path, restored)
        _remove_files(dataset_dir, spec, copies)
        os.remove(layout.augment_manifest(dataset_dir))
    return Undone(len(copies), rows, fingerprint(restored) == manifest["split_before"], train_path)
