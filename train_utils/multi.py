"""Training on several datasets at once (DATASET.dataset_name a list): one split of every dataset
as one shuffled set, and metrics per dataset beside the overall ones.

Each dataset keeps its own registry entry (keyword, mask format), text CSV and split rows; all
must have the same classes. The overall figure is given two ways: the mean over every image
(the summary itself) and the mean over datasets (`mean_over_datasets`, its `_std` the spread
between datasets), where a small dataset weighs as much as a large one; TRAIN.select_overall says which one picks the best epoch.
"""

from __future__ import annotations

import bisect

import numpy as np
from torch.utils.data import ConcatDataset

from common.errors import CoTexNetError
from data_process.registry import DatasetSpec
from llava_inference.text_csv_reader import load_prompts
from train_utils import data
from train_utils.config import Config
from train_utils.metrics import summarize as summarize_images

COUNTS = ("images", "empty_pred", "empty_truth", "hd95_undefined")


class Mixed(ConcatDataset):
    """The same split of several datasets as one dataset; each item carries its dataset's name."""

    def __init__(self, parts: dict):
        super().__init__(list(parts.values()))
        self.names = list(parts)
        self.folders = {name: part.folder for name, part in parts.items()}

    def __getitem__(self, index: int) -> dict:
        item = super().__getitem__(index)
        part = bisect.bisect_right(self.cumulative_sizes, index % len(self))
        return dict(item, dataset=self.names[part])


def is_multi(cfg: Config) -> bool:
    return len(cfg.datasets()) > 1


def specs(cfg: Config) -> dict[str, DatasetSpec]:
    """Dataset name -> registry entry, checked to have one class count for all."""
    found = {name: data.spec(cfg, name) for name in cfg.datasets()}
    counts = {name: spec.num_classes for name, spec in found.items()}
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{name} {count}" for name, count in counts.items())
        raise CoTexNetError(f"DATASET.dataset_name: datasets trained together must have the same classes; "
                            f"the registry gives {listed} (categories + 1 background)")
    return found


def split_set(cfg: Config, split: str, tokenizer=None):
    """A split of the configured dataset(s): a SegDataset for one dataset, a `Mixed` of them for
    several. With a tokenizer, each dataset's items carry the prompts of its own text CSV."""
    sets = {}
    for name, csv in cfg.text_csvs().items():
        prompts = None
        if tokenizer is not None:
            try:
                prompts = load_prompts(csv, data.spec(cfg, name))
            except CoTexNetError as err:
                # The default text CSV names its dataset; a path of one's own may not.
                raise CoTexNetError(f"dataset {name}: {err}" if is_multi(cfg) else str(err)) from None
        sets[name] = data.dataset(cfg, split, tokenizer, prompts, name=name)
    return Mixed(sets) if is_multi(cfg) else sets[cfg.datasets()[0]]


def image_paths(dataset, batch: dict) -> list:
    """The image files of a batch of `dataset` (a SegDataset or a `Mixed`)."""
    if "dataset" in batch:
        return [dataset.folders[part] / "images" / name for part, name in zip(batch["dataset"], batch["name"],
                                                                              strict=True)]
    return [dataset.folder / "images" / name for name in batch["name"]]


def summarize(rows: list[dict]) -> dict:
    """The summary over every image; rows of several datasets (a `dataset` column) add
    `datasets` (name -> its summary) and `mean_over_datasets` (the mean of their means)."""
    summary = summarize_images(rows)
    if not rows or "dataset" not in rows[0]:
        return summary
    names = list(dict.fromkeys(row["dataset"] for row in rows))
    per = {name: summarize_images([row for row in rows if row["dataset"] == name]) for name in names}
    keys = [key for key, value in summary.items()
            if key not in COUNTS and not key.endswith("_std") and isinstance(value, int | float | None)]
    mean = {"datasets": len(names)}
    for key in keys:
        values = [per[name].get(key) for name in names]
        defined = [value for value in values if value is not None]
        mean[key] = float(np.mean(defined)) if defined else None
        mean[f"{key}_std"] = float(np.std(defined)) if defined else None  # the spread between datasets
    return dict(summary, datasets=per, mean_over_datasets=mean)


def overall(summary: dict, select_overall: str) -> dict:
    """The overall figures that pick the best epoch: over images (the summary), or over datasets."""
    return summary["mean_over_datasets"] if select_overall == "datasets" and "datasets" in summary else summary


def log_columns(summary: dict) -> dict:
    """The per-epoch log's validation columns of each dataset and of their mean (empty for one dataset)."""
    if "datasets" not in summary:
        return {}
    columns = {f"val_dice_{name}": s.get("dice") for name, s in summary["datasets"].items()}
    return dict(columns, val_dice_datasets=summary["mean_over_datasets"]["dice"])


def table(results: dict[str, dict]) -> dict[str, dict]:
    """split -> summary, with a line for each dataset of a split ("test kvasir") and for their mean."""
    lines = {}
    for split, summary in results.items():
        lines[split] = summary
        for name, part in summary.get("datasets", {}).items():
            lines[f"{split} {name}"] = part
        if "mean_over_datasets" in summary:
            counts = {key: summary[key] for key in COUNTS if key in summary}
            lines[f"{split} mean of datasets"] = dict(summary["mean_over_datasets"], **counts)
    return lines
