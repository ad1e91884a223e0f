"""Joint image/mask transforms of METHOD.md (torchvision.transforms.v2), the paper's exactly.

Input: `tv_tensors.Image` uint8 (3,H,W) and `tv_tensors.Mask` (H,W) label map; masks are
resized with nearest neighbour and padded with 0 (background) by v2 itself.
- train: shorter side resized (aspect kept) to a random int(0.95 x size)..int(1.20 x size)
  inclusive (212..268 at 224), zero padded at the right and bottom only where smaller than
  size, then a random size x size crop; ImageNet normalisation. No flips (the paper flips
  offline);
- eval: resized to size x size, ImageNet normalisation.
"""

from __future__ import annotations

import functools

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
        v2.RandomResize(low, high + 1),  # shorter side; randint's upper bound is exclusive
        # The image and its mask have one size, so padding each alone pads them alike.
        v2.Lambda(functools.partial(pad_right_bottom, size=size), tv_tensors.Image, tv_tensors.Mask),
        v2.RandomCrop(size),
        *_to_normalised_float(),
    ])


def eval_transform(size: int = 224) -> v2.Compose:
    return v2.Compose([v2.Resize((size, size)), *_to_normalised_float()])
