"""Models built offline from configs: nothing here downloads anything.

- `clip_tokenizer()`: OpenAI's CLIP BPE tokenizer, rebuilt from the vocabulary file that the
  `open-clip-torch` wheel ships (same ids as `openai/clip-vit-base-patch16`).
- `tiny_clipseg_config()`: a CLIPSeg with a few small layers, for tests and the demo.
- `real_size_clipseg_config()`: the architecture of `CIDAS/clipseg-rd64-refined`
  (ViT-B/16, 150.7 M parameters), for benchmarks with random weights.
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
        projection_dim=32,
        reduce_dim=16,
        extract_layers=[0, 1, 2],
        decoder_num_attention_heads=2,
        decoder_intermediate_size=64,
        use_complex_transposed_convolution=True,
    )


def real_size_clipseg_config() -> CLIPSegConfig:
    """The architecture of CIDAS/clipseg-rd64-refined: ViT-B/16, reduce dim 64, complex head."""
    return CLIPSegConfig(
        text_config=_text_config(),
        vision_config={"patch_size": 16},
        use_complex_transposed_convolution=True,
    )


def build_clipseg(config: CLIPSegConfig, seed: int = 0) -> CLIPSegForImageSegmentation:
    """A CLIPSeg with random weights from `config` (deterministic for a seed)."""
    torch.manual_seed(seed)
    model = CLIPSegForImageSegmentation(config).eval()
    # transformers' CLIPSeg init draws decoder weights with std ~1 (fine for CLIP, which is
    # always loaded pretrained): initial logits then have std ~66 and a decoder trained from
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


def save_tiny_llava(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a random tiny LLaVA-1.5 in the llava-hf layout (model, tokenizer, processor).

    A CLIP vision tower (hidden 32, 2 layers, 32x32 images, 8x8 patches: 16 image tokens) and a
    Llama (hidden 32, 2 layers) with a byte-level BPE tokenizer trained here on a few sentences
    of the stage-2 vocabulary, so any text is encodable and xgrammar sees a real BPE vocabulary.
    `get_text.py` loads the folder exactly as it loads `llava-hf/llava-1.5-13b-hf`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    from llava_inference.attributes import VOCABULARIES
    from llava_inference.llava_model import CHAT_TEMPLATE, question

    specials = ["<unk>", "<s>", "</s>", "<image>", "<pad>"]  # <image> before <pad>, as llava-hf
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    words = " ".join(w for vocabulary in VOCABULARIES.values() for w in vocabulary)
    corpus = [question("polyp area"), question("tumor area"), words, '{"number": 1, "location": "center"}'] * 4
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bpe.token_to_id("<s>"))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", padding_side="left")
    ids = {token: bpe.token_to_id(token) for token in specials}

    image_size, patch = 32, 8
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                       image_size=image_size, patch_size=patch, projection_dim=32),
        text_config=LlamaConfig(vocab_size=bpe.get_vocab_size(), hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                max_position_embeddings=2048, bos_token_id=ids["<s>"], eos_token_id=ids["</s>"],
                                pad_token_id=ids["<pad>"]),
        image_token_index=ids["<image>"], pad_token_id=ids["<pad>"], image_seq_length=(image_size // patch) ** 2,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.update(bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"])
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=CHAT_TEMPLATE)  # +1: the CLS token, dropped by "default"
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":
    run_cli(main)
