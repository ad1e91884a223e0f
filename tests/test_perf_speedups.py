"""The speed-ups compute what they replace (no timing here; tools/bench.py times them):
the vision encoder's last layer run for the CLS row only, bf16 autocast of the frozen
encoder, and the frozen-feature cache of validation and test passes."""

from __future__ import annotations

import os

import pytest
import torch

from common.errors import CoTexNetError
from model.CoTexNet import CoTexNet
from model.feature_cache import FeatureCache
from model.tiny import build_clipseg, tiny_clipseg_config

B = 3


def _config(extract_layers):
    config = tiny_clipseg_config()
    config.extract_layers = extract_layers
    return config


@pytest.fixture(scope="module")
def model():
    # Extract layers end before the last ViT layer, as in the real model ([3, 6, 9] of 12):
    # the last layer then only feeds the CLS token.
    return CoTexNet.from_clipseg(build_clipseg(_config([0, 1]), seed=3))


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(B, 3, 224, 224, generator=torch.Generator().manual_seed(1))


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_cls_row_of_the_last_layer_equals_the_full_stock_encoder(pixels, attn):
    model = CoTexNet.from_clipseg(build_clipseg(_config([0, 1]), seed=3), attn_implementation=attn)
    with torch.no_grad():
        activations, cls = model.encode_images(pixels)
        stock = model.clip.vision_model(pixels, output_hidden_states=True)
    assert len(activations) == 2
    for got, i in zip(activations, [0, 1], strict=True):
        torch.testing.assert_close(got, stock.hidden_states[i + 1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cls, stock.last_hidden_state[:, 0], atol=1e-5, rtol=1e-5)


def test_last_layer_runs_in_full_when_the_decoder_needs_it(pixels):
    model = CoTexNet.from_clipseg(build_clipseg(_config([2, 0]), seed=3))  # config order is kept
    with torch.no_grad():
        activations, cls = model.encode_images(pixels)
        stock = model.clip.vision_model(pixels, output_hidden_states=True)
    torch.testing.assert_close(activations[0], stock.last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(activations[1], stock.hidden_states[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cls, stock.last_hidden_state[:, 0], atol=1e-5, rtol=1e-5)


def test_cls_row_path_passes_gradients_when_the_encoder_trains(pixels):
    model = CoTexNet.from_clipseg(build_clipseg(_config([0, 1]), seed=3), freeze_encoder=False)
    _, cls = model.encode_images(pixels[:1])
    cls.sum().backward()
    last = model.clip.vision_model.encoder.layers[-1]
    assert last.mlp.fc2.weight.grad.abs().sum() > 0 and last.self_attn.k_proj.weight.grad.abs().sum() > 0
    assert model.clip.vision_model.embeddings.patch_embedding.weight.grad.abs().sum() > 0


def test_bf16_autocast_of_the_frozen_encoder_stays_within_1e_2(model, pixels):
    with torch.no_grad():
        full = model.extract_features(pixels)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model.extract_features(pixels)
        # The trained decoder in float32 on the bf16 encoder's features.
        logits_half = model.forward_features(half).logits
        logits_full = model.forward_features(full).logits
    for name in full:
        assert _relative(half[name], full[name]) < 1e-2, name
    assert _relative(logits_half, logits_full) < 1e-2


def _image_files(folder, n):
    paths = []
    for i in range(n):
        path = folder / f"img_{i}.jpg"
        path.write_bytes(b"\xff\xd8 stand-in %d" % i)
        paths.append(path)
    return paths


def _forbid_encoder(model):
    def refuse(*_):
        raise AssertionError("the frozen encoder ran on a cached pass")

    return model.clip.vision_model.embeddings.register_forward_pre_hook(refuse)


@pytest.mark.parametrize("memory_mb, on_disk", [(64, False), (0, True)])
def test_cached_pass_skips_the_encoder_and_equals_the_first(model, pixels, tmp_path, memory_mb, on_disk):
    paths = _image_files(tmp_path, B)
    cache = FeatureCache(model, 224, folder=tmp_path / "cache", memory_mb=memory_mb)
    with torch.no_grad():
        first = model.forward_features(cache.features(model, pixels, paths)).logits
        cold = model(pixels).logits
    assert (cache.hits, cache.misses) == (0, B)
    assert any((tmp_path / "cache").rglob("*.safetensors")) == on_disk
    hook = _forbid_encoder(model)
    try:
        with torch.no_grad():
            again = model.forward_features(cache.features(model, pixels, paths)).logits
    finally:
        hook.remove()
    assert cache.hits == B
    assert torch.equal(again, first)  # every pass decodes the same stored features
    # float16 storage: close to the uncached evaluation path.
    assert _relative(first, cold) < 1e-2
    # A new cache over the same folder (a later run) finds the disk entries.
    if on_disk:
        later = FeatureCache(model, 224, folder=tmp_path / "cache", memory_mb=0)
        later.features(model, pixels, paths)
        assert later.hits == B


def test_float32_cache_is_exact(model, pixels, tmp_path):
    cache = FeatureCache(model, 224, memory_mb=64, dtype=torch.float32)
    paths = _image_files(tmp_path, B)
    with torch.no_grad():
        assert torch.equal(model.forward_features(cache.features(model, pixels, paths)).logits, model(pixels).logits)


def test_partial_batches_compute_only_the_missing_images(model, pixels, tmp_path):
    paths = _image_files(tmp_path, B)
    cache = FeatureCache(model, 224, dtype=torch.float32)
    cache.features(model, pixels[:1], paths[:1])
    seen = []
    hook = model.clip.vision_model.embeddings.register_forward_pre_hook(lambda _m, args: seen.append(len(args[0])))
    try:
        features = cache.features(model, pixels, paths)
    finally:
        hook.remove()
    assert seen == [B - 1] and cache.hits == 1
    with torch.no_grad():
        torch.testing.assert_close(features["vision_cls"], model.extract_features(pixels)["vision_cls"])


def test_key_changes_with_the_file_the_size_and_the_base(model, tmp_path):
    path = _image_files(tmp_path, 1)[0]
    cache = FeatureCache(model, 224)
    key = cache.key(path)
    assert cache.key(path) == key
    assert FeatureCache(model, 352).key(path) != key  # another input size
    path.write_bytes(b"an edited image, longer than before")
    assert cache.key(path) != key
    edited = cache.key(path)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # same size, newer
    assert cache.key(path) != edited
    other_base = CoTexNet.from_clipseg(build_clipseg(_config([0, 1]), seed=4))
    assert FeatureCache(other_base, 224).key(path) != cache.key(path)


def test_without_a_folder_a_full_memory_just_recomputes(model, pixels, tmp_path):
    paths = _image_files(tmp_path, B)
    cache = FeatureCache(model, 224, memory_mb=0)
    cache.features(model, pixels, paths)
    cache.features(model, pixels, paths)
    assert (cache.hits, cache.misses) == (0, 2 * B)
    assert not any(tmp_path.rglob("*.safetensors"))


def test_the_cache_works_under_cpu_bf16_autocast(model, pixels, tmp_path):
    # The bench's validation pass runs the cache inside autocast; CPU autocast rejects float16
    # tensors in ops such as stack.
    paths = _image_files(tmp_path, B)
    cache = FeatureCache(model, 224, memory_mb=64)
    with torch.no_grad():
        outside = cache.features(model, pixels, paths)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inside = cache.features(model, pixels, paths)
            logits = model.forward_features(inside).logits
        reference = model(pixels).logits
    assert cache.hits == B
    for name in outside:
        assert torch.equal(inside[name], outside[name]), name
    assert _relative(logits, reference) < 1e-2


# --- the frozen CLIP kept in bf16 (train.py, evaluate.py, predict.py under bf16 autocast) --------
@pytest.fixture(scope="module")
def prompt():
    from model.tiny import CLIP_BOS, CLIP_EOS

    ids = torch.randint(1000, 40000, (B, 9), generator=torch.Generator().manual_seed(2))
    ids[:, 0], ids[:, 8] = CLIP_BOS, CLIP_EOS
    return ids


def _cast_copy(seed=3):
    reference = CoTexNet.from_clipseg(build_clipseg(_config([0, 1]), seed=seed))
    cast = CoTexNet.from_clipseg(build_clipseg(_config([0, 1]), seed=seed))
    cast.load_state_dict(reference.state_dict())
    cast.cast_frozen_encoder(torch.bfloat16)
    return reference, cast


def test_cast_keeps_the_clip_in_bf16_and_the_trained_parts_in_float32():
    _, model = _cast_copy()
    assert {p.dtype for p in model.clip.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in model.clip.parameters())
    trained = [(n, p) for n, p in model.named_parameters() if not n.startswith("clip.")]
    assert trained and all(p.dtype == torch.float32 and p.requires_grad for _, p in trained)
    assert model.encoder_dtype == torch.bfloat16
    with pytest.raises(CoTexNetError, match="cannot train"):
        model.set_frozen(encoder=False)
    trains = CoTexNet.from_clipseg(build_clipseg(_config([0, 1]), seed=3), freeze_encoder=False)
    with pytest.raises(CoTexNetError, match="needs float32"):
        trains.cast_frozen_encoder(torch.bfloat16)


def test_cast_model_computes_the_float32_function_within_1e_2(pixels, prompt):
    reference, model = _cast_copy()
    with torch.no_grad():
        full_train = reference(pixels, pixels * 0.5, prompt).logits
        full_eval = reference(pixels).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half_train = model(pixels, pixels * 0.5, prompt).logits
            half_eval = model(pixels).logits
        plain = model(pixels).logits  # outside autocast the trained parts get float32 inputs
    assert _relative(half_train, full_train) < 1e-2
    assert _relative(half_eval, full_eval) < 1e-2 and plain.dtype == torch.float32
    assert _relative(plain, full_eval) < 1e-2


def test_cast_model_trains_its_mapper_through_the_bf16_text_encoder(pixels, prompt):
    _, model = _cast_copy()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(pixels, pixels * 0.5, prompt)
    out.logits.float().sum().backward()
    assert model.roi_mapper[0].weight.grad.dtype == torch.float32
    assert model.roi_mapper[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.clip.parameters())


def test_cast_model_saves_float32_weights_and_the_base_fingerprint_as_loaded(tmp_path):
    from safetensors.torch import load_file

    reference, model = _cast_copy()
    assert model.base_fingerprint() == reference.base_fingerprint()
    model.save_pretrained(tmp_path / "ck")
    stored = load_file(tmp_path / "ck" / "model.safetensors")
    assert stored and {t.dtype for t in stored.values()} == {torch.float32}
    base = build_clipseg(_config([0, 1]), seed=3)  # the fp32 base it was trained on: accepted
    loaded = CoTexNet.from_pretrained(tmp_path / "ck", clipseg=base)
    for name, tensor in reference.state_dict().items():
        if not name.startswith("clip."):
            assert torch.equal(tensor, loaded.state_dict()[name]), name


def test_the_cache_keys_the_encoder_dtype_and_stores_bf16_features(pixels, tmp_path):
    reference, model = _cast_copy()
    path = _image_files(tmp_path, 1)[0]
    cache = FeatureCache(model, 224)
    assert cache.key(path) != FeatureCache(reference, 224).key(path)
    features = cache.features(model, pixels[:1], [path])
    assert {t.dtype for t in features.values()} == {torch.bfloat16}
    with pytest.raises(CoTexNetError, match="built for a torch.bfloat16 encoder"):
        cache.features(reference, pixels[:1], [path])


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16), ("no", torch.float32)])
def test_apply_precision_casts_the_frozen_clip_for_mixed_precision_only(precision, dtype):
    from types import SimpleNamespace

    from train_utils.precision import apply_precision

    model = CoTexNet.from_clipseg(build_clipseg(_config([0, 1]), seed=3))
    apply_precision(model, SimpleNamespace(mixed_precision=precision))
    assert model.encoder_dtype == dtype and model.decoder.film_mul.weight.dtype == torch.float32
    trains = CoTexNet.from_clipseg(build_clipseg(_config([0, 1]), seed=3), freeze_encoder=False)
    apply_precision(trains, SimpleNamespace(mixed_precision=precision))
    assert trains.encoder_dtype == torch.float32  # a trained encoder keeps float32 master weights


def test_the_bench_defaults_to_the_precision_train_py_picks_here():
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    # In child processes: accelerate's state, once made with a precision, stays for the process.
    picked = subprocess.run([sys.executable, "-c", "from train_utils.config import load_config; "
                             "from train_utils.precision import make_accelerator; "
                             "print(make_accelerator(load_config(None, ['TRAIN.device=cpu'])).mixed_precision)"],
                            cwd=repo, capture_output=True, text=True, check=True).stdout.split()[-1]
    shown = subprocess.run([sys.executable, str(repo / "tools" / "bench.py"), "--help"], capture_output=True,
                           text=True, check=True).stdout
    assert f"this CPU ({'fp32' if picked == 'no' else picked})" in " ".join(shown.split())
