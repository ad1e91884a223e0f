"""A tiny LLaVA-1.5 folder in the ORIGINAL layout (liuhaotian/llava-v1.5-13b), written from the
original's key names and config fields, and the original's computation on it, by hand.

Nothing here uses the converter or the describer: the folder, the prompt, the pixels and the
logits are what the original LLaVA code would see and compute, so a converted folder compared
with them cannot pass by repeating the converter's own mistakes.
"""

import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")
# METHOD.md, "The paper's protocol, exactly", for the keyword "polyp area".
QUESTION = ("The image shows the polyp areas. Please provide a single JSON format message containing a general "
            "description of the area information (only one result is needed). Use the following format: "
            "{'number': xxx, 'location': xxx, 'shape': xxx, 'size': xxx, 'color': xxx}. Note: Use words in the "
            "'location' item to describe the approximate location of the region in the image. Only one description "
            "should be provided.")
# conv_llava_v1: system, " ", "USER: " + "<image>\n" + question, " ", "ASSISTANT:"
PROMPT = SYSTEM + " USER: <image>\n" + QUESTION + " ASSISTANT:"

HIDDEN, VISION_HIDDEN, IMAGE, PATCH = 32, 32, 32, 8  # equal widths: the projector's two linears can be swapped
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def sentencepiece_model() -> bytes:
    """A real sentencepiece BPE model trained here, with Llama's settings (byte fallback, no
    normalisation, dummy prefix, digits split; <unk> 0, <s> 1, </s> 2)."""
    import sentencepiece as spm

    corpus = [SYSTEM, QUESTION, '{"number": 1, "location": "top left", "shape": "round", "size": "small", '
              '"color": "pink"}', "center left right bottom oval irregular large medium red white yellow"] * 4
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, vocab_size=420, model_type="bpe", byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True, split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, hard_vocab_limit=False, minloglevel=2,
        num_threads=1)
    return model.getvalue()


def write_clip_folder(folder: Path, seed: int = 1) -> Path:
    """As openai/clip-vit-large-patch14-336 ships: a whole CLIPModel (text tower and projections
    too) in one pytorch_model.bin that still carries the `position_ids` buffers of both towers
    (older transformers saved them; transformers 5 rebuilds them and no longer loads them), a
    config.json of the old layout (full nested configs plus `*_config_dict`) and the
    CLIPFeatureExtractor-era preprocessor_config.json (integer size and crop size)."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    vision = dict(hidden_size=VISION_HIDDEN, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                  image_size=IMAGE, patch_size=PATCH)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    model = CLIPModel(config).eval()
    with torch.no_grad():  # larger than the init's, so that every layer moves the features
        for parameter in model.vision_model.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))
    folder.mkdir(parents=True)
    state = model.state_dict()
    state["text_model.embeddings.position_ids"] = torch.arange(config.text_config.max_position_embeddings)[None]
    state["vision_model.embeddings.position_ids"] = torch.arange((IMAGE // PATCH) ** 2 + 1)[None]
    torch.save(state, folder / "pytorch_model.bin")
    saved = config.to_dict()
    saved.update(architectures=["CLIPModel"], text_config_dict=text, vision_config_dict=vision, torch_dtype="float32")
    (folder / "config.json").write_text(json.dumps(saved))
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": IMAGE, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
        "resample": 3, "size": IMAGE}))
    return folder


def clip_state(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "pytorch_model.bin", weights_only=True)


def write_original_llava(folder: Path, clip: Path, seed: int = 0, **config_changes) -> dict[str, torch.Tensor]:
    """The original layout (liuhaotian/llava-v1.5-13b): three pytorch_model-0000k-of-00003.bin
    shards and their index, fp16 weights under the original's key names (projector
    `model.mm_projector.*`, no vision tower) beside fp32 rotary buffers, every field of its
    config.json, a sentencepiece tokenizer. Returns the weights written."""
    import sentencepiece as spm

    folder.mkdir(parents=True)
    sp_model = sentencepiece_model()
    (folder / "tokenizer.model").write_bytes(sp_model)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "clean_up_tokenization_spaces": False, "legacy": False, "model_max_length": 2048, "pad_token": None,
        "padding_side": "right", "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer"}))
    (folder / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                               "unk_token": "<unk>"}))
    vocab = spm.SentencePieceProcessor(model_proto=sp_model).get_piece_size()
    intermediate, layers = 64, 2
    config = {
        "_name_or_path": "./checkpoints/llava-v1.5-13b", "architectures": ["LlavaLlamaForCausalLM"],
        "bos_token_id": 1, "eos_token_id": 2, "freeze_mm_mlp_adapter": False, "hidden_act": "silu",
        "hidden_size": HIDDEN, "image_aspect_ratio": "pad", "image_grid_pinpoints": None, "initializer_range": 0.02,
        "intermediate_size": intermediate, "max_position_embeddings": 4096, "mm_hidden_size": VISION_HIDDEN,
        "mm_projector_type": "mlp2x_gelu", "mm_use_im_patch_token": False, "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2, "mm_vision_tower": str(clip),
        "model_type": "llava", "num_attention_heads": 2, "num_hidden_layers": layers, "num_key_value_heads": 2,
        "pad_token_id": 0, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None,
        "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.31.0",
        "tune_mm_mlp_adapter": False, "use_cache": True, "use_mm_proj": True, "vocab_size": vocab,
    }
    config.update(config_changes)
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not ...}))

    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.3):
        return scale * torch.randn(*shape, generator=generator)

    weights = {"model.embed_tokens.weight": rand(vocab, HIDDEN, scale=1.0)}
    for i in range(layers):
        layer = f"model.layers.{i}."
        weights.update({layer + f"self_attn.{p}_proj.weight": rand(HIDDEN, HIDDEN) for p in "qkvo"})
        weights.update({layer + "mlp.gate_proj.weight": rand(intermediate, HIDDEN),
                        layer + "mlp.up_proj.weight": rand(intermediate, HIDDEN),
                        layer + "mlp.down_proj.weight": rand(HIDDEN, intermediate),
                        layer + "input_layernorm.weight": 1 + rand(HIDDEN, scale=0.1),
                        layer + "post_attention_layernorm.weight": 1 + rand(HIDDEN, scale=0.1),
                        layer + "self_attn.rotary_emb.inv_freq": 1 / 10000 ** (torch.arange(0, 16, 2) / 16)})
    weights.update({"model.norm.weight": 1 + rand(HIDDEN, scale=0.1), "lm_head.weight": rand(vocab, HIDDEN),
                    "model.mm_projector.0.weight": rand(HIDDEN, VISION_HIDDEN), "model.mm_projector.0.bias": rand(HIDDEN),
                    "model.mm_projector.2.weight": rand(HIDDEN, HIDDEN), "model.mm_projector.2.bias": rand(HIDDEN)})
    # stored as the original: fp16 weights, fp32 rotary buffers
    weights = {k: v if "inv_freq" in k else v.half() for k, v in weights.items()}
    keys = list(weights)
    third = -(-len(keys) // 3)
    shards = {f"pytorch_model-0000{i + 1}-of-00003.bin": keys[i * third:(i + 1) * third] for i in range(3)}
    for name, part in shards.items():
        torch.save({k: weights[k] for k in part}, folder / name)
    total = sum(t.numel() * t.element_size() for t in weights.values())
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": {k: name for name, part in shards.items() for k in part}}))
    return weights


def reference_pixels(roi: np.ndarray, mean=CLIP_MEAN, std=CLIP_STD, size: int = IMAGE) -> torch.Tensor:
    """expand2square with the mean colour, then CLIPImageProcessor (bicubic resize, /255, normalise),
    in PIL and numpy: (1, 3, size, size)."""
    image = Image.fromarray(roi)
    side = max(image.size)
    square = Image.new("RGB", (side, side), tuple(int(m * 255) for m in mean))
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    array = np.asarray(square.resize((size, size), Image.BICUBIC), np.float32) / 255
    array = (array - np.array(mean, np.float32)) / np.array(std, np.float32)
    return torch.from_numpy(array.transpose(2, 0, 1))[None]


def reference_ids(folder: Path, prompt: str = PROMPT) -> tuple[list[int], list[int]]:
    """tokenizer_image_token: the text on each side of <image> tokenised as separate strings with
    sentencepiece (the first with <s>), the image between them."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    before, after = prompt.split("<image>")
    return [sp.bos_id(), *sp.encode(before)], sp.encode(after)


@torch.no_grad()
def reference_logits(folder: Path, clip: Path, weights: dict, roi: np.ndarray) -> torch.Tensor:
    """The original's forward pass: CLIP hidden states of `mm_vision_select_layer` without CLS,
    Linear-GELU-Linear, spliced into the Llama input embeddings where <image> stood. (1, T, V)."""
    from transformers import CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    config = json.loads((folder / "config.json").read_text())
    weights = {k: v.float() for k, v in weights.items()}
    tower = CLIPVisionModel.from_pretrained(clip).eval()
    with torch.no_grad():  # the original runs the tower in the language model's precision (fp16)
        for parameter in tower.parameters():
            parameter.copy_(parameter.half().float())
    hidden = tower(reference_pixels(roi), output_hidden_states=True).hidden_states[config["mm_vision_select_layer"]]
    hidden = hidden[:, 1:]  # "patch": without the CLS token
    first = torch.nn.functional.linear(hidden, weights["model.mm_projector.0.weight"], weights["model.mm_projector.0.bias"])
    features = torch.nn.functional.linear(torch.nn.functional.gelu(first), weights["model.mm_projector.2.weight"],
                                          weights["model.mm_projector.2.bias"])
    llama = LlamaForCausalLM(LlamaConfig(**{k: config[k] for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
        "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "hidden_act", "tie_word_embeddings")})).eval()
    llama.load_state_dict({k: v for k, v in weights.items() if "mm_projector" not in k and "inv_freq" not in k},
                          strict=True)
    before, after = reference_ids(folder)
    embed = llama.get_input_embeddings()
    embeds = torch.cat([embed(torch.tensor([before])), features, embed(torch.tensor([after]))], dim=1)
    return llama(inputs_embeds=embeds).logits
