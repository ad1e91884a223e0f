"""The paper's protocol, one switch away: its metrics, loss, early stopping, transform, mask
reading and split files, each against the paper's computation, and `--protocol paper` end to end."""

import dataclasses
import json
import re

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from torchmetrics.classification import Accuracy, BinaryJaccardIndex
from torchvision import tv_tensors
from torchvision.transforms import v2

from common.errors import CoTexNetError
from data_process import splits as split_files
from data_process.transforms import train_scale_range, train_transform
from tests.train_fixtures import REPO, run_script, train_setup  # noqa: F401
from train_utils import data
from train_utils.config import PAPER_PROTOCOL, Config, apply_protocol, load_config
from train_utils.early_stopping import EarlyStopping
from train_utils.losses import CoTexNetLoss
from train_utils.paper_metrics import paper_batch, paper_image_stats, paper_summary

PARITY = REPO / ".." / "shared" / "parity"


def _batches(seed=0, n=3, size=(4, 1, 24, 24)):
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        probs = torch.sigmoid(torch.randn(size, generator=g) * 3)
        target = (torch.rand(size, generator=g) > 0.7).long()
        if i == 1:
            target[0] = 0  # an empty truth
        yield probs, target


def test_paper_dice_is_the_soft_dice_of_torchmetrics_1_6_averaged_over_batches():
    """DiceScore(num_classes=2) of torchmetrics 1.6 on (probabilities, integer target) of
    shape (B,1,H,W): per image 2 sum(p t) / (sum(p) + sum(t)), mean over the batch; the epoch
    value is the plain mean of the batch values."""
    values = []
    for probs, target in _batches():
        got = paper_batch(paper_image_stats(probs, target[:, 0]))
        p, t = probs.double(), target.double()
        expected = (2 * (p * t).sum((1, 2, 3)) / (p.sum((1, 2, 3)) + t.sum((1, 2, 3)))).mean().item()
        assert got["paper_dice"] == pytest.approx(expected, abs=1e-6)
        values.append(got)
    assert paper_summary(values)["paper_dice"] == pytest.approx(np.mean([v["paper_dice"] for v in values]))
    # A soft Dice: a perfect but unsure prediction (p = 0.6 on the truth, 0.4 elsewhere) is not 1.
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    target[0, :4] = 1
    unsure = torch.where(target.bool(), 0.6, 0.4)
    assert paper_batch(paper_image_stats(unsure, target))["paper_dice"] == pytest.approx(2 * 19.2 / (32 + 32))  # 0.6


def test_paper_dice_equals_torchmetrics_1_6_dicescore():
    import torchmetrics

    # requirement.txt holds torchmetrics below 1.7: from 1.7 on DiceScore argmaxes float inputs, so on
    # probabilities it no longer computes the paper's soft Dice.
    assert torchmetrics.__version__.startswith("1.6."), torchmetrics.__version__
    from torchmetrics.segmentation import DiceScore

    for probs, target in _batches():
        got = paper_batch(paper_image_stats(probs, target[:, 0]))["paper_dice"]
        assert got == pytest.approx(DiceScore(num_classes=2)(probs, target).item(), abs=1e-6)


def test_paper_iou_acc_miou_match_torchmetrics_per_batch():
    for probs, target in _batches(seed=1):
        got = paper_batch(paper_image_stats(probs, target[:, 0]))
        assert got["paper_iou"] == pytest.approx(BinaryJaccardIndex()(probs, target).item(), abs=1e-6)
        assert got["paper_acc"] == pytest.approx(Accuracy(task="binary")(probs, target).item(), abs=1e-6)
        hard = probs > 0.5
        inter = (hard & target.bool()).sum((1, 2, 3)).double()
        union = (hard | target.bool()).sum((1, 2, 3)).double()
        miou = torch.where(union > 0, inter / union.clamp(min=1), 0.0).mean().item()  # 1.6: empty/empty is 0
        assert got["paper_miou"] == pytest.approx(miou, abs=1e-6)


def test_paper_figures_of_a_batch_do_not_depend_on_how_it_was_split():
    probs, target = next(_batches(seed=2, size=(6, 1, 16, 16)))
    whole = paper_batch(paper_image_stats(probs, target[:, 0]))
    parts = paper_image_stats(probs[:3], target[:3, 0]) + paper_image_stats(probs[3:], target[3:, 0])
    assert paper_batch(parts) == pytest.approx(whole)


@pytest.mark.skipif(not (PARITY / "README.md").is_file(), reason=f"parity fixture not present at {PARITY}")
def test_paper_probabilities_loss_reproduces_the_papers_loss():
    from types import SimpleNamespace

    inputs = load_file(PARITY / "inputs.safetensors")
    expected = load_file(PARITY / "expected_binary.safetensors")
    output = SimpleNamespace(logits=expected["train.logits"], text_embedding=expected["train.conditional_embeddings"],
                             img_embedding=expected["train.img_embedding"])
    label = inputs["target_binary"][:, 0]
    paper = CoTexNetLoss(2, loss_input="paper_probabilities")(output, label)
    torch.testing.assert_close(paper["seg"], expected["train.loss_seg"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(paper["loss"], expected["train.loss_total"], atol=1e-5, rtol=1e-5)
    ours = CoTexNetLoss(2)(output, label)
    assert abs(ours["seg"] - paper["seg"]) > 1e-3  # the fix changes the value
    with pytest.raises(ValueError, match="paper_probabilities"):
        CoTexNetLoss(3, loss_input="paper_probabilities")


def _run(stopper, scores):
    best, stop_at = [], None
    for epoch, score in enumerate(scores, 1):
        if stopper.update(epoch, score):
            best.append(epoch)
        if stopper.should_stop:
            stop_at = epoch
            break
    return best, stop_at


def test_paper_early_stopping_takes_the_first_score_after_the_grace_as_reference():
    # epochs 10: grace 2, the paper consults it from 0-based index 3 (epoch 4) on.
    scores = [0.9, 0.1, 0.2, 0.5, 0.4, 0.6, 0.55, 0.5, 0.58, 0.3]
    best, stop = _run(EarlyStopping(patience=3, epochs=10, rule="paper"), scores)
    # reference 0.5 at epoch 4 (not 0.9 of epoch 1); 0.4 < 0.5: 1; 0.6 resets; 0.55, 0.5, 0.58 < 0.6: stop.
    assert (best, stop) == ([1], 9)
    best, stop = _run(EarlyStopping(patience=3, epochs=10, rule="best"), scores)
    # ours: against the best (0.9): epochs 3.. count after the grace (epoch > 2).
    assert (best, stop) == ([1], 5)


def test_paper_best_epoch_starts_at_zero_and_needs_strictly_more():
    stopper = EarlyStopping(patience=5, epochs=10, rule="paper")
    assert [stopper.update(e, s) for e, s in enumerate([0.0, 0.3, 0.3, 0.4], 1)] == [False, True, False, True]
    assert EarlyStopping(5, 10, "best").update(1, 0.0)  # ours: the first epoch is a best even at 0
    restored = EarlyStopping(5, 10, "paper")
    restored.load_state_dict(stopper.state_dict())
    assert restored.state_dict() == stopper.state_dict()


def test_train_transform_draws_212_to_268_and_pads_right_and_bottom():
    transform = train_transform(224)
    assert train_scale_range(224) == (212, 268)
    resize = next(step for step in transform.transforms if isinstance(step, v2.RandomResize))
    torch.manual_seed(0)
    image = tv_tensors.Image(torch.zeros(1, 10, 20, dtype=torch.uint8))
    sides = {resize(image).shape[-2] for _ in range(3000)}
    assert sides == set(range(212, 269))
    # A square image drawn below 224 (about 12 draws in 57) is padded with zeros at the right
    # and bottom only: the mask is 1 on a top-left square and 0 on the rest.
    torch.manual_seed(3)
    ones = tv_tensors.Image(torch.full((3, 100, 100), 255, dtype=torch.uint8))
    mask = tv_tensors.Mask(torch.ones(100, 100, dtype=torch.long))
    padded = []
    for _ in range(60):
        pixels, label = transform(ones, mask)
        if (label == 0).any():
            side = int(label[0].sum())
            assert 212 <= side < 224 and label[:side, :side].all() and not label[side:].any() \
                and not label[:, side:].any()
            assert (pixels[:, :, side:] == pixels[:, -1:, -1:]).all()  # each channel: zero before normalisation
            padded.append(side)
    assert padded


def test_protocol_preset_changes_exactly_the_readme_table_keys():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## What differs from the paper's code, and why")[1].split("\n## ")[0]
    cells = re.findall(r"`((?:TRAIN|DATASET|MODEL)\.\w+)`\s*\(paper:\s*`([^`]+)`\)", section)
    table = {key: value for key, value in cells}
    assert table, "the README table names no switch"
    assert {key: str(value).lower() for key, value in PAPER_PROTOCOL.items()} == table
    # Every other key keeps the value it had, from the defaults or from a user's config.
    for base in (Config(), load_config(REPO / "dataset_config" / "demo_config.yaml", ["TRAIN.global_batch=false"])):
        paper = apply_protocol(base, "paper")
        changed = {f"{s.name}.{f.name}" for s in dataclasses.fields(Config)
                   for f in dataclasses.fields(s.default_factory)
                   if getattr(getattr(base, s.name), f.name) != getattr(getattr(paper, s.name), f.name)}
        assert changed <= set(PAPER_PROTOCOL)
        assert all(getattr(getattr(paper, k.split(".")[0]), k.split(".")[1]) == v for k, v in PAPER_PROTOCOL.items())
    assert apply_protocol(Config(), "ours") == Config()


@pytest.mark.parametrize("override, words", [
    ("TRAIN.select_metric=soft", ["TRAIN.select_metric", "dice or paper_dice"]),
    ("TRAIN.early_stopping=first", ["TRAIN.early_stopping", "best or paper"]),
    ("TRAIN.loss_input=probs", ["TRAIN.loss_input"]),
    ("DATASET.binarize=otsu", ["DATASET.binarize", "registry or paper"]),
    ("TRAIN.global_batch=2", ["TRAIN.global_batch", "expected bool"]),
])
def test_bad_switch_values_name_the_key(override, words):
    with pytest.raises(CoTexNetError) as err:
        load_config(None, [override])
    assert all(word in str(err.value) for word in words)
    with pytest.raises(CoTexNetError, match="binary datasets only"):
        load_config(None, ["DATASET.num_classes=3"], protocol="paper")


def test_global_batch_splits_over_processes_or_refuses():
    cfg = load_config(None, ["TRAIN.batch_size=16"])
    assert [data.process_batch_size(cfg, n) for n in (1, 2, 4, 16)] == [16, 8, 4, 1]
    with pytest.raises(CoTexNetError, match=r"TRAIN.batch_size: 16 does not divide over 3 processes"):
        data.process_batch_size(cfg, 3)
    assert data.process_batch_size(load_config(None, ["TRAIN.global_batch=false"]), 3) == 16


def test_shipped_configs_spell_out_the_switches_at_our_values():
    import yaml

    defaults = Config()
    for name in ("train_config.yaml", "demo_config.yaml"):
        shipped = yaml.safe_load((REPO / "dataset_config" / name).read_text())
        for key in PAPER_PROTOCOL:
            section, field = key.split(".")
            assert shipped[section][field] == getattr(getattr(defaults, section), field), (name, key)


def test_papers_split_files_load_with_their_alias(tmp_path, capsys):
    # As the paper's published val_data.csv: its rows are named kvasir_polyp.
    pd.DataFrame(dict(dataset=["kvasir_polyp"] * 2 + ["clinicdb"], img_name=["a.jpg", "b.jpg", "c.png"],
                      mask_name=["a.jpg", "b.jpg", "c.png"])).to_csv(tmp_path / "val_data.csv", index=False)
    rows = split_files.read(tmp_path).of("kvasir", tmp_path / "kvasir").split("val")
    assert list(rows["img_name"]) == ["a.jpg", "b.jpg"]
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and "'kvasir_polyp'" in warning[0] and "read as 'kvasir'" in warning[0]


@pytest.mark.slow
def test_protocol_paper_end_to_end(train_setup, tmp_path):  # noqa: F811
    result = run_script("train.py", "--config", train_setup["config"], "--protocol", "paper",
                        "TRAIN.run_name=paper", "TRAIN.epochs=2")
    run = train_setup["runs"] / "paper"
    saved = load_config(run / "config.yaml")
    for key, value in PAPER_PROTOCOL.items():
        section, field = key.split(".")
        assert getattr(getattr(saved, section), field) == value
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["select_metric"] == "paper_dice"
    for split in ("val", "test"):
        assert {"dice", "iou", "paper_dice", "paper_iou", "paper_acc", "paper_miou"} <= set(metrics[split])
        assert metrics[split]["paper_batch_size"] == 2  # the 2 images of the split, batch 4
    log = pd.read_csv(run / "log.csv")
    assert {"val_dice", "val_paper_dice", "best_paper_dice"} <= set(log.columns)
    assert {"dice", "paper_dice"} <= set(pd.read_csv(run / "test_per_image.csv").columns)
    assert "paper_dice" in result.stdout and "compare these with the paper's tables" in result.stdout
    out = tmp_path / "eval"
    run_script("evaluate.py", "--run", run, "--protocol", "paper", "--out", out, "--overlays", "0")
    evaluated = json.loads((out / "metrics.json").read_text())
    assert 0 <= evaluated["paper_dice"] <= 1 and "dice" in pd.read_csv(out / "per_image.csv").columns
    refused = run_script("train.py", "--resume", run, "--protocol", "paper", check=False)
    assert refused.returncode == 2 and "--protocol" in refused.stderr

