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

from pathlib import Path, PurePosixPath

from common.errors import CoTexNetError

DEFAULT_ROOT = "data_process"
DEFAULT_SPLIT_DIR = "data_process"
SPLITS = ("train", "val", "test")
SPLIT_COLUMNS = ["dataset", "img_name", "mask_name"]  # a list: pandas reads a tuple as one key
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp")
ROI_EXT = ".jpg"
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
    POSIX paths relative to it: the one filter every reader of a data folder uses."""
    folder = Path(folder)
    exts = tuple(ext.lower() for ext in exts)
    return sorted(rel for rel in (path.relative_to(folder).as_posix() for path in folder.rglob("*")
                                  if path.suffix.lower() in exts and path.is_file())
                  if not is_hidden(rel))


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
        image_stem, category = image_stem.rsplit(CATEGORY_SEP, 1)
        return image_stem, category
    return image_stem, None
