"""Session fixtures shared by all test files: the network guard, synthetic datasets, the CLIP
tokenizer, real Kvasir."""

import os
from pathlib import Path

import pytest

# The suite is offline by design: the hub libraries must not even try (bitsandbytes, for one,
# asks the hub for a kernel unless told it is offline), whichever way pytest was started.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import cotexnet_netguard  # tests/netguard, on pytest's pythonpath

from data_process.make_synthetic import make_synthetic

REPO = Path(__file__).resolve().parents[1]
GUARD_DIR = Path(__file__).resolve().parent / "netguard"


@pytest.fixture(scope="session", autouse=True)
def no_network():
    """Any connection beyond loopback / AF_UNIX raises, here and in Python subprocesses. The
    subprocesses, like pytest (pyproject.toml's pythonpath), import this checkout's packages first,
    whichever checkout the venv installed."""
    cotexnet_netguard.install()
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(GUARD_DIR), str(REPO), os.environ.get("PYTHONPATH")]))
    yield


@pytest.fixture(autouse=True)
def network_attempts_fail_the_test(no_network):
    """Fails the test even when a library caught the guard's error and carried on."""
    cotexnet_netguard.take_attempts()
    yield
    attempts = cotexnet_netguard.take_attempts()
    if attempts:
        pytest.fail(f"the test tried to reach the network: {attempts[:3]}")


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A root with `synthetic` (12 images, JPEG 0/255 masks) and `synthetic_multiclass` (8, label maps).

    Read-only: tests that write into a dataset copy it first.
    """
    root = tmp_path_factory.mktemp("data")
    make_synthetic(root, count=12, seed=1)
    make_synthetic(root, count=8, seed=2, multiclass=True)
    return root


@pytest.fixture(scope="session")
def tokenizer():
    """The real CLIP BPE tokenizer, built offline once per session (~1 s)."""
    from model.tiny import clip_tokenizer

    return clip_tokenizer()


@pytest.fixture(scope="session")
def kvasir_dir() -> Path:
    """The 1000 real Kvasir-SEG pairs beside the project (read-only), or a skip saying why."""
    path = (REPO / ".." / "shared" / "data" / "kvasir-seg").resolve()
    if not (path / "images").is_dir():
        pytest.skip(f"real Kvasir-SEG not found at {path} (only on the project's machines)")
    return path


@pytest.fixture
def one_thread():
    """torch on one thread for the test: small tensors on shared cores, where a second thread only waits."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
