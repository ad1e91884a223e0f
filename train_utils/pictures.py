"""Pictures of predictions: label maps as PNG, overlays (image | truth | prediction, every class
tinted), and the report page's gallery of small overlays, one per evaluated image, written where
the predictions are made so that a report can be written again later from the folder alone."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from common.atomic import write_image
from data_process import layout
from data_process.transforms import IMAGENET_MEAN, IMAGENET_STD

# Tints of classes 1, 2, ... in overlays (RGB).
CLASS_COLORS = np.array([(0, 255, 0), (255, 0, 0), (0, 128, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255)], np.uint8)
PANEL_HEIGHT = 160  # pixels of a gallery picture: a gallery of a thousand images stays small


def denormalize(pixel_values: torch.Tensor) -> np.ndarray:
    """A (3,H,W) tensor normalised by the transforms back to an HxWx3 uint8 RGB image."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    image = (pixel_values.float().cpu() * std + mean).clamp(0, 1)
    return (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def tint(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The image with each class tinted in its colour and outlined."""
    out = image.copy()
    for k in range(1, int(labels.max(initial=0)) + 1):
        mask = (labels == k).astype(np.uint8)
        color = CLASS_COLORS[(k - 1) % len(CLASS_COLORS)]
        out[mask > 0] = (0.55 * out[mask > 0] + 0.45 * color).astype(np.uint8)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, contours, -1, tuple(int(c) for c in color), max(1, image.shape[0] // 150))
    return out


def overlay(image: np.ndarray, truth: np.ndarray | None, pred: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 RGB: image | truth | prediction (image | prediction when there is no truth)."""
    return np.hstack([image] + ([tint(image, truth)] if truth is not None else []) + [tint(image, pred)])


def write_overlay(path: str | Path, image: np.ndarray, truth: np.ndarray | None, pred: np.ndarray) -> None:
    """`overlay` as one PNG."""
    write_image(path, cv2.cvtColor(overlay(image, truth, pred), cv2.COLOR_RGB2BGR))


def write_mask(path: str | Path, labels: np.ndarray, num_classes: int) -> None:
    """A label map as PNG: binary 0/255 (viewable, as the datasets store masks), multi-class 0..K."""
    scale = 255 if num_classes == 2 else 1
    write_image(path, (labels * scale).astype(np.uint8))


def picture_path(folder: str | Path, name: str, dataset: str | None = None) -> Path:
    """Where the picture of image `name` goes in `folder` (under its dataset's sub-folder where an
    evaluation mixes several datasets): the image's stem, sub-folders kept, as JPEG."""
    stem = layout.stem(name)
    return Path(folder) / (f"{dataset}/{stem}.jpg" if dataset else f"{stem}.jpg")


def write_picture(path: str | Path, image: np.ndarray, truth: np.ndarray, pred: np.ndarray) -> None:
    """`overlay(image, truth, pred)` (RGB, label maps at the image's size), scaled to
    PANEL_HEIGHT pixels high, as a JPEG."""
    strip = overlay(image, truth, pred)
    height, width = strip.shape[:2]
    size = (max(1, round(width * PANEL_HEIGHT / height)), PANEL_HEIGHT)
    small = cv2.resize(strip, size, interpolation=cv2.INTER_AREA if height > PANEL_HEIGHT else cv2.INTER_LINEAR)
    write_image(path, cv2.cvtColor(small, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
