"""The figures of a run as text and tables: its per-epoch CSV log (and its plot, curves.png),
per-image CSVs, and the tables printed at the end.

Every file goes through `common.io.atomic_path`, so an interrupted run never leaves a
half-written log or plot behind.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on training machines
import matplotlib.pyplot as plt
import pandas as pd

from common.atomic import atomic_path
from train_utils.metrics import COUNTS
from train_utils.paper_metrics import PAPER_KEYS


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
            ax.set(title=title, xlabel="epoch")
            ax.legend()
            ax.grid(alpha=0.3)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100)
        plt.close(fig)


def write_csv(path: str | Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)


def format_table(summaries: dict[str, dict], keys=("dice", "iou", "miou", "pixel_acc", "hd95")) -> str:
    """Split -> summary as a text table of mean ± std over images, with the empty-case counts, and
    a line for each dataset of a split of several ("test kvasir") and for their mean; binary runs
    add the paper's figures (means over batches, no std) and a line saying so."""
    results = {}
    for split, summary in summaries.items():
        results[split] = summary
        results.update({f"{split} {name}": part for name, part in summary.get("datasets", {}).items()})
        if "mean_over_datasets" in summary:  # with the counts of the images it is a mean over
            results[f"{split} mean of datasets"] = dict(summary["mean_over_datasets"],
                                                        **{key: summary[key] for key in COUNTS if key in summary})
    paper = [k for k in PAPER_KEYS if any(k in s for s in results.values())]
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
    """`train_utils.concept_readout.agreement` as a text table: per attribute, agreement beside chance and majority."""
    without = f", {figures['no_region']} without (left out)" if figures["no_region"] else ""
    lines = [f"concept readout vs the geometry describer on the true masks ({figures['images']} images with a "
             f"region{without})", f"{'attribute':<10}{'agreement':>11}{'chance':>9}{'majority':>10}"]
    lines += [f"{key:<10}{f['agreement']:>11.2f}{f['chance']:>9.2f}{f['majority']:>10.2f}"
              for key, f in figures.items() if isinstance(f, dict)]
    return "\n".join(lines)
