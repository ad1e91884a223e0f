"""Label maps at each image's own size from a trained model: what evaluation and prediction output."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from train_utils.metrics import predict_labels


def logits_at(logits: torch.Tensor, sizes) -> list[torch.Tensor]:
    """One (C, h, w) float map per image of (B,C,H',W') `logits`, resized to that image's (h, w)
    in `sizes`: the logits are resized, not the labels (a smooth upsampling, then the decision)."""
    maps = []
    for one, (h, w) in zip(logits.float(), sizes, strict=True):
        size = (int(h), int(w))
        maps.append(one if one.shape[-2:] == size else
                    F.interpolate(one[None], size=size, mode="bilinear", align_corners=False)[0])
    return maps


def labels_at(logits: torch.Tensor, sizes) -> list[torch.Tensor]:
    """One (h, w) label map per image of (B,C,H',W') `logits`, at that image's (h, w) in `sizes`."""
    return [predict_labels(one[None])[0] for one in logits_at(logits, sizes)]


def predict_batches(model, loader, accelerator: Accelerator):
    """Yield (batch, label maps, logit maps) at the images' original sizes, on the CPU, for every
    batch of a loader collated by `data.collate_readable`; a batch without a readable image yields
    no maps."""
    model.eval()
    for batch in loader:
        if not batch["name"]:
            yield batch, [], []
            continue
        with torch.no_grad(), accelerator.autocast():
            logits = model(batch["pixel_values"].to(accelerator.device)).logits
        full = [one.cpu() for one in logits_at(logits, batch["orig_size"])]
        yield batch, [predict_labels(one[None])[0] for one in full], full
