"""Joint image/mask transforms of METHOD.md (torchvision.transforms.v2).

Input: `tv_tensors.Image` uint8 (3,H,W) and `tv_tensors.Mask` (H,W) label map; masks are
resized with nearest neighbour and padded with 0 (background) by v2 itself.
- train: shorter side resized to a random 0.95..1.20 x size, random size x size crop
  (zero padded where the image is smaller), ImageNet normalisation;
- eval: resized to size x size, ImageNet normalisation.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _to_normalised_float() -> list:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def train_transform(size: int = 224) -> v2.Compose:
    return v2.Compose([
        v2.RandomResize(round(0.95 * size), round(1.20 * size) + 1),  # shorter side, upper bound exclusive
        v2.RandomCrop(size, pad_if_needed=True, fill=0),
        *_to_normalised_float(),
    ])


def eval_transform(size: int = 224) -> v2.Compose:
    return v2.Compose([v2.Resize((size, size)), *_to_normalised_float()])
