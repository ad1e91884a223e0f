"""Session fixtures of the text tests: a synthetic dataset with ROIs and a tiny LLaVA folder, built once."""

import pytest

__all__ = ["synthetic", "synthetic_multiclass", "tiny_llava", "tiny_llava_64", "tiny_vlm"]

from data_process import make_ROI_img
from data_process.make_synthetic import make_synthetic
from model.tiny import TINY_VLMS, save_tiny_llava


def _dataset(root, multiclass: bool, count: int):
    folder = make_synthetic(root, count=count, multiclass=multiclass)
    name = folder.name
    make_ROI_img.main(["--dataset-name", name, "--dataset-path", str(folder), "--workers", "1"])
    return folder


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    """data/synthetic: 50 images (0/255 JPEG masks, a few of them empty) with images/, masks/, ROIs/, truth.csv."""
    return _dataset(tmp_path_factory.mktemp("data"), multiclass=False, count=50)


@pytest.fixture(scope="session")
def synthetic_multiclass(tmp_path_factory):
    return _dataset(tmp_path_factory.mktemp("data_mc"), multiclass=True, count=12)


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory):
    return save_tiny_llava(tmp_path_factory.mktemp("tiny_llava"))


@pytest.fixture(scope="session")
def tiny_llava_64(tmp_path_factory):
    """The tiny LLaVA-1.5 with widths bitsandbytes can quantise (64: NF4 blocks need 64 inputs)."""
    return save_tiny_llava(tmp_path_factory.mktemp("tiny_llava_64"), width=64)


@pytest.fixture(scope="session", params=sorted(set(TINY_VLMS) - {"llava"}))
def tiny_vlm(request, tmp_path_factory):
    """Each tiny architecture beside LLaVA-1.5 (LLaVA-NeXT, Qwen2-VL): (model type, folder)."""
    return request.param, TINY_VLMS[request.param](tmp_path_factory.mktemp(request.param))
