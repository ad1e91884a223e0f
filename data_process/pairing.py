"""Which mask belongs to which image: pairing by stem, and the per-category mask files.

`pair_files` matches `<dataset>/masks/*` to `<dataset>/images/*` by stem, with the registry's
mask prefix and suffix; per_category layout: a mask name pairs when every category folder
(`masks/<k or keyword>/`) holds it, and `mask_files` gives the files behind such a name.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from common.errors import SHOW, CoTexNetError
from data_process import layout
from data_process.registry import DatasetSpec


def category_folders(masks_dir, spec: DatasetSpec) -> list[Path] | None:
    """per_category layout: the folder of each category in `masks_dir`, named by its index
    (1..K) or its keyword; None when some category has neither."""
    folders = []
    for k, keyword in enumerate(spec.categories, start=1):
        found = [Path(masks_dir) / name for name in (str(k), keyword) if (Path(masks_dir) / name).is_dir()]
        if not found:
            return None
        if len(found) > 1:
            raise CoTexNetError(f"{masks_dir}: both {k}/ and {keyword}/ exist for category {k}; keep one")
        folders.append(found[0])
    return folders


def mask_files(path, spec: DatasetSpec) -> list[Path]:
    """The file(s) behind mask path `<masks>/<name>`: itself, or per_category layout the K files
    of the categories (`<masks>` = the nearest folder above `path` that holds every category's folder)."""
    path = Path(path)
    if spec.mask_layout != "per_category":
        return [path]
    for masks_dir in path.parents:
        folders = category_folders(masks_dir, spec)
        if folders is not None:
            return [folder / path.relative_to(masks_dir) for folder in folders]
    raise _no_category_folders(path, spec)


def _no_category_folders(path, spec: DatasetSpec) -> CoTexNetError:
    names = ", ".join(f"{k}/ or {c}/" for k, c in enumerate(spec.categories, start=1))
    return CoTexNetError(f"{path}: no folder of each category ({names}) in or above it, "
                         f"as mask_layout per_category of {spec.name} needs")


def image_stem(mask_name: str, spec: DatasetSpec) -> str:
    """The stem of the image a mask belongs to ("sub/ISIC_1_Segmentation.png" -> "sub/ISIC_1")."""
    path = PurePosixPath(mask_name)
    stem = layout.stem(path.name)
    if spec.mask_prefix and stem.startswith(spec.mask_prefix):
        stem = stem[len(spec.mask_prefix):]
    if spec.mask_suffix and stem.lower().endswith(spec.mask_suffix.lower()):
        stem = stem[: -len(spec.mask_suffix)]
    return str(path.parent / stem) if str(path.parent) != "." else stem


@dataclass
class Pairing:
    pairs: list[tuple[str, str]]        # (image name, mask name), relative to images/ and masks/
    masks_without_image: list[str]      # relative to masks/ (per_category: "<category folder>/<name>")
    images_without_mask: list[str]      # per_category: also images lacking the mask of some category
    other_extensions: dict[str, str] = field(default_factory=dict)  # stem -> an image left out by its extension
    other_masks: list[str] = field(default_factory=list)  # where no mask has the extension asked for: the others

    def check(self, dataset_dir, spec: DatasetSpec) -> None:
        """The scripts' rule: a mask without image stops the run (naming it); images without
        mask are warned about, listed, and left out; no pairs at all stops the run."""
        if self.masks_without_image:
            first, more = self.masks_without_image[0], len(self.masks_without_image) - 1
            name = first.split("/", 1)[1] if spec.mask_layout == "per_category" else first  # less the category folder
            found = self.other_extensions.get(image_stem(name, spec))
            hint = (f"; found {found}, of another extension than {spec.image_ext or 'given'}: pass --img-format "
                    f"{PurePosixPath(found).suffix}" if found else "")
            raise CoTexNetError(f"{Path(dataset_dir) / 'masks' / first}: no image with its stem "
                                f"in {Path(dataset_dir) / 'images'}"
                                + (f" (and {more} more masks without image)" if more else "") + hint
                                + "; nothing written")
        if not self.pairs:
            found = self.other_masks
            hint = (f" with the extension asked for; found {len(found)} files with another, e.g. {found[0]}: "
                    f"pass --mask-format {PurePosixPath(found[0]).suffix}" if found else "")
            raise CoTexNetError(f"{Path(dataset_dir) / 'masks'}: no masks found{hint}")
        if self.images_without_mask:
            where = " in every category folder" if spec.mask_layout == "per_category" else ""
            names = self.images_without_mask
            print(f"warning: {len(names)} images without a mask{where}, left out: {', '.join(names[:SHOW])}"
                  + (f" ... ({len(names) - SHOW} more)" if len(names) > SHOW else ""), file=sys.stderr)


def _list_images(folder: Path, ext: str) -> list[str]:
    if not folder.is_dir():
        raise CoTexNetError(f"{folder}: {layout.why_missing(folder, 'folder')}")
    return layout.list_files(folder, (ext,) if ext else layout.IMAGE_EXTS)


def pair_files(dataset_dir, spec: DatasetSpec, image_ext: str | None = None,
               mask_ext: str | None = None) -> Pairing:
    """Match `<dataset_dir>/masks/*` to `<dataset_dir>/images/*` by stem (extensions: case ignored;
    per_category layout: see the module's doc)."""
    dataset_dir, masks_dir = Path(dataset_dir), Path(dataset_dir) / "masks"
    image_ext, mask_ext = layout.normalise_ext(image_ext), layout.normalise_ext(mask_ext)
    images = _list_images(dataset_dir / "images", spec.image_ext if image_ext is None else image_ext)
    mask_ext = spec.mask_ext if mask_ext is None else mask_ext
    if spec.mask_layout == "per_category":
        folders = category_folders(masks_dir, spec)
        if folders is None:
            raise _no_category_folders(masks_dir, spec)
        listed = [_list_images(folder, mask_ext) for folder in folders]
        files = [(f"{folder.name}/{name}", name) for folder, names in zip(folders, listed, strict=True)
                 for name in names]
        masks = sorted(set.intersection(*map(set, listed)))
    else:
        masks = _list_images(masks_dir, mask_ext)
        files = [(name, name) for name in masks]
    by_stem: dict[str, str] = {}
    for name in images:
        stem = layout.stem(name)
        if stem in by_stem:
            raise CoTexNetError(f"{dataset_dir / 'images' / name}: two images with stem {stem!r} "
                                f"({by_stem[stem]}); pass --img-format")
        by_stem[stem] = name
    pairs = [(by_stem[image_stem(mask, spec)], mask) for mask in masks if image_stem(mask, spec) in by_stem]
    orphans = [shown for shown, name in files if image_stem(name, spec) not in by_stem]
    paired = {image for image, _ in pairs}
    others = {}
    if orphans and (spec.image_ext if image_ext is None else image_ext):  # what the extension filter left out
        others = {layout.stem(name): name for name in _list_images(dataset_dir / "images", "") if name not in images}
    other_masks = _list_images(masks_dir, "") if not masks and mask_ext else []
    return Pairing(pairs, orphans, [name for name in images if name not in paired], others, other_masks)
