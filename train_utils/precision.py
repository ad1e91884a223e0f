"""Which precision a run computes in, and the `accelerate` Accelerator that applies it.

Runs use `accelerate` in every case: single process without its launcher (CPU or one GPU),
DDP with `accelerate launch --num_processes N train.py ...`.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator

from common.errors import CoTexNetError
from train_utils.config import Config


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX. Without them oneDNN emulates bf16 and the frozen ViT runs several times
    slower than in float32 (README, Speed)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def make_accelerator(cfg: Config) -> Accelerator:
    """bf16 autocast where the hardware has it (recent GPUs, CPUs with AVX-512 BF16 or AMX),
    fp16 with a grad scaler on older GPUs, float32 elsewhere."""
    t = cfg.TRAIN
    if t.device == "cuda" and not torch.cuda.is_available():
        raise CoTexNetError("TRAIN.device: cuda requested but no GPU is visible; set TRAIN.device=cpu or auto")
    on_gpu = torch.cuda.is_available() and t.device != "cpu"
    if not t.amp or not (on_gpu or cpu_has_native_bf16()):
        precision = "no"
    else:
        precision = "fp16" if on_gpu and not torch.cuda.is_bf16_supported() else "bf16"
    if t.cpu_threads:
        torch.set_num_threads(t.cpu_threads)
    return Accelerator(cpu=not on_gpu, mixed_precision=precision)


def apply_precision(model, accelerator: Accelerator, compile: bool = False) -> None:
    """Under bf16 or fp16 autocast, the frozen CLIP's weights in that dtype, cast once here
    instead of by autocast at every call; the trained parts stay float32. `compile`
    (TRAIN.compile): torch.compile of the frozen encoder and the decoder."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)
    if dtype is not None and model.freeze_encoder:
        model.cast_frozen_encoder(dtype)
    if compile:
        model.compile_parts()
