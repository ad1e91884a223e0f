"""Segmentation metrics per image (MONAI), then mean and std over images.

The paper's code averages over batches; here every image counts once, whatever the batch
size or the number of processes. Background is excluded from Dice, IoU and HD95; mIoU is the
mean IoU over all classes including background; pixel accuracy counts every pixel.

Empty masks are counted, not dropped:
- truth and prediction both empty (for a class): Dice = IoU = 1 (MONAI's `ignore_empty=False`);
  exactly one of them empty: Dice = IoU = 0;
- HD95 is undefined when either is empty: stored as NaN, left out of its mean, and counted in
  `hd95_undefined` of the summary.
HD95 is in pixels at the resolution the masks are given in.

Rows of several datasets (a `dataset` column) are also summarised per dataset and as the mean over
the datasets, where a small dataset weighs as much as a large one. The paper's own figures are
`train_utils.paper_metrics`.
"""

from __future__ import annotations

import importlib.util
import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou

from train_utils.paper_metrics import PAPER_KEYS

# MONAI's HD95 needs scipy (binary erosion); without it HD95 is reported as NaN, loudly.
HAS_SCIPY = importlib.util.find_spec("scipy") is not None
COUNTS = ("images", "empty_pred", "empty_truth", "hd95_undefined")


def class_names(num_classes: int, categories=()) -> list[str]:
    """Names of the foreground classes, used in column names of multi-class metrics."""
    return list(categories) if categories else [f"class{k}" for k in range(1, num_classes)]


def image_metrics(pred: torch.Tensor, truth: torch.Tensor, num_classes: int, names=None,
                  hd95: bool = True) -> list[dict]:
    """Metrics of each image of a batch of (B,H,W) label maps, as one dict per image.

    Keys: dice, iou (mean over foreground classes), miou, pixel_acc, hd95 (mean over the
    foreground classes where defined), empty_pred, empty_truth (number of foreground classes
    empty in the prediction / truth); multi-class adds dice_<name>, iou_<name>, hd95_<name>.
    """
    names = names or class_names(num_classes)
    pred, truth = pred.long().cpu(), truth.long().cpu()
    pred_1h = F.one_hot(pred, num_classes).permute(0, 3, 1, 2).float()
    truth_1h = F.one_hot(truth, num_classes).permute(0, 3, 1, 2).float()
    dice = compute_dice(pred_1h, truth_1h, include_background=False, ignore_empty=False)
    iou = compute_iou(pred_1h, truth_1h, include_background=True, ignore_empty=False)
    if hd95 and HAS_SCIPY:
        with warnings.catch_warnings():  # MONAI warns about every empty mask; they are counted instead
            warnings.simplefilter("ignore")
            hd = compute_hausdorff_distance(pred_1h, truth_1h, include_background=False, percentile=95)
        hd = torch.where(torch.isfinite(hd), hd, torch.nan)
    else:
        hd = torch.full_like(dice, torch.nan)
    accuracy = (pred == truth).float().mean((1, 2))
    empty_pred = pred_1h[:, 1:].sum((2, 3)) == 0
    empty_truth = truth_1h[:, 1:].sum((2, 3)) == 0
    rows = []
    for i in range(pred.shape[0]):
        finite = hd[i][~torch.isnan(hd[i])]
        row = dict(dice=dice[i].mean().item(), iou=iou[i, 1:].mean().item(), miou=iou[i].mean().item(),
                   pixel_acc=accuracy[i].item(), hd95=finite.mean().item() if len(finite) else math.nan,
                   empty_pred=int(empty_pred[i].sum()), empty_truth=int(empty_truth[i].sum()))
        if num_classes > 2:
            for k, name in enumerate(names):
                row.update({f"dice_{name}": dice[i, k].item(), f"iou_{name}": iou[i, k + 1].item(),
                            f"hd95_{name}": hd[i, k].item()})
        rows.append(row)
    return rows


def summarize(rows: list[dict]) -> dict:
    """Mean and std (ddof 0) over images of every metric column, undefined HD95s left out; plus
    the number of images with an empty prediction / truth / undefined HD95. Rows of several
    datasets add `datasets` (name -> its summary) and `mean_over_datasets` (the mean of their
    means; its `_std` the spread between datasets)."""
    summary = _over_images(rows)
    if not rows or "dataset" not in rows[0]:
        return summary
    names = list(dict.fromkeys(row["dataset"] for row in rows))
    per = {name: _over_images([row for row in rows if row["dataset"] == name]) for name in names}
    mean = {"datasets": len(names)}
    for key, value in summary.items():
        if key not in COUNTS and not key.endswith("_std") and isinstance(value, int | float | None):
            defined = [per[name][key] for name in names if per[name].get(key) is not None]
            mean[key] = float(np.mean(defined)) if defined else None
            mean[f"{key}_std"] = float(np.std(defined)) if defined else None
    return dict(summary, datasets=per, mean_over_datasets=mean)


def overall(summary: dict, select_overall: str) -> dict:
    """The overall figures that pick the best epoch: over images (the summary), or over datasets."""
    return summary["mean_over_datasets"] if select_overall == "datasets" and "datasets" in summary else summary


def _over_images(rows: list[dict]) -> dict:
    summary: dict = {"images": len(rows)}
    if not rows:
        return summary
    for key in rows[0]:
        values = [row[key] for row in rows]
        # The paper's figures are means over batches (paper_summary), not over images.
        if key in ("empty_pred", "empty_truth", *PAPER_KEYS) or not isinstance(values[0], int | float):
            continue
        array = np.asarray(values, dtype=np.float64)
        defined = array[~np.isnan(array)]
        # None (JSON null) rather than NaN, which JSON does not have.
        summary[key] = float(defined.mean()) if len(defined) else None
        summary[f"{key}_std"] = float(defined.std()) if len(defined) else None
    summary["empty_pred"] = sum(row["empty_pred"] > 0 for row in rows)
    summary["empty_truth"] = sum(row["empty_truth"] > 0 for row in rows)
    summary["hd95_undefined"] = sum(math.isnan(row["hd95"]) for row in rows)
    if not HAS_SCIPY:
        summary["hd95_note"] = "not computed: MONAI's HD95 needs scipy (pip install scipy)"
    return summary
