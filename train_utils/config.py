"""The training configuration: the paper's YAML keys, KEY=VALUE overrides, validation.

`load_config(path, overrides)` reads `dataset_config/train_config.yaml` (or any file with the
same sections), applies overrides such as `TRAIN.epochs=5`, checks every key and value, and
returns a `Config` of plain dataclasses. A typo, a wrong type or an impossible value is a
`CoTexNetError` naming the key (and the closest known key, for typos).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from common.errors import CoTexNetError, not_utf8
from data_process import layout
from data_process.registry import REGISTRY_FILE, DatasetSpec, get_spec, known_datasets
from train_utils.trackers import check_trackers

# Keys of the paper's YAML that can hold one value only: a file that has them is read (the paper's,
# and runs of earlier versions, carry them), another value is refused, saying why.
ONE_VALUE_KEYS = {"MODEL.model_name": ("CoTexNet", "the only model here"),
                  "TRAIN.start_epoch": (0, "continue a run with `train.py --resume RUN_DIR`, which restores the "
                                           "optimizer, schedule and RNG as well")}


@dataclass
class ModelConfig:
    clipseg_hf_api: str = "CIDAS/clipseg-rd64-refined"  # hub id or a local from_pretrained folder


@dataclass
class DatasetConfig:
    dataset_name: str | list[str] = "kvasir"  # a list trains on several datasets at once, mixed in every batch
    num_classes: int | None = None  # categories + 1 background; null: the registry's; given: checked against it
    root_dir: str = "data_process"  # <root_dir>/<dataset_name>/{images,masks,ROIs}
    split_dir: str = "data_process"  # {train,val,test}_data.csv
    text_csv: str | list[str] = ""  # "" = text_file/<dataset_name>/<dataset_name>_text_out.csv; a list: one per dataset
    keyword: str | None = None  # only for datasets the registry does not know
    binarize: str = "registry"  # registry: the dataset's mask threshold on the brightest channel; paper: 8-bit grey first
    augmented: bool = True  # also train on the copies in <split_dir>/train_augmented.csv (augment_data.py)
    allow_split_overlap: bool = False  # an image in two splits is an error unless true (a benchmark that means it)


@dataclass
class TrainConfig:
    device: str = "auto"  # auto | cpu | cuda; several GPUs: `accelerate launch train.py`
    random_seed: int = 666
    input_size: int = 224
    train_data_ratio: float = 1.0  # fraction of the training split used (seeded subset)
    batch_size: int = 16
    global_batch: bool = True  # batch_size is the batch over all processes (the paper's lr holds on N GPUs)
    num_workers: int = 4
    epochs: int = 500
    lr: float = 3e-4
    warmup_lr: float = 3e-5
    warmup_epoch: int = 0
    lr_schedule: str = "warmup_cosine"  # after a warm-up: warmup_cosine, reach lr then a cosine | paper (train_utils/optim.py)
    weight_decay: float = 1e-4
    patience: int = 50  # counted only after the first fifth of the epochs
    print_freq: int = 10  # iterations between progress-bar loss updates
    save_best: bool = True  # keep the best validation score and test it; False: test the last
    select_metric: str = "dice"  # best epoch and early stopping: dice (hard, per image) | paper_dice (soft, batch mean)
    early_stopping: str = "best"  # best: against the best so far | paper: the paper's rule (train_utils/early_stopping.py)
    loss_input: str = "logits"  # logits | paper_probabilities (the paper's DiceCE on sigmoid outputs; binary)
    amp: bool = True  # bf16 autocast, the frozen CLIP kept in bf16 (fp16 + grad scaler on GPUs without bf16)
    compile: bool = False  # torch.compile of the frozen encoder and the decoder (README: Speed)
    seg_weight: float = 1.0
    kl_weight: float = 10.0
    cpu_threads: int = 0  # torch intra-op threads; 0 = torch's default
    num_overlays: int = 4  # validation images drawn each time the best improves
    feature_cache_mb: int = 512  # frozen validation features kept in memory; the rest on disk in the run folder
    run_dir: str = "runs"
    run_name: str = ""  # "" = <dataset_name>_<date-time>
    select_overall: str = "images"  # several datasets: the best epoch has the best Dice over all images, or over datasets
    log_with: list[str] = field(default_factory=list)  # experiment trackers, e.g. [tensorboard]; [] = none


@dataclass
class Config:
    MODEL: ModelConfig = field(default_factory=ModelConfig)
    DATASET: DatasetConfig = field(default_factory=DatasetConfig)
    TRAIN: TrainConfig = field(default_factory=TrainConfig)

    def datasets(self) -> list[str]:
        """The names of the datasets trained on: one, or several (DATASET.dataset_name a list)."""
        name = self.DATASET.dataset_name
        return list(name) if isinstance(name, list) else [name]

    def text_csvs(self) -> dict[str, Path]:
        """Dataset name -> its text CSV (DATASET.text_csv, in the order of the names, "" = the default)."""
        given = self.DATASET.text_csv
        given = given if isinstance(given, list) else [given] * len(self.datasets())
        return {name: Path(path) if path else layout.text_csv(name) for name, path in zip(self.datasets(), given,
                                                                                          strict=True)}

    def spec(self, name: str | None = None) -> DatasetSpec:
        """The registry entry of dataset `name` (default: the first configured), with DATASET.keyword."""
        return get_spec(name or self.datasets()[0], self.DATASET.keyword)

    def num_classes(self) -> int:
        """Categories + 1 background: DATASET.num_classes where given, else the registry's."""
        return self.DATASET.num_classes or self.spec().num_classes

    def check_num_classes(self, predicted: int | None = None) -> None:
        """The registry gives every configured dataset the same class count, the one DATASET.num_classes
        gives where set, and the one a trained run `predicted`s where evaluated on another dataset."""
        counts = {name: self.spec(name).num_classes for name in self.datasets()}
        if len(set(counts.values())) > 1:
            listed = ", ".join(f"{name} {count}" for name, count in counts.items())
            raise CoTexNetError(f"DATASET.dataset_name: datasets trained together must have the same classes; "
                                f"the registry gives {listed} (categories + 1 background)")
        (name, count), given = next(iter(counts.items())), self.DATASET.num_classes
        if predicted is not None and predicted != count:
            raise CoTexNetError(f"--dataset {name}: it has {count} classes (categories + 1 background) but the run "
                                f"predicts {predicted}; evaluate it with a run trained for its classes")
        if given is not None and given != count:
            where = (f"{REGISTRY_FILE} gives {name} {count}" if name.lower() in map(str.lower, known_datasets())
                     else f"{name} is not in {REGISTRY_FILE}, so it is binary: 2")
            raise CoTexNetError(f"DATASET.num_classes: {given}, but {where} (categories + 1 background); fix the "
                                "config or the registry entry")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _suggest(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.5)
    return f" (did you mean {close[0]}?)" if close else f" (known: {', '.join(known)})"


def _check_type(key: str, value, hint):
    """Return `value` as the field's type, or raise naming the key. int is accepted for float."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return None
    for kind in allowed:
        # bool is an int subclass in Python: `epochs: true` must not pass as 1. PyYAML reads 1e-3
        # (no dot) as a string: a float field accepts what float() accepts.
        if kind is float and isinstance(value, int | float | str) and not isinstance(value, bool):
            try:
                number = float(value)
            except ValueError:
                continue
            if not math.isfinite(number):  # inf or nan would train on, to a checkpoint of NaNs
                raise CoTexNetError(f"{key}: {value!r} is not a finite number")
            return number
        if kind in (int, str) and type(value) is kind:
            return value
        if kind is str and type(value) is int:  # YAML reads a name such as 2018 as a number
            return str(value)
        if kind is bool and isinstance(value, bool):
            return value
        if typing.get_origin(kind) is list and isinstance(value, list) and all(type(v) in (str, int) for v in value):
            return [str(v) for v in value]
    names = " or ".join("null" if k is type(None) else "list of str" if typing.get_origin(k) is list else k.__name__
                        for k in allowed)
    raise CoTexNetError(f"{key}: expected {names}, got {value!r} ({type(value).__name__})")


def _set(config: Config, key: str, value) -> None:
    if key in ONE_VALUE_KEYS:
        only, why = ONE_VALUE_KEYS[key]
        if value != only or type(value) is not type(only):
            raise CoTexNetError(f"{key}: {value!r} must be {only!r} ({why}), or the key left out")
        return
    section_name, _, field_name = key.partition(".")
    sections = {f.name: f.default_factory for f in dataclasses.fields(Config)}
    hints = typing.get_type_hints(sections[section_name]) if section_name in sections else {}
    if field_name not in hints:
        raise CoTexNetError(f"unknown config key {key!r}{_suggest(key, _all_keys())}")
    setattr(getattr(config, section_name), field_name, _check_type(key, value, hints[field_name]))


def _all_keys() -> list[str]:
    return [f"{s.name}.{f.name}" for s in dataclasses.fields(Config) for f in dataclasses.fields(s.default_factory)]


def _validate(config: Config) -> None:
    t, d, names = config.TRAIN, config.DATASET, config.datasets()
    rules = [
        ("DATASET.num_classes", d.num_classes is None or d.num_classes >= 2,
         "must be >= 2 (categories + 1 background; binary is 2), or null for the registry's"),
        ("DATASET.dataset_name", bool(names) and all(n.strip() for n in names), "must not be empty"),
        ("DATASET.dataset_name", len(set(names)) == len(names), "names a dataset twice"),
        ("DATASET.text_csv", len(d.text_csv) == len(names) if isinstance(d.text_csv, list)
         else len(names) == 1 or not d.text_csv,
         f"must be a list of one path per dataset of DATASET.dataset_name ({len(names)}; \"\" = that dataset's "
         "default), or \"\" for every default"),
        ("DATASET.keyword", len(names) == 1 or d.keyword is None, "must be null with several datasets (it would "
         "replace every dataset's keyword): give each its keyword in dataset_config/datasets.yaml"),
        ("TRAIN.select_overall", t.select_overall in ("images", "datasets"), "must be images or datasets"),
        ("TRAIN.select_overall", t.select_overall == "images" or t.select_metric == "dice",
         "datasets needs TRAIN.select_metric dice (the paper's figures are means over mixed batches, not per dataset)"),
        ("DATASET.binarize", d.binarize in ("registry", "paper"), "must be registry or paper"),
        ("TRAIN.select_metric", t.select_metric in ("dice", "paper_dice"), "must be dice or paper_dice"),
        ("TRAIN.select_metric", t.select_metric == "dice" or config.num_classes() == 2,
         "paper_dice is defined for binary datasets only (DATASET.num_classes 2)"),
        ("TRAIN.early_stopping", t.early_stopping in ("best", "paper"), "must be best or paper"),
        ("TRAIN.loss_input", t.loss_input in ("logits", "paper_probabilities"), "must be logits or paper_probabilities"),
        ("TRAIN.lr_schedule", t.lr_schedule in ("warmup_cosine", "paper"), "must be warmup_cosine or paper"),
        ("TRAIN.loss_input", t.loss_input == "logits" or config.num_classes() == 2,
         "paper_probabilities is for binary datasets only (DATASET.num_classes 2)"),
        ("TRAIN.device", t.device in ("auto", "cpu", "cuda"), "must be auto, cpu or cuda"),
        ("TRAIN.random_seed", 0 <= t.random_seed < 2**32, "must be in 0..2**32-1 (what numpy's seeding takes)"),
        ("TRAIN.input_size", t.input_size >= 32 and t.input_size % 16 == 0, "must be a multiple of 16, at least 32"),
        ("TRAIN.train_data_ratio", 0 < t.train_data_ratio <= 1, "must be in (0, 1]"),
        ("TRAIN.batch_size", t.batch_size >= 1, "must be >= 1"),
        ("TRAIN.num_workers", t.num_workers >= 0, "must be >= 0"),
        ("TRAIN.epochs", t.epochs >= 1, "must be >= 1"),
        ("TRAIN.lr", t.lr > 0, "must be > 0"),
        ("TRAIN.warmup_lr", t.warmup_lr > 0, "must be > 0 (the learning rate the warm-up starts from)"),
        ("TRAIN.warmup_lr", t.warmup_epoch == 0 or t.warmup_lr <= t.lr,
         f"must be <= TRAIN.lr ({t.lr!r}): the warm-up rises from it to TRAIN.lr"),
        ("TRAIN.warmup_epoch", 0 <= t.warmup_epoch < t.epochs, "must be >= 0 and below TRAIN.epochs"),
        ("TRAIN.weight_decay", t.weight_decay >= 0, "must be >= 0"),
        ("TRAIN.patience", t.patience >= 1, "must be >= 1"),
        ("TRAIN.print_freq", t.print_freq >= 1, "must be >= 1"),
        ("TRAIN.seg_weight", t.seg_weight >= 0, "must be >= 0"),
        ("TRAIN.kl_weight", t.kl_weight >= 0, "must be >= 0"),
        ("TRAIN.cpu_threads", t.cpu_threads >= 0, "must be >= 0"),
        ("TRAIN.num_overlays", t.num_overlays >= 0, "must be >= 0"),
        ("TRAIN.feature_cache_mb", t.feature_cache_mb >= 0, "must be >= 0"),
    ]
    for key, ok, why in rules:
        if not ok:
            value = getattr(getattr(config, key.split(".")[0]), key.split(".")[1])
            raise CoTexNetError(f"{key}: {value!r} {why}")
    t.log_with = check_trackers(t.log_with, installed=False)


# `--protocol paper`: every switch at the paper's value (README, "What differs from the paper's
# code"); applied on top of the config file and the overrides.
PAPER_PROTOCOL = {"TRAIN.select_metric": "paper_dice", "TRAIN.early_stopping": "paper",
                  "TRAIN.loss_input": "paper_probabilities", "TRAIN.lr_schedule": "paper",
                  "TRAIN.global_batch": True, "DATASET.binarize": "paper"}
PROTOCOLS = ("ours", "paper")


def apply_protocol(config: Config, protocol: str) -> Config:
    """`config` with the preset of `protocol` set on top ("ours" changes nothing); validated."""
    if protocol not in PROTOCOLS:
        raise CoTexNetError(f"--protocol {protocol}: expected one of {', '.join(PROTOCOLS)}")
    config = copy.deepcopy(config)
    if protocol == "paper":
        for key, value in PAPER_PROTOCOL.items():
            _set(config, key, value)
    _validate(config)
    return config


def parse_override(text: str) -> tuple[str, object]:
    """`TRAIN.epochs=5` -> ("TRAIN.epochs", 5); the value is read as YAML (numbers, true, null)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise CoTexNetError(f"override {text!r}: expected SECTION.key=value, e.g. TRAIN.epochs=5")
    try:
        return key.strip(), yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise CoTexNetError(f"override {text!r}: the value is not valid YAML ({err.problem})") from err


def load_config(path: str | Path | None, overrides: list[str] = (), protocol: str = "ours") -> Config:
    """Defaults <- the YAML file at `path` (if given) <- `overrides` <- the `protocol` preset; validated."""
    config = Config()
    if path is not None:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except OSError as err:
            raise CoTexNetError(f"{path}: cannot read the config ({err.strerror})") from err
        except UnicodeDecodeError as err:
            raise not_utf8(path, err) from err
        except yaml.YAMLError as err:
            raise CoTexNetError(f"{path}: not valid YAML ({err})") from err
        if not isinstance(data, dict):
            raise CoTexNetError(f"{path}: expected sections MODEL, DATASET, TRAIN at the top level")
        for section, values in data.items():
            if not isinstance(values, dict):
                raise CoTexNetError(f"{path}: section {section!r} must be a mapping of keys{_suggest(str(section), ['MODEL', 'DATASET', 'TRAIN'])}")
            for key, value in values.items():
                try:
                    _set(config, f"{section}.{key}", value)
                except CoTexNetError as err:
                    raise CoTexNetError(f"{path}: {err}") from None
    for text in overrides:
        _set(config, *parse_override(text))
    return apply_protocol(config, protocol)
