"""CoTexNet checkpoints: small, pickle-free, tied to the frozen base they were trained on.

A checkpoint folder holds `model.safetensors` (the trained parameters: decoder, ROI mapper,
Img2text, the scalars a, v, m; ~14 MB at real size) and `config.json` (the model config, the
CLIPSeg base it needs by name (`clipseg_hf_api`) and by a fingerprint of its weights, a SHA-256
of the weights file, and the caller's `extra`, e.g. epoch and metrics). `export_full` writes a
self-contained folder (base weights included) for sharing.

`import_paper_checkpoint` reads the paper's `.pth` files (`{"model": state_dict, ...}`), maps
its keys onto ours, and checks that its duplicated tensors (a second copy of the vision
encoder, a second name of Img2text) and its frozen CLIP equal what we use instead.

Command line:
  python -m model.checkpoint import --pth best_model.pth --clipseg CIDAS/clipseg-rd64-refined --out DIR
  python -m model.checkpoint export --checkpoint DIR --out SHARED_DIR
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import pickle
import zipfile
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import CLIPSegConfig, CLIPSegForImageSegmentation

from common.errors import CoTexNetError, run_cli
from common.io import atomic_path, write_json
from model.CoTexNet import CoTexNet

WEIGHTS, CONFIG = "model.safetensors", "config.json"
FORMAT, VERSION = "cotexnet-checkpoint", 1


def base_fingerprint(model: CoTexNet) -> str:
    """SHA-256 of the CLIP weights (names, shapes, float32 values): the same base gives the
    same fingerprint whatever dtype or device it was loaded in with."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.clip.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().data)
    return digest.hexdigest()


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
    return config


def _load_state(model: CoTexNet, state: dict[str, torch.Tensor], with_base: bool, source) -> None:
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
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise CoTexNetError(f"{weights}: not found")
    if _file_sha256(weights) != config["weights_sha256"]:
        raise CoTexNetError(f"{weights}: does not match {CONFIG} (interrupted save or a mixed-up folder)")

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
    if not config["includes_base"] and base_fingerprint(model) != config["base_fingerprint"]:
        raise CoTexNetError(f"{folder}: trained on a different CLIPSeg base than "
                            f"{model.clip.config.name_or_path or 'the given one'} (weight fingerprint differs); "
                            "pass the base it was trained on")
    try:
        state = load_file(weights)
    except SafetensorError as err:
        raise CoTexNetError(f"{weights}: unreadable safetensors file ({err})") from err
    _load_state(model, state, config["includes_base"], weights)
    return model, config["extra"]


# --- the paper's checkpoints ----------------------------------------------------------------
# Paper prefix -> ours, most specific first. The 3-class head (`output_convolution`) is mapped
# separately, onto the last module of our decoder's transposed convolution.
_PAPER_PREFIXES = (
    ("clipsegp.clipseg.clip.", "clip."),
    ("clipsegp.clipseg.decoder.", "decoder."),
    ("im2text.mapping_module.", "roi_mapper."),
    ("img_projection.", "img2text."),
)
_PAPER_SCALARS = {"clipsegp.clipseg.weight_alpha": "alpha", "clipsegp.clipseg.var": "var",
                  "clipsegp.clipseg.mean": "mean"}
_PAPER_HEAD = "clipsegp.clipseg.decoder.output_convolution."
# Copies in the paper's model -> the original they must equal (dropped after the check).
_PAPER_DUPLICATES = (
    ("im2text.vision_model.", "clipsegp.clipseg.clip.vision_model."),
    ("clipsegp.clipseg.img_projection.", "img_projection."),
)


class _StandIn(dict):
    """Takes the place of a class that a trusted pickle names but this environment lacks
    (the paper's config object); keeps its state, which we never use."""

    def __setstate__(self, state):
        self.__dict__["state"] = state


class _LenientUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return type(name, (_StandIn,), {"__module__": module})


_lenient_pickle = SimpleNamespace(__name__="pickle", Unpickler=_LenientUnpickler, load=pickle.load)


def _read_paper_file(pth: Path, trust_pickle: bool) -> dict:
    if not pth.is_file():
        raise CoTexNetError(f"{pth}: not found")
    with open(pth, "rb") as f:
        pickled = f.read(1) == b"\x80"  # the pickle protocol opcode: torch's legacy (non-zip) format
    if not pickled and not zipfile.is_zipfile(pth):
        # else torch reports any non-checkpoint as a pickle the user would have to trust
        raise CoTexNetError(f"{pth}: not a readable torch checkpoint (neither torch's zip format nor a pickle)")
    try:
        if trust_pickle:
            return torch.load(pth, map_location="cpu", weights_only=False, pickle_module=_lenient_pickle)
        return torch.load(pth, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if trust_pickle:
            raise CoTexNetError(f"{pth}: unreadable checkpoint ({str(err).splitlines()[0]})") from err
        raise CoTexNetError(f"{pth}: holds pickled objects beyond tensors (the paper's files pickle their "
                            "config), so it cannot be loaded safely; load it with trust_pickle=True "
                            "(--trust-pickle) only if you trust this file") from err
    except (RuntimeError, EOFError, OSError) as err:
        raise CoTexNetError(f"{pth}: not a readable torch checkpoint ({str(err).splitlines()[0]})") from err


def _map_paper_state(state: dict[str, torch.Tensor], head_prefix: str, pth) -> dict[str, torch.Tensor]:
    """The paper's state dict in our names, after checking and dropping its duplicates."""
    mapped = {}
    for key, tensor in state.items():
        duplicate = next(((p, o) for p, o in _PAPER_DUPLICATES if key.startswith(p)), None)
        if duplicate is not None:
            original = duplicate[1] + key[len(duplicate[0]):]
            if original not in state:
                raise CoTexNetError(f"{pth}: {key} duplicates {original}, which is missing")
            if not torch.equal(tensor, state[original]):
                raise CoTexNetError(f"{pth}: {key} differs from {original}; they must be copies")
            continue
        if key in _PAPER_SCALARS:
            mapped[_PAPER_SCALARS[key]] = tensor
        elif key.startswith(_PAPER_HEAD):
            mapped[head_prefix + key[len(_PAPER_HEAD):]] = tensor
        else:
            prefix = next(((p, o) for p, o in _PAPER_PREFIXES if key.startswith(p)), None)
            if prefix is None:
                raise CoTexNetError(f"{pth}: unknown key {key} (not a CoTexNet checkpoint of the paper's code?)")
            mapped[prefix[1] + key[len(prefix[0]):]] = tensor
    return mapped


def _head_prefix(model: CoTexNet) -> str:
    conv = model.decoder.transposed_convolution
    return f"decoder.transposed_convolution.{len(conv) - 1}." if isinstance(conv, torch.nn.Sequential) \
        else "decoder.transposed_convolution."


def _import(pth, clipseg, trust_pickle: bool, base_from_file: bool, roi_position: int,
            attn_implementation: str | None) -> tuple[CoTexNet, dict]:
    pth = Path(pth)
    content = _read_paper_file(pth, trust_pickle)
    state = content.get("model") if isinstance(content, dict) else None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise CoTexNetError(f"{pth}: no 'model' state dict in it (expected the paper's {{'model': ...}} file)")
    head = state.get(_PAPER_HEAD + "weight")
    num_classes = 2 if head is None else head.shape[1]  # ConvTranspose2d weight: (in, out, k, k)
    model = CoTexNet.from_clipseg(clipseg, num_classes, roi_position, attn_implementation=attn_implementation)
    mapped = _map_paper_state(state, _head_prefix(model), pth)

    file_clip = {k: v for k, v in mapped.items() if k.startswith("clip.")}
    ours = {k: v for k, v in model.state_dict().items() if k.startswith("clip.")}
    if file_clip.keys() != ours.keys():
        odd = sorted(file_clip.keys() ^ ours.keys())[0]
        raise CoTexNetError(f"{pth}: its frozen CLIP does not have the architecture of the base (key {odd})")
    if base_from_file:
        # The base's weights are replaced, so its name no longer describes them; a given
        # instance shares its CLIP with the model and must not change under its owner.
        model.clipseg_hf_api = None
        if isinstance(clipseg, CLIPSegForImageSegmentation):
            model.clip = copy.deepcopy(model.clip)
    else:
        for name, tensor in file_clip.items():
            if tensor.shape != ours[name].shape or not torch.equal(tensor.to(ours[name]), ours[name]):
                raise CoTexNetError(f"{pth}: its frozen CLIP differs from the base {model.clip.config.name_or_path} "
                                    f"(first at {name}); pass the base it was trained on, or base_from_file=True "
                                    "(--base-from-file) to use the file's")
        mapped = {k: v for k, v in mapped.items() if not k.startswith("clip.")}
    _load_state(model, mapped, base_from_file, pth)
    meta = {k: v for k, v in content.items() if k != "model" and isinstance(v, (int, float, str, bool))}
    return model, meta


def import_paper_checkpoint(pth, clipseg, trust_pickle: bool = False, base_from_file: bool = False,
                            roi_position: int = 5, attn_implementation: str | None = "sdpa") -> CoTexNet:
    """A CoTexNet from the paper's `.pth`, built on `clipseg` (folder, hub id or instance).

    The file's frozen CLIP must equal the base's weights, unless `base_from_file` loads them
    from the file. `trust_pickle` allows unpickling arbitrary objects: only for trusted files.
    """
    return _import(pth, clipseg, trust_pickle, base_from_file, roi_position, attn_implementation)[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    imp = commands.add_parser("import", help="convert a checkpoint of the paper's code into a CoTexNet checkpoint")
    imp.add_argument("--pth", required=True, help="the paper's checkpoint (.pth with a 'model' state dict)")
    imp.add_argument("--clipseg", required=True, help="the CLIPSeg base it was trained on (folder or hub id)")
    imp.add_argument("--out", required=True, help="checkpoint folder to write")
    imp.add_argument("--roi-position", type=int, default=5, help="sequence position of the ROI token (default 5)")
    imp.add_argument("--trust-pickle", action="store_true",
                     help="allow unpickling arbitrary objects (the paper's files pickle their config); "
                          "only for files you trust")
    imp.add_argument("--base-from-file", action="store_true",
                     help="use the frozen CLIP stored in the file instead of requiring it to equal --clipseg's "
                          "(writes a self-contained checkpoint)")
    exp = commands.add_parser("export", help="write a self-contained copy of a checkpoint (base weights included)")
    exp.add_argument("--checkpoint", required=True, help="checkpoint folder")
    exp.add_argument("--clipseg", help="its CLIPSeg base, if not the one named in its config")
    exp.add_argument("--out", required=True, help="folder to write")
    args = parser.parse_args(argv)

    if args.command == "import":
        model, meta = _import(args.pth, args.clipseg, args.trust_pickle, args.base_from_file, args.roi_position,
                              "sdpa")
        extra = {"imported_from": str(Path(args.pth).resolve()), **meta}
        write = export_full if args.base_from_file else save_checkpoint
        print(f"{model.num_classes}-class checkpoint written to {write(model, args.out, extra)}")
    else:
        model, extra = load_checkpoint(args.checkpoint, args.clipseg)
        print(f"self-contained checkpoint written to {export_full(model, args.out, extra)}")


if __name__ == "__main__":
    run_cli(main)
