"""CoTexNet checkpoints: small, pickle-free, tied to the frozen base they were trained on.

A checkpoint folder holds `model.safetensors` (the trained parameters: decoder, ROI mapper,
Img2text, the scalars a, v, m; ~14 MB at real size) and `config.json` (the model config, the
CLIPSeg base it needs by name (`clipseg_hf_api`) and by a fingerprint of its weights, a SHA-256
of the weights file, and the caller's `extra`, e.g. epoch and metrics). `export_full` writes a
self-contained folder (base weights included) for sharing. The model's `save_pretrained` and
`from_pretrained` call this module; the paper's `.pth` files are read by `model.paper_import`.

Command line:
  python -m model.checkpoint export --checkpoint DIR --out SHARED_DIR
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import CLIPSegConfig, CLIPSegForImageSegmentation

from common.atomic import atomic_path, write_json
from common.errors import CoTexNetError, run_cli
from model.CoTexNet import CoTexNet

WEIGHTS, CONFIG = "model.safetensors", "config.json"
FORMAT, VERSION = "cotexnet-checkpoint", 1


def base_fingerprint(model: CoTexNet) -> str:
    """SHA-256 of the CLIP weights (names, shapes, float32 values): the same base gives the
    same fingerprint whatever dtype or device it was loaded in with. Computed once per model
    while its CLIP is unchanged (`CoTexNet.base_fingerprint`)."""
    return model.base_fingerprint()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _write(model: CoTexNet, folder: str | Path, with_base: bool, extra: dict | None) -> Path:
    folder = Path(folder)
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()
             if with_base or not name.startswith("clip.")}
    with atomic_path(folder / WEIGHTS) as tmp:
        save_file(state, tmp, metadata={"format": "pt"})
    config = dict(format=FORMAT, version=VERSION, **model.config, includes_base=with_base,
                  base_fingerprint=None if with_base else base_fingerprint(model),
                  clipseg_config=model.clip.config.to_dict(),
                  # config.json is written last and names the weights it belongs to, so an
                  # interrupted save can never pass for a complete checkpoint.
                  weights_sha256=_file_sha256(folder / WEIGHTS), extra=extra or {})
    try:
        json.dumps(config)
    except TypeError as err:
        raise CoTexNetError(f"checkpoint extra: not JSON-serialisable ({err})") from err
    write_json(folder / CONFIG, config)
    return folder


def save_checkpoint(model: CoTexNet, folder: str | Path, extra: dict | None = None) -> Path:
    """The trained parameters and config. A trained (unfrozen) encoder is saved too."""
    return _write(model, folder, with_base=not model.freeze_encoder, extra=extra)


def export_full(model: CoTexNet, folder: str | Path, extra: dict | None = None) -> Path:
    """A self-contained checkpoint: every weight, base included; loads with no CLIPSeg given."""
    return _write(model, folder, with_base=True, extra=extra)


_CONFIG_TYPES = {"num_classes": (int,), "roi_position": (int,), "freeze_encoder": (bool,), "freeze_decoder": (bool,),
                 "includes_base": (bool,), "clipseg_hf_api": (str, type(None)), "base_fingerprint": (str, type(None)),
                 "clipseg_config": (dict,), "weights_sha256": (str,), "extra": (dict,)}


def _read_config(folder: Path) -> dict:
    path = folder / CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise CoTexNetError(f"{path}: not found (is {folder} a CoTexNet checkpoint folder?)") from err
    except (OSError, json.JSONDecodeError) as err:
        raise CoTexNetError(f"{path}: unreadable ({err})") from err
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CoTexNetError(f"{path}: not a CoTexNet checkpoint config (format is not {FORMAT!r})")
    for key, kinds in _CONFIG_TYPES.items():
        if key not in config:
            raise CoTexNetError(f"{path}: no {key!r}; an incomplete or hand-edited checkpoint config")
        # type(), not isinstance: true is no class count, "2" is no number
        if type(config[key]) not in kinds:
            names = " or ".join("null" if kind is type(None) else kind.__name__ for kind in kinds)
            raise CoTexNetError(f"{path}: {key} is {config[key]!r} ({type(config[key]).__name__}), expected {names}")
    return config


def load_state(model: CoTexNet, state: dict[str, torch.Tensor], with_base: bool, source) -> None:
    """Load `state` into `model`, requiring exactly the expected keys and shapes."""
    expected = {name: tensor for name, tensor in model.state_dict().items()
                if with_base or not name.startswith("clip.")}
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing:
        raise CoTexNetError(f"{source}: missing weight {missing[0]} ({len(missing)} missing in all)")
    if unexpected:
        raise CoTexNetError(f"{source}: unexpected weight {unexpected[0]} ({len(unexpected)} unexpected in all)")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise CoTexNetError(f"{source}: weight {name} has shape {tuple(tensor.shape)}, "
                                f"the model needs {tuple(expected[name].shape)}")
    model.load_state_dict(state, strict=False)


def load_checkpoint(folder: str | Path, clipseg=None, num_classes: int | None = None,
                    attn_implementation: str | None = "sdpa") -> tuple[CoTexNet, dict]:
    """(model, extra) from a checkpoint folder.

    `clipseg` (folder, hub id or CLIPSegForImageSegmentation) overrides the base named in the
    config; its weights must match the fingerprint. `num_classes`, when given, must match.
    """
    folder = Path(folder)
    config = _read_config(folder)
    if num_classes is not None and num_classes != config["num_classes"]:
        raise CoTexNetError(f"{folder}: checkpoint has num_classes {config['num_classes']}, "
                            f"expected {num_classes}")
    if config["includes_base"]:
        base = CLIPSegForImageSegmentation(CLIPSegConfig.from_dict(config["clipseg_config"])).eval()
    else:
        base = clipseg if clipseg is not None else config["clipseg_hf_api"]
        if base is None:
            raise CoTexNetError(f"{folder}: the checkpoint names no CLIPSeg base; pass the one it was trained on")
    model = CoTexNet.from_clipseg(base, config["num_classes"], config["roi_position"],
                                  freeze_encoder=config["freeze_encoder"], freeze_decoder=config["freeze_decoder"],
                                  attn_implementation=attn_implementation)
    model.clipseg_hf_api = config["clipseg_hf_api"]
    return model, load_weights_into(model, folder)


def load_weights_into(model: CoTexNet, folder: str | Path) -> dict:
    """Load a checkpoint folder's weights into `model`, which must be built on the base the
    checkpoint was trained on (a resumed run's model); returns the checkpoint's extra. Only the
    trained weights are copied, unless the checkpoint holds its base: a frozen CLIP is not
    touched (it may have been cast to bf16 already)."""
    folder = Path(folder)
    config = _read_config(folder)
    if config["num_classes"] != model.num_classes:
        raise CoTexNetError(f"{folder}: checkpoint has num_classes {config['num_classes']}, "
                            f"expected {model.num_classes}")
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise CoTexNetError(f"{weights}: not found")
    if _file_sha256(weights) != config["weights_sha256"]:
        raise CoTexNetError(f"{weights}: does not match {CONFIG} (interrupted save or a mixed-up folder)")
    if not config["includes_base"] and model.base_fingerprint() != config["base_fingerprint"]:
        raise CoTexNetError(f"{folder}: trained on a different CLIPSeg base than "
                            f"{model.clip.config.name_or_path or 'the given one'} (weight fingerprint differs); "
                            "pass the base it was trained on")
    try:
        state = load_file(weights)
    except SafetensorError as err:
        raise CoTexNetError(f"{weights}: unreadable safetensors file ({err})") from err
    load_state(model, state, config["includes_base"], weights)
    return config["extra"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    exp = commands.add_parser("export", help="write a self-contained copy of a checkpoint (base weights included)")
    exp.add_argument("--checkpoint", required=True, help="checkpoint folder")
    exp.add_argument("--clipseg", help="its CLIPSeg base, if not the one named in its config")
    exp.add_argument("--out", required=True, help="folder to write")
    args = parser.parse_args(argv)
    model, extra = load_checkpoint(args.checkpoint, args.clipseg)
    print(f"self-contained checkpoint written to {export_full(model, args.out, extra)}")


if __name__ == "__main__":
    run_cli(main)
