"""Convert an original LLaVA-1.5 folder (liuhaotian/llava-v1.5-13b) to the llava-hf layout.

    python llava_inference/convert_llava.py --src llava_inference/llava-v1.5-13b \\
        --vision-tower path/to/clip-vit-large-patch14-336 --out llava_inference/llava-v1.5-13b-hf

The original folder holds the Llama weights and the projector (`model.mm_projector.*`) but not
the vision tower: its config names `openai/clip-vit-large-patch14-336`, which must be a local
folder here (nothing is downloaded). The output loads with `LlavaForConditionalGeneration` and
`AutoProcessor` and is what `get_text.py --model-path` expects. One source shard is read at a
time, so memory stays near the largest shard (13B: ~10 GB), not the whole model.

What changes: the keys (Llama under `model.language_model`, projector `linear_1/linear_2`, CLIP
vision weights under `model.vision_tower`), an `<image>` and a `<pad>` token are added to the
tokenizer, and the embedding/LM-head rows grow to a multiple of 64 (new rows = mean row).
"""

import sys, pathlib; sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])  # noqa: E401,E702,I001

import argparse
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from common.errors import CoTexNetError, run_cli
from common.io import atomic_path, write_json

# Original key prefix -> llava-hf prefix; the first match wins.
RENAMES = (
    ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
    ("model.vision_tower.vision_tower.vision_model.", "model.vision_tower."),
    ("model.", "model.language_model."),
    ("lm_head.", "lm_head."),
)
# Top-level modules of transformers' CLIP vision transformer (CLIPModel files prefix them "vision_model.").
VISION_PARTS = ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")
RESIZED = ("model.language_model.embed_tokens.weight", "lm_head.weight")
PAD_MULTIPLE = 64
LLAMA_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "num_key_value_heads",
              "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling", "hidden_act",
              "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings", "attention_bias")


def rename(key: str) -> str | None:
    """The llava-hf name of an original key; None for buffers that are not weights."""
    if key.endswith("rotary_emb.inv_freq"):
        return None
    for old, new in RENAMES:
        if key.startswith(old):
            return new + key[len(old):]
    raise CoTexNetError(f"unexpected weight {key!r} in the original checkpoint")


def vision_key(key: str) -> str | None:
    """The llava-hf name of a CLIP vision weight; None for the text half of a CLIPModel file."""
    key = key.removeprefix("vision_model.")
    return "model.vision_tower." + key if key.startswith(VISION_PARTS) else None


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise CoTexNetError(f"{folder}: no weights (*.safetensors or pytorch_model*.bin)")
    return files


def _load(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        with safe_open(path, "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    # weights_only: a checkpoint is data, never code to run
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def _grow(weight: torch.Tensor, rows: int) -> torch.Tensor:
    extra = weight.float().mean(dim=0, keepdim=True).expand(rows - weight.shape[0], -1).to(weight.dtype)
    return torch.cat([weight, extra])


def _tokenizer(src: Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError, ImportError) as err:
        raise CoTexNetError(f"{src}: cannot read the tokenizer ({' '.join(str(err).split())[:200]}); "
                            "tokenizer.model needs `pip install sentencepiece protobuf`") from None
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    return tokenizer


def convert(src: Path, vision_tower: Path, out: Path) -> Path:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaProcessor

    from llava_inference.llava_model import CHAT_TEMPLATE

    config_file = src / "config.json"
    if not config_file.is_file():
        raise CoTexNetError(f"{src}: no config.json")
    original = json.loads(config_file.read_text())
    if "mm_vision_tower" not in original:
        raise CoTexNetError(f"{config_file}: no mm_vision_tower: not an original LLaVA folder")
    if original.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise CoTexNetError(f"{config_file}: projector {original['mm_projector_type']!r}; LLaVA-1.5 has mlp2x_gelu")
    if not (vision_tower / "config.json").is_file():
        raise CoTexNetError(f"{vision_tower}: no config.json; --vision-tower is a local copy of {original['mm_vision_tower']}")

    tokenizer = _tokenizer(src)
    vocab = -(-len(tokenizer) // PAD_MULTIPLE) * PAD_MULTIPLE
    vision_config = CLIPVisionConfig.from_pretrained(vision_tower)
    text_config = LlamaConfig(vocab_size=vocab, **{k: original[k] for k in LLAMA_KEYS if k in original})
    text_config.pad_token_id = tokenizer.pad_token_id
    strategy = "default" if original.get("mm_vision_select_feature", "patch") == "patch" else "full"
    config = LlavaConfig(vision_config=vision_config, text_config=text_config,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         image_seq_length=(vision_config.image_size // vision_config.patch_size) ** 2,
                         vision_feature_layer=original.get("mm_vision_select_layer", -2),
                         vision_feature_select_strategy=strategy, projector_hidden_act="gelu")

    sources = _weight_files(src)
    vision_files = _weight_files(vision_tower)
    total = len(sources) + 1
    weight_map, size, dtype = {}, 0, None
    out.mkdir(parents=True, exist_ok=True)
    for index, path in enumerate(tqdm(sources, desc="converting", unit="shard"), start=1):
        tensors = {}
        for key, tensor in _load(path).items():
            new = rename(key)
            if new is not None:
                tensors[new] = _grow(tensor, vocab) if new in RESIZED else tensor.contiguous()
        if "model.language_model.embed_tokens.weight" in tensors:
            dtype = tensors["model.language_model.embed_tokens.weight"].dtype
        name = f"model-{index:05d}-of-{total:05d}.safetensors"
        _save(out / name, tensors, weight_map, name)
        size += sum(t.numel() * t.element_size() for t in tensors.values())
    if dtype is None:
        raise CoTexNetError(f"{src}: no model.embed_tokens.weight in {', '.join(p.name for p in sources)}")
    # The vision tower is stored in the language model's precision, as llava-hf does.
    vision = {vision_key(k): v.to(dtype).contiguous()
              for path in vision_files for k, v in _load(path).items() if vision_key(k)}
    if not vision:
        raise CoTexNetError(f"{vision_tower}: no CLIP vision weights (vision_model.*)")
    name = f"model-{total:05d}-of-{total:05d}.safetensors"
    _save(out / name, vision, weight_map, name)
    size += sum(t.numel() * t.element_size() for t in vision.values())
    write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": size}, "weight_map": weight_map})

    config.dtype = dtype
    config.save_pretrained(out)
    image_processor = CLIPImageProcessor.from_pretrained(vision_tower)
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=vision_config.patch_size,
                   vision_feature_select_strategy=strategy, num_additional_image_tokens=1,
                   chat_template=CHAT_TEMPLATE).save_pretrained(out)
    return out


def _save(path: Path, tensors: dict, weight_map: dict, name: str) -> None:
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(tensors, name))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, required=True, help="original LLaVA-1.5 folder (liuhaotian/llava-v1.5-13b)")
    parser.add_argument("--vision-tower", type=Path, required=True, help="local openai/clip-vit-large-patch14-336 folder")
    parser.add_argument("--out", type=Path, required=True, help="llava-hf folder to write")
    args = parser.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        raise CoTexNetError(f"{args.out}: exists and is not empty")
    print(f"llava-hf folder written to {convert(args.src, args.vision_tower, args.out)}")


if __name__ == "__main__":
    run_cli(main)
