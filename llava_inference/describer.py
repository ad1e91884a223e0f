"""The describer interface: a vision-language model that answers the paper's question about ROIs.

A backend (transformers_backend.py; vllm_describer.py, the vLLM engine) is one subclass of `Describer` that
implements `generate(images, keywords) -> one answer string per ROI`, building each prompt
with `llava_inference.prompts` (the model family's format) and, when constrained, decoding
under `answer_grammar` compiled from the model's own tokenizer. `ask` (validation,
re-asking, counting the tries) is the same for every backend.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod

import numpy as np

from llava_inference.attributes import AnswerError, Attributes, json_schema, parse_answer


def answer_schema_grammar():
    """The xgrammar grammar of one answer (`attributes.json_schema`), before any tokenizer; its text
    is what a serving engine takes. No free whitespace: a weak model could otherwise pad with spaces
    up to the token limit."""
    import xgrammar as xgr

    return xgr.Grammar.from_json_schema(json.dumps(json_schema()), any_whitespace=False)


def answer_grammar(tokenizer, vocab_size: int, stop_token_ids: list[int]):
    """The compiled xgrammar grammar of one answer (`answer_schema_grammar`) for this tokenizer.
    `vocab_size`: the model's logits width, which may exceed the tokenizer's (llava-hf: 32064
    rows); `stop_token_ids`: the tokens generation stops on, the only ones allowed after the JSON."""
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
    return xgr.GrammarCompiler(info).compile_grammar(answer_schema_grammar())


class Describer(ABC):
    """Answers about ROI images. Subclasses load a model and implement `generate`."""

    @abstractmethod
    def generate(self, images: list[np.ndarray], keywords: list[str]) -> list[str]:
        """One raw answer per (RGB ROI image, keyword), in order; batched as the backend can."""

    def ask(self, images, keywords, max_numbers, max_retries: int) -> list[tuple[Attributes | None, int]]:
        """(validated attributes or None, answers drawn) per ROI; invalid answers are re-asked in batches."""
        results: list[tuple[Attributes | None, int]] = [(None, 0)] * len(images)
        pending = list(range(len(images)))
        for attempt in range(1, max_retries + 1):
            if not pending:
                break
            answers = self.generate([images[i] for i in pending], [keywords[i] for i in pending])
            failed = []
            for i, answer in zip(pending, answers, strict=True):
                try:
                    results[i] = (parse_answer(answer, max_numbers[i]), attempt)
                except AnswerError:
                    results[i] = (None, attempt)
                    failed.append(i)
            pending = failed
        return results
