"""CoTexNet checkpoints: bit-exact round trips, refusal of a wrong base or class count, and
import of checkpoints in the paper's format (built here from a tiny model)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from common.errors import CoTexNetError, run_cli
from model import CoTexNet as cotexnet_module
from model import export, paper_import
from model.checkpoint import read_extra
from model.CoTexNet import CoTexNet
from model.tiny import CLIP_BOS, CLIP_EOS, build_clipseg, tiny_clipseg_config


@pytest.fixture(scope="module")
def clipseg():
    return build_clipseg(tiny_clipseg_config())


@pytest.fixture(scope="module")
def clipseg_folder(clipseg, tmp_path_factory):
    folder = tmp_path_factory.mktemp("clipseg")
    clipseg.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 40000, (1, 9), generator=gen)
    ids[:, 0], ids[:, 8] = CLIP_BOS, CLIP_EOS
    pixel_values = torch.randn(1, 3, 224, 224, generator=gen)
    return dict(pixel_values=pixel_values, roi_pixel_values=pixel_values * 0.5, input_ids=ids)


def load_checkpoint(folder, clipseg=None, num_classes=None):
    """(model, extra) of a checkpoint folder."""
    return CoTexNet.from_pretrained(folder, clipseg, num_classes), read_extra(folder)


def trained_model(clipseg, num_classes=2, seed=1) -> CoTexNet:
    """A model whose trained parts all differ from their initial values."""
    model = CoTexNet.from_clipseg(clipseg, num_classes)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("clip."):
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def test_round_trip_is_bit_exact_and_small(clipseg, inputs, tmp_path):
    model = trained_model(clipseg, 3)
    model.save_pretrained(tmp_path / "ck", extra={"epoch": 7, "dice": 0.5})
    stored = load_file(tmp_path / "ck" / "model.safetensors")
    assert stored and not any(name.startswith("clip.") for name in stored)  # the base is named, not stored
    loaded, extra = load_checkpoint(tmp_path / "ck", clipseg=clipseg)
    assert extra == {"epoch": 7, "dice": 0.5} and loaded.num_classes == 3
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)


def test_base_is_found_by_its_recorded_folder(clipseg_folder, tmp_path):
    model = trained_model(clipseg_folder)
    model.save_pretrained(tmp_path / "ck")
    loaded, _ = load_checkpoint(tmp_path / "ck")
    assert loaded.clipseg_hf_api == str(clipseg_folder.resolve())
    assert torch.equal(loaded.img2text.fc_out.weight, model.img2text.fc_out.weight)


def test_another_base_or_class_count_is_refused(clipseg, tmp_path):
    trained_model(clipseg).save_pretrained(tmp_path / "ck")
    other_base = build_clipseg(tiny_clipseg_config(), seed=1)
    with pytest.raises(CoTexNetError, match="different CLIPSeg base"):
        load_checkpoint(tmp_path / "ck", clipseg=other_base)
    with pytest.raises(CoTexNetError, match="num_classes 2, expected 3"):
        load_checkpoint(tmp_path / "ck", clipseg=clipseg, num_classes=3)
    with pytest.raises(CoTexNetError, match="names no CLIPSeg base"):
        load_checkpoint(tmp_path / "ck")  # an in-memory base has no name to find it by


def test_edited_or_half_written_checkpoints_are_refused(clipseg, tmp_path):
    folder = trained_model(clipseg).save_pretrained(tmp_path / "ck")
    config = json.loads((folder / "config.json").read_text())
    config["num_classes"] = 3
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CoTexNetError, match=r"transposed_convolution.4.bias has shape \(1,\), the model needs \(3,\)"):
        load_checkpoint(folder, clipseg=clipseg)
    trained_model(clipseg, seed=2).save_pretrained(tmp_path / "other")
    (folder / "model.safetensors").write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    with pytest.raises(CoTexNetError, match="does not match config.json"):
        load_checkpoint(folder, clipseg=clipseg)
    with pytest.raises(CoTexNetError, match="not found"):
        load_checkpoint(tmp_path / "missing")


def test_full_export_needs_no_base(clipseg, inputs, tmp_path):
    model = trained_model(clipseg)
    model.save_pretrained(tmp_path / "full", extra={"note": "shared"}, with_base=True)
    loaded, extra = load_checkpoint(tmp_path / "full")
    assert extra == {"note": "shared"}
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)


def test_pretrained_entry_points_round_trip(clipseg, inputs, tmp_path):
    model = trained_model(clipseg, 3)
    assert model.save_pretrained(tmp_path / "ck", extra={"epoch": 2}) == tmp_path / "ck"
    loaded = CoTexNet.from_pretrained(tmp_path / "ck", clipseg=clipseg, num_classes=3)
    assert load_checkpoint(tmp_path / "ck", clipseg)[1] == {"epoch": 2}
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)
    with pytest.raises(CoTexNetError, match="expected 2"):
        CoTexNet.from_pretrained(tmp_path / "ck", clipseg=clipseg, num_classes=2)


def _count_hashes(monkeypatch) -> list:
    calls = []
    real = cotexnet_module.clip_fingerprint

    def counted(clip):
        calls.append(1)
        return real(clip)

    monkeypatch.setattr(cotexnet_module, "clip_fingerprint", counted)
    return calls


def test_saving_twice_hashes_the_frozen_clip_once(clipseg, tmp_path, monkeypatch):
    model = trained_model(clipseg)
    calls = _count_hashes(monkeypatch)
    model.save_pretrained(tmp_path / "a")
    model.save_pretrained(tmp_path / "b")
    assert len(calls) == 1
    assert json.loads((tmp_path / "a" / "config.json").read_text())["base_fingerprint"] == \
        json.loads((tmp_path / "b" / "config.json").read_text())["base_fingerprint"]


def test_a_trained_encoder_is_hashed_again_after_it_changes(clipseg, inputs, monkeypatch):
    model = CoTexNet.from_clipseg(build_clipseg(tiny_clipseg_config(), seed=5), freeze_encoder=False)
    before = model.base_fingerprint()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(**inputs).logits.sum().backward()
    optimizer.step()
    calls = _count_hashes(monkeypatch)
    after = model.base_fingerprint()
    assert len(calls) == 1 and after != before
    assert model.base_fingerprint() == after and len(calls) == 1  # unchanged since: memoised
    with torch.no_grad():  # a load into the same tensors changes it too
        model.clip.text_projection.weight.mul_(2)
    assert model.base_fingerprint() != after


# --- the paper's format ---------------------------------------------------------------------
def paper_state_dict(model: CoTexNet) -> dict[str, torch.Tensor]:
    """`model` in the paper's layout (README of the parity fixture): a second vision encoder
    for the ROI, Img2text under two names, the multi-class head as `output_convolution`."""
    head = f"decoder.transposed_convolution.{len(model.decoder.transposed_convolution) - 1}."
    names = {"alpha": "weight_alpha", "var": "var", "mean": "mean"}
    paper = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.clone()
        if name in names:
            paper["clipsegp.clipseg." + names[name]] = tensor
        elif name.startswith("clip."):
            paper["clipsegp.clipseg." + name] = tensor
            if name.startswith("clip.vision_model."):
                paper["im2text." + name[len("clip."):]] = tensor.clone()
        elif name.startswith(head) and model.num_classes > 2:
            paper["clipsegp.clipseg.decoder.output_convolution." + name[len(head):]] = tensor
        elif name.startswith("decoder."):
            paper["clipsegp.clipseg." + name] = tensor
        elif name.startswith("roi_mapper."):
            paper["im2text.mapping_module." + name[len("roi_mapper."):]] = tensor
        else:
            assert name.startswith("img2text."), name
            paper["img_projection." + name[len("img2text."):]] = tensor
            paper["clipsegp.clipseg.img_projection." + name[len("img2text."):]] = tensor.clone()
    return paper


@pytest.mark.parametrize("num_classes", [2, 3])
def test_paper_import_maps_every_key(clipseg, tmp_path, num_classes):
    source = trained_model(clipseg, num_classes)
    torch.save({"model": paper_state_dict(source), "epoch": 3, "best_dice": 0.8}, tmp_path / "p.pth")
    imported, meta = paper_import.import_paper_checkpoint(tmp_path / "p.pth", clipseg)
    assert imported.num_classes == num_classes and meta == {"epoch": 3, "best_dice": 0.8}
    for name, tensor in source.state_dict().items():
        assert torch.equal(tensor, imported.state_dict()[name]), name


def test_paper_import_checks_duplicates_and_base(clipseg, tmp_path):
    source = trained_model(clipseg)
    base = paper_state_dict(source)

    def attempt(state, **kw):
        torch.save({"model": state}, tmp_path / "p.pth")
        return paper_import.import_paper_checkpoint(tmp_path / "p.pth", clipseg, **kw)[0]

    assert torch.equal(attempt(base).roi_mapper[0].weight, source.roi_mapper[0].weight)
    for duplicate in ("im2text.vision_model.post_layernorm.bias", "clipsegp.clipseg.img_projection.fc_out.bias"):
        state = dict(base, **{duplicate: base[duplicate] + 1})
        with pytest.raises(CoTexNetError, match=f"{duplicate} differs"):
            attempt(state)
    with pytest.raises(CoTexNetError, match="unknown key extra.weight"):
        attempt(dict(base, **{"extra.weight": torch.zeros(1)}))
    with pytest.raises(CoTexNetError, match="missing weight roi_mapper.3.bias"):
        attempt({k: v for k, v in base.items() if k != "im2text.mapping_module.3.bias"})

    changed = "clipsegp.clipseg.clip.text_projection.weight"
    state = dict(base, **{changed: base[changed] * 2})
    with pytest.raises(CoTexNetError, match="frozen CLIP differs from the base"):
        attempt(state)
    from_file = attempt(state, base_from_file=True)
    assert torch.equal(from_file.clip.text_projection.weight, state[changed])
    assert from_file.clipseg_hf_api is None
    assert torch.equal(clipseg.clip.text_projection.weight, base[changed])  # the given base is unchanged


def test_pickled_config_needs_explicit_trust(clipseg, tmp_path, monkeypatch):
    # The paper's files pickle a config object of a module this project does not have.
    module = tmp_path / "paper_config.py"
    module.write_text("class Config:\n    def __init__(self):\n        self.lr = 3e-4\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import paper_config

    torch.save({"model": paper_state_dict(trained_model(clipseg)), "config": paper_config.Config()},
               tmp_path / "p.pth")
    monkeypatch.delitem(sys.modules, "paper_config")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path)])
    with pytest.raises(CoTexNetError, match="trust_pickle=True"):
        paper_import.import_paper_checkpoint(tmp_path / "p.pth", clipseg)
    model, meta = paper_import.import_paper_checkpoint(tmp_path / "p.pth", clipseg, trust_pickle=True)
    assert model.num_classes == 2 and meta == {}  # the pickled config object is not a plain value


def test_import_command_line(clipseg, clipseg_folder, tmp_path, capsys):
    torch.save({"model": paper_state_dict(trained_model(clipseg, 3)), "epoch": 12}, tmp_path / "p.pth")
    paper_import.main(["--pth", str(tmp_path / "p.pth"), "--clipseg", str(clipseg_folder),
                       "--out", str(tmp_path / "ck")])
    assert "3-class checkpoint" in capsys.readouterr().out
    model, extra = load_checkpoint(tmp_path / "ck")
    assert model.num_classes == 3 and extra["epoch"] == 12
    export.main(["--checkpoint", str(tmp_path / "ck"), "--out", str(tmp_path / "full")])
    assert load_checkpoint(tmp_path / "full")[0].num_classes == 3
    with pytest.raises(SystemExit) as exit_info:
        run_cli(paper_import.main, ["--pth", str(tmp_path / "none.pth"), "--clipseg", str(clipseg_folder),
                                    "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2 and "none.pth: not found" in capsys.readouterr().err
