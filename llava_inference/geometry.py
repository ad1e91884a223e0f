"""Describe a region from its mask and ROI image alone: no model, exact where the mask knows.

- number: external contours whose area is at least `MIN_REGION_FRACTION` of the image (and
  `MIN_REGION_PIXELS`), so JPEG speckle around a mask is not counted as a region.
- location: the paper's position words of the foreground centroid (pixel centres, x / width,
  y / height).
- size: from the foreground area fraction: below 5 % small, 5-20 % medium, from 20 % large.
- shape: of the largest region: irregular if its solidity (area / convex hull area) is below
  0.9 or its circularity 4*pi*A/P^2 below 0.6 (ellipses up to 3:1 stay above 0.66); otherwise
  round if the ellipse aspect (from second moments) is at most 1.3, else oval.
- color: the palette entry nearest (CIELAB distance) to the mean RGB of the ROI inside the mask.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from common.errors import CoTexNetError
from llava_inference.attributes import Attributes, location_words

MIN_REGION_FRACTION = 0.001
MIN_REGION_PIXELS = 10
SMALL_BELOW, LARGE_FROM = 0.05, 0.20
SOLIDITY_MIN, CIRCULARITY_MIN, ROUND_ASPECT_MAX = 0.9, 0.6, 1.3
PALETTE = {
    "pink": (230, 150, 160), "red": (190, 40, 40), "orange": (235, 130, 40), "yellow": (230, 210, 60),
    "white": (240, 240, 240), "brown": (130, 80, 45), "purple": (120, 50, 130), "gray": (128, 128, 128),
    "black": (20, 20, 20), "green": (60, 150, 70), "blue": (50, 80, 190),
}


def _min_area(pixels: int) -> float:
    return max(MIN_REGION_PIXELS, MIN_REGION_FRACTION * pixels)


def _regions(mask: np.ndarray) -> list[np.ndarray]:
    """External contours large enough to be a region, largest first."""
    binary = (np.asarray(mask) > 0).astype(np.uint8)
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    min_area = _min_area(binary.size)
    # Filled pixel count, not contourArea: a one-pixel-wide region has contour area 0.
    areas = [int(cv2.drawContours(np.zeros_like(binary), [c], -1, 1, cv2.FILLED).sum()) for c in contours]
    kept = [(a, c) for a, c in zip(areas, contours, strict=True) if a >= min_area]
    return [c for _, c in sorted(kept, key=lambda item: -item[0])]


def count_regions(mask: np.ndarray) -> int:
    """The number of regions in a mask (0 for an empty or speckle-only mask)."""
    return len(_regions(mask))


def size_word(area_fraction: float) -> str:
    return "small" if area_fraction < SMALL_BELOW else "medium" if area_fraction < LARGE_FROM else "large"


def shape_word(contour: np.ndarray) -> str:
    area = cv2.contourArea(contour)
    hull_area = cv2.contourArea(cv2.convexHull(contour))
    perimeter = cv2.arcLength(contour, True)
    if (min(area, hull_area, perimeter) <= 0 or area / hull_area < SOLIDITY_MIN
            or 4 * np.pi * area / perimeter**2 < CIRCULARITY_MIN):
        return "irregular"
    m = cv2.moments(contour)
    cov = np.array([[m["mu20"], m["mu11"]], [m["mu11"], m["mu02"]]]) / m["m00"]
    small, large = np.linalg.eigvalsh(cov)
    aspect = np.sqrt(large / small) if small > 0 else np.inf
    return "round" if aspect <= ROUND_ASPECT_MAX else "oval"


def color_word(rgb: np.ndarray) -> str:
    """The palette name nearest to an RGB colour, compared in CIELAB (closer to what people call a colour)."""
    names = list(PALETTE)
    colours = np.array([PALETTE[n] for n in names] + [np.asarray(rgb).round()], dtype=np.uint8)[None]
    lab = cv2.cvtColor(colours, cv2.COLOR_RGB2LAB)[0].astype(np.float32)
    return names[int(np.argmin(np.linalg.norm(lab[:-1] - lab[-1], axis=1)))]


def measure(mask: np.ndarray, roi: np.ndarray, name: str = "mask") -> Attributes:
    """Attributes of the foreground of `mask` (HxW, >0 = region) in `roi` (HxWx3 RGB, same size)."""
    binary = np.asarray(mask) > 0
    regions = _regions(binary)
    if not regions:
        raise CoTexNetError(f"{name}: the mask has no region of at least {math.ceil(_min_area(binary.size))} pixels")
    if roi.shape[:2] != binary.shape:
        raise CoTexNetError(f"{name}: ROI is {roi.shape[1]}x{roi.shape[0]} but the mask {binary.shape[1]}x{binary.shape[0]}")
    ys, xs = np.nonzero(binary)
    h, w = binary.shape
    return Attributes(len(regions), location_words((xs.mean() + 0.5) / w, (ys.mean() + 0.5) / h),
                      shape_word(regions[0]), size_word(binary.mean()), color_word(roi[binary].mean(axis=0)))
