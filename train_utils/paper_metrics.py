"""The paper's own figures (`paper_dice`, `paper_iou`, `paper_acc`, `paper_miou`), binary only:
torchmetrics 1.6.0 called once per validation batch on the sigmoid probabilities and the integer
target, the epoch's value the plain mean over batches. They compare with the paper's tables, not
with the per-image figures of `train_utils.metrics`.

Each image contributes sufficient statistics, so that one batch's figures come out the same
whether the batch ran on one process or was split over several, and at any image size
(evaluate.py's original sizes). The sums are written out here, and tests/test_protocol.py holds
them to torchmetrics: its 1.6 DiceScore multiplies the probabilities with the target as they
are, but from 1.7 on it argmaxes float inputs over the channel, which on the paper's one channel
makes every pixel background: the same call no longer gives the paper's number.
"""

from __future__ import annotations

import numpy as np
import torch

PAPER_KEYS = ("paper_dice", "paper_iou", "paper_acc", "paper_miou")


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
