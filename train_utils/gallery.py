"""The pictures of the report page's gallery: image | truth | prediction of every evaluated image,
small, written where the predictions are made (evaluate.py, and train.py's final test), so that
a report can be written again later from the folder alone."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from common.atomic import write_image
from data_process import layout
from train_utils import reporting

PANEL_HEIGHT = 160  # pixels: a gallery of a thousand images stays a few tens of MB


def picture_path(folder: str | Path, name: str, dataset: str | None = None) -> Path:
    """Where the picture of image `name` goes in `folder` (under its dataset's sub-folder where an
    evaluation mixes several datasets): the image's stem, sub-folders kept, as JPEG."""
    stem = layout.stem(name)
    return Path(folder) / (f"{dataset}/{stem}.jpg" if dataset else f"{stem}.jpg")


def write_picture(path: str | Path, image: np.ndarray, truth: np.ndarray, pred: np.ndarray) -> None:
    """`reporting.overlay(image, truth, pred)` (RGB, label maps at the image's size), scaled to
    PANEL_HEIGHT pixels high, as a JPEG."""
    strip = reporting.overlay(image, truth, pred)
    height, width = strip.shape[:2]
    size = (max(1, round(width * PANEL_HEIGHT / height)), PANEL_HEIGHT)
    small = cv2.resize(strip, size, interpolation=cv2.INTER_AREA if height > PANEL_HEIGHT else cv2.INTER_LINEAR)
    write_image(path, cv2.cvtColor(small, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
