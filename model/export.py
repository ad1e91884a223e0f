"""Write a self-contained copy of a checkpoint folder (its CLIPSeg base's weights included), for sharing:

  python -m model.export --checkpoint DIR --out SHARED_DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common.errors import run_cli
from common.output_folders import OutputFolder
from model.checkpoint import read_extra
from model.CoTexNet import CoTexNet


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder")
    parser.add_argument("--clipseg", help="its CLIPSeg base, if not the one named in its config")
    parser.add_argument("--out", required=True, help="folder to write")
    args = parser.parse_args(argv)
    model = CoTexNet.from_pretrained(args.checkpoint, args.clipseg)
    bases = [base for base in (args.clipseg, model.clipseg_hf_api) if base and Path(base).is_dir()]
    OutputFolder(args.out, "--out", [args.checkpoint, *bases])  # never over the checkpoint or the base it reads
    folder = model.save_pretrained(args.out, read_extra(args.checkpoint), with_base=True)
    print(f"self-contained checkpoint written to {folder}")


if __name__ == "__main__":
    run_cli(main)
