"""convert_llava.py: a tiny fake original-format LLaVA (+ CLIP folder) becomes a loadable llava-hf folder."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from common.errors import CoTexNetError
from llava_inference import convert_llava
from llava_inference.llava_model import LlavaDescriber
from tests.text_fixtures import *  # noqa: F403 (session fixtures)


def _to_original(hf_key: str) -> str:
    for original, hf in convert_llava.RENAMES:
        if hf_key.startswith(hf):
            return original + hf_key[len(hf):]
    raise AssertionError(hf_key)


@pytest.fixture
def original_folder(tiny_llava, tmp_path):
    """The tiny LLaVA written the way liuhaotian/llava-v1.5 ships: .bin shards without the vision tower."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, CLIPImageProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava)
    state = model.state_dict()
    src, clip = tmp_path / "llava-v1.5-tiny", tmp_path / "clip-vit-tiny"
    src.mkdir()
    llm = {_to_original(k): v for k, v in state.items() if not k.startswith("model.vision_tower.")}
    llm["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # old checkpoints carry this buffer
    keys = sorted(llm)
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:]), start=1):
        torch.save({k: llm[k] for k in part}, src / f"pytorch_model-0000{i}-of-00002.bin")
    text = model.config.text_config
    (src / "config.json").write_text(json.dumps({
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", "mm_vision_tower": str(clip),
        "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
        "mm_hidden_size": model.config.vision_config.hidden_size, "vocab_size": text.vocab_size,
        **{k: getattr(text, k) for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                         "num_hidden_layers", "num_key_value_heads", "max_position_embeddings",
                                         "rms_norm_eps", "bos_token_id", "eos_token_id")}}))
    AutoTokenizer.from_pretrained(tiny_llava).save_pretrained(src)
    # as openai/clip-vit-large-patch14-336 ships: a whole CLIPModel, vision weights under "vision_model."
    model.config.vision_config.save_pretrained(clip)
    clip_weights = {"vision_model." + k[len("model.vision_tower."):]: v.contiguous() for k, v in state.items()
                    if k.startswith("model.vision_tower.")}
    save_file({**clip_weights, "logit_scale": torch.ones(()), "text_model.final_layer_norm.weight": torch.ones(4)},
              str(clip / "model.safetensors"))
    CLIPImageProcessor.from_pretrained(tiny_llava).save_pretrained(clip)
    return src, clip, state


def test_converted_folder_loads_with_the_same_weights(original_folder, tmp_path):
    from transformers import LlavaForConditionalGeneration

    src, clip, state = original_folder
    out = tmp_path / "llava-hf"
    convert_llava.main(["--src", str(src), "--vision-tower", str(clip), "--out", str(out)])
    converted = LlavaForConditionalGeneration.from_pretrained(out)
    new = converted.state_dict()
    assert set(new) == set(state)
    for key, value in state.items():
        if key in convert_llava.RESIZED:
            assert new[key].shape[0] % convert_llava.PAD_MULTIPLE == 0
            torch.testing.assert_close(new[key][: value.shape[0]], value)
        else:
            torch.testing.assert_close(new[key], value, msg=key)
    stored = {}
    for path in out.glob("*.safetensors"):
        stored.update(load_file(path))
    assert not any("inv_freq" in k for k in stored)
    # and get_text's loader answers with it
    describer = LlavaDescriber(out, max_new_tokens=120)
    (attrs, tries), = describer.describe([np.full((40, 50, 3), 200, np.uint8)], ["polyp area"], [1], 1)
    assert attrs is not None and tries == 1


def test_converter_refuses_what_it_cannot_convert(original_folder, tmp_path):
    src, clip, _ = original_folder
    with pytest.raises(CoTexNetError, match="no config.json"):
        convert_llava.convert(tmp_path / "nothing", clip, tmp_path / "a")
    with pytest.raises(CoTexNetError, match="--vision-tower"):
        convert_llava.convert(src, tmp_path / "no-clip", tmp_path / "b")
