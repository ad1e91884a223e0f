"""get_text.py --backend vllm: the vLLM engine for real, on the CPU, with a tiny random llava-hf model.

The engine tests run get_text.py under the vLLM venv's Python, which `make test-vllm` builds
(tools/vllm_venv.sh) and names in VLLM_PYTHON; without it they are skipped. The others run here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import get_text
from common.errors import CoTexNetError
from tests.text_fixtures import *  # noqa: F403 (session fixtures)
from tests.train_fixtures import REPO

NET_GUARD = "cotexnet test guard"


def _args(folder, model, out, *extra) -> list[str]:
    return ["--dataset-name", folder.name, "--dataset-path", str(folder), "--model-path", str(model),
            "--out", str(out), *extra]


# --- without vLLM -------------------------------------------------------------------------------

def test_a_missing_vllm_is_one_line_naming_its_install_and_nothing_is_written(synthetic, tiny_llava, tmp_path,
                                                                               monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # as in a Python without vLLM: import raises ImportError
    out = tmp_path / "t.csv"
    with pytest.raises(CoTexNetError, match=r"--backend vllm: vLLM cannot be imported by .*make vllm-venv.*"
                                            r"\.venv-vllm/bin/python"):
        get_text.main(_args(synthetic, tiny_llava, out, "--backend", "vllm"))
    assert list(tmp_path.iterdir()) == []


def test_tensor_parallel_needs_the_vllm_backend(synthetic, tiny_llava, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        get_text.main(_args(synthetic, tiny_llava, tmp_path / "t.csv", "--tensor-parallel", "2"))
    assert stop.value.code == 2 and "--tensor-parallel needs --backend vllm" in capsys.readouterr().err


def test_a_csv_recorded_before_the_backend_was_continues_with_transformers(synthetic, tiny_llava, tmp_path):
    """Records written before the backend was recorded were made by transformers: a rerun with it goes on."""
    fast = ["--no-constrain", "--max-retries", "1", "--max-new-tokens", "4", "--batch-size", "50"]
    out = tmp_path / "t.csv"
    get_text.main(_args(synthetic, tiny_llava, out, *fast))
    first = pd.read_csv(out)
    record = out.with_name("t.settings.json")
    settings = json.loads(record.read_text())
    assert settings.pop("backend") == "transformers"
    record.write_text(json.dumps(settings))
    get_text.main(_args(synthetic, tiny_llava, out, *fast))
    pd.testing.assert_frame_equal(pd.read_csv(out), first)
    assert json.loads(record.read_text())["backend"] == "transformers"


# --- the vLLM engine ----------------------------------------------------------------------------

@pytest.fixture(scope="session")
def vllm_python() -> Path:
    name = os.environ.get("VLLM_PYTHON")
    if not name:
        pytest.skip("vLLM engine tests run under `make test-vllm`, which builds the vLLM venv and names its "
                    "Python in VLLM_PYTHON")
    python = Path(name)
    assert python.is_file(), f"VLLM_PYTHON={name}: no such file (make vllm-venv builds it)"
    return python


@pytest.fixture(scope="session")
def tiny_vllm_llava(tmp_path_factory) -> Path:
    from model.tiny_vllm import save_tiny_vllm_llava

    return save_tiny_vllm_llava(tmp_path_factory.mktemp("tiny_vllm_llava"))


def _engine_env() -> dict:
    """The CPU engine's settings: 1 GiB of KV cache, threads not pinned (cores are shared here)."""
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1",
                VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="nobind",
                OMP_NUM_THREADS=str(min(2, os.cpu_count() or 1)), VLLM_NO_USAGE_STATS="1")


def _start(python: Path, args: list[str]) -> subprocess.Popen:
    # Its own process group: a kill reaches the engine's processes too.
    return subprocess.Popen([str(python), str(REPO / "get_text.py"), *args], cwd=REPO, env=_engine_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert NET_GUARD not in err, err[-3000:]
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _vllm(python: Path, args: list[str], status: int = 0) -> subprocess.CompletedProcess:
    done = _finish(_start(python, args))
    assert done.returncode == status, done.stderr[-3000:]
    return done


GREEDY = ["--temperature", "0", "--max-new-tokens", "120"]


@pytest.fixture(scope="module")
def transformers_csv(synthetic, tiny_vllm_llava, tmp_path_factory) -> Path:
    """The default backend's CSV under greedy decoding (float32 on the CPU)."""
    out = tmp_path_factory.mktemp("transformers") / "t.csv"
    get_text.main(_args(synthetic, tiny_vllm_llava, out, *GREEDY, "--batch-size", "50"))
    return out


@pytest.fixture(scope="module")
def vllm_csv(vllm_python, synthetic, tiny_vllm_llava, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vllm") / "v.csv"
    _vllm(vllm_python, _args(synthetic, tiny_vllm_llava, out, "--backend", "vllm", *GREEDY))
    return out


@pytest.mark.slow
def test_vllm_writes_the_transformers_csv_under_greedy_decoding(vllm_csv, transformers_csv, synthetic):
    table = pd.read_csv(vllm_csv)
    truth = pd.read_csv(synthetic / "truth.csv").set_index("img_name")["number"]
    described = table[table["number"] > 0]
    assert len(table) == 50 and len(described) == (truth > 0).sum() > 40
    assert (described["source"] == "llava").all() and (described["tries"] == 1).all()  # valid on the first try
    pd.testing.assert_frame_equal(table, pd.read_csv(transformers_csv))
    settings = json.loads(vllm_csv.with_name("v.settings.json").read_text())
    assert settings["backend"] == "vllm" and settings["temperature"] == 0
    assert not list(vllm_csv.parent.glob("*.partial*"))


@pytest.mark.slow
def test_vllm_inputs_are_the_transformers_inputs(vllm_python, tiny_vllm_llava, tmp_path):
    """First-token log-probabilities of non-square ROIs equal transformers' to 1e-4: same padding,
    pixels, prompt tokens and weights. The comparison sees the image: cropping instead of padding
    moves them by 1e-2. Free answers of the random model are no JSON: 2 tries, then none."""
    from llava_inference.transformers_backend import TransformersDescriber

    rng = np.random.default_rng(0)
    rois = []
    for height, width in [(24, 60), (60, 24), (40, 40)]:
        roi = np.zeros((height, width, 3), np.uint8)
        roi[2:14, 2:14] = rng.integers(60, 255, (12, 12, 3))  # a region at the corner: cropping cuts it
        rois.append(roi)
    np.savez(tmp_path / "rois.npz", **{f"roi{i}": roi for i, roi in enumerate(rois)})
    done = subprocess.run([str(vllm_python), str(REPO / "tests" / "vllm_probe.py"), str(tiny_vllm_llava),
                           str(tmp_path / "rois.npz"), str(tmp_path / "probe.json")],
                          cwd=REPO, env=_engine_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0 and NET_GUARD not in done.stderr, done.stderr[-3000:]
    probe = json.loads((tmp_path / "probe.json").read_text())

    describer = TransformersDescriber(tiny_vllm_llava, constrain=False)

    @torch.inference_mode()
    def first_token(inputs) -> torch.Tensor:
        return describer.model(**inputs).logits[0, -1].float().log_softmax(-1)

    for roi, engine in zip(rois, probe["logprobs"], strict=True):
        tokens = [int(token) for token in engine]
        expected = first_token(describer.inputs([roi], ["polyp area"]))
        assert tokens == expected.topk(len(tokens)).indices.tolist()
        torch.testing.assert_close(torch.tensor(list(engine.values())), expected[tokens], atol=1e-4, rtol=0)
        if roi.shape[0] != roi.shape[1]:
            cropped = describer.processor(images=[roi], text=[describer.prompt("polyp area")], return_tensors="pt")
            assert (first_token(cropped)[tokens] - expected[tokens]).abs().max() > 1e-2
    assert probe["described"] == [[None, 2]] * len(rois)


def _rows(path: Path) -> int:
    return max(0, len(path.read_text().splitlines()) - 1) if path.exists() else 0


def _alive(group: int) -> list[int]:
    """Processes of a process group that still run (zombies excluded)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError):
            continue
        if int(pgrp) == group and state != "Z":
            alive.append(int(stat.parent.name))
    return alive


@pytest.mark.slow
def test_a_killed_vllm_run_resumes_to_the_same_csv(vllm_python, vllm_csv, synthetic, tiny_vllm_llava, tmp_path):
    out = tmp_path / "v.csv"
    partial = tmp_path / "v.partial.csv"
    args = _args(synthetic, tiny_vllm_llava, out, "--backend", "vllm", *GREEDY, "--batch-size", "2")
    proc = _start(vllm_python, args)
    deadline = time.monotonic() + 600
    while _rows(partial) < 3:
        assert proc.poll() is None, f"ended before it was killed: {proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, "no rows within 10 minutes"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # kill -9 of the whole job, engine included
    proc.communicate(timeout=60)
    time.sleep(1)
    assert _alive(proc.pid) == [], "engine processes outlived the kill"
    done_before = _rows(partial)
    assert 3 <= done_before < 50 and not out.exists()

    rerun = _vllm(vllm_python, args)
    assert f"50 rows ({done_before} from earlier runs)" in rerun.stderr
    pd.testing.assert_frame_equal(pd.read_csv(out), pd.read_csv(vllm_csv))


@pytest.mark.slow
def test_tensor_parallel_2_on_two_cpu_processes_writes_the_same_csv(vllm_python, vllm_csv, synthetic, tiny_vllm_llava,
                                                                    tmp_path):
    out = tmp_path / "tp2.csv"
    _vllm(vllm_python, _args(synthetic, tiny_vllm_llava, out, "--backend", "vllm", "--tensor-parallel", "2", *GREEDY))
    pd.testing.assert_frame_equal(pd.read_csv(out), pd.read_csv(vllm_csv))


@pytest.mark.slow
def test_a_rerun_with_the_other_backend_is_refused(vllm_python, transformers_csv, synthetic, tiny_vllm_llava, tmp_path):
    out = tmp_path / "t.csv"
    out.write_bytes(transformers_csv.read_bytes())
    out.with_name("t.settings.json").write_bytes(transformers_csv.with_name("t.settings.json").read_bytes())
    done = _vllm(vllm_python, _args(synthetic, tiny_vllm_llava, out, "--backend", "vllm", *GREEDY), status=2)
    last = done.stderr.strip().splitlines()[-1]
    made, asked = last.split("this run asks for")
    assert made.startswith(f"error: {out}: its 50 earlier rows were made with") and "--backend" not in made
    assert "--backend vllm" in asked and last.endswith("or with the earlier options to continue")
    assert out.read_bytes() == transformers_csv.read_bytes()
