"""Checkpoint folders on disk: pickle-free, and never taken for complete when half-written.

A folder holds `model.safetensors` (a state dict) and `config.json`: the model's config, the
SHA-256 of the weights file and the caller's `extra` (e.g. epoch and metrics). config.json is
written last and names the weights it belongs to. Which weights and which config a model
stores is the model's own business (`CoTexNet.save_pretrained` and `from_pretrained`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from common.atomic import atomic_path, write_json
from common.errors import CoTexNetError

WEIGHTS, CONFIG = "model.safetensors", "config.json"
FORMAT, VERSION = "cotexnet-checkpoint", 1
_TYPES = {"weights_sha256": (str,), "extra": (dict,)}


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def write(folder: str | Path, state: dict[str, torch.Tensor], config: dict, extra: dict | None = None) -> Path:
    """Write `state` and `config` (plus `extra`) as a checkpoint folder; returns the folder."""
    folder = Path(folder)
    with atomic_path(folder / WEIGHTS) as tmp:
        save_file(state, tmp, metadata={"format": "pt"})
    config = dict(format=FORMAT, version=VERSION, **config, weights_sha256=_file_sha256(folder / WEIGHTS),
                  extra=extra or {})
    try:
        json.dumps(config)
    except TypeError as err:
        raise CoTexNetError(f"checkpoint extra: not JSON-serialisable ({err})") from err
    write_json(folder / CONFIG, config)
    return folder


def read_config(folder: str | Path, types: dict[str, tuple] | None = None) -> dict:
    """The config of a checkpoint folder, each key of `types` present with a value of one of its types."""
    path = Path(folder) / CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise CoTexNetError(f"{path}: not found (is {folder} a CoTexNet checkpoint folder?)") from err
    except (OSError, json.JSONDecodeError) as err:
        raise CoTexNetError(f"{path}: unreadable ({err})") from err
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CoTexNetError(f"{path}: not a CoTexNet checkpoint config (format is not {FORMAT!r})")
    for key, kinds in {**(types or {}), **_TYPES}.items():
        if key not in config:
            raise CoTexNetError(f"{path}: no {key!r}; an incomplete or hand-edited checkpoint config")
        # type(), not isinstance: true is no class count, "2" is no number
        if type(config[key]) not in kinds:
            names = " or ".join("null" if kind is type(None) else kind.__name__ for kind in kinds)
            raise CoTexNetError(f"{path}: {key} is {config[key]!r} ({type(config[key]).__name__}), expected {names}")
    return config


def read_extra(folder: str | Path) -> dict:
    """The `extra` a checkpoint folder was written with."""
    return read_config(folder)["extra"]


def read_weights(folder: str | Path, config: dict) -> dict[str, torch.Tensor]:
    """The state dict of a checkpoint folder, checked to be the file its `config` names."""
    weights = Path(folder) / WEIGHTS
    if not weights.is_file():
        raise CoTexNetError(f"{weights}: not found")
    if _file_sha256(weights) != config["weights_sha256"]:
        raise CoTexNetError(f"{weights}: does not match {CONFIG} (interrupted save or a mixed-up folder)")
    try:
        return load_file(weights)
    except SafetensorError as err:
        raise CoTexNetError(f"{weights}: unreadable safetensors file ({err})") from err


def load_state(module: torch.nn.Module, state: dict[str, torch.Tensor], source, skip: str | None = None) -> None:
    """Load `state` into `module`, requiring exactly its keys (but those starting with `skip`) and shapes."""
    expected = {name: tensor for name, tensor in module.state_dict().items()
                if skip is None or not name.startswith(skip)}
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing:
        raise CoTexNetError(f"{source}: missing weight {missing[0]} ({len(missing)} missing in all)")
    if unexpected:
        raise CoTexNetError(f"{source}: unexpected weight {unexpected[0]} ({len(unexpected)} unexpected in all)")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise CoTexNetError(f"{source}: weight {name} has shape {tuple(tensor.shape)}, "
                                f"the model needs {tuple(expected[name].shape)}")
    module.load_state_dict(state, strict=False)
