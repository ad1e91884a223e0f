"""A tiny random LLaVA-1.5 that both stage-2 backends load: transformers and vLLM.

`model.tiny.save_tiny_llava` at width 64 (2 heads of 32: vLLM's attention takes head sizes 32,
64, 80, 96, 112, 128, ...; two heads, so that tensor parallel 2 splits them), with its weights
written in the key layout of the llava-hf folders on the hub (`vision_tower.vision_model.*`),
which vLLM's loader expects, where transformers 5's `save_pretrained` writes `vision_tower.*`.
transformers loads both layouts.

Command line: `python -m model.tiny_vllm --out DIR`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common.errors import run_cli
from model.tiny import save_tiny_llava

WIDTH = 64


def to_hub_key_layout(folder: str | Path) -> None:
    """Rename the vision tower's weights to the llava-hf hub layout (`vision_tower.vision_model.*`)."""
    from safetensors.torch import load_file, save_file

    weights_file = Path(folder) / "model.safetensors"
    weights = load_file(weights_file)
    renamed = {("vision_tower.vision_model." + key.removeprefix("vision_tower.")
                if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model.") else key): value
               for key, value in weights.items()}
    save_file(renamed, weights_file, metadata={"format": "pt"})


def save_tiny_vllm_llava(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the tiny LLaVA folder (tokenizer, processor, random weights) that vLLM and transformers load."""
    folder = save_tiny_llava(out_dir, seed, width=WIDTH)
    to_hub_key_layout(folder)
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write (from_pretrained layout)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args(argv)
    print(f"random tiny LLaVA (vLLM-compatible) written to {save_tiny_vllm_llava(args.out, args.seed)}")


if __name__ == "__main__":
    run_cli(main)
