"""The dataset registry: what each dataset's files are like, from `dataset_config/datasets.yaml`.

Every dataset quirk (file formats, mask names, mask encoding and layout, keyword, categories,
aliases) is an entry there; the stages ask `get_spec` instead of testing dataset names. A name
that is not listed gets the defaults.

Mask layouts (`mask_layout`): "single" = one mask file per image, `masks/<name>`;
"per_category" = one binary mask per image and category, `masks/<k or keyword>/<name>`. In both
a mask is named by `<name>` (relative to `masks/`, resp. to each category folder).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import yaml

from common.errors import CoTexNetError

REGISTRY_FILE = Path(__file__).resolve().parents[1] / "dataset_config" / "datasets.yaml"


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    keyword: str
    image_ext: str
    mask_ext: str
    mask_encoding: str
    mask_suffix: str = ""
    mask_prefix: str = ""
    categories: tuple[str, ...] = ()
    mask_layout: str = "single"
    mask_threshold: int = 128  # binary masks: foreground = brightest channel >= this (0/1 masks: 1)
    aliases: tuple[str, ...] = ()  # other names of the dataset in split files (the paper's "kvasir_polyp")

    @property
    def num_classes(self) -> int:
        """Classes the model predicts, background counted."""
        return len(self.categories) + 1 if self.categories else 2


@functools.cache
def _registry() -> dict:
    try:
        return yaml.safe_load(REGISTRY_FILE.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise CoTexNetError(f"{REGISTRY_FILE}: cannot read the dataset registry ({err})") from err


def known_datasets() -> list[str]:
    return list(_registry()["datasets"])


def get_spec(name: str, keyword: str | None = None) -> DatasetSpec:
    """The spec of dataset `name` (case ignored; an unknown name gets the defaults). `keyword` replaces
    the registry's keyword; of a multi-class dataset, a comma-separated list the category keywords."""
    registry = _registry()
    entries = {key.lower(): value for key, value in registry["datasets"].items()}
    fields = {**registry["defaults"], **(entries.get(name.lower()) or {})}
    fields["categories"] = tuple(fields.get("categories") or ())
    fields["aliases"] = tuple(str(alias) for alias in fields.get("aliases") or ())
    if keyword:
        words = tuple(word.strip() for word in keyword.split(","))
        if fields["categories"]:
            if len(words) != len(fields["categories"]):
                raise CoTexNetError(f"keywords: {name} has {len(fields['categories'])} categories, "
                                    f"got {len(words)} comma-separated keywords")
            fields["categories"] = words
        else:
            fields["keyword"] = keyword.strip()
    unknown = set(fields) - set(DatasetSpec.__dataclass_fields__)
    if unknown:
        raise CoTexNetError(f"{REGISTRY_FILE}: {name}: unknown keys {sorted(unknown)}")
    if fields["mask_encoding"] not in ("binary", "labelmap"):
        raise CoTexNetError(f"{REGISTRY_FILE}: {name}: mask_encoding must be binary or labelmap")
    if fields.get("mask_layout", "single") not in ("single", "per_category"):
        raise CoTexNetError(f"{REGISTRY_FILE}: {name}: mask_layout must be single or per_category")
    if fields.get("mask_layout") == "per_category" and (fields["mask_encoding"] != "binary" or not fields["categories"]):
        raise CoTexNetError(f"{REGISTRY_FILE}: {name}: mask_layout per_category needs categories "
                            "and mask_encoding binary (each file is one category's binary mask)")
    if not isinstance(fields.get("mask_threshold", 128), int) or not 1 <= fields.get("mask_threshold", 128) <= 255:
        raise CoTexNetError(f"{REGISTRY_FILE}: {name}: mask_threshold must be an integer 1..255")
    fields = {key: ("" if value is None else value) for key, value in fields.items()}
    return DatasetSpec(name=name, **fields)
