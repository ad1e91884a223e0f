"""The paper's joint image/mask transforms, exactly, in torchvision.transforms.v2.

Input: `tv_tensors.Image` uint8 (3,H,W) and a `tv_tensors.Mask` (H,W) label map. The image is
resized bilinearly with antialiasing; the label map as PIL's NEAREST resizes it (the paper
resizes its masks as PIL images): each output pixel takes the source pixel under its centre
(`LabelMap`); padding is 0 (background).
- train: shorter side resized (aspect kept) to a random int(0.95 x size)..int(1.20 x size)
  inclusive (212..268 at 224), zero padded at the right and bottom only where smaller than
  size, then a random size x size crop; ImageNet normalisation. No flips (the paper flips
  offline);
- eval: resized to size x size, ImageNet normalisation.
"""

from __future__ import annotations

import functools

import cv2
import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class LabelMap(tv_tensors.Mask):
    """A Mask whose resize samples pixel centres, as PIL's NEAREST does. torchvision resizes a
    Mask by `nearest`, which samples pixel corners: the labels then lie half a source pixel off
    the (centre-aligned) bilinear image. Every other op is the Mask's."""


def centre_indices(n_in: int, n_out: int) -> torch.Tensor:
    """The source index of each of `n_out` pixels resized from `n_in` by pixel centres.

    OpenCV's INTER_NEAREST_EXACT breaks the exact ties (a centre on the line between two source
    pixels, as when upscaling 2 -> 7) the way PIL's NEAREST does; torch's `nearest-exact` does
    not everywhere."""
    row = np.arange(n_in, dtype=np.float32)[None]  # exact up to 2**24 pixels
    return torch.from_numpy(cv2.resize(row, (n_out, 1), interpolation=cv2.INTER_NEAREST_EXACT)[0].astype(np.int64))


@TF.register_kernel(TF.resize, LabelMap)
def _resize_label_map(label: LabelMap, size, interpolation=None, max_size=None, antialias=True) -> LabelMap:
    # The output size by torchvision's own rule (shorter side, max_size), from an empty mask of this size.
    canvas = torch.empty((0, *label.shape[-2:]), dtype=label.dtype)
    h, w = TF.resize(tv_tensors.Mask(canvas), size, max_size=max_size).shape[-2:]
    rows, cols = centre_indices(label.shape[-2], h), centre_indices(label.shape[-1], w)
    plain = label.as_subclass(torch.Tensor)
    return tv_tensors.wrap(plain[..., rows.to(plain.device), :][..., cols.to(plain.device)], like=label)


def _label_map(mask: tv_tensors.Mask) -> LabelMap:
    return mask.as_subclass(LabelMap)


def _as_label_map() -> v2.Lambda:
    """Every Mask through these transforms becomes a LabelMap, so that no path samples corners."""
    return v2.Lambda(_label_map, tv_tensors.Mask)


def _to_normalised_float() -> list:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def train_scale_range(size: int = 224) -> tuple[int, int]:
    """The shorter side's inclusive range of the paper's train transform (212, 268 at 224)."""
    return int(0.95 * size), int(1.20 * size)


def pad_right_bottom(inpt, size: int):
    """Zero-pad at the right and bottom up to size x size (nothing where already as large)."""
    h, w = inpt.shape[-2:]
    return TF.pad(inpt, [0, 0, max(size - w, 0), max(size - h, 0)], fill=0)


def train_transform(size: int = 224) -> v2.Compose:
    low, high = train_scale_range(size)
    return v2.Compose([
        _as_label_map(),
        v2.RandomResize(low, high + 1),  # shorter side; randint's upper bound is exclusive
        # The image and its mask have one size, so padding each alone pads them alike.
        v2.Lambda(functools.partial(pad_right_bottom, size=size), tv_tensors.Image, tv_tensors.Mask),
        v2.RandomCrop(size),
        *_to_normalised_float(),
    ])


def eval_transform(size: int = 224) -> v2.Compose:
    return v2.Compose([_as_label_map(), v2.Resize((size, size)), *_to_normalised_float()])
