"""CoTexNet's training loss: Dice + cross-entropy on the logits, plus the distillation of the
text embedding T into the image's pseudo text embedding I.

Unlike the paper's code, the segmentation loss sees logits and multi-class uses softmax over
the classes. `loss_input="paper_probabilities"` (`TRAIN.loss_input`) computes the paper's loss
instead, binary only: MONAI's `DiceCELoss()` with its defaults on the sigmoid probabilities,
so that its cross-entropy part (BCE with logits) applies a second sigmoid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch import nn


def distillation_kl(text_embedding: torch.Tensor, img_embedding: torch.Tensor) -> torch.Tensor:
    """KL(softmax(T) || softmax(I)), batch mean: the student I learns from the teacher T,
    which gets no gradient."""
    student = F.log_softmax(img_embedding.float(), dim=-1)
    teacher = F.log_softmax(text_embedding.detach().float(), dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean")


LOSS_INPUTS = ("logits", "paper_probabilities")


class CoTexNetLoss(nn.Module):
    def __init__(self, num_classes: int, seg_weight: float = 1.0, kl_weight: float = 10.0,
                 loss_input: str = "logits"):
        super().__init__()
        if loss_input not in LOSS_INPUTS or (loss_input == "paper_probabilities" and num_classes != 2):
            raise ValueError(f"loss_input {loss_input!r}: expected logits, or paper_probabilities for 2 classes")
        self.num_classes, self.paper = num_classes, loss_input == "paper_probabilities"
        self.seg_weight, self.kl_weight = seg_weight, kl_weight
        binary = num_classes == 2
        self.seg_loss = DiceCELoss() if self.paper else DiceCELoss(sigmoid=binary, softmax=not binary,
                                                                   to_onehot_y=not binary)

    def forward(self, output, label: torch.Tensor) -> dict[str, torch.Tensor]:
        """`output`: a CoTexNetOutput; `label`: int64 (B, H, W) label map 0..num_classes-1.
        On the evaluation path (no text embedding) the KL term is 0."""
        # float32 even under AMP: Dice sums over many pixels.
        logits = output.logits.float()
        target = (label > 0).float() if self.num_classes == 2 else label
        seg = self.seg_loss(torch.sigmoid(logits) if self.paper else logits, target.unsqueeze(1))
        kl = (logits.new_zeros(()) if output.text_embedding is None
              else distillation_kl(output.text_embedding, output.img_embedding))
        return {"loss": self.seg_weight * seg + self.kl_weight * kl, "seg": seg, "kl": kl}
