"""Import of the paper's checkpoints: its `.pth` files (`{"model": state_dict, ...}`) become
CoTexNet models, and with the command line our checkpoint folders (`CoTexNet.save_pretrained`).

Its keys are mapped onto ours, and its duplicated tensors (a second copy of the vision encoder,
a second name of Img2text) and its frozen CLIP are checked to equal what we use instead.

Command line:
  python -m model.paper_import --pth best_model.pth --clipseg CIDAS/clipseg-rd64-refined --out DIR
"""

from __future__ import annotations

import argparse
import copy
import pickle
import zipfile
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import CLIPSegForImageSegmentation

from common.errors import CoTexNetError, run_cli
from common.output_folders import OutputFolder
from model.checkpoint import load_state
from model.CoTexNet import ROI_POSITION, CoTexNet

# Paper prefix -> ours, most specific first. The 3-class head (`output_convolution`) is mapped
# separately, onto the last module of our decoder's transposed convolution.
_PAPER_PREFIXES = (("clipsegp.clipseg.clip.", "clip."), ("clipsegp.clipseg.decoder.", "decoder."),
                   ("im2text.mapping_module.", "roi_mapper."), ("img_projection.", "img2text."))
_PAPER_SCALARS = {"clipsegp.clipseg.weight_alpha": "alpha", "clipsegp.clipseg.var": "var",
                  "clipsegp.clipseg.mean": "mean"}
_PAPER_HEAD = "clipsegp.clipseg.decoder.output_convolution."
# Copies in the paper's model -> the original they must equal (dropped after the check).
_PAPER_DUPLICATES = (("im2text.vision_model.", "clipsegp.clipseg.clip.vision_model."),
                     ("clipsegp.clipseg.img_projection.", "img_projection."))


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


def import_paper_checkpoint(pth, clipseg, trust_pickle: bool = False, base_from_file: bool = False,
                            roi_position: int = ROI_POSITION, attn_implementation: str | None = "sdpa") -> tuple[CoTexNet, dict]:
    """(model, metadata) from the paper's `.pth`, built on `clipseg` (folder, hub id or instance);
    the metadata are the file's plain values beside the state dict (e.g. epoch, best Dice).

    The file's frozen CLIP must equal the base's weights, unless `base_from_file` loads them
    from the file. `trust_pickle` allows unpickling arbitrary objects: only for trusted files.
    """
    pth = Path(pth)
    content = _read_paper_file(pth, trust_pickle)
    state = content.get("model") if isinstance(content, dict) else None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise CoTexNetError(f"{pth}: no 'model' state dict in it (expected the paper's {{'model': ...}} file)")
    head = state.get(_PAPER_HEAD + "weight")
    num_classes = 2 if head is None else head.shape[1]  # ConvTranspose2d weight: (in, out, k, k)
    model = CoTexNet.from_clipseg(clipseg, num_classes, roi_position, attn_implementation=attn_implementation)
    conv = model.decoder.transposed_convolution  # the head: its last module where it is a Sequential
    last = f"{len(conv) - 1}." if isinstance(conv, torch.nn.Sequential) else ""
    mapped = _map_paper_state(state, f"decoder.transposed_convolution.{last}", pth)

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
    load_state(model, mapped, pth, skip=None if base_from_file else "clip.")
    meta = {k: v for k, v in content.items() if k != "model" and isinstance(v, (int, float, str, bool))}
    return model, meta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pth", required=True, help="the paper's checkpoint (.pth with a 'model' state dict)")
    parser.add_argument("--clipseg", required=True, help="the CLIPSeg base it was trained on (folder or hub id)")
    parser.add_argument("--out", required=True, help="checkpoint folder to write")
    parser.add_argument("--roi-position", type=int, default=ROI_POSITION,
                        help=f"sequence position of the ROI token (default {ROI_POSITION})")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow unpickling arbitrary objects (the paper's files pickle their config); "
                             "only for files you trust")
    parser.add_argument("--base-from-file", action="store_true",
                        help="use the frozen CLIP stored in the file instead of requiring it to equal --clipseg's "
                             "(writes a self-contained checkpoint)")
    args = parser.parse_args(argv)
    OutputFolder(args.out, "--out", [args.clipseg] if Path(args.clipseg).is_dir() else [])  # never over the base
    model, meta = import_paper_checkpoint(args.pth, args.clipseg, args.trust_pickle, args.base_from_file,
                                          args.roi_position)
    extra = {"imported_from": str(Path(args.pth).resolve()), **meta}
    print(f"{model.num_classes}-class checkpoint written to "
          f"{model.save_pretrained(args.out, extra, with_base=args.base_from_file)}")


if __name__ == "__main__":
    run_cli(main)
