"""The describer's language model in 8 or 4 bits (bitsandbytes through transformers), for one GPU.

`--quantize 8bit`: LLM.int8 weights (int8 per output row, outliers in fp16 at run time);
`--quantize 4bit`: NF4 weights with double quantisation (the block scales quantised again) and
bf16 compute. Only the language model's linear layers are quantised: the vision tower, the
projector (every part of the model beside its language model) and the LM head stay in 16 bits,
as is usual for vision-language models; `kept_unquantised` names them from the model itself.
bitsandbytes runs on CUDA GPUs and on CPUs.
"""

from __future__ import annotations

import torch

from common.errors import CoTexNetError

MODES = ("none", "8bit", "4bit")
INSTALL = "pip install 'bitsandbytes>=0.45,<0.51'"
BLOCK_4BIT, BLOCK_ABSMAX = 64, 256  # NF4 block size; absmax values per second-level block (double quantisation)


def require_bitsandbytes(mode: str) -> None:
    if mode == "none":
        return
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise CoTexNetError(f"--quantize {mode}: needs bitsandbytes, which is not installed: {INSTALL}") from None


def _path_of(model: torch.nn.Module, module: torch.nn.Module) -> str:
    return next(name for name, candidate in model.named_modules() if candidate is module)


def kept_unquantised(model: torch.nn.Module) -> list[str]:
    """Module paths that stay in 16 bits: the siblings of the language model (vision tower,
    projector, ...) and the output head. Paths, not bare names: transformers matches them as
    prefixes of module paths, so "vision_tower" alone would keep nothing."""
    decoder_path = _path_of(model, model.get_decoder())
    parent_path, _, decoder_name = decoder_path.rpartition(".")
    parent = model.get_submodule(parent_path)
    siblings = [f"{parent_path}.{name}" if parent_path else name
                for name, _ in parent.named_children() if name != decoder_name]
    return [*siblings, _path_of(model, model.get_output_embeddings())]


def meta_model(location):
    """The model at `location` (folder or hub id) without memory (meta device): its module names
    and parameter shapes, from its config alone."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(location))


def quantization_config(mode: str, model, compute_dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for `mode` (None for "none"); `model` (a meta model)
    gives the modules kept in 16 bits."""
    if mode == "none":
        return None
    require_bitsandbytes(mode)
    from transformers import BitsAndBytesConfig

    kept = kept_unquantised(model)
    narrow = [name for name, module in quantised_linears(model) if module.in_features < BLOCK_4BIT]
    if mode == "4bit" and narrow:
        raise CoTexNetError(f"--quantize 4bit: {narrow[0]} has {model.get_submodule(narrow[0]).in_features} inputs; "
                            f"bitsandbytes' 4-bit layers need at least {BLOCK_4BIT} (use --quantize 8bit or none)")
    if mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=kept)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=kept)


def quantised_linears(model) -> list[tuple[str, torch.nn.Linear]]:
    """The linear layers `mode` quantises: those of the language model, outside the kept modules."""
    kept = tuple(kept_unquantised(model))
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and not name.startswith(kept)]


def weight_bytes(model, mode: str, state: bool = True) -> int:
    """Bytes of the weights of the unquantised `model` (a meta model will do) once loaded in `mode`: 16-bit
    everywhere for "none"; 8bit: 1 byte per quantised weight; 4bit: half a byte. `state`: add
    the quantisation state bitsandbytes keeps beside the weights (8bit: one fp32 scale per
    output row; 4bit: one 8-bit absmax per block of 64 weights and one fp32 per 256 absmax)."""
    quantised = {id(module.weight): module for _, module in quantised_linears(model)} if mode != "none" else {}
    total = 0
    for parameter in model.parameters():
        module = quantised.get(id(parameter))
        count = parameter.numel()
        if module is None:
            total += 2 * count
        elif mode == "8bit":
            total += count + (4 * module.out_features if state else 0)
        else:
            blocks = -(-count // BLOCK_4BIT)
            total += -(-count // 2) + ((blocks + 4 * -(-blocks // BLOCK_ABSMAX)) if state else 0)
    return total
