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

Beside them, the paper's own figures (`paper_dice`, `paper_iou`, `paper_acc`, `paper_miou`):
a soft Dice on probabilities and batch means, computed as the paper's torchmetrics calls do
(below); they compare with the paper's tables, not with the per-image figures.
"""

from __future__ import annotations

import importlib.util
import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou

# MONAI's HD95 needs scipy (binary erosion); without it HD95 is reported as NaN, loudly.
HAS_SCIPY = importlib.util.find_spec("scipy") is not None
PAPER_KEYS = ("paper_dice", "paper_iou", "paper_acc", "paper_miou")


def predict_labels(logits: torch.Tensor) -> torch.Tensor:
    """(B,C,H,W) logits -> (B,H,W) int64 labels: C=1 is binary (logit > 0), else argmax."""
    return (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(1)


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
    """Mean and std (ddof 0) over images of every metric column, undefined HD95s left out;
    plus the number of images with an empty prediction / truth / undefined HD95."""
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


# The paper's figures (METHOD.md, "The paper's protocol"): torchmetrics 1.6.0 called once per
# validation batch on the sigmoid probabilities and the integer target, the epoch's value the
# plain mean over batches; binary only. Each image contributes sufficient statistics, so that
# one batch's figures come out the same whether the batch ran on one process or was split over
# several, and at any image size (evaluate.py's original sizes).
# The sums are written out here, and tests/test_protocol.py holds them to torchmetrics: its
# 1.6 DiceScore multiplies the probabilities with the target as they are, but from 1.7 on it
# argmaxes float inputs over the channel, which on the paper's one channel makes every pixel
# background: the same call no longer gives the paper's number.
def paper_image_stats(probabilities: torch.Tensor, labels: torch.Tensor) -> list[dict]:
    """Per image of a batch: the soft Dice terms of torchmetrics 1.6's `DiceScore(num_classes=2)`
    (2 sum(p t), sum(p) + sum(t)) and the confusion counts at p > 0.5 behind `BinaryJaccardIndex`,
    `Accuracy(task="binary")` and `MeanIoU`. `probabilities`: (B,1,H,W) or (B,H,W) sigmoid outputs; `labels`: (B,H,W) 0/1."""
    probs = probabilities.reshape(labels.shape).float().cpu()
    target = (labels > 0).long().cpu()
    numerator = 2 * (probs * target).sum((1, 2))
    denominator = probs.sum((1, 2)) + target.sum((1, 2))
    hard, truth = probs > 0.5, target.bool()  # torchmetrics' binary threshold: p > 0.5
    counts = torch.stack([(hard & truth).sum((1, 2)), (hard & ~truth).sum((1, 2)), (~hard & ~truth).sum((1, 2)),
                          (~hard & truth).sum((1, 2))], 1)
    return [dict(dice_num=float(n), dice_den=float(d), tp=int(c[0]), fp=int(c[1]), tn=int(c[2]), fn=int(c[3]))
            for n, d, c in zip(numerator, denominator, counts.tolist(), strict=True)]


def _divide(num: float, den: float, zero: float) -> float:
    return num / den if den else zero


def paper_image_dice(stats: dict) -> float:
    """The paper's soft Dice of one image (a batch of one); both sums 0 gives 1, as in 1.6."""
    return _divide(stats["dice_num"], stats["dice_den"], 1.0)


def paper_batch(stats: list[dict]) -> dict:
    """The four figures of one batch as the paper's torchmetrics calls give them:
    DiceScore: mean over images of their soft Dice; BinaryJaccardIndex and Accuracy: over
    the batch's pixels pooled; MeanIoU on the thresholded output with one channel: mean over
    images of their foreground IoU, 0 when prediction and truth are both empty (1.6's
    zero division)."""
    tp, fp, tn, fn = (sum(s[k] for s in stats) for k in ("tp", "fp", "tn", "fn"))
    return dict(images=len(stats), paper_dice=float(np.mean([paper_image_dice(s) for s in stats])),
                paper_iou=_divide(tp, tp + fp + fn, 0.0), paper_acc=_divide(tp + tn, tp + fp + tn + fn, 0.0),
                paper_miou=float(np.mean([_divide(s["tp"], s["tp"] + s["fp"] + s["fn"], 0.0) for s in stats])))


def paper_summary(batches: list[dict]) -> dict:
    """The paper's epoch figures: plain means over the batches' figures (so they depend on the
    batch size), and how many batches they average."""
    if not batches:
        return {}
    return {**{key: float(np.mean([b[key] for b in batches])) for key in PAPER_KEYS}, "paper_batches": len(batches),
            "paper_batch_size": max(b["images"] for b in batches)}
