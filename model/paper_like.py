"""CoTexNet computed the way the paper's code computes it: the baseline that tools/bench.py times
beside ours, on the same weights.

`PaperLikeCoTexNet` is `CoTexNet` with the same function (its logits equal ours: the bench checks
it) and the paper's work:
- the ROI goes through the vision encoder in a call of its own, on a second copy of the encoder
  (the paper's model holds two);
- every vision layer is computed in full, through the stock vision forward;
- prompts are padded to the text encoder's full length (77 tokens for CLIP), as the paper's
  tokenizer call pads them;
- in eval mode, a prompt given still goes through the text encoder, its result unused, as in the
  paper's evaluation.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from model.CoTexNet import CoTexNet, CoTexNetOutput


class PaperLikeCoTexNet(CoTexNet):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.roi_vision = copy.deepcopy(self.clip.vision_model)

    def encode_images(self, pixel_values: torch.Tensor, vision=None) -> tuple[list[torch.Tensor], torch.Tensor]:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_encoder):
            out = (vision or self.clip.vision_model)(pixel_values.to(self.encoder_dtype), output_hidden_states=True)
        return [out.hidden_states[i + 1] for i in self.extract_layers], out.last_hidden_state[:, 0]

    def encode_image_and_roi(self, pixel_values: torch.Tensor, roi_pixel_values: torch.Tensor | None):
        activations, cls = self.encode_images(pixel_values)
        if roi_pixel_values is not None:
            cls = torch.cat([cls, self.encode_images(roi_pixel_values, self.roi_vision)[1]])
        return activations, cls

    def forward(self, pixel_values: torch.Tensor, roi_pixel_values: torch.Tensor | None = None,
                input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None) -> CoTexNetOutput:
        if input_ids is not None:
            text = self.clip.text_model.config
            extra = text.max_position_embeddings - input_ids.shape[1]
            attention_mask = F.pad(torch.ones_like(input_ids) if attention_mask is None else attention_mask, (0, extra))
            input_ids = F.pad(input_ids, (0, extra), value=text.pad_token_id)
            if not self.training:
                self.text_features(input_ids, attention_mask)
                input_ids = attention_mask = None
        return super().forward(pixel_values, roi_pixel_values, input_ids, attention_mask)
