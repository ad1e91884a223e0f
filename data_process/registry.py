"""The dataset registry: names, file formats, mask decoding and image/mask pairing.

Every dataset quirk is an entry of `dataset_config/datasets.yaml`; the stages ask this module
(`get_spec`, `read_image`, `read_mask`, `category_masks`, `pair_files`) instead of testing dataset names.

Mask layouts (`mask_layout`): "single" = one mask file per image, `masks/<name>`;
"per_category" = one binary mask per image and category, `masks/<k or keyword>/<name>`. In both
a mask is named by `<name>` (relative to `masks/`, resp. to each category folder), and
`read_mask(<dataset>/masks/<name>, spec)` gives the image's label map.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import cv2
import numpy as np
import yaml
from PIL import Image, ImageOps

from common.errors import CoTexNetError, warn_once
from data_process import layout

REGISTRY_FILE = Path(__file__).resolve().parents[1] / "dataset_config" / "datasets.yaml"
SHOW = 5  # names listed in warnings
MIN_MASK_SIDE = 4  # pixels: a smaller mask cannot be a downscaled copy of its image's label
# Pillow modes numpy cannot take as they are: bits, 16-bit variants.
_PLAIN_MODES = {"1": "L", "I;16": "I", "I;16L": "I", "I;16B": "I", "I;16N": "I"}
# Modes read as they are; any other colour model (CMYK, YCbCr, LAB, HSV) is converted (images) or refused (masks).
_KNOWN_MODES = {"L", "LA", "I", "F", "P", "PA", "RGB", "RGBA", "RGBX"}
BINARIZE = ("registry", "paper")
PIXEL_LIMIT_ENV = "COTEXNET_MAX_IMAGE_PIXELS"
_PILLOW_PIXEL_LIMIT = Image.MAX_IMAGE_PIXELS  # Pillow warns above it and refuses above twice it
VOC_VOID = (224, 224, 192)  # the colour of index 255, "void", in VOC-style palette masks
# A binary mask holds black and white (JPEG: near them); a photograph given as a mask has a large
# share of its pixels at many grey levels far from both.
FAR_GREYS = (32, 224)  # exclusive
NOT_A_MASK_SHARE, NOT_A_MASK_LEVELS = 0.25, 32
SAMPLE_PIXELS = 65536  # pixels of a mask whose grey levels are counted
EDGE = np.ones((5, 5), np.uint8)  # transparent pixels this close to visible ones are antialiased edges


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    keyword: str
    image_ext: str
    mask_ext: str
    mask_encoding: str
    mask_suffix: str = ""
    mask_prefix: str = ""
    categories: tuple[str, ...] = ()
    mask_layout: str = "single"
    mask_threshold: int = 128  # binary masks: foreground = brightest channel >= this (0/1 masks: 1)
    aliases: tuple[str, ...] = ()  # other names of the dataset in split files (the paper's "kvasir_polyp")

    @property
    def num_classes(self) -> int:
        """Classes the model predicts, background counted."""
        return len(self.categories) + 1 if self.categories else 2


@functools.cache
def _registry() -> dict:
    try:
        return yaml.safe_load(REGISTRY_FILE.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise CoTexNetError(f"{REGISTRY_FILE}: cannot read the dataset registry ({err})") from err


def known_datasets() -> list[str]:
    return list(_registry()["datasets"])


def get_spec(name: str, keyword: str | None = None) -> DatasetSpec:
    """The spec of dataset `name` (case ignored); an unknown name gets the defaults.

    `keyword` replaces the registry's keyword; for a multi-class dataset a comma-separated
    list replaces the category keywords ("lv area, myo area, la area").
    """
    registry = _registry()
    entries = {key.lower(): value for key, value in registry["datasets"].items()}
    fields = {**registry["defaults"], **(entries.get(name.lower()) or {})}
    fields["categories"] = tuple(fields.get("categories") or ())
    fields["aliases"] = tuple(str(alias) for alias in fields.get("aliases") or ())
    if keyword:
        words = tuple(word.strip() for word in keyword.split(","))
        if fields["categories"]:
            if len(words) != len(fields["categories"]):
                raise CoTexNetError(f"keywords: {name} has {len(fields['categories'])} categories, "
                                    f"got {len(words)} comma-separated keywords")
            fields["categories"] = words
        else:
            fields["keyword"] = keyword.strip()
    unknown = set(fields) - set(DatasetSpec.__dataclass_fields__)
    if unknown:
        raise CoTexNetError(f"{REGISTRY_FILE}: {name}: unknown keys {sorted(unknown)}")
    if fields["mask_encoding"] not in ("binary", "labelmap"):
        raise CoTexNetError(f"{REGISTRY_FILE}: {name}: mask_encoding must be binary or labelmap")
    if fields.get("mask_layout", "single") not in ("single", "per_category"):
        raise CoTexNetError(f"{REGISTRY_FILE}: {name}: mask_layout must be single or per_category")
    if fields.get("mask_layout") == "per_category" and (fields["mask_encoding"] != "binary" or not fields["categories"]):
        raise CoTexNetError(f"{REGISTRY_FILE}: {name}: mask_layout per_category needs categories "
                            "and mask_encoding binary (each file is one category's binary mask)")
    if not isinstance(fields.get("mask_threshold", 128), int) or not 1 <= fields.get("mask_threshold", 128) <= 255:
        raise CoTexNetError(f"{REGISTRY_FILE}: {name}: mask_threshold must be an integer 1..255")
    fields = {key: ("" if value is None else value) for key, value in fields.items()}
    return DatasetSpec(name=name, **fields)


def pixel_limit() -> int | None:
    """Pillow's decompression-bomb limit, or the one COTEXNET_MAX_IMAGE_PIXELS sets (0: none)."""
    raw = os.environ.get(PIXEL_LIMIT_ENV, "").strip()
    if not raw:
        return _PILLOW_PIXEL_LIMIT
    try:
        limit = int(raw)
    except ValueError:
        limit = -1
    if limit < 0:
        raise CoTexNetError(f"{PIXEL_LIMIT_ENV}={raw!r}: expected a whole number of pixels (0: no limit)")
    return limit or None


def _too_large(path, limit: int) -> CoTexNetError:
    """Pillow refused the file before decoding it: say its size (from the header) and the switch."""
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(path) as image:
            w, h = image.size
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    return CoTexNetError(f"{path}: image too large: {w}x{h} = {w * h:,} pixels, more than twice Pillow's "
                         f"decompression-bomb limit of {limit:,}; if you trust the file, set the environment "
                         f"variable {PIXEL_LIMIT_ENV}={w * h} (0: no limit) and rerun")


def _open(path, what: str) -> Image.Image:
    """The decoded file, turned as its EXIF orientation says (as viewers show it; said once),
    with 16-bit-per-channel colour noted (Pillow keeps the high byte of each value). An image
    above Pillow's decompression-bomb limit is read with one warning line, above twice the limit
    refused as too large (both name the size and COTEXNET_MAX_IMAGE_PIXELS). Pillow's own
    warnings (corrupt EXIF ...) become one line each, naming the file."""
    Image.MAX_IMAGE_PIXELS = limit = pixel_limit()
    try:
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            image = _decode(path, what, limit)
    except Image.DecompressionBombError as err:
        raise _too_large(path, limit) from err
    except (FileNotFoundError, IsADirectoryError) as err:
        raise CoTexNetError(f"{path}: {layout.why_missing(path)}") from err
    except (OSError, ValueError, SyntaxError) as err:
        raise CoTexNetError(f"{path}: unreadable or truncated image ({err})") from err
    for warning in said:
        if not issubclass(warning.category, Image.DecompressionBombWarning):  # said by _decode, with the switch
            warn_once(path, f"{what}: {' '.join(str(warning.message).split())} (Pillow)")
    return image


def _decode(path, what: str, limit: int | None) -> Image.Image:
    """`_open`'s work, under its watch for Pillow's warnings and errors."""
    with Image.open(path) as image:
        w, h = image.size
        if limit and w * h > limit:
            warn_once(path, f"{what} of {w}x{h} = {w * h:,} pixels, above Pillow's decompression-bomb limit of "
                            f"{limit:,}: read (it refuses twice that); {PIXEL_LIMIT_ENV}={w * h} allows it silently")
        deep = any(";16" in str(tile.args) for tile in image.tile) and image.mode in ("RGB", "RGBA")
        image.load()  # decode now: a truncated file fails here, naming itself
        orientation = image.getexif().get(0x0112, 1)
        if orientation not in (1, None):
            image = ImageOps.exif_transpose(image)
            warn_once(path, f"EXIF orientation {orientation}: {what} turned as viewers show it")
        if deep:
            warn_once(path, f"16 bits per colour channel: {what} read at 8 bits (the high byte of each value)")
        return image


def _through_palette(image: Image.Image) -> Image.Image:
    """A palette image as the colours it shows (RGB, or RGBA where the palette has transparency)."""
    if image.mode not in ("P", "PA"):
        return image
    return image.convert("RGBA" if image.mode == "PA" or "transparency" in image.info else "RGB")


def _alpha(image: Image.Image) -> np.ndarray | None:
    """The alpha channel when some pixel is not opaque, else None (palette images: see _through_palette)."""
    if image.mode not in ("RGBA", "LA"):
        return None
    alpha = np.array(image.getchannel("A"))
    return alpha if alpha.min() < 255 else None


def read_image(path) -> np.ndarray:
    """HxWx3 uint8 RGB from any common format: gray, palette, RGBA (alpha dropped), 16-bit.

    Said once per file: EXIF orientation (applied), colour models other than RGB, grey and
    palette (converted by Pillow), 16-bit colour (read at 8 bits), transparency (dropped)."""
    image = _open(path, "image")
    if image.mode not in _KNOWN_MODES | set(_PLAIN_MODES):
        warn_once(path, f"{image.mode} colour model: converted to RGB by Pillow (check its colours)")
        image = image.convert("RGB")
    image = _through_palette(image)  # Pillow's own warning about palette transparency is two lines
    if _alpha(image) is not None:
        warn_once(path, "transparent pixels: alpha dropped, their colours read as stored")
    mode = _PLAIN_MODES.get(image.mode, image.mode)
    if mode not in ("L", "RGB", "RGBA", "I", "F"):
        mode = "RGB"
    array = np.array(image.convert(mode) if mode != image.mode else image)
    if array.dtype != np.uint8:
        # 16-bit and float images often fill only part of their range (12-bit scanners): stretch.
        array = array.astype(np.float32) * (255.0 / max(float(array.max()), 1.0))
        array = np.clip(array, 0, 255).astype(np.uint8)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    return np.ascontiguousarray(array[:, :, :3])


def read_mask(path, spec: DatasetSpec, size: tuple[int, int] | None = None,
              binarize: str = "registry") -> np.ndarray:
    """HxW uint8 label map (0 background, 1..K); binary masks give {0, 1}; `size` = (w, h).

    `binarize` (binary masks): "registry", foreground = the brightest colour channel >=
    `spec.mask_threshold`, palette masks by index; "paper", the paper's reading: 8-bit grey
    (Pillow's convert("L"), so pure red is 76), then the same threshold.
    per_category layout: `path` = `<masks>/<name>` stands for the category files
    `<masks>/<k or keyword>/<name>`; where categories overlap the later category wins.
    """
    if spec.mask_layout == "per_category":
        masks = category_masks(path, spec, size, binarize)
        label = np.zeros(masks[0].shape, np.uint8)
        for k, inside in enumerate(masks, start=1):
            label[inside] = k
        return label
    if spec.mask_encoding == "labelmap":
        image = _mask_image(path)
        array = np.array(image.convert(_PLAIN_MODES.get(image.mode, image.mode)) if image.mode in _PLAIN_MODES
                         else image)
        label = _check_labels(array if array.ndim == 2 else array[:, :, 0], spec, path)
    else:
        label = _binary(path, spec, binarize)
    return _resize(label, size, path)


def _mask_image(path) -> Image.Image:
    image = _open(path, "mask")
    if image.mode not in _KNOWN_MODES | set(_PLAIN_MODES):
        raise CoTexNetError(f"{path}: mask in the {image.mode} colour model, which has no unambiguous "
                            "foreground; save it as grey, RGB or palette")
    return image


def category_masks(path, spec: DatasetSpec, size: tuple[int, int] | None = None,
                   binarize: str = "registry") -> list[np.ndarray]:
    """One HxW bool mask per category (binary datasets: one, the foreground), before any overlap
    is resolved: the per_category layout's files as they are, else `label == k` of the label map."""
    if spec.mask_layout != "per_category":
        label = read_mask(path, spec, size, binarize)
        return [label == k for k in range(1, max(len(spec.categories), 1) + 1)]
    files = category_files(path, spec)
    first = _binary(files[0], spec, binarize)
    size = size or (first.shape[1], first.shape[0])  # categories of another size follow the first
    return [_resize(first if i == 0 else _binary(file, spec, binarize), size, file) > 0
            for i, file in enumerate(files)]


def _binary(path, spec: DatasetSpec, binarize: str) -> np.ndarray:
    """{0, 1} foreground of a binary mask file as a viewer shows it, by the dataset's threshold,
    never by the file's own values: a nearly empty 0/255 JPEG mask stays empty whatever its noise.

    "registry": the brightest colour channel of what is shown, palette masks through their
    palette; where some pixels are transparent, `_with_alpha` decides. "paper": Pillow's
    convert("L"), as the paper's code reads every mask."""
    image, threshold = _mask_image(path), spec.mask_threshold
    value, alpha = _shown(image)
    _say_if_not_a_mask(path, value, spec)
    if binarize == "paper":
        return (np.array(image.convert("L")) >= threshold).astype(np.uint8)
    void = _voc_void(path, image)
    inside = value >= threshold
    if void is not None:
        inside &= ~void
    if alpha is not None:
        return _with_alpha(path, inside, alpha, threshold).astype(np.uint8)
    if not inside.any() and value.max() > 0:
        warn_once(path, f"no value reaches the foreground threshold {threshold} of {spec.name} (largest "
                        f"{value.max()}): read as empty; for 0/1 masks set mask_threshold: 1 in {REGISTRY_FILE.name}")
    return inside.astype(np.uint8)


def _shown(image: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """What a viewer shows of a mask: the brightest colour channel at each pixel (palette
    masks through their palette; 16-bit grey as it is), and the alpha channel where some pixel
    is transparent."""
    image = _through_palette(image)
    plain = {**_PLAIN_MODES, "LA": "L"}
    array = np.array(image.convert(plain[image.mode]) if image.mode in plain else image)
    # colour masks: the brightest channel (np.maximum over planes: 10x faster than max(axis=2))
    value = array if array.ndim == 2 else np.maximum.reduce([array[:, :, c] for c in range(min(3, array.shape[2]))])
    return value, _alpha(image)


def _voc_void(path, image: Image.Image) -> np.ndarray | None:
    """VOC-style palette masks mark object boundaries "void" with index 255 in a cream colour: where
    that index lies beside other classes, its pixels (returned) are background, not object."""
    if image.mode != "P" or tuple((image.getpalette() or [])[765:768]) != VOC_VOID:
        return None
    indices = np.array(image)
    present = np.unique(indices)
    if 255 not in present or not len(present[(present > 0) & (present < 255)]):
        return None
    warn_once(path, "palette mask with index 255 beside other classes (a VOC-style boundary): "
                    "index 255 read as background")
    return indices == 255


def _with_alpha(path, colour: np.ndarray, alpha: np.ndarray, threshold: int) -> np.ndarray:
    """The foreground of a mask with transparent pixels, as a viewer shows it. Where its colours
    show no object (one side of the threshold everywhere) and its alpha varies, the alpha is the
    mask, by the same threshold; where the colours' object is visible (up to an antialiased
    edge), the colours are; colours' foreground made transparent beyond that edge makes the
    file ambiguous: refused."""
    visible = alpha >= threshold
    if colour.all() or not colour.any():
        if alpha.min() == alpha.max():  # evenly (un)seen: the colours as far as they show
            return colour & visible
        empty = "" if visible.any() else f" (none at the threshold {threshold}: largest {alpha.max()}, read as empty)"
        warn_once(path, f"its colours show no object, its transparency does: mask read from the alpha channel{empty}")
        return visible
    hidden = colour & ~cv2.dilate(visible.astype(np.uint8), EDGE).astype(bool)
    if hidden.any():
        raise CoTexNetError(f"{path}: its colours and its transparency show different masks ({hidden.sum()} of "
                            f"{colour.sum()} foreground pixels are transparent); save the mask without transparency")
    return colour


def _say_if_not_a_mask(path, value: np.ndarray, spec: DatasetSpec) -> None:
    """Warn, naming the file, where a binary mask looks like a picture: many pixels at many grey
    levels far from black and white (values beyond 8 bits stretched, as read_image shows them)."""
    step = max(1, int((value.size / SAMPLE_PIXELS) ** 0.5))  # a share is measured as well on a sample
    value = value[::step, ::step]
    if value.dtype != np.uint8:
        value = np.nan_to_num(value.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        value = np.clip(value * (255.0 / max(float(value.max()), 1.0)), 0, 255).astype(np.uint8)
    far = value[(value > FAR_GREYS[0]) & (value < FAR_GREYS[1])]
    share = far.size / value.size
    if share > NOT_A_MASK_SHARE and (levels := np.count_nonzero(np.bincount(far, minlength=256))) > NOT_A_MASK_LEVELS:
        warn_once(path, f"does not look like a mask of {spec.name}: {share:.0%} of its pixels take {levels} grey "
                        f"levels far from black and white (a photograph?); read with threshold {spec.mask_threshold}")


def _resize(label: np.ndarray, size, path) -> np.ndarray:
    """`label` at `size` (w, h) of its image, resized only when it is the image at another scale:
    a mask of another shape (width and height swapped, a 1x1 placeholder) belongs to no pixel."""
    if size is None or (label.shape[1], label.shape[0]) == tuple(size):
        return label
    (w, h), (mw, mh) = size, (label.shape[1], label.shape[0])
    # the mask's aspect ratio may differ from the image's by the rounding of one pixel on each side
    if abs(mw * h - mh * w) > (h + w) / 2 or min(mw, mh) < MIN_MASK_SIDE:
        raise CoTexNetError(f"{path}: mask of {mw}x{mh} pixels for an image of {w}x{h}: not the image at another "
                            "scale (width and height swapped, or a placeholder?); give the mask its image's size")
    # Pixel centres, as PIL's NEAREST samples them; INTER_NEAREST samples corners (half a pixel off).
    return cv2.resize(label, tuple(size), interpolation=cv2.INTER_NEAREST_EXACT)


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


def category_files(path, spec: DatasetSpec) -> list[Path]:
    """per_category layout: the K files behind mask path `<masks>/<name>` (`<masks>` = the
    nearest folder above `path` that holds every category's folder)."""
    path = Path(path)
    for masks_dir in path.parents:
        folders = category_folders(masks_dir, spec)
        if folders is not None:
            return [folder / path.relative_to(masks_dir) for folder in folders]
    raise _no_category_folders(path, spec)


def _no_category_folders(path, spec: DatasetSpec) -> CoTexNetError:
    names = ", ".join(f"{k}/ or {c}/" for k, c in enumerate(spec.categories, start=1))
    return CoTexNetError(f"{path}: no folder of each category ({names}) in or above it, "
                         f"as mask_layout per_category of {spec.name} needs")


def _check_labels(label: np.ndarray, spec: DatasetSpec, path) -> np.ndarray:
    k = len(spec.categories)
    values = np.unique(label)
    if values.max() <= k:
        return label.astype(np.uint8)
    scaled = np.round(np.arange(k + 1) * 255 / k)  # label maps saved for viewing: 0, 85, 170, 255
    if k and np.isin(values, scaled).all():
        return np.searchsorted(scaled, label).astype(np.uint8)
    raise CoTexNetError(f"{path}: label map has values {values[:8].tolist()}, expected 0..{k} "
                        f"(categories of {spec.name}: {', '.join(spec.categories) or 'none'})")


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
    """Match `<dataset_dir>/masks/*` to `<dataset_dir>/images/*` by stem (extensions: case ignored).

    per_category layout: a mask name pairs when every category folder holds it."""
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
