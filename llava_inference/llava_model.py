"""LLaVA-1.5 through transformers: batched, optionally grammar-constrained, answers about ROIs.

The model folder is in the llava-hf layout (`LlavaForConditionalGeneration` + `AutoProcessor`,
as llava-hf/llava-1.5-13b-hf); the original liuhaotian folders are converted once with
convert_llava.py. On GPU the weights are fp16/bf16, spread over every visible GPU by accelerate
(`device_map="auto"`); on CPU (tiny test models) float32.

The input is the paper's: each ROI padded to a square with the processor's mean colour before the
processor resizes it (LLaVA-1.5's `image_aspect_ratio: pad`), the paper's question verbatim in
the LLaVA v1 conversation, tokenised as the original (`legacy=True`).

Constrained decoding (default): xgrammar masks the logits so that the answer is one JSON object
with the five keys, `number` a bounded integer and the other four from the vocabularies: every
answer parses on the first try. Unconstrained (`constrain=False`): the paper's free sampling,
each answer validated and re-asked, at most `max_retries` answers per ROI.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from common.errors import CoTexNetError
from llava_inference.attributes import AnswerError, Attributes, json_schema, parse_answer

# The LLaVA v1 conversation the paper queried with: system line, "USER: <image>\n...", "ASSISTANT:".
SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")
CHAT_TEMPLATE = (
    "{{ '" + SYSTEM.replace("'", "\\'") + " ' }}"
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for part in message['content'] if part['type'] == 'image' %}{{ '<image>\\n' }}{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] }}{% endfor %}"
    "{{ ' ' if message['role'] == 'user' else '</s>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def question(keyword: str) -> str:
    """The paper's question, word for word (the keyword + "s", as the paper's code writes it)."""
    return ("The image shows the " + keyword + "s. "
            "Please provide a single JSON format message containing a general description of the area information "
            "(only one result is needed). Use the following format: {'number': xxx, 'location': xxx, 'shape': xxx, "
            "'size': xxx, 'color': xxx}. Note: Use words in the 'location' item to describe the approximate location "
            "of the region in the image. Only one description should be provided.")


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


def check_model_folder(path: Path) -> None:
    """Fail in one line for a folder that is not a llava-hf LLaVA, naming what is missing."""
    if not path.is_dir():
        raise CoTexNetError(f"{path}: no such model folder (--model-path)")
    config_file = path / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    except (ValueError, OSError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CoTexNetError(f"{config_file}: not a readable JSON config ({err})") from err
    if not isinstance(config, dict):
        raise CoTexNetError(f"{config_file}: not a JSON object")
    if "mm_vision_tower" in config or "LlavaLlamaForCausalLM" in config.get("architectures", []):
        raise CoTexNetError(f"{path}: original LLaVA format; convert it once: python llava_inference/convert_llava.py "
                            f"--src {path} --vision-tower <clip-vit-large-patch14-336 folder> --out {path}-hf")
    checks = {
        "config.json with text_config and vision_config": {"text_config", "vision_config"} <= set(config),
        "weights (*.safetensors or pytorch_model*.bin)": any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin")),
        "tokenizer (tokenizer.json or tokenizer.model)": (path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file(),
        "image processor (preprocessor_config.json)": (path / "preprocessor_config.json").is_file()
        or (path / "processor_config.json").is_file(),
    }
    missing = [what for what, ok in checks.items() if not ok]
    if missing:
        raise CoTexNetError(f"{path}: not a LLaVA-1.5 folder in the llava-hf layout; missing {'; '.join(missing)}")


def torch_dtype(name: str) -> torch.dtype:
    """The weights' dtype for --dtype: float32 on CPU unless named; on GPU auto is bfloat16 where supported."""
    if not torch.cuda.is_available():
        return torch.float32 if name == "auto" else getattr(torch, name)
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, name)


def load_processor(path: Path):
    """The folder's processor, computing as the original: PIL resampling as its CLIPImageProcessor, and
    legacy tokenisation whatever the folder's tokenizer_config says (the text after <image> keeps its
    sentencepiece space)."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path, backend="pil", legacy=True)


def v1_prompt(processor, keyword: str) -> str:
    """The paper's question about one image in the LLaVA v1 conversation."""
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question(keyword)}]}]
    return processor.apply_chat_template(conversation, chat_template=CHAT_TEMPLATE, add_generation_prompt=True)


def answer_grammar():
    """The xgrammar grammar of one answer (attributes.json_schema), without free whitespace: a weak
    model could otherwise pad with spaces up to the token limit."""
    import xgrammar as xgr

    return xgr.Grammar.from_json_schema(json.dumps(json_schema()), any_whitespace=False)


def describe_with_retries(generate, images, keywords, max_numbers, max_retries: int) -> list[tuple[Attributes | None, int]]:
    """(validated attributes or None, answers drawn) per ROI; `generate(images, keywords)` answers a
    batch, and invalid answers are asked again in batches, at most `max_retries` answers per ROI."""
    results: list[tuple[Attributes | None, int]] = [(None, 0)] * len(images)
    pending = list(range(len(images)))
    for attempt in range(1, max_retries + 1):
        if not pending:
            break
        answers = generate([images[i] for i in pending], [keywords[i] for i in pending])
        failed = []
        for i, answer in zip(pending, answers, strict=True):
            try:
                results[i] = (parse_answer(answer, max_numbers[i]), attempt)
            except AnswerError:
                results[i] = (None, attempt)
                failed.append(i)
        pending = failed
    return results


class LlavaDescriber:
    def __init__(self, model_path, dtype: str = "auto", constrain: bool = True, max_new_tokens: int = 512,
                 temperature: float = 0.2, seed: int = 0, gpus: list[int] | None = None):
        """`gpus`: the GPUs to spread the model over (default: all visible); ignored without CUDA."""
        from transformers import LlavaForConditionalGeneration

        path = Path(model_path)
        check_model_folder(path)
        torch.manual_seed(seed)
        self.processor = load_processor(path)
        # Batched generation appends new tokens on the right: prompts must end at the same column.
        self.processor.tokenizer.padding_side = "left"
        placement = {}
        if torch.cuda.is_available():
            gpus = range(torch.cuda.device_count()) if gpus is None else gpus
            # accelerate fills the listed GPUs in order, up to their free memory; a data-parallel
            # process lists only its own GPUs.
            placement = {"device_map": "auto", "max_memory": {g: torch.cuda.mem_get_info(g)[0] for g in gpus}}
        self.model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch_dtype(dtype), **placement).eval()
        tokenizer = self.processor.tokenizer
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.generate_kwargs = dict(
            max_new_tokens=max_new_tokens, num_beams=1, do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None, top_p=None, top_k=None,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        self.grammar = self._compile_grammar() if constrain else None

    def _compile_grammar(self):
        import xgrammar as xgr

        tokenizer = self.processor.tokenizer
        # The model's vocabulary may be padded beyond the tokenizer's (llava-hf: 32064 rows).
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.model.config.text_config.vocab_size,
                                                  stop_token_ids=[tokenizer.eos_token_id])
        return xgr.GrammarCompiler(info).compile_grammar(answer_grammar())

    def prompt(self, keyword: str) -> str:
        return v1_prompt(self.processor, keyword)

    def inputs(self, images: list[np.ndarray], keywords: list[str]):
        """The model's inputs for RGB ROI images: each padded to a square, then the folder's processor."""
        mean = self.processor.image_processor.image_mean
        inputs = self.processor(images=[pad_to_square(image, mean) for image in images],
                                text=[self.prompt(k) for k in keywords], padding=True,
                                return_tensors="pt").to(self.model.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
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
                                "--dtype float16, or more GPUs (CUDA_VISIBLE_DEVICES; 13B needs > 28 GB in all)") from None
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        return self.processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)

    def describe(self, images, keywords, max_numbers, max_retries: int) -> list[tuple[Attributes | None, int]]:
        return describe_with_retries(self.generate, images, keywords, max_numbers, max_retries)
