"""The training config: the shipped YAMLs load, overrides apply, mistakes name the key."""

import dataclasses

import pytest

from common.errors import CoTexNetError
from tests.train_fixtures import REPO
from train_utils.config import Config, load_config
from train_utils.early_stopping import EarlyStopping
from train_utils.optim import build_scheduler


def test_paper_defaults_load():
    cfg = load_config(REPO / "dataset_config" / "train_config.yaml")
    assert cfg == Config()  # the YAML and the dataclass defaults tell the same story
    t = cfg.TRAIN
    assert (t.random_seed, t.input_size, t.batch_size, t.epochs, t.lr, t.warmup_lr, t.patience) == \
        (666, 224, 16, 500, 3e-4, 3e-5, 50)
    assert cfg.MODEL.clipseg_hf_api == "CIDAS/clipseg-rd64-refined"


def test_demo_config_loads():
    cfg = load_config(REPO / "dataset_config" / "demo_config.yaml")
    assert cfg.DATASET.dataset_name == "synthetic"


def test_overrides_are_typed():
    cfg = load_config(None, ["TRAIN.epochs=5", "TRAIN.lr=1e-3", "DATASET.dataset_name=clinicdb", "TRAIN.amp=false",
                             "DATASET.keyword=null"])
    assert (cfg.TRAIN.epochs, cfg.TRAIN.lr, cfg.DATASET.dataset_name, cfg.TRAIN.amp) == (5, 1e-3, "clinicdb", False)
    assert isinstance(load_config(None, ["TRAIN.lr=1"]).TRAIN.lr, float)  # an int is a fine float


@pytest.mark.parametrize("override, words", [
    ("TRAIN.epoch=5", ["TRAIN.epoch", "did you mean TRAIN.epochs"]),
    ("TRIAN.lr=0.1", ["TRIAN.lr", "did you mean TRAIN.lr"]),
    ("TRAIN.batch_size=abc", ["TRAIN.batch_size", "expected int", "'abc'"]),
    ("TRAIN.batch_size=2.5", ["TRAIN.batch_size", "expected int"]),
    ("TRAIN.epochs=true", ["TRAIN.epochs", "expected int"]),
    ("TRAIN.amp=1", ["TRAIN.amp", "expected bool"]),
    ("TRAIN.lr=fast", ["TRAIN.lr", "expected float"]),
    ("TRAIN.batch_size=0", ["TRAIN.batch_size", ">= 1"]),
    ("TRAIN.lr=-0.001", ["TRAIN.lr", "> 0"]),
    ("DATASET.num_classes=1", ["DATASET.num_classes", ">= 2"]),
    ("TRAIN.train_data_ratio=1.5", ["TRAIN.train_data_ratio"]),
    ("TRAIN.warmup_epoch=600", ["TRAIN.warmup_epoch", "below TRAIN.epochs"]),
    ("TRAIN.start_epoch=10", ["TRAIN.start_epoch", "--resume"]),
    ("TRAIN.device=gpu", ["TRAIN.device", "auto, cpu or cuda"]),
    ("TRAIN.epochs", ["TRAIN.epochs", "SECTION.key=value"]),
])
def test_bad_override_names_the_key(override, words):
    with pytest.raises(CoTexNetError) as err:
        load_config(None, [override])
    for word in words:
        assert word in str(err.value)


def test_the_papers_yaml_keys_load_and_mean_what_they_say(tmp_path):
    # The paper's train_config.yaml carries MODEL.model_name, TRAIN.start_epoch and DATASET.num_classes.
    path = tmp_path / "paper.yaml"
    path.write_text("MODEL:\n  model_name: CoTexNet\nDATASET:\n  dataset_name: kvasir\n  num_classes: 2\n"
                    "TRAIN:\n  start_epoch: 0\n  epochs: 500\n")
    cfg = load_config(path)
    assert (cfg.num_classes(), cfg.TRAIN.epochs) == (2, 500)
    assert load_config(None, ["DATASET.dataset_name=camus"]).num_classes() == 4  # null: the registry's
    path.write_text("MODEL:\n  model_name: UNet\n")
    with pytest.raises(CoTexNetError, match="MODEL.model_name"):
        load_config(path)


def test_typo_in_yaml_file_names_file_and_key(tmp_path):
    path = tmp_path / "my.yaml"
    path.write_text("TRAIN:\n  batch_szie: 8\n")
    with pytest.raises(CoTexNetError, match=r"my.yaml.*TRAIN.batch_szie.*did you mean TRAIN.batch_size"):
        load_config(path)
    path.write_text("TRAIN: 5\n")
    with pytest.raises(CoTexNetError, match="must be a mapping"):
        load_config(path)
    with pytest.raises(CoTexNetError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    path.write_bytes("TRAIN:\n  run_name: caf\xe9\n".encode("latin-1"))  # saved by an old Windows editor
    with pytest.raises(CoTexNetError, match=r"my.yaml: not UTF-8 text.*save it as UTF-8"):
        load_config(path)


def test_early_stopping_counts_patience_after_the_first_fifth():
    stopper = EarlyStopping(patience=3, epochs=20)  # grace: epochs 1..4
    scores = [0.0] + [0.0] * 3  # epoch 1 is a best even at Dice 0; 2..4 are in the grace period
    for epoch, score in enumerate(scores, 1):
        stopper.update(epoch, score)
    assert (stopper.best_epoch, stopper.bad_epochs, stopper.should_stop) == (1, 0, False)
    for epoch in (5, 6, 7):
        stopper.update(epoch, 0.0)
    assert stopper.should_stop
    restored = EarlyStopping(3, 20)
    restored.load_state_dict(stopper.state_dict())
    assert restored.state_dict() == stopper.state_dict()


def test_schedule_warms_up_then_decays_to_zero():
    import torch

    cfg = load_config(None, ["TRAIN.epochs=10", "TRAIN.warmup_epoch=2", "TRAIN.lr=1e-3", "TRAIN.warmup_lr=1e-4"])
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.TRAIN.lr)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch=5)
    lrs = []
    for step in range(1, 51):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step_update(step)  # after the step-th optimiser step, as train_one_epoch does
    assert lrs[0] == pytest.approx(1e-4)
    assert max(lrs) == pytest.approx(1e-3) and lrs.index(max(lrs)) == 10  # end of warm-up
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))  # then only down
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0, abs=1e-12)


def test_shipped_yaml_spells_out_the_dataclass_defaults():
    """The dataclasses are the one home of the defaults; the shipped YAML shows every key with
    the same value, so that users see what they can change and what they get."""
    import yaml

    shipped = yaml.safe_load((REPO / "dataset_config" / "train_config.yaml").read_text())
    for section in dataclasses.fields(Config):
        assert set(shipped[section.name]) == {f.name for f in dataclasses.fields(section.default_factory)}
    assert load_config(REPO / "dataset_config" / "train_config.yaml") == Config()
