"""The conventions every stage shares about files on disk: one home, no copies.

    <root>/<dataset>/images/    the images           (root defaults to data_process)
    <root>/<dataset>/masks/     their masks
    <root>/<dataset>/ROIs/      stage 1's ROI images: <stem>.jpg, or <stem>__<category>.jpg
    <root>/<dataset>/augmented/ the copies augment_data.py makes: a dataset folder of its own
                                (images/, masks/, ROIs/) and about.json, naming its split file
    <split_dir>/{train,val,test}_data.csv       columns dataset,img_name,mask_name
    <split_dir>/train_augmented.csv             the copies' rows: the same columns, + origin,op
    text_file/<dataset>/<dataset>_text_out.csv  stage 2's text

Default paths are relative to the current working directory: run the scripts from the
repository root, as the paper's README does.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from common.errors import CoTexNetError, warn_once

DEFAULT_ROOT = "data_process"
DEFAULT_SPLIT_DIR = "data_process"
SPLITS = ("train", "val", "test")
SPLIT_COLUMNS = ["dataset", "img_name", "mask_name"]  # a list: pandas reads a tuple as one key
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp")
ROI_EXT = ".jpg"
JPEG_QUALITY = 95  # of the JPEG files the stages write (ROIs, augmented copies)
CATEGORY_SEP = "__"  # ROI of one category: "<stem>__<category>.jpg"
AUGMENT_SEP = "_aug-"  # augmented copy: "<stem>_aug-<op tag><ext>"; never read as CATEGORY_SEP
AUGMENTED = "augmented"  # the copies' folder in a dataset folder
AUGMENTED_RECORD = "about.json"  # in it: made by augment_data.py, for which split file
AUGMENTED_COLUMNS = [*SPLIT_COLUMNS, "origin", "op"]  # origin: the image copied (relative to images/)


def normalise_ext(ext: str | None) -> str | None:
    """"jpg", ".jpg" -> ".jpg"; None (not given) and "" (any) stay as they are."""
    return ext if not ext else "." + ext.lstrip(".")


def stem(name: str) -> str:
    """A file name relative to its folder without its extension ("sub/a.v2.png" -> "sub/a.v2")."""
    path = PurePosixPath(name)
    return str(path.with_suffix("")) if path.suffix else str(path)


def is_hidden(relative: str | Path) -> bool:
    """Names starting with a dot are never data: our temporary files (".<name>.<random>.tmp<ext>"),
    folders such as .ipynb_checkpoints/, macOS's "._x.jpg" companions."""
    return any(part.startswith(".") for part in Path(relative).parts)


def list_files(folder: str | Path, exts=IMAGE_EXTS) -> list[str]:
    """The visible files under `folder` (recursively) with one of `exts` (case ignored), as sorted
    POSIX paths relative to it: the one listing every reader of a data folder uses.

    Read as a file browser shows the folder: symbolic links to folders are followed, a link whose
    target is gone is listed (reading it says so), and a folder reached twice (a link back up, two
    links to one folder) is read once, with a warning; real sub-folders are read before links, so
    a file keeps its real path where it has one."""
    folder = Path(folder)
    exts = tuple(ext.lower() for ext in exts)
    found: list[str] = []
    read: dict[tuple[int, int], PurePosixPath] = {}  # (device, inode) of each folder read -> where
    real, linked = [PurePosixPath()], []  # folders to read: real sub-folders first, then links to folders
    while real or linked:
        rel = real.pop() if real else linked.pop(0)
        where = folder / rel
        try:
            status = where.stat()
            identity = (status.st_dev, status.st_ino)
            if identity in read:
                warn_once(where, f"a link to a folder already read as {folder / read[identity]}: read once")
                continue
            read[identity] = rel
            with os.scandir(where) as entries:
                entries = sorted(entries, key=lambda e: e.name)
        except OSError as err:
            raise CoTexNetError(f"{where}: cannot be listed ({err.strerror})") from err
        for entry in entries:
            if is_hidden(entry.name):
                continue
            if entry.is_dir():
                (linked if entry.is_symlink() else real).append(rel / entry.name)
            elif PurePosixPath(entry.name).suffix.lower() in exts and (entry.is_file() or entry.is_symlink()):
                found.append((rel / entry.name).as_posix())
    return sorted(found)


def why_missing(path: str | Path, what: str = "file") -> str:
    """What stands at `path` instead of the image (`what` "file"), data folder ("folder") or
    either a command looks for: nothing, a link whose target is gone, a folder, a file."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        return f"a link to {os.readlink(path)}, which does not exist"
    if what == "file" and path.is_dir():
        return "a folder, not an image file"
    if what == "folder" and path.exists():
        return "a file, not a folder"
    return f"no such {what}"


def check_unique_stems(names, what: str) -> None:
    """Outputs are named by stem (masks/<stem>.png): two inputs of one stem (a.jpg and a.png) are
    refused up front, listed, rather than one output silently replacing the other."""
    by_stem: dict[str, list[str]] = {}
    for name in names:
        by_stem.setdefault(stem(name), []).append(name)
    shared = [" and ".join(group) for group in by_stem.values() if len(group) > 1]
    if shared:
        more = f" (and {len(shared) - 3} more)" if len(shared) > 3 else ""
        raise CoTexNetError(f"{what}: images that would write the same mask <stem>.png: {'; '.join(shared[:3])}"
                            f"{more}; rename or move one of each")


def dataset_dir(root: str | Path, dataset_name: str) -> Path:
    return Path(root) / dataset_name


def augmented_dir(dataset_folder: str | Path) -> Path:
    return Path(dataset_folder) / AUGMENTED


def data_folders(dataset_folder: str | Path) -> list[Path]:
    """The dataset folder, then its copies folder if augment_data.py made one (and `--undo` has not
    begun removing it): the folders whose images/ and masks/ stage 1 and stage 2 read (each writes
    its ROIs/)."""
    copies = augmented_dir(dataset_folder)
    made = (copies / AUGMENTED_RECORD).is_file() and (copies / "images").is_dir()
    return [Path(dataset_folder), *([copies] if made else [])]


def augmented_stem(image_stem: str, tag: str) -> str:
    """The stem of the copy of an image made by augmentation `tag` ("sub/a", "hflip" -> "sub/a_aug-hflip")."""
    return f"{image_stem}{AUGMENT_SEP}{tag}"


def split_csv(split_dir: str | Path, split: str) -> Path:
    """A split file; split "augmented": the copies' rows (train only)."""
    return Path(split_dir) / ("train_augmented.csv" if split == "augmented" else f"{split}_data.csv")


def text_csv(dataset_name: str) -> Path:
    return Path("text_file") / dataset_name / f"{dataset_name}_text_out.csv"


def roi_name(image_stem: str, category: str | None = None) -> str:
    """The ROI file of an image (relative to ROIs/), or of one category of a multi-class image."""
    return f"{image_stem}{CATEGORY_SEP}{category}{ROI_EXT}" if category else f"{image_stem}{ROI_EXT}"


def roi_names(image_name: str, categories=()) -> list[str]:
    """The ROI files of one image (relative to ROIs/): one, or one per category in category order."""
    return [roi_name(stem(image_name), category) for category in categories or (None,)]


def parse_roi_name(name: str, per_category: bool) -> tuple[str, str | None]:
    """Inverse of `roi_name`: (image stem, category or None). The separator means a category
    only in a multi-class dataset (`per_category`): a binary image may be named "case__01.jpg"."""
    image_stem = stem(name) if name.lower().endswith(ROI_EXT) else name
    if per_category and CATEGORY_SEP in PurePosixPath(image_stem).name:
        return tuple(image_stem.rsplit(CATEGORY_SEP, 1))
    return image_stem, None
