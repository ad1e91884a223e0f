"""Any image-text-to-text model as describer: tiny LLaVA-NeXT and Qwen2-VL (random weights, BPE
tokenizers trained here, their families' chat templates) through get_text.py, as LLaVA-1.5 is."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import get_text
from common.errors import CoTexNetError
from llava_inference.model_folder import inspect_model
from llava_inference.prompts import conversation
from llava_inference.quantization import kept_unquantised, meta_model
from llava_inference.transformers_backend import TransformersDescriber
from tests.llava_original import QUESTION
from tests.text_fixtures import *  # noqa: F403 (session fixtures)

REPO = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(3)
ROIS = [RNG.integers(30, 255, (h, w, 3), dtype=np.uint8) for h, w in ((180, 300), (260, 200), (64, 64), (400, 220))]
KEPT = {"llava_next": ["model.vision_tower", "model.multi_modal_projector", "lm_head"],
        "qwen2_vl": ["model.visual", "lm_head"]}


def _run(folder, model, out, *extra) -> pd.DataFrame:
    get_text.main(["--dataset-name", folder.name, "--dataset-path", str(folder), "--model-path", str(model),
                   "--out", str(out), *extra])
    return pd.read_csv(out)


def test_prompt_is_the_paper_question_in_the_models_own_chat_template(tiny_vlm):
    model_type, folder = tiny_vlm
    describer = TransformersDescriber(folder, constrain=False)
    processor = describer.processor
    prompt = describer.prompt("polyp area")
    assert QUESTION in prompt  # word for word
    assert prompt == processor.apply_chat_template(conversation("polyp area"), add_generation_prompt=True)
    assert describer.source.prompt.pad_mean is None  # the ROI as it is: the processor sizes it as the model wants
    ids = describer.inputs([ROIS[0]], ["polyp area"])["input_ids"][0].tolist()
    assert ids.count(processor.image_token_id) > 0
    bos = processor.tokenizer.bos_token_id
    assert bos is None or ids.count(bos) <= 1  # a template that writes the BOS gets no second one


def test_every_answer_is_valid_and_the_csv_complete(synthetic, tiny_vlm, tmp_path):
    model_type, folder = tiny_vlm
    table = _run(synthetic, folder, tmp_path / "t.csv", "--batch-size", "16", "--max-new-tokens", "120")
    truth = pd.read_csv(synthetic / "truth.csv").set_index("img_name")["number"]
    described = table[table["number"] > 0]
    assert len(table) == 50 and len(described) == (truth > 0).sum()
    assert (described["source"] == "llava").all() and (described["tries"] == 1).all()
    for row in described.itertuples():
        assert 1 <= row.number <= truth[row.roi_name] and json.loads(row.text)["number"] == row.number
    assert json.loads((tmp_path / "t.settings.json").read_text())["model_path"] == str(folder.resolve())


def test_batched_answers_equal_one_by_one_answers(tiny_vlm):
    """ROIs of different sizes (different image token counts) padded on the left in one batch."""
    _, folder = tiny_vlm
    describer = TransformersDescriber(folder, temperature=0, max_new_tokens=80)
    keywords = ["polyp area", "tumor area", "polyp area", "ulcer area"]
    batched = describer.generate(ROIS, keywords)
    assert batched == [describer.generate([roi], [keyword])[0] for roi, keyword in zip(ROIS, keywords, strict=True)]


def test_retries_fallback_and_resume(synthetic, tiny_vlm, tmp_path, capsys):
    _, folder = tiny_vlm
    free = ["--no-constrain", "--max-retries", "2", "--max-new-tokens", "16", "--batch-size", "50"]
    table = _run(synthetic, folder, tmp_path / "f.csv", *free)
    described = table[table["number"] > 0]
    assert (described["source"] == "fallback").all() and (described["tries"] == 2).all()
    table.iloc[:10].to_csv(tmp_path / "f.csv", index=False)  # as if stopped after 10 ROIs
    capsys.readouterr()
    pd.testing.assert_frame_equal(_run(synthetic, folder, tmp_path / "f.csv", *free), table)
    assert "50 rows (10 from earlier runs)" in capsys.readouterr().err


def test_quantised_describer_keeps_each_familys_vision_parts(tiny_vlm):
    model_type, folder = tiny_vlm
    assert kept_unquantised(meta_model(folder)) == KEPT[model_type]
    describer = TransformersDescriber(folder, quantize="4bit", max_new_tokens=120)
    kept = {name: module for name, module in describer.model.named_modules()
            if isinstance(module, torch.nn.Linear) and name.startswith(tuple(KEPT[model_type]))}
    assert kept and {type(m) for m in kept.values()} == {torch.nn.Linear}
    answers = describer.ask(ROIS, ["polyp area"] * 4, [3] * 4, 1)
    assert all(attrs is not None for attrs, _ in answers)


def _without_image_in_template(folder: Path, tmp_path: Path) -> Path:
    copy = shutil.copytree(folder, tmp_path / "text-only-template")
    (copy / "chat_template.jinja").write_text(
        "{% for m in messages %}{% for p in m['content'] if p['type'] == 'text' %}{{ p['text'] }}{% endfor %}"
        "{% endfor %}")
    return copy


def test_a_template_without_the_image_is_refused_naming_the_model(tiny_vlm, tmp_path):
    model_type, folder = tiny_vlm
    with pytest.raises(CoTexNetError, match=f"text-only-template: the chat template of model type '{model_type}' "
                                            "writes no image"):
        inspect_model(str(_without_image_in_template(folder, tmp_path)))


def _hub_cache(folder: Path, cache: Path, repo: str) -> None:
    """The layout huggingface_hub keeps a downloaded model in."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, root / "snapshots" / revision)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(revision)


@pytest.mark.slow
def test_a_model_is_swapped_in_by_its_hub_id_from_the_cache(synthetic, tiny_vlm, tmp_path):
    model_type, folder = tiny_vlm
    repo = f"tiny-org/tiny-{model_type.replace('_', '-')}"
    _hub_cache(folder, tmp_path / "hub", repo)
    out = tmp_path / "hub.csv"
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    done = subprocess.run([sys.executable, str(REPO / "get_text.py"), "--dataset-name", synthetic.name,
                           "--dataset-path", str(synthetic), "--model-path", repo, "--out", str(out),
                           "--batch-size", "25", "--max-new-tokens", "120"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    table = pd.read_csv(out)
    assert len(table) == 50 and (table.loc[table["number"] > 0, "tries"] == 1).all()
    assert json.loads((tmp_path / "hub.settings.json").read_text())["model_path"] == repo


@pytest.mark.slow
def test_two_processes_shard_and_merge_with_another_family(synthetic, tiny_vlm, tmp_path):
    from tests.test_text_llava import _two_processes

    _, folder = tiny_vlm
    single = _run(synthetic, folder, tmp_path / "one.csv", "--batch-size", "25", "--max-new-tokens", "120",
                  "--temperature", "0")
    two = _two_processes(synthetic, tmp_path / "two.csv", "--model-path", str(folder), "--batch-size", "25",
                         "--max-new-tokens", "120", "--temperature", "0")
    pd.testing.assert_frame_equal(two, single)
