"""Models built offline from configs: nothing here downloads anything.

- `clip_tokenizer()`: OpenAI's CLIP BPE tokenizer, rebuilt from the vocabulary file that the
  `open-clip-torch` wheel ships (same ids as `openai/clip-vit-base-patch16`).
- `tiny_clipseg_config()`: a CLIPSeg with a few small layers, for tests and the demo.
- `real_size_clipseg_config()`: the architecture of `CIDAS/clipseg-rd64-refined`
  (ViT-B/16), for benchmarks with random weights.
- `save_clipseg_folder()`: a `from_pretrained` folder (model + tokenizer), so that every
  code path loads it exactly as it loads the real `CIDAS/clipseg-rd64-refined`.

Command line: `python -m model.tiny --out DIR [--size tiny|real]`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import CLIPSegConfig, CLIPSegForImageSegmentation, CLIPTokenizer

from common.errors import run_cli

CLIP_BOS, CLIP_EOS, CLIP_VOCAB = 49406, 49407, 49408
CLIP_MAX_LENGTH = 77


def clip_tokenizer(save_dir: str | Path | None = None) -> CLIPTokenizer:
    """The CLIP BPE tokenizer, built from open_clip's packaged vocabulary (no network)."""
    from open_clip.tokenizer import SimpleTokenizer

    simple = SimpleTokenizer()
    merges = [pair for pair, _ in sorted(simple.bpe_ranks.items(), key=lambda item: item[1])]
    # open_clip spells the special tokens <start_of_text>/<end_of_text>; OpenAI's files, <|...|>.
    renamed = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {renamed.get(token, token): index for token, index in simple.encoder.items()}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH)
    if save_dir is not None:
        tokenizer.save_pretrained(save_dir)
    return tokenizer


def _text_config(**sizes) -> dict:
    # The real CLIP vocabulary even for tiny models: tests then run the real tokenizer.
    return dict(vocab_size=CLIP_VOCAB, max_position_embeddings=CLIP_MAX_LENGTH,
                bos_token_id=CLIP_BOS, eos_token_id=CLIP_EOS, pad_token_id=CLIP_EOS, **sizes)


def tiny_clipseg_config() -> CLIPSegConfig:
    """A CLIPSeg small enough for CPU tests: 3 ViT layers (hidden 48), 2 text layers (hidden 32)."""
    return CLIPSegConfig(
        text_config=_text_config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=2,
                           image_size=224, patch_size=16),
        projection_dim=32, reduce_dim=16, extract_layers=[0, 1, 2], decoder_num_attention_heads=2,
        decoder_intermediate_size=64, use_complex_transposed_convolution=True)


def real_size_clipseg_config() -> CLIPSegConfig:
    """The architecture of CIDAS/clipseg-rd64-refined: ViT-B/16, reduce dim 64, complex head."""
    return CLIPSegConfig(text_config=_text_config(), vision_config={"patch_size": 16},
                         use_complex_transposed_convolution=True)


def build_clipseg(config: CLIPSegConfig, seed: int = 0) -> CLIPSegForImageSegmentation:
    """A CLIPSeg with random weights from `config` (deterministic for a seed)."""
    torch.manual_seed(seed)
    model = CLIPSegForImageSegmentation(config).eval()
    # transformers' CLIPSeg init draws decoder weights with a std near 1 (fine for CLIP, which is
    # always loaded pretrained): initial logits are then huge and a decoder trained from
    # scratch does not learn. PyTorch's default layer init instead.
    for module in model.decoder.modules():
        if module is not model.decoder and hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return model


def save_clipseg_folder(out_dir: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write a `from_pretrained` folder with a random CLIPSeg of `size` and the CLIP tokenizer."""
    configs = {"tiny": tiny_clipseg_config, "real": real_size_clipseg_config}
    out_dir = Path(out_dir)
    build_clipseg(configs[size](), seed).save_pretrained(out_dir)
    clip_tokenizer(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write (from_pretrained layout)")
    parser.add_argument("--size", choices=["tiny", "real"], default="tiny", help="tiny (tests, demo) or real size (benchmarks)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args(argv)
    print(f"random {args.size} CLIPSeg and CLIP tokenizer written to {save_clipseg_folder(args.out, args.size, args.seed)}")


def chat_tokenizer(specials: list[str], chat_words: tuple[str, ...] = (), **roles: str):
    """A byte-level BPE tokenizer trained here (no network) on the stage-2 text: the paper's
    question, the attribute vocabularies, JSON and `chat_words`. Any text encodes, and xgrammar
    sees a real BPE vocabulary. `specials` get the first ids in order; `roles` name them
    (bos_token="<s>", ...)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from llava_inference.attributes import VOCABULARIES
    from llava_inference.prompts import question

    bpe = Tokenizer(models.BPE(unk_token=roles.get("unk_token")))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    words = " ".join(w for vocabulary in VOCABULARIES.values() for w in vocabulary)
    corpus = [question("polyp area"), question("tumor area"), words, '{"number": 1, "location": "center"}',
              *chat_words] * 4
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if "bos_token" in roles:
        bos = roles["bos_token"]
        bpe.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, bpe.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, padding_side="left", **roles)


def _llama(tokenizer, width: int, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, **extra)


def _clip_vision(width: int, image_size: int, patch: int):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=2,
                            image_size=image_size, patch_size=patch, projection_dim=width)


def _save(model, processor, out_dir, stop_ids) -> Path:
    model.generation_config.update(eos_token_id=stop_ids, pad_token_id=processor.tokenizer.pad_token_id)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


LLAMA_SPECIALS = ["<unk>", "<s>", "</s>", "<image>", "<pad>"]  # <image> before <pad>, as llava-hf
LLAMA_ROLES = dict(unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def save_tiny_llava(out_dir: str | Path, seed: int = 0, width: int = 32) -> Path:
    """Write a random tiny LLaVA-1.5 in the llava-hf layout (model, tokenizer, processor).

    A CLIP vision tower (2 layers, 32x32 images, 8x8 patches: 16 image tokens) and a Llama
    (2 layers), both `width` wide (a multiple of 64 lets bitsandbytes quantise every linear layer
    of the language model), with `chat_tokenizer`. `get_text.py` loads the folder exactly as it
    loads `llava-hf/llava-1.5-13b-hf`.
    """
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from llava_inference.prompts import LLAVA_V1_TEMPLATE

    tokenizer = chat_tokenizer(LLAMA_SPECIALS, **LLAMA_ROLES)
    image_size, patch = 32, 8
    config = LlavaConfig(
        vision_config=_clip_vision(width, image_size, patch), text_config=_llama(tokenizer, width),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), pad_token_id=tokenizer.pad_token_id,
        image_seq_length=(image_size // patch) ** 2, vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=LLAVA_V1_TEMPLATE)  # +1: the CLS token, dropped by "default"
    return _save(model, processor, out_dir, tokenizer.eos_token_id)


# LLaVA-NeXT (llava-v1.6-mistral-7b-hf): one user turn in [INST] ... [/INST], the image first.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{{ ' [/INST]' }}"
    "{% else %}{% for part in message['content'] if part['type'] == 'text' %}{{ ' ' + part['text'] }}{% endfor %}"
    "{{ eos_token }}{% endif %}{% endfor %}"
)


def save_tiny_llava_next(out_dir: str | Path, seed: int = 0, width: int = 64) -> Path:
    """A random tiny LLaVA-NeXT (anyres: the ROI tiled at one of four 32/64 px grids plus a
    32 px overview, 16 tokens per tile, newline embeddings between rows) with a Mistral-style
    [INST] chat template."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    tokenizer = chat_tokenizer(LLAMA_SPECIALS, ("[INST]", "[/INST]"), **LLAMA_ROLES)
    image_size, patch = 32, 8
    grid = [[32, 32], [32, 64], [64, 32], [64, 64]]
    config = LlavaNextConfig(
        vision_config=_clip_vision(width, image_size, patch), text_config=_llama(tokenizer, width),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), image_grid_pinpoints=grid,
        vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=(image_size // patch) ** 2)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": image_size}, image_grid_pinpoints=grid,
                                                 crop_size={"height": image_size, "width": image_size})
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=MISTRAL_TEMPLATE)
    return _save(model, processor, out_dir, tokenizer.eos_token_id)


# Qwen2-VL-Instruct's conversation (ChatML): a default system turn, the image between vision markers.
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]
QWEN_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def save_tiny_qwen2_vl(out_dir: str | Path, seed: int = 0, width: int = 64) -> Path:
    """A random tiny Qwen2-VL (native resolution: the ROI resized to at most 56x56 px, 14 px
    patches merged 2x2, so 1..4 tokens per ROI; multimodal rotary positions) with the ChatML
    template and <|im_end|> ending the turn."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor, Qwen2VLVideoProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = chat_tokenizer(QWEN_SPECIALS, ("system", "user", "assistant", "You are a helpful assistant."),
                               eos_token="<|im_end|>", pad_token="<|endoftext|>")
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIALS}
    heads = 2
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=2048,
                         rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]},  # sums to head_dim / 2
                         bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=2, embed_dim=width, hidden_size=width, num_heads=heads, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_chans=3),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    pixels = dict(min_pixels=28 * 28, max_pixels=56 * 56)
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessorPil(**pixels),
                                 video_processor=Qwen2VLVideoProcessor(**pixels), tokenizer=tokenizer,
                                 chat_template=QWEN_TEMPLATE)
    return _save(model, processor, out_dir, [ids["<|im_end|>"], ids["<|endoftext|>"]])


def real_size_llava_config():
    """The architecture of llava-hf/llava-1.5-13b-hf (CLIP ViT-L/14 at 336 px, Vicuna-13B, the
    two-layer projector), for memory figures computed on the meta device (no weights)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    text = LlamaConfig(vocab_size=32064, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                       num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=4096, pad_token_id=32001)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000, pad_token_id=32001,
                       image_seq_length=576, vision_feature_layer=-2, vision_feature_select_strategy="default")


TINY_VLMS = {"llava": save_tiny_llava, "llava_next": save_tiny_llava_next, "qwen2_vl": save_tiny_qwen2_vl}


if __name__ == "__main__":
    run_cli(main)
