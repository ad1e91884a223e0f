"""get_text.py --quantize 8bit / 4bit on a tiny LLaVA-1.5 whose widths bitsandbytes can quantise
(bitsandbytes runs on CPU): what is quantised, the bytes it saves, how far the logits move, and
that answers and reruns behave as without it."""

import json
import sys

import numpy as np
import pandas as pd
import pytest
import torch

import get_text
from common.errors import CoTexNetError
from llava_inference.quantization import INSTALL, kept_unquantised, meta_model, weight_bytes
from llava_inference.transformers_backend import TransformersDescriber
from tests.text_fixtures import *  # noqa: F403 (session fixtures)

ROI = np.random.default_rng(0).integers(40, 255, (60, 90, 3), dtype=np.uint8)


def _run(folder, model, out, *extra) -> pd.DataFrame:
    get_text.main(["--dataset-name", folder.name, "--dataset-path", str(folder), "--model-path", str(model),
                   "--out", str(out), *extra])
    return pd.read_csv(out)


@pytest.fixture(scope="module")
def loaded(tiny_llava_64):
    """The tiny LLaVA in bf16 (the reference) and in 8 and 4 bits, greedy, constrained."""
    return {mode: TransformersDescriber(tiny_llava_64, quantize=mode, dtype="bfloat16" if mode == "none" else "auto",
                                        temperature=0, max_new_tokens=120)
            for mode in ("none", "8bit", "4bit")}


@pytest.mark.parametrize("mode", ["8bit", "4bit"])
def test_language_model_is_quantised_and_vision_projector_head_stay_16_bit(loaded, mode):
    import bitsandbytes as bnb

    describer = loaded[mode]
    linears = {name: module for name, module in describer.model.named_modules() if isinstance(module, torch.nn.Linear)}
    language = [m for n, m in linears.items() if n.startswith("model.language_model.")]
    kept = [m for n, m in linears.items() if n.startswith(("model.vision_tower.", "model.multi_modal_projector.", "lm_head"))]
    assert len(language) == 14 and len(kept) + len(language) == len(linears)
    assert {type(m) for m in language} == {bnb.nn.Linear8bitLt if mode == "8bit" else bnb.nn.Linear4bit}
    assert {type(m) for m in kept} == {torch.nn.Linear} and {m.weight.dtype for m in kept} == {describer.dtype}
    if mode == "4bit":  # NF4, double quantisation, bf16 compute
        state = language[0].weight.quant_state
        assert state.quant_type == "nf4" and state.nested and language[0].compute_dtype == torch.bfloat16
    else:
        assert language[0].weight.dtype == torch.int8


def test_the_modules_kept_are_named_by_path():
    # bare names ("vision_tower") would match no module path: transformers matches path prefixes
    assert kept_unquantised(meta_model_of("llava")) == ["model.vision_tower", "model.multi_modal_projector", "lm_head"]


def meta_model_of(model_type):
    from transformers import AutoConfig, AutoModelForImageTextToText

    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(AutoConfig.for_model(model_type))


def test_weight_bytes_fall_exactly_as_computed(loaded, tiny_llava_64, capsys):
    meta = meta_model(tiny_llava_64)
    measured = {mode: d.model.get_memory_footprint(return_buffers=False) for mode, d in loaded.items()}
    assert measured == {mode: weight_bytes(meta, mode, state=False) for mode in measured}
    assert measured["4bit"] < measured["8bit"] < measured["none"]
    with capsys.disabled():
        print(f"\ntiny LLaVA weight bytes: bf16 {measured['none']}, 8bit {measured['8bit'] / measured['none']:.3f}x, "
              f"4bit {measured['4bit'] / measured['none']:.3f}x (embeddings, vision tower and head stay 16-bit)")


@pytest.mark.parametrize("mode, bound", [("8bit", 0.05), ("4bit", 0.25)])
def test_logits_of_one_prompt_stay_close_to_bf16(loaded, mode, bound, capsys):
    with torch.no_grad():
        reference, quantised = (loaded[m].model(**loaded[m].inputs([ROI], ["polyp area"])).logits.float()
                                for m in ("none", mode))
    difference = ((quantised - reference).abs().max() / reference.abs().max()).item()
    agree = (quantised.argmax(-1) == reference.argmax(-1)).float().mean().item()
    with capsys.disabled():
        print(f"\n{mode}: max logit difference {difference:.4f} of the largest bf16 logit; top-1 token agrees at "
              f"{agree:.1%} of {reference.shape[1]} positions")
    assert 0 < difference < bound and agree > 0.8


@pytest.mark.parametrize("mode", ["8bit", "4bit"])
def test_constrained_answers_stay_valid(loaded, mode):
    answers = loaded[mode].ask([ROI, ROI[:30], ROI[:, :20]], ["polyp area"] * 3, [2, 2, 2], 1)
    assert all(attrs is not None and tries == 1 for attrs, tries in answers)


def test_a_4bit_run_is_valid_and_its_rerun_keeps_the_mode(synthetic, tiny_llava_64, tmp_path, capsys):
    out = tmp_path / "q.csv"
    table = _run(synthetic, tiny_llava_64, out, "--quantize", "4bit", "--batch-size", "25", "--max-new-tokens", "120")
    described = table[table["number"] > 0]
    assert len(table) == 50 and (described["source"] == "llava").all() and (described["tries"] == 1).all()
    assert all(json.loads(text)["number"] == n for text, n in zip(described["text"], described["number"], strict=True))
    assert json.loads(out.with_name("q.settings.json").read_text())["quantize"] == "4bit"
    table.iloc[:20].to_csv(out, index=False)  # as if the run had stopped after 20 ROIs
    capsys.readouterr()
    resumed = _run(synthetic, tiny_llava_64, out, "--quantize", "4bit", "--batch-size", "25", "--max-new-tokens", "120")
    assert "50 rows (20 from earlier runs)" in capsys.readouterr().err
    assert list(resumed["roi_name"]) == list(table["roi_name"]) and (resumed["tries"] <= 1).all()
    with pytest.raises(CoTexNetError, match=r"earlier rows were made with .*--quantize 4bit.*this run asks for .*"
                                            r"--quantize 8bit"):
        _run(synthetic, tiny_llava_64, out, "--quantize", "8bit")
    with pytest.raises(CoTexNetError, match=r"earlier rows were made with .*--quantize 4bit.*asks for .*--quantize none"):
        _run(synthetic, tiny_llava_64, out)


def test_a_record_from_before_quantisation_reads_as_none(synthetic, tiny_llava_64, tmp_path):
    fast = ["--no-constrain", "--max-retries", "1", "--max-new-tokens", "4", "--batch-size", "50"]
    out = tmp_path / "old.csv"
    first = _run(synthetic, tiny_llava_64, out, *fast)
    record = out.with_name("old.settings.json")
    settings = json.loads(record.read_text())
    del settings["quantize"]  # what get_text wrote before --quantize existed
    record.write_text(json.dumps(settings))
    pd.testing.assert_frame_equal(_run(synthetic, tiny_llava_64, out, *fast), first)
    record.write_text(json.dumps(settings))
    with pytest.raises(CoTexNetError, match="made with .*--quantize none.*asks for .*--quantize 8bit"):
        _run(synthetic, tiny_llava_64, out, *fast, "--quantize", "8bit")


def test_without_bitsandbytes_one_line_names_the_install(synthetic, tiny_llava_64, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes now raises ImportError
    with pytest.raises(CoTexNetError) as caught:
        _run(synthetic, tiny_llava_64, tmp_path / "x.csv", "--quantize", "8bit")
    assert str(caught.value) == f"--quantize 8bit: needs bitsandbytes, which is not installed: {INSTALL}"
    assert list(tmp_path.iterdir()) == []


def test_4bit_refuses_layers_narrower_than_a_block_before_writing(synthetic, tiny_llava, tmp_path):
    with pytest.raises(CoTexNetError, match=r"^--quantize 4bit: model\.language_model\.layers\.0\.self_attn\.q_proj has "
                                            r"32 inputs; bitsandbytes' 4-bit layers need at least 64"):
        _run(synthetic, tiny_llava, tmp_path / "x.csv", "--quantize", "4bit")
    assert list(tmp_path.iterdir()) == []
