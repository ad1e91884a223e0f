"""What a describer shows the model for one ROI: the prompt text and the image, per model family.

Every family gets the paper's question word for word. LLaVA-1.5 (config `model_type` "llava")
keeps the paper's input exactly: the LLaVA v1 conversation (system line, "USER: <image>\\n...",
"ASSISTANT:") and the ROI padded to a square with the processor's mean colour before the
processor resizes it (`image_aspect_ratio: pad`). Any other family gets the conversation its
own processor's chat template writes (one image, then the question) and the ROI as it is, so
that the processor sizes it as the model was trained to see it.

Backends (transformers, vLLM, ...) share these formats: they turn (keyword, ROI) into
(prompt text, image) the same way, whatever runs the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.errors import CoTexNetError

# The LLaVA v1 conversation the paper queried with: system line, "USER: <image>\n...", "ASSISTANT:".
SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")
LLAVA_V1_TEMPLATE = (
    "{{ '" + SYSTEM.replace("'", "\\'") + " ' }}"
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for part in message['content'] if part['type'] == 'image' %}{{ '<image>\\n' }}{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] }}{% endfor %}"
    "{{ ' ' if message['role'] == 'user' else '</s>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
PAPER_MODEL_TYPE = "llava"  # llava-hf's LLaVA-1.5 (and what convert_llava.py writes)


def question(keyword: str) -> str:
    """The paper's question, word for word (the keyword + "s", as the paper's code writes it)."""
    return ("The image shows the " + keyword + "s. "
            "Please provide a single JSON format message containing a general description of the area information "
            "(only one result is needed). Use the following format: {'number': xxx, 'location': xxx, 'shape': xxx, "
            "'size': xxx, 'color': xxx}. Note: Use words in the 'location' item to describe the approximate location "
            "of the region in the image. Only one description should be provided.")


def conversation(keyword: str) -> list[dict]:
    """One user turn: the image, then the question (the order the chat templates of VLMs expect)."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question(keyword)}]}]


def pad_to_square(image: np.ndarray, mean) -> np.ndarray:
    """The ROI (H, W, 3) centred on a square of the processor's mean colour, as LLaVA-1.5 does
    (`image_aspect_ratio: pad`) before its resize to 336: nothing is cropped away."""
    height, width = image.shape[:2]
    side = max(height, width)
    square = np.empty((side, side, image.shape[2]), image.dtype)
    square[:] = [int(m * 255) for m in mean]  # the original truncates the colour to integers
    top, left = (side - height) // 2, (side - width) // 2
    square[top:top + height, left:left + width] = image
    return square


@dataclass(frozen=True)
class PromptFormat:
    """How one model family is asked: `text(keyword)` is the whole prompt (image placeholder
    included, generation prompt appended), `image(roi)` what goes to the image processor."""

    template: str          # Jinja chat template
    pad_mean: tuple | None  # LLaVA-1.5: pad to a square of this colour (0..1 per channel); else None
    family: str            # "LLaVA-1.5 (paper's v1 prompt, padded)" or "<model_type> (its chat template)"

    def text(self, processor, keyword: str) -> str:
        return processor.apply_chat_template(conversation(keyword), chat_template=self.template,
                                             add_generation_prompt=True, tokenize=False)

    def image(self, roi: np.ndarray) -> np.ndarray:
        return roi if self.pad_mean is None else pad_to_square(roi, self.pad_mean)


def prompt_format(processor, model_type: str, source: str) -> PromptFormat:
    """The format of the model at `source` (named in errors): LLaVA-1.5's for model type "llava",
    else the processor's own chat template, which must exist and take an image."""
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None:
        raise CoTexNetError(f"{source}: model type {model_type!r} has no image processor: it takes no image input, "
                            "so it cannot describe ROIs")
    if model_type == PAPER_MODEL_TYPE:
        return PromptFormat(LLAVA_V1_TEMPLATE, tuple(image_processor.image_mean),
                            "LLaVA-1.5 (the paper's v1 prompt, ROI padded to a square)")
    template = getattr(processor, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one
        template = template.get("default")
    if not template:
        raise CoTexNetError(f"{source}: model type {model_type!r} has no chat template in its processor: the question "
                            "cannot be put in its conversation format (add chat_template.jinja to the folder)")
    chosen = PromptFormat(template, None, f"{model_type} (its own chat template)")
    image_token = getattr(processor, "image_token", None)
    if image_token and image_token not in chosen.text(processor, "area"):
        raise CoTexNetError(f"{source}: the chat template of model type {model_type!r} writes no image "
                            f"({image_token}) into the conversation: it takes no image input")
    return chosen
