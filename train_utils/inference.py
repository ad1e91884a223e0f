"""Label maps at each image's own size from a trained model: what evaluation and prediction output."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from train_utils.metrics import predict_labels


def labels_at(logits: torch.Tensor, sizes) -> list[torch.Tensor]:
    """One (h, w) label map per image of (B,C,H',W') `logits`, at that image's (h, w) in `sizes`.

    The logits are resized, not the labels: a smooth upsampling, then the decision at full size.
    """
    maps = []
    for one, (h, w) in zip(logits.float(), sizes, strict=True):
        size = (int(h), int(w))
        if one.shape[-2:] != size:
            one = F.interpolate(one[None], size=size, mode="bilinear", align_corners=False)[0]
        maps.append(predict_labels(one[None])[0])
    return maps


def predict_batches(model, loader, accelerator: Accelerator):
    """Yield (batch, label maps at the images' original sizes, on the CPU) for every batch of a loader
    collated by `data.collate_readable`; a batch without a readable image yields no maps."""
    model.eval()
    for batch in loader:
        if not batch["name"]:
            yield batch, []
            continue
        with torch.no_grad(), accelerator.autocast():
            logits = model(batch["pixel_values"].to(accelerator.device)).logits
        yield batch, [labels.cpu() for labels in labels_at(logits, batch["orig_size"])]
