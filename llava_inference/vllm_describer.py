"""LLaVA-1.5 on vLLM: the same questions, inputs and grammar as llava_model.LlavaDescriber, on a
serving engine (continuous batching, paged KV cache, tensor parallelism over GPUs).

vLLM lives in its own venv (`make vllm-venv`, tools/vllm_venv.sh): its wheels pin a torch and a
transformers of their own. get_text.py runs under that venv's Python with `--backend vllm`.

What the model sees is what the transformers backend gives it:
- the ROI padded to a square with the processor's mean colour (`pad_to_square`), then the
  folder's own image processor with PIL resampling (vLLM runs it);
- the prompt as token ids, tokenised here by the processor that backend loads (`load_processor`:
  legacy tokenisation), since vLLM would otherwise tokenise the text with the folder's settings;
- the answer grammar of `answer_grammar()` (same schema, no free whitespace), through vLLM's
  xgrammar backend;
- the weights in the dtype that backend picks (`torch_dtype`).
The retries and the validation are `describe_with_retries`, shared with that backend.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from common.errors import CoTexNetError
from llava_inference.attributes import Attributes
from llava_inference.llava_model import (
    answer_grammar,
    check_model_folder,
    describe_with_retries,
    load_processor,
    pad_to_square,
    torch_dtype,
    v1_prompt,
)

INSTALL = ("build its venv with `make vllm-venv` (tools/vllm_venv.sh) and run get_text.py with "
           ".venv-vllm/bin/python")


def import_vllm():
    """The vllm package, or one line naming how to install it."""
    import sys

    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")  # nothing is reported anywhere
    # One machine: its engine processes meet on loopback, and vLLM need not probe a public address
    # to learn its own.
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # the engine's start-up chatter stays out of the summary
    try:
        import vllm
    except ImportError as err:
        raise CoTexNetError(f"--backend vllm: vLLM cannot be imported by {sys.executable} ({err}); {INSTALL}") from None
    return vllm


class VllmDescriber:
    def __init__(self, model_path, dtype: str = "auto", constrain: bool = True, max_new_tokens: int = 512,
                 temperature: float = 0.2, seed: int = 0, tensor_parallel: int = 1):
        """`tensor_parallel`: GPUs (on a CPU-only machine, processes) one copy of the model is split over."""
        path = Path(model_path)
        check_model_folder(path)
        vllm = import_vllm()
        from vllm.sampling_params import StructuredOutputsParams

        self.processor = load_processor(path)
        try:
            # The engine's seed: reproducible runs, while a retried ROI still draws a new answer.
            # backend="pil": the folder's image processor resizes with PIL as load_processor's does;
            # where torchvision is installed (vLLM's GPU wheels), transformers would pick it instead.
            self.engine = vllm.LLM(model=str(path), dtype=torch_dtype(dtype), seed=seed,
                                   tensor_parallel_size=tensor_parallel, limit_mm_per_prompt={"image": 1},
                                   mm_processor_kwargs={"backend": "pil"},
                                   structured_outputs_config={"backend": "xgrammar"})
        except Exception as err:  # vLLM raises many kinds; its log above names the cause
            message = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            raise CoTexNetError(f"{path}: vLLM could not start its engine ({message}); if vLLM itself is broken, "
                                f"{INSTALL}") from err
        structured = StructuredOutputsParams(grammar=str(answer_grammar())) if constrain else None
        self.sampling = vllm.SamplingParams(temperature=temperature, max_tokens=max_new_tokens,
                                            structured_outputs=structured)

    def prompt(self, keyword: str) -> str:
        return v1_prompt(self.processor, keyword)

    def requests(self, images: list[np.ndarray], keywords: list[str]) -> list[dict]:
        """vLLM's inputs for RGB ROI images: token ids of the prompt, the ROI padded to a square."""
        from PIL import Image

        mean = self.processor.image_processor.image_mean
        return [{"prompt_token_ids": self.processor.tokenizer(self.prompt(keyword))["input_ids"],
                 "multi_modal_data": {"image": Image.fromarray(pad_to_square(image, mean))}}
                for image, keyword in zip(images, keywords, strict=True)]

    def generate(self, images: list[np.ndarray], keywords: list[str]) -> list[str]:
        """One answer per (ROI image, keyword); the engine batches them as it goes."""
        outputs = self.engine.generate(self.requests(images, keywords), self.sampling, use_tqdm=False)
        return [output.outputs[0].text for output in outputs]

    def describe(self, images, keywords, max_numbers, max_retries: int) -> list[tuple[Attributes | None, int]]:
        return describe_with_retries(self.generate, images, keywords, max_numbers, max_retries)
