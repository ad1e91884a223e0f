"""get_text.py with the tiny random LLaVA: constrained batched answers, free answers with retries, bad folders."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

import get_text
from common.errors import CoTexNetError
from llava_inference.model_folder import check_model_folder
from llava_inference.transformers_backend import TransformersDescriber
from tests.llava_original import reference_pixels
from tests.text_fixtures import *  # noqa: F403 (session fixtures)


def _run(folder, model, out, *extra) -> pd.DataFrame:
    get_text.main(["--dataset-name", folder.name, "--dataset-path", str(folder), "--model-path", str(model),
                   "--out", str(out), *extra])
    return pd.read_csv(out)


def test_constrained_batched_answers_are_all_valid_first_try(synthetic, tiny_llava, tmp_path):
    table = _run(synthetic, tiny_llava, tmp_path / "llava.csv", "--batch-size", "16", "--max-new-tokens", "120")
    truth = pd.read_csv(synthetic / "truth.csv").set_index("img_name")["number"]
    described = table[table["number"] > 0]
    assert len(table) == 50 and len(described) == (truth > 0).sum() > 40
    assert (described["source"] == "llava").all() and (described["tries"] == 1).all()
    for row in described.itertuples():  # the number never exceeds what the mask shows
        assert 1 <= row.number <= truth[row.roi_name]
        assert json.loads(row.text)["number"] == row.number


def test_hybrid_takes_number_location_size_from_the_mask(synthetic, tiny_llava, tmp_path):
    geometry = _run(synthetic, tiny_llava, tmp_path / "g.csv", "--describer", "geometry")
    hybrid = _run(synthetic, tiny_llava, tmp_path / "h.csv", "--describer", "hybrid", "--batch-size", "50",
                  "--max-new-tokens", "120")
    columns = ["roi_name", "number", "location", "size"]
    pd.testing.assert_frame_equal(hybrid[columns], geometry[columns])
    assert set(hybrid["source"]) == {"hybrid", "geometry"}  # geometry: the empty ROI


def test_free_answers_are_retried_then_fall_back(synthetic, tiny_llava, tmp_path):
    # A random model writes no JSON in 24 tokens: every ROI takes exactly --max-retries tries, then geometry.
    table = _run(synthetic, tiny_llava, tmp_path / "free.csv", "--no-constrain", "--max-retries", "2",
                 "--max-new-tokens", "24", "--batch-size", "50")
    described = table[table["number"] > 0]
    assert (described["source"] == "fallback").all() and (described["tries"] == 2).all()


@pytest.mark.parametrize("height, width", [(24, 60), (60, 24)])
def test_a_non_square_roi_is_padded_to_a_square_not_cropped(tiny_llava, height, width):
    # llava-hf folders ship a CLIPImageProcessor (resize the short side, centre-crop): the describer pads first.
    describer = TransformersDescriber(tiny_llava, constrain=False)
    processor = describer.processor.image_processor
    assert not getattr(processor, "do_pad", False)
    roi = np.zeros((height, width, 3), np.uint8)
    roi[1:12, 1:12] = np.random.default_rng(0).integers(60, 255, (11, 11, 3))  # a region at the corner
    pixels = describer.inputs([roi], ["polyp area"])["pixel_values"]
    expected = reference_pixels(roi, processor.image_mean, processor.image_std, processor.crop_size["height"])
    torch.testing.assert_close(pixels, expected, atol=1e-6, rtol=0)
    black = describer.inputs([np.zeros_like(roi)], ["polyp area"])["pixel_values"]
    assert (pixels - black).abs().amax() > 1  # the region is in the model's input, not cropped away


def test_bad_model_folders_are_named(tmp_path, tiny_llava):
    with pytest.raises(CoTexNetError, match="no such model folder"):
        check_model_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CoTexNetError, match="missing config.json.*weights.*tokenizer.*image processor"):
        check_model_folder(tmp_path / "empty")
    original = tmp_path / "llava-v1.5-13b"
    original.mkdir()
    (original / "config.json").write_text(json.dumps({"architectures": ["LlavaLlamaForCausalLM"],
                                                      "mm_vision_tower": "openai/clip-vit-large-patch14-336"}))
    with pytest.raises(CoTexNetError, match="original LLaVA format.*convert_llava.py"):
        check_model_folder(original)
    check_model_folder(tiny_llava)


def _two_processes(folder, out, *extra):
    """`accelerate launch --multi_gpu --num_processes 2`: on a CPU-only machine, two processes over gloo."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(29500 + os.getpid() % 1000), str(root / "get_text.py"),
               "--dataset-name", folder.name, "--dataset-path", str(folder), "--out", str(out), *extra]
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "by 2 process(es)" in done.stderr
    return pd.read_csv(out)


@pytest.mark.slow
def test_two_processes_shard_and_merge(synthetic, tiny_llava, tmp_path):
    single = _run(synthetic, tiny_llava, tmp_path / "one.csv", "--describer", "geometry")
    pd.testing.assert_frame_equal(_two_processes(synthetic, tmp_path / "two.csv", "--describer", "geometry"), single)
    table = _two_processes(synthetic, tmp_path / "llava.csv", "--model-path", str(tiny_llava), "--batch-size", "25",
                      "--max-new-tokens", "120")
    assert list(table["roi_name"]) == list(single["roi_name"])
    assert set(table["source"]) == {"llava", "geometry"} and (table.loc[table["source"] == "llava", "tries"] == 1).all()
    assert not list(tmp_path.glob("*.partial*"))


def test_a_rerun_with_other_decoding_is_refused_but_not_one_with_another_batch_size(synthetic, tiny_llava, tmp_path):
    """The rows depend on the model and its decoding: a rerun that would mix two settings in one
    CSV stops; what only changes the speed (batch size) continues."""
    fast = ["--no-constrain", "--max-retries", "1", "--max-new-tokens", "4"]
    first = _run(synthetic, tiny_llava, tmp_path / "t.csv", *fast, "--batch-size", "50")
    with pytest.raises(CoTexNetError, match=r"t.csv: its 50 earlier rows were made with --describer llava .*"
                                            r"--temperature 0.2 .*this run asks for .*--temperature 0.7"):
        _run(synthetic, tiny_llava, tmp_path / "t.csv", *fast, "--temperature", "0.7")
    pd.testing.assert_frame_equal(_run(synthetic, tiny_llava, tmp_path / "t.csv", *fast, "--batch-size", "8"), first)
