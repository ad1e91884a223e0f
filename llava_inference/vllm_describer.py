"""The vLLM backend: the describer's model on a serving engine (continuous batching, paged KV
cache, tensor parallelism over GPUs), asked what the transformers backend asks.

vLLM lives in its own venv (`make vllm-venv`, tools/vllm_venv.sh): its wheels pin a torch and a
transformers of their own. get_text.py runs under that venv's Python with `--backend vllm`.

What the model sees is what transformers_backend.TransformersDescriber gives it:
- the prompt text and image of the model's family (prompts.py: LLaVA-1.5's v1 prompt and the ROI
  padded to a square), the image then through the folder's own image processor with PIL
  resampling for LLaVA-1.5 (vLLM runs the processor);
- the prompt as token ids, tokenised here by the processor model_folder.inspect_model loads
  (LLaVA-1.5: legacy tokenisation), since vLLM would otherwise tokenise the text with the
  folder's own settings;
- the answer grammar `describer.answer_schema_grammar`, through vLLM's xgrammar backend;
- the weights in the dtype that backend picks (`compute_dtype`).
`ask` (validation, retries) is Describer's. Tested on LLaVA-1.5; the other families go
through the same code.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from common.errors import CoTexNetError
from llava_inference.describer import Describer, answer_schema_grammar
from llava_inference.model_folder import ModelSource, inspect_model
from llava_inference.prompts import PAPER_MODEL_TYPE
from llava_inference.transformers_backend import compute_dtype

INSTALL = ("build its venv with `make vllm-venv` (tools/vllm_venv.sh) and run get_text.py with "
           ".venv-vllm/bin/python")


def import_vllm():
    """The vllm package, or one line naming how to install it."""
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")  # nothing is reported anywhere
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # the engine's start-up chatter stays out of the summary
    # One machine: its engine processes meet on loopback; vLLM need not probe a public address for its own.
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    try:
        import vllm
    except ImportError as err:
        raise CoTexNetError(f"--backend vllm: vLLM cannot be imported by {sys.executable} ({err}); {INSTALL}") from None
    return vllm


class VllmDescriber(Describer):
    def __init__(self, source: ModelSource | str, dtype: str = "auto", constrain: bool = True, max_new_tokens: int = 512,
                 temperature: float = 0.2, seed: int = 0, tensor_parallel: int = 1):
        """`source`: a ModelSource or a folder / hub id; `tensor_parallel`: GPUs (on a CPU-only
        machine, processes) one copy of the model is split over."""
        self.source = source if isinstance(source, ModelSource) else inspect_model(str(source))
        vllm = import_vllm()
        from vllm.sampling_params import StructuredOutputsParams

        self.processor = self.source.processor
        # LLaVA-1.5: the image processor resizes with PIL, as inspect_model's does; where torchvision
        # is installed (vLLM's GPU wheels) transformers would pick it instead.
        processor_kwargs = {"backend": "pil"} if self.source.model_type == PAPER_MODEL_TYPE else {}
        try:
            # The engine's seed: reproducible runs, while a retried ROI still draws a new answer.
            self.engine = vllm.LLM(model=self.source.location, dtype=compute_dtype(dtype, "none"), seed=seed,
                                   tensor_parallel_size=tensor_parallel, limit_mm_per_prompt={"image": 1},
                                   mm_processor_kwargs=processor_kwargs,
                                   structured_outputs_config={"backend": "xgrammar"})
        except Exception as err:  # vLLM raises many kinds; its log above names the cause
            message = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            raise CoTexNetError(f"{self.source.name}: vLLM could not start its engine ({message}); if vLLM itself "
                                f"is broken, {INSTALL}") from err
        structured = StructuredOutputsParams(grammar=str(answer_schema_grammar())) if constrain else None
        self.sampling = vllm.SamplingParams(temperature=temperature, max_tokens=max_new_tokens,
                                            structured_outputs=structured)

    def prompt(self, keyword: str) -> str:
        return self.source.prompt.text(self.processor, keyword)

    def prompt_ids(self, keyword: str) -> list[int]:
        text = self.prompt(keyword)
        bos = self.processor.tokenizer.bos_token
        # A chat template that writes the BOS itself: the tokenizer must not add a second one.
        return self.processor.tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]

    def requests(self, images: list[np.ndarray], keywords: list[str]) -> list[dict]:
        """vLLM's inputs for RGB ROI images: the prompt's token ids and the image of the model's family."""
        from PIL import Image

        return [{"prompt_token_ids": self.prompt_ids(keyword),
                 "multi_modal_data": {"image": Image.fromarray(self.source.prompt.image(image))}}
                for image, keyword in zip(images, keywords, strict=True)]

    def generate(self, images: list[np.ndarray], keywords: list[str]) -> list[str]:
        """One answer per (ROI image, keyword); the engine batches them as it goes."""
        outputs = self.engine.generate(self.requests(images, keywords), self.sampling, use_tqdm=False)
        return [output.outputs[0].text for output in outputs]
