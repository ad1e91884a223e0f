"""The transformers backend: any image-text-to-text model answers about ROIs, batched and constrained.

The model loads with `AutoModelForImageTextToText` and `AutoProcessor` from a folder or a
Hugging Face id (model_folder.inspect_model checks it first). LLaVA-1.5 in the llava-hf layout
is the paper's model (original folders are converted once with convert_llava.py); the prompt
and the image each family gets are in prompts.py.

Placement: on GPU the weights are spread over the process's GPUs by accelerate
(`device_map="auto"`), bf16 where supported, else fp16; on CPU (tiny test models) float32.
`quantize` "8bit" / "4bit": the language model in 8 or 4 bits (quantization.py).

Constrained decoding (default): xgrammar masks the logits so that the answer is one JSON object
with the five keys, `number` a bounded integer and the other four from the vocabularies: every
answer parses on the first try. Unconstrained (`constrain=False`): the paper's free sampling,
each answer validated and re-asked (Describer.ask).
"""

from __future__ import annotations

import numpy as np
import torch

from common.errors import CoTexNetError
from llava_inference.describer import Describer, answer_grammar
from llava_inference.model_folder import ModelSource, inspect_model
from llava_inference.quantization import meta_model, quantization_config, require_bitsandbytes


def compute_dtype(name: str, quantize: str) -> torch.dtype:
    """The dtype of the weights kept in 16 bits (and of the 4-bit compute)."""
    if name != "auto":
        return getattr(torch, name)
    if quantize == "8bit":
        return torch.float16  # LLM.int8 multiplies in fp16 and casts other inputs to it
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if quantize == "4bit" else torch.float32


class TransformersDescriber(Describer):
    def __init__(self, source: ModelSource | str, dtype: str = "auto", quantize: str = "none", constrain: bool = True,
                 max_new_tokens: int = 512, temperature: float = 0.2, seed: int = 0, gpus: list[int] | None = None):
        """`source`: a ModelSource or a folder / hub id; `gpus`: the GPUs to spread the model over
        (default: all visible); ignored without CUDA."""
        from transformers import AutoModelForImageTextToText

        self.source = source if isinstance(source, ModelSource) else inspect_model(str(source))
        require_bitsandbytes(quantize)
        torch.manual_seed(seed)
        self.processor = self.source.processor
        tokenizer = self.processor.tokenizer
        # Batched generation appends new tokens on the right: prompts must end at the same column.
        tokenizer.padding_side = "left"
        placement = {}
        if torch.cuda.is_available():
            gpus = range(torch.cuda.device_count()) if gpus is None else gpus
            # accelerate fills the listed GPUs in order, up to their free memory; a data-parallel
            # process lists only its own GPUs.
            placement = {"device_map": "auto", "max_memory": {g: torch.cuda.mem_get_info(g)[0] for g in gpus}}
        self.dtype = compute_dtype(dtype, quantize)
        quantization = (quantization_config(quantize, meta_model(self.source.location), self.dtype)
                        if quantize != "none" else None)
        self.model = AutoModelForImageTextToText.from_pretrained(
            self.source.location, dtype=self.dtype, quantization_config=quantization, **placement).eval()
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        # The tokens that end an answer: the generation config's (chat models end their turn with
        # their own token), else the tokenizer's end of sequence.
        eos = self.model.generation_config.eos_token_id
        eos = tokenizer.eos_token_id if eos is None else eos
        stop = [eos] if isinstance(eos, int) else list(eos)
        self.generate_kwargs = dict(
            max_new_tokens=max_new_tokens, num_beams=1, do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None, top_p=None, top_k=None,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=stop)
        self.grammar = (answer_grammar(tokenizer, self.model.get_output_embeddings().out_features, stop)
                        if constrain else None)

    def prompt(self, keyword: str) -> str:
        return self.source.prompt.text(self.processor, keyword)

    def inputs(self, images: list[np.ndarray], keywords: list[str]):
        """The model's inputs for RGB ROI images: each as its family wants it, then the folder's processor."""
        prompts = [self.prompt(k) for k in keywords]
        bos = self.processor.tokenizer.bos_token
        # A chat template that writes the BOS itself: the tokenizer must not add a second one.
        written = bool(bos) and prompts[0].startswith(bos)
        inputs = self.processor(images=[self.source.prompt.image(image) for image in images], text=prompts,
                                padding=True, add_special_tokens=not written, return_tensors="pt").to(self.model.device)
        for key, value in inputs.items():
            if value.is_floating_point():  # pixels (and any other image input) in the weights' precision
                inputs[key] = value.to(self.dtype)
        return inputs

    @torch.inference_mode()
    def generate(self, images: list[np.ndarray], keywords: list[str]) -> list[str]:
        """One answer per (ROI image, keyword), all in one batched generate() call."""
        inputs = self.inputs(images, keywords)
        processors = []
        if self.grammar is not None:
            import xgrammar as xgr

            processors.append(xgr.contrib.hf.LogitsProcessor(self.grammar))  # one per call: it keeps state
        try:
            output = self.model.generate(**inputs, logits_processor=processors, **self.generate_kwargs)
        except torch.OutOfMemoryError:
            raise CoTexNetError(f"out of GPU memory with {len(images)} ROIs per batch: try a smaller --batch-size, "
                                "--quantize 4bit, or more GPUs (CUDA_VISIBLE_DEVICES; LLaVA-1.5-13B in 16 bits "
                                "needs > 28 GB in all)") from None
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        return self.processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
