"""Session fixtures shared by all test files: synthetic datasets, the CLIP tokenizer, real Kvasir."""

from pathlib import Path

import pytest

from data_process.make_synthetic import make_synthetic

REPO = Path(__file__).resolve().parents[1]


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
