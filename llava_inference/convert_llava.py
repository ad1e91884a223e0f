"""Convert an original LLaVA-1.5 folder (liuhaotian/llava-v1.5-13b) to the llava-hf layout.

    python llava_inference/convert_llava.py --src llava_inference/llava-v1.5-13b \\
        --vision-tower path/to/clip-vit-large-patch14-336 --out llava_inference/llava-v1.5-13b-hf

The original folder holds the Llama weights and the projector (`model.mm_projector.*`) but not
the vision tower: its config names `openai/clip-vit-large-patch14-336`, which must be a local
folder here (nothing is downloaded). The output loads with `LlavaForConditionalGeneration` and
`AutoProcessor` and is what `get_text.py --model-path` expects. One source shard is read at a
time, so memory stays near the largest shard (13B: ~10 GB), not the whole model.

What the output guarantees, against the original code on the same input:
- weights: every source key maps by an explicit rule (Llama under `model.language_model`,
  projector `mm_projector.0/2` -> `linear_1/linear_2`, a vision tower the checkpoint carries is
  kept, else the CLIP folder's); a key without a rule stops the conversion, naming it. Buffers
  that the model rebuilds itself and no longer loads (CLIP's `position_ids`, saved by older
  transformers in the real checkpoints) are left out by name, and the conversion says which.
  After writing, the output's names and shapes are checked against the model its config builds:
  any other missing or unexpected key is refused.
- features: vision layer `mm_vision_select_layer`, patch tokens without CLS for `patch`; the
  projector type must be `mlp2x_gelu` (absent means the original's default, `linear`, refused).
- pixels: `image_aspect_ratio: pad` -> `LlavaImageProcessor(do_pad=True)`: pad to a square with
  the mean colour, then resize (nothing cropped away).
- token ids: `legacy=True` tokenisation, `<image>` = V and `<pad>` = V+1 as llava-hf, a
  top-level `pad_token_id`; the embedding/LM-head rows grow to a multiple of 64 (new rows = mean
  row).
The output is written to a temporary folder beside `--out` and renamed when complete: a stopped
conversion leaves no `--out`, and a rerun starts over.
"""

import argparse
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from common.atomic import atomic_path, write_json
from common.errors import CoTexNetError, run_cli

_CLIP = r"((?:embeddings|pre_layrnorm|encoder|post_layernorm)\..+)"
# Every key of an original checkpoint, as a full match -> its llava-hf name (None: a buffer that
# transformers recomputes, not a weight).
RULES = (
    (r"model\.embed_tokens\.weight", "model.language_model.embed_tokens.weight"),
    (r"model\.layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)\.(weight|bias)",
     r"model.language_model.layers.\1.\2.\3"),
    (r"model\.layers\.(\d+)\.(input|post_attention)_layernorm\.weight", r"model.language_model.layers.\1.\2_layernorm.weight"),
    (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", None),
    (r"model\.norm\.weight", "model.language_model.norm.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
    (r"model\.mm_projector\.0\.(weight|bias)", r"model.multi_modal_projector.linear_1.\1"),
    (r"model\.mm_projector\.2\.(weight|bias)", r"model.multi_modal_projector.linear_2.\1"),
    (r"model\.vision_tower\.vision_tower\.vision_model\." + _CLIP, r"model.vision_tower.\1"),
)
# A CLIP folder (openai/clip-vit-large-patch14-336 ships a whole CLIPModel): its vision half; the
# text half and the projections are not part of LLaVA.
CLIP_RULES = (
    (r"vision_model\." + _CLIP, r"model.vision_tower.\1"),
    (r"text_model\..+|logit_scale|text_projection\.weight|visual_projection\.weight", None),
)
TOWER = "model.vision_tower."
RESIZED = ("model.language_model.embed_tokens.weight", "lm_head.weight")
PAD_MULTIPLE = 64
LLAMA_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "num_key_value_heads",
              "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling", "hidden_act",
              "bos_token_id", "eos_token_id", "tie_word_embeddings", "attention_bias")
SELECT_FEATURE = {"patch": "default", "cls_patch": "full"}


def rename(key: str, rules=RULES) -> str | None:
    """The llava-hf name of `key` (None: not a weight); KeyError when no rule matches."""
    for pattern, target in rules:
        if re.fullmatch(pattern, key):
            return None if target is None else re.sub(pattern, target, key)
    raise KeyError(key)


def _unmapped(keys, rules) -> list[str]:
    """The keys no rule matches (`rename` raises KeyError for them)."""
    return [key for key in keys if not any(re.fullmatch(pattern, key) for pattern, _ in rules)]


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise CoTexNetError(f"{folder}: no weights (*.safetensors or pytorch_model*.bin)")
    return files


def _load(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        with safe_open(path, "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    # weights_only: a checkpoint is data, never code to run; mmap: keys without reading the tensors
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def _keys(files: list[Path]) -> list[str]:
    keys = []
    for path in files:
        if path.suffix == ".safetensors":
            with safe_open(path, "pt") as f:
                keys += list(f.keys())
        else:
            keys += list(_load(path))
    return keys


def _convert(tensors: dict, rules, vocab: int, rebuilt: set[str], dropped: list[str]) -> dict[str, torch.Tensor]:
    """The llava-hf tensors of one source file; a buffer the model rebuilds itself (its name in
    `rebuilt`) is left out and its source name added to `dropped`."""
    out = {}
    for key, tensor in tensors.items():
        new = rename(key, rules)
        if new in rebuilt:
            dropped.append(key)
        elif new is not None:
            out[new] = _grow(tensor, vocab) if new in RESIZED else tensor.contiguous()
    return out


def _meta_model(config):
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        return LlavaForConditionalGeneration(config)


def rebuilt_buffers(model) -> set[str]:
    """Buffers the model computes when it is built and never loads (transformers 5: CLIP's
    `position_ids`, which older transformers saved with the weights)."""
    return {name for name, _ in model.named_buffers()} - set(model.state_dict())


def _grow(weight: torch.Tensor, rows: int) -> torch.Tensor:
    extra = weight.float().mean(dim=0, keepdim=True).expand(rows - weight.shape[0], -1).to(weight.dtype)
    return torch.cat([weight, extra])


def _tokenizer(src: Path):
    from transformers import AutoTokenizer

    try:
        # legacy=True: the text after <image> starts with the sentencepiece space, as when the
        # original tokenises the text on each side of the image token as separate strings.
        tokenizer = AutoTokenizer.from_pretrained(src, legacy=True)
    except (OSError, ValueError, ImportError) as err:
        raise CoTexNetError(f"{src}: cannot read the tokenizer ({' '.join(str(err).split())[:200]}); "
                            "tokenizer.model needs `pip install sentencepiece protobuf`") from None
    tokenizer.add_tokens(["<image>"], special_tokens=True)  # llava-hf: <image> = V, <pad> = V+1
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.init_kwargs["legacy"] = True  # transformers rebuilds the pre-tokenizer from this flag at load
    return tokenizer


def _original_config(src: Path) -> dict:
    config_file = src / "config.json"
    if not config_file.is_file():
        raise CoTexNetError(f"{src}: no config.json")
    try:
        original = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:
        raise CoTexNetError(f"{config_file}: not a readable JSON config ({err})") from err
    if not isinstance(original, dict) or "mm_vision_tower" not in original:
        raise CoTexNetError(f"{config_file}: no mm_vision_tower: not an original LLaVA folder")
    # The original builds a plain Linear when the field is absent.
    projector = original.get("mm_projector_type", "linear")
    if projector != "mlp2x_gelu":
        absent = "" if "mm_projector_type" in original else " (mm_projector_type absent: the original's default)"
        raise CoTexNetError(f"{config_file}: projector {projector!r}{absent}; llava-hf LLaVA has the two-layer "
                            "GELU projector of LLaVA-1.5 (mlp2x_gelu) only")
    if "mm_vision_select_layer" not in original:
        raise CoTexNetError(f"{config_file}: no mm_vision_select_layer (LLaVA-1.5: -2)")
    if original.get("mm_vision_select_feature", "patch") not in SELECT_FEATURE:
        raise CoTexNetError(f"{config_file}: mm_vision_select_feature {original['mm_vision_select_feature']!r}; "
                            f"known: {', '.join(SELECT_FEATURE)}")
    if original.get("image_aspect_ratio") == "anyres" or original.get("mm_use_im_start_end"):
        raise CoTexNetError(f"{config_file}: anyres images or image start/end tokens: not LLaVA-1.5")
    return original


def convert(src: Path, vision_tower: Path, out: Path) -> Path:
    """Write the llava-hf folder `out` (which must not exist or be empty) from `src` and the CLIP folder."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CoTexNetError(f"{out}: exists and is not an empty folder")
    original = _original_config(src)
    if not (vision_tower / "config.json").is_file():
        raise CoTexNetError(f"{vision_tower}: no config.json; --vision-tower is a local copy of {original['mm_vision_tower']}")
    sources = _weight_files(src)
    keys = _keys(sources)
    if unmapped := _unmapped(keys, RULES):
        raise CoTexNetError(f"{src}: {len(unmapped)} weights with no conversion rule: {', '.join(unmapped[:8])}"
                            f"{' ...' if len(unmapped) > 8 else ''}")
    own_tower = any((rename(k, RULES) or "").startswith(TOWER) for k in keys)
    tmp = out.parent / f".{out.name}.converting"
    shutil.rmtree(tmp, ignore_errors=True)  # what a stopped conversion left
    try:
        _write(src, original, sources, vision_tower, own_tower, tmp)
        verify(tmp)
        if out.exists():
            out.rmdir()  # empty: checked above
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write(src: Path, original: dict, sources: list[Path], vision_tower: Path, own_tower: bool, tmp: Path) -> None:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaImageProcessorPil, LlavaProcessor

    from llava_inference.prompts import LLAVA_V1_TEMPLATE

    tokenizer = _tokenizer(src)
    vocab = -(-len(tokenizer) // PAD_MULTIPLE) * PAD_MULTIPLE
    vision_config = CLIPVisionConfig.from_pretrained(vision_tower)
    text_config = LlamaConfig(vocab_size=vocab, pad_token_id=tokenizer.pad_token_id,
                              **{k: original[k] for k in LLAMA_KEYS if original.get(k) is not None})
    strategy = SELECT_FEATURE[original.get("mm_vision_select_feature", "patch")]
    config = LlavaConfig(vision_config=vision_config, text_config=text_config,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         pad_token_id=tokenizer.pad_token_id,
                         image_seq_length=(vision_config.image_size // vision_config.patch_size) ** 2,
                         vision_feature_layer=original["mm_vision_select_layer"],
                         vision_feature_select_strategy=strategy, projector_hidden_act="gelu")

    vision_files = [] if own_tower else _weight_files(vision_tower)
    if vision_files:
        if unmapped := _unmapped(_keys(vision_files), CLIP_RULES):
            raise CoTexNetError(f"{vision_tower}: not a CLIP folder; no rule for {', '.join(unmapped[:8])}")
    else:
        print(f"vision tower: the one in {src} (fine-tuned with LLaVA); {vision_tower} gives its config only")
    total = len(sources) + bool(vision_files)
    weight_map, size, dtype = {}, 0, None
    rebuilt, dropped = rebuilt_buffers(_meta_model(config)), []
    tmp.mkdir(parents=True)
    for index, path in enumerate(tqdm(sources, desc="converting", unit="shard"), start=1):
        tensors = _convert(_load(path), RULES, vocab, rebuilt, dropped)
        if RESIZED[0] in tensors:
            dtype = tensors[RESIZED[0]].dtype
        size += _save(tmp, f"model-{index:05d}-of-{total:05d}.safetensors", tensors, weight_map)
    if dtype is None:
        raise CoTexNetError(f"{src}: no model.embed_tokens.weight in {', '.join(p.name for p in sources)}")
    if vision_files:
        # The vision tower is stored in the language model's precision, as llava-hf does.
        vision = {k: v.to(dtype) for path in vision_files
                  for k, v in _convert(_load(path), CLIP_RULES, vocab, rebuilt, dropped).items()}
        size += _save(tmp, f"model-{total:05d}-of-{total:05d}.safetensors", vision, weight_map)
    write_json(tmp / "model.safetensors.index.json", {"metadata": {"total_size": size}, "weight_map": weight_map})
    if dropped:
        print(f"left out {len(dropped)} buffers that transformers rebuilds itself (not weights): {', '.join(dropped)}")

    config.dtype = dtype
    config.save_pretrained(tmp)
    # The original pads to a square with the mean colour for image_aspect_ratio "pad" (LLaVA-1.5),
    # else resizes and centre-crops; PIL resampling as the original's CLIPImageProcessor.
    image_processor = LlavaImageProcessorPil.from_pretrained(
        vision_tower, do_pad=original.get("image_aspect_ratio") == "pad")
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=vision_config.patch_size,
                   vision_feature_select_strategy=strategy, num_additional_image_tokens=1,
                   chat_template=LLAVA_V1_TEMPLATE).save_pretrained(tmp)


def _save(folder: Path, name: str, tensors: dict, weight_map: dict) -> int:
    with atomic_path(folder / name) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(tensors, name))
    return sum(t.numel() * t.element_size() for t in tensors.values())


def verify(folder: Path) -> None:
    """Refuse a folder whose stored weights differ in names or shapes from the model its config builds.
    The model is built without memory (meta device) and compared with the shards' headers, so a
    13B output is checked without loading it; `from_pretrained` would otherwise only warn and
    initialise what is missing at random."""
    from transformers import LlavaConfig

    expected = {k: tuple(v.shape) for k, v in _meta_model(LlavaConfig.from_pretrained(folder)).state_dict().items()}
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    stored = {}
    for name in sorted(set(index.values())):
        with safe_open(folder / name, "pt") as f:
            stored.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    problems = {
        "missing": sorted(set(expected) - set(stored)),
        "unexpected": sorted(set(stored) - set(expected)),
        "of another shape": sorted(k for k in set(expected) & set(stored) if expected[k] != stored[k]),
        "not in the index": sorted(set(stored) ^ set(index)),
    }
    found = [f"{what}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}" for what, keys in problems.items() if keys]
    if found:
        raise CoTexNetError(f"conversion check failed, output removed; {'; '.join(found)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, required=True, help="original LLaVA-1.5 folder (liuhaotian/llava-v1.5-13b)")
    parser.add_argument("--vision-tower", type=Path, required=True, help="local openai/clip-vit-large-patch14-336 folder")
    parser.add_argument("--out", type=Path, required=True, help="llava-hf folder to write")
    args = parser.parse_args(argv)
    print(f"llava-hf folder written to {convert(args.src, args.vision_tower, args.out)}")


if __name__ == "__main__":
    run_cli(main)
