"""convert_llava.py against the original computation on a tiny folder in the ORIGINAL layout.

The folder and the reference (pixels, token ids, logits) come from tests/llava_original.py,
which never calls the converter: a wrong mapping changes the logits and fails here.
"""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from common.errors import CoTexNetError
from llava_inference import convert_llava
from llava_inference.transformers_backend import TransformersDescriber
from tests.llava_original import (
    IMAGE,
    PATCH,
    PROMPT,
    clip_state,
    reference_ids,
    reference_logits,
    reference_pixels,
    write_clip_folder,
    write_original_llava,
)


def _roi() -> np.ndarray:
    """A wide ROI, black outside a textured region near the left edge (as a Kvasir polyp at x 60-360 of 1920)."""
    roi = np.zeros((24, 60, 3), np.uint8)
    roi[6:20, 1:12] = np.random.default_rng(0).integers(60, 255, (14, 11, 3))
    return roi


ROI = _roi()


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """(original folder, CLIP folder, the original's weights, the original's logits on ROI)."""
    root = tmp_path_factory.mktemp("original")
    clip = write_clip_folder(root / "clip-vit-tiny")
    src = root / "llava-v1.5-tiny"
    weights = write_original_llava(src, clip)
    return src, clip, weights, reference_logits(src, clip, weights, ROI)


@pytest.fixture(scope="module")
def converted(original, tmp_path_factory):
    src, clip, _, _ = original
    out = tmp_path_factory.mktemp("converted") / "llava-hf"
    convert_llava.main(["--src", str(src), "--vision-tower", str(clip), "--out", str(out)])
    return out


@torch.no_grad()
def check_against_original(folder, original) -> None:
    """The converted folder, through get_text's describer, gives the original's prompt, token ids, pixels, logits."""
    src, _, _, logits = original
    describer = TransformersDescriber(folder, constrain=False)
    assert describer.prompt("polyp area") == PROMPT
    inputs = describer.inputs([ROI], ["polyp area"])
    before, after = reference_ids(src)
    image_tokens = [describer.model.config.image_token_index] * (IMAGE // PATCH) ** 2
    assert inputs["input_ids"][0].tolist() == before + image_tokens + after
    torch.testing.assert_close(inputs["pixel_values"], reference_pixels(ROI), atol=1e-6, rtol=0)
    converted = describer.model(**inputs).logits[..., : logits.shape[-1]]
    torch.testing.assert_close(converted, logits, atol=1e-4, rtol=0,
                               msg=lambda m: f"logits differ from the original's: {m}")


def test_converted_folder_computes_what_the_original_computes(original, converted):
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration

    check_against_original(converted, original)
    # the folder on its own pads too (do_pad), for users who do not go through the describer
    processor = AutoImageProcessor.from_pretrained(converted, backend="pil")
    torch.testing.assert_close(processor(ROI, return_tensors="pt")["pixel_values"], reference_pixels(ROI),
                               atol=1e-6, rtol=0)
    _, info = LlavaForConditionalGeneration.from_pretrained(converted, output_loading_info=True)
    assert not any(info.values()), info
    # the added tokens as llava-hf has them: <image> = V, <pad> = V + 1, pad id also at the top level
    vocab = original[2]["model.embed_tokens.weight"].shape[0]
    tokenizer = AutoTokenizer.from_pretrained(converted)
    assert tokenizer.convert_tokens_to_ids(["<image>", "<pad>"]) == [vocab, vocab + 1] and tokenizer.pad_token == "<pad>"
    config = LlavaConfig.from_pretrained(converted)
    assert config.image_token_index == vocab and config.pad_token_id == config.text_config.pad_token_id == vocab + 1
    assert config.text_config.vocab_size % convert_llava.PAD_MULTIPLE == 0
    assert json.loads((converted / "tokenizer_config.json").read_text())["legacy"] is True
    stored = {k for path in converted.glob("*.safetensors") for k in load_file(path)}
    assert not any("inv_freq" in k for k in stored)


def test_describer_keeps_the_original_ids_when_a_folder_says_legacy_false(original, converted, tmp_path):
    # A tokenizer_config with legacy=false: the text after <image> would lose its sentencepiece space.
    folder = shutil.copytree(converted, tmp_path / "legacy-false")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "legacy": False}))
    check_against_original(folder, original)


def _swap_projector(folder):
    for path in folder.glob("*.safetensors"):
        tensors = load_file(path)
        if "model.multi_modal_projector.linear_1.weight" in tensors:
            for part in ("weight", "bias"):
                one, two = (f"model.multi_modal_projector.linear_{i}.{part}" for i in (1, 2))
                tensors[one], tensors[two] = tensors[two], tensors[one]
            save_file(tensors, str(path), metadata={"format": "pt"})


def _last_vision_layer(folder):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vision_feature_layer": -1}))


def _drop_key(folder, key="model.language_model.layers.1.mlp.down_proj.weight"):
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    path = folder / index["weight_map"].pop(key)
    tensors = load_file(path)
    del tensors[key]
    save_file(tensors, str(path), metadata={"format": "pt"})
    index_file.write_text(json.dumps(index))


@pytest.mark.parametrize("mutate", [_swap_projector, _last_vision_layer, _drop_key],
                         ids=["swapped projector layers", "vision layer -1", "dropped key"])
def test_the_check_catches_a_wrong_conversion(original, converted, tmp_path, mutate):
    folder = shutil.copytree(converted, tmp_path / "mutated")
    mutate(folder)
    with pytest.raises(AssertionError, match="logits differ from the original's"):
        check_against_original(folder, original)


@pytest.mark.parametrize("rule, target, problem", [
    (r"model\.norm\.weight", None, "missing: model.language_model.norm.weight"),
    (r"model\.norm\.weight", "model.language_model.final_norm.weight", "missing: model.language_model.norm.weight; unexpected: model.language_model.final_norm"),
    (r"model\.mm_projector\.2\.(weight|bias)", r"model.multi_modal_projector.linear_1.\1", "missing: model.multi_modal_projector.linear_2.bias"),
])
def test_converter_refuses_and_removes_an_output_that_does_not_load(original, tmp_path, monkeypatch, rule, target,
                                                                     problem):
    src, clip, _, _ = original
    rules = tuple((pattern, target if pattern == rule else new) for pattern, new in convert_llava.RULES)
    monkeypatch.setattr(convert_llava, "RULES", rules)
    out = tmp_path / "llava-hf"
    with pytest.raises(CoTexNetError, match="conversion check failed, output removed; " + problem):
        convert_llava.convert(src, clip, out)
    assert list(tmp_path.iterdir()) == []


def test_converter_refuses_misshaped_weights(original, tmp_path, monkeypatch):
    src, clip, _, _ = original
    monkeypatch.setattr(convert_llava, "_grow", lambda weight, rows: weight)  # vocabulary rows not grown
    with pytest.raises(CoTexNetError, match="of another shape: lm_head.weight, model.language_model.embed_tokens"):
        convert_llava.convert(src, clip, tmp_path / "llava-hf")
    assert list(tmp_path.iterdir()) == []


def test_unmapped_keys_stop_the_conversion_naming_them(original, tmp_path):
    src, clip, _, _ = original
    extra = shutil.copytree(src, tmp_path / "extra")
    torch.save({"model.image_newline": torch.zeros(4), "model.vision_resampler.x": torch.zeros(1),
                "model.mm_projector.weight": torch.zeros(2, 2)}, extra / "pytorch_model-00003-of-00003.bin")
    with pytest.raises(CoTexNetError, match=r"3 weights with no conversion rule: model\.image_newline, "
                                            r"model\.vision_resampler\.x, model\.mm_projector\.weight"):
        convert_llava.convert(extra, clip, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_projector_type_absent_is_the_originals_linear(tmp_path):
    clip = write_clip_folder(tmp_path / "clip")
    src = tmp_path / "src"
    write_original_llava(src, clip, mm_projector_type=...)  # ...: the field is left out
    with pytest.raises(CoTexNetError, match="projector 'linear' .mm_projector_type absent: the original's default"):
        convert_llava.convert(src, clip, tmp_path / "out")


def test_a_tower_in_the_checkpoint_is_kept(original, tmp_path):
    from transformers import LlavaForConditionalGeneration

    src, clip, _, _ = original
    own = shutil.copytree(src, tmp_path / "own-tower")
    # as the original saves a tuned tower: its CLIPVisionTower holds a CLIPVisionModel
    tuned = {"model.vision_tower.vision_tower." + k: (v + 1).half() for k, v in clip_state(clip).items()
             if k.startswith("vision_model.") and not k.endswith("position_ids")}
    buffer = {"model.vision_tower.vision_tower.vision_model.embeddings.position_ids": torch.arange(17)[None]}
    torch.save({**tuned, **buffer}, own / "pytorch_model-00004-of-00004.bin")
    out = convert_llava.convert(own, clip, tmp_path / "out")
    state = LlavaForConditionalGeneration.from_pretrained(out).state_dict()
    for key, value in tuned.items():
        torch.testing.assert_close(state[key.replace("vision_tower.vision_tower.vision_model.", "vision_tower.")], value)


def test_a_stopped_conversion_leaves_nothing_a_rerun_refuses(original, tmp_path):
    src, clip, _, _ = original
    leftover = tmp_path / ".llava-hf.converting"  # what kill -9 during a conversion leaves
    leftover.mkdir()
    (leftover / "model-00001-of-00003.safetensors").write_bytes(b"half")
    (tmp_path / "llava-hf").mkdir()  # an empty --out is fine
    convert_llava.main(["--src", str(src), "--vision-tower", str(clip), "--out", str(tmp_path / "llava-hf")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llava-hf"]
    with pytest.raises(CoTexNetError, match="exists and is not an empty folder"):
        convert_llava.convert(src, clip, tmp_path / "llava-hf")


def test_converted_folder_answers_through_get_texts_describer(converted):
    describer = TransformersDescriber(converted, max_new_tokens=200)
    (attrs, tries), = describer.ask([ROI], ["polyp area"], [1], 1)
    assert attrs is not None and tries == 1


def test_converter_refuses_what_it_cannot_convert(original, tmp_path):
    src, clip, _, _ = original
    with pytest.raises(CoTexNetError, match="no config.json"):
        convert_llava.convert(tmp_path / "nothing", clip, tmp_path / "a")
    with pytest.raises(CoTexNetError, match="--vision-tower"):
        convert_llava.convert(src, tmp_path / "no-clip", tmp_path / "b")


def test_real_layout_converts_and_the_report_names_the_buffers_left_out(original, tmp_path, capsys):
    """The fixtures are laid out as the real folders: the CLIP folder one pytorch_model.bin with the
    text tower and both position_ids buffers; LLaVA three fp16 .bin shards with their index."""
    src, clip, _, _ = original
    assert {"text_model.embeddings.position_ids", "vision_model.embeddings.position_ids",
            "text_model.embeddings.token_embedding.weight"} <= set(clip_state(clip))
    assert sorted(p.name for p in src.glob("pytorch_model*")) == [
        *(f"pytorch_model-0000{i}-of-00003.bin" for i in (1, 2, 3)), "pytorch_model.bin.index.json"]
    convert_llava.main(["--src", str(src), "--vision-tower", str(clip), "--out", str(tmp_path / "hf")])
    assert ("left out 1 buffers that transformers rebuilds itself (not weights): vision_model.embeddings.position_ids"
            in capsys.readouterr().out)


def test_a_buffer_the_model_does_not_rebuild_is_still_refused(original, tmp_path):
    src, clip, _, _ = original
    odd = shutil.copytree(clip, tmp_path / "clip-odd")
    state = clip_state(odd)
    state["vision_model.embeddings.patch_ids"] = torch.arange(16)[None]
    torch.save(state, odd / "pytorch_model.bin")
    with pytest.raises(CoTexNetError, match="conversion check failed, output removed; unexpected: "
                                            "model.vision_tower.embeddings.patch_ids$"):
        convert_llava.convert(src, odd, tmp_path / "out")
    assert not (tmp_path / "out").exists()
