"""Images and masks decoded as a viewer shows them, with one line about anything unusual.

`read_image` gives RGB from any common format; `read_mask` the label map of an image (0
background, 1..K) by the dataset's registry entry, `category_masks` one boolean mask per
category. The edge cases (palette, 16-bit, alpha, EXIF orientation, JPEG noise, VOC boundaries,
masks at another scale, files too large to trust) are each decided here, once.
"""

from __future__ import annotations

import os
import warnings

import cv2
import numpy as np
from PIL import Image, ImageOps

from common.errors import CoTexNetError, warn_once
from data_process import layout
from data_process.pairing import mask_files
from data_process.registry import REGISTRY_FILE, DatasetSpec

MIN_MASK_SIDE = 4  # pixels: a smaller mask cannot be a downscaled copy of its image's label
# Pillow modes numpy cannot take as they are: bits, 16-bit variants.
_PLAIN_MODES = {"1": "L", "I;16": "I", "I;16L": "I", "I;16B": "I", "I;16N": "I"}
# Modes read as they are; any other colour model (CMYK, YCbCr, LAB, HSV) is converted (images) or refused (masks).
_KNOWN_MODES = {"L", "LA", "I", "F", "P", "PA", "RGB", "RGBA", "RGBX"}
PIXEL_LIMIT_ENV = "COTEXNET_MAX_IMAGE_PIXELS"
_PILLOW_PIXEL_LIMIT = Image.MAX_IMAGE_PIXELS  # Pillow warns above it and refuses above twice it
VOC_VOID = (224, 224, 192)  # the colour of index 255, "void", in VOC-style palette masks
# A binary mask holds black and white (JPEG: near them); a photograph given as a mask has a large
# share of its pixels at many grey levels far from both.
FAR_GREYS = (32, 224)  # exclusive
NOT_A_MASK_SHARE, NOT_A_MASK_LEVELS = 0.25, 32
SAMPLE_PIXELS = 65536  # pixels of a mask whose grey levels are counted
EDGE = np.ones((5, 5), np.uint8)  # transparent pixels this close to visible ones are antialiased edges


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
    `<masks>/<k or keyword>/<name>`; where categories overlap the later category wins."""
    if spec.mask_layout == "per_category":
        masks = category_masks(path, spec, size, binarize)
        label = np.zeros(masks[0].shape, np.uint8)
        for k, inside in enumerate(masks, start=1):
            label[inside] = k
        return label
    if spec.mask_encoding == "labelmap":
        image = _mask_image(path)
        array = np.array(image.convert(_PLAIN_MODES[image.mode]) if image.mode in _PLAIN_MODES else image)
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
    files = mask_files(path, spec)
    first = _binary(files[0], spec, binarize)
    size = size or (first.shape[1], first.shape[0])  # categories of another size follow the first
    return [_resize(first if i == 0 else _binary(file, spec, binarize), size, file) > 0
            for i, file in enumerate(files)]


def _binary(path, spec: DatasetSpec, binarize: str) -> np.ndarray:
    """{0, 1} foreground of a binary mask file as a viewer shows it, by the dataset's threshold,
    never by the file's own values: a nearly empty 0/255 JPEG mask stays empty whatever its noise.
    `binarize` as in `read_mask`; where some pixels are transparent, `_with_alpha` decides."""
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
    # colour masks: the brightest channel (np.maximum over planes: faster than max(axis=2))
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


