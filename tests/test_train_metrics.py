"""Per-image metrics against MONAI's own metric classes, on random masks with empty cases."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.metrics import DiceMetric, HausdorffDistanceMetric, MeanIoU

from model.CoTexNet import predict_labels
from train_utils.metrics import HAS_SCIPY, image_metrics, summarize


def random_batch(num_classes: int, seed: int, size=(40, 56)):
    """Blobby random label maps (smoothed noise), plus the empty cases that matter."""
    g = torch.Generator().manual_seed(seed)

    def maps(n):
        noise = F.avg_pool2d(torch.rand(n, num_classes, *size, generator=g), 9, stride=1, padding=4)
        return noise.argmax(1)

    pred, truth = maps(6), maps(6)
    pred[0], truth[0] = 0, 0  # both empty
    pred[1] = 0  # empty prediction, non-empty truth
    truth[2] = 0  # empty truth, non-empty prediction
    return pred, truth


def one_hot(labels, k):
    return F.one_hot(labels, k).permute(0, 3, 1, 2).float()


@pytest.mark.parametrize("num_classes", [2, 4])
def test_dice_iou_match_monai(num_classes):
    pred, truth = random_batch(num_classes, seed=num_classes)
    rows = image_metrics(pred, truth, num_classes, hd95=False)
    p, t = one_hot(pred, num_classes), one_hot(truth, num_classes)
    dice = DiceMetric(include_background=False, reduction="none", ignore_empty=False)(p, t)
    iou = MeanIoU(include_background=True, reduction="none", ignore_empty=False)(p, t)
    for i, row in enumerate(rows):
        assert row["dice"] == pytest.approx(dice[i].mean().item(), abs=1e-6)
        assert row["iou"] == pytest.approx(iou[i, 1:].mean().item(), abs=1e-6)
        assert row["miou"] == pytest.approx(iou[i].mean().item(), abs=1e-6)
        assert row["pixel_acc"] == pytest.approx((pred[i] == truth[i]).float().mean().item())
    # Empty cases follow MONAI's ignore_empty=False: both empty is perfect, one empty is 0.
    assert rows[0]["dice"] == 1.0 and rows[0]["empty_pred"] == rows[0]["empty_truth"] == num_classes - 1
    if num_classes == 2:
        assert rows[1]["dice"] == 0.0 and rows[2]["dice"] == 0.0
    else:
        assert {"dice_class1", "iou_class3", "hd95_class2"} <= rows[3].keys()


@pytest.mark.skipif(not HAS_SCIPY, reason="MONAI's HD95 needs scipy (binary erosion), which is not installed")
@pytest.mark.parametrize("num_classes", [2, 3])
def test_hd95_matches_monai_and_counts_undefined(num_classes):
    pred, truth = random_batch(num_classes, seed=10 + num_classes)
    rows = image_metrics(pred, truth, num_classes)
    hd = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")(
        one_hot(pred, num_classes), one_hot(truth, num_classes))
    for i, row in enumerate(rows):
        finite = hd[i][torch.isfinite(hd[i])]
        expected = finite.mean().item() if len(finite) else math.nan
        assert (math.isnan(row["hd95"]) and math.isnan(expected)) or row["hd95"] == pytest.approx(expected, rel=1e-5)
    assert all(math.isnan(rows[i]["hd95"]) for i in (0, 1, 2))  # an empty side: undefined, not 0
    summary = summarize(rows)
    assert summary["hd95_undefined"] >= 3
    assert summary["hd95"] == pytest.approx(np.nanmean([r["hd95"] for r in rows]))


def test_summary_is_over_images_not_batches():
    pred, truth = random_batch(2, seed=3)
    rows = image_metrics(pred[:1], truth[:1], 2, hd95=False) + image_metrics(pred[1:], truth[1:], 2, hd95=False)
    summary = summarize(rows)
    dices = [r["dice"] for r in rows]
    assert summary["images"] == 6
    assert summary["dice"] == pytest.approx(np.mean(dices)) and summary["dice_std"] == pytest.approx(np.std(dices))
    assert (summary["empty_pred"], summary["empty_truth"]) == (2, 2)


def test_predict_labels_binary_and_multiclass():
    logits = torch.tensor([[[[-1.0, 2.0]]]])
    assert predict_labels(logits).tolist() == [[[0, 1]]]
    logits = torch.tensor([[[[0.0, 1.0]], [[2.0, 0.0]], [[1.0, 3.0]]]])
    assert predict_labels(logits).tolist() == [[[1, 2]]]
