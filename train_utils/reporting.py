"""What a run writes besides checkpoints: the per-epoch CSV log, curves.png, overlays, tables.

Every file goes through `common.atomic.atomic_path`, so an interrupted run never leaves a
half-written log or picture behind.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import matplotlib

matplotlib.use("Agg")  # no display on training machines
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from common.atomic import atomic_path, write_image
from data_process.transforms import IMAGENET_MEAN, IMAGENET_STD

# Tints of classes 1, 2, ... in overlays (RGB).
CLASS_COLORS = np.array([(0, 255, 0), (255, 0, 0), (0, 128, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255)], np.uint8)


class EpochLog:
    """The per-epoch CSV log of a run; rewritten whole (atomically) after every epoch."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        # A resumed run continues its log.
        self.rows = pd.read_csv(self.path).to_dict("records") if self.path.exists() else []

    def append(self, row: dict) -> None:
        self.rows.append(row)
        write_csv(self.path, self.rows)

    def plot(self, path: str | Path) -> None:
        """curves.png: losses, validation Dice/IoU (and the paper's soft Dice) and the learning rate
        against the epoch."""
        log = pd.DataFrame(self.rows)
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        for key in ("train_loss", "train_seg", "train_kl"):
            axes[0].plot(log["epoch"], log[key], label=key)
        axes[0].set_yscale("log")
        for key in ("val_dice", "val_iou", "val_paper_dice"):
            if key in log:  # val_paper_dice: binary runs
                axes[1].plot(log["epoch"], log[key], label=key)
        axes[1].set_ylim(0, 1)
        axes[2].plot(log["epoch"], log["lr"], label="lr (end of epoch)")
        for ax, title in zip(axes, ("training losses", "validation", "learning rate"), strict=True):
            ax.set_title(title)
            ax.set_xlabel("epoch")
            ax.legend()
            ax.grid(alpha=0.3)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100)
        plt.close(fig)


def write_csv(path: str | Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)


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
    panels = [image] + ([tint(image, truth)] if truth is not None else []) + [tint(image, pred)]
    return np.hstack(panels)


def write_overlay(path: str | Path, image: np.ndarray, truth: np.ndarray | None, pred: np.ndarray) -> None:
    """`overlay` as one PNG."""
    write_image(path, cv2.cvtColor(overlay(image, truth, pred), cv2.COLOR_RGB2BGR))


def write_mask(path: str | Path, labels: np.ndarray, num_classes: int) -> None:
    """A label map as PNG: binary 0/255 (viewable, as the datasets store masks), multi-class 0..K."""
    scale = 255 if num_classes == 2 else 1
    write_image(path, (labels * scale).astype(np.uint8))


def format_table(results: dict[str, dict], keys=("dice", "iou", "miou", "pixel_acc", "hd95")) -> str:
    """Split -> summary as a text table of mean ± std over images, with the empty-case counts;
    binary runs add the paper's figures (means over batches, no std) and a line saying so."""
    paper = [k for k in ("paper_dice", "paper_iou", "paper_acc", "paper_miou") if any(k in s for s in results.values())]
    width = max(8, *(len(split) + 1 for split in results))  # rows such as "test kvasir" of several datasets
    header = (f"{'split':<{width}}{'images':>7}" + "".join(f"{k:>18}" for k in keys) + f"{'empty pred':>12}{'hd95 undef':>12}"
              + "".join(f"{k:>12}" for k in paper))
    lines = [header, "-" * len(header)]
    for split, s in results.items():
        cells = "".join(f"{_cell(s.get(k), s.get(k + '_std')):>18}" for k in keys)
        extra = "".join(f"{_cell(s.get(k), None):>12}" for k in paper)
        lines.append(f"{split:<{width}}{s['images']:>7}{cells}{s.get('empty_pred', 0):>12}{s.get('hd95_undefined', 0):>12}"
                     + extra)
    if paper:
        size = max(s.get("paper_batch_size", 0) for s in results.values())
        lines.append(f"dice..hd95: per image (hard, at 0.5), mean ± std over images. paper_*: the paper's figures "
                     f"(soft Dice on probabilities; means over batches of up to {size} images): compare these with "
                     "the paper's tables")
    return "\n".join(lines)


def _cell(mean, std) -> str:
    if mean is None or math.isnan(mean):
        return "n/a"
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def format_agreement(figures: dict) -> str:
    """`model.concept_readout.agreement` as a text table: per attribute, agreement beside chance and majority."""
    without = f", {figures['no_region']} without (left out)" if figures["no_region"] else ""
    lines = [f"concept readout vs the geometry describer on the true masks ({figures['images']} images with a "
             f"region{without})", f"{'attribute':<10}{'agreement':>11}{'chance':>9}{'majority':>10}"]
    lines += [f"{key:<10}{f['agreement']:>11.2f}{f['chance']:>9.2f}{f['majority']:>10.2f}"
              for key, f in figures.items() if isinstance(f, dict)]
    return "\n".join(lines)
