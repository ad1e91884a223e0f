"""The tokenizer of a run's CLIPSeg base, for training (the prompts) and the concept readout."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig, AutoTokenizer

from common.errors import CoTexNetError


def load_tokenizer(name: str):
    """The tokenizer of the CLIPSeg folder (or hub id), checked against the model's text vocabulary:
    transformers builds an empty tokenizer (special tokens only) for a folder without tokenizer files."""
    key, local = "MODEL.clipseg_hf_api", Path(name)
    # A path-like value that is no folder would reach the hub as a malformed repo id.
    if not local.is_dir() and (local.is_absolute() or name.startswith(".") or local.exists() or name.count("/") > 1):
        raise CoTexNetError(f"{key}: no tokenizer at {name}: no such folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        vocab = getattr(getattr(AutoConfig.from_pretrained(name), "text_config", None), "vocab_size", None)
    except (OSError, ValueError) as err:
        raise CoTexNetError(f"{key}: no tokenizer at {name} ({str(err).splitlines()[0]})") from err
    if vocab is not None and len(tokenizer) != vocab:  # None: not a CLIPSeg config, the model load says so
        raise CoTexNetError(f"{key}: {name}: its tokenizer has {len(tokenizer)} tokens but the model's text "
                            f"vocabulary {vocab}; tokenizer files missing or of another model "
                            "(needs vocab.json + merges.txt, or tokenizer.json)")
    return tokenizer
