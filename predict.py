"""Segment new images with a trained run: no text, no ROI, no LLaVA (the evaluation path).

  python predict.py --run runs/kvasir_20260101-120000 --input photos/ --output masks_out/ [--overlay] [--readout]

Writes <output>/<image stem>.png at each image's original size (binary: 0/255; multi-class:
the class ids 0..K), and with --overlay <output>/overlays/<stem>.png (image | prediction).
Mask names are the image stems, as in the dataset layout: input images that share a stem
(a.jpg and a.png) are refused up front, listed, rather than one mask silently replacing the other.
Unreadable images are listed (and written to <output>/unreadable.txt); the rest are processed.
--readout adds <output>/concept.csv: per image, the attribute sentence the model sees in it
(train_utils/concept_readout.py, from the image and its predicted mask only).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.errors import CoTexNetError, run_cli
from common.output_folders import OutputFolder
from data_process.layout import IMAGE_EXTS, check_unique_stems, list_files, why_missing
from train_utils import data
from train_utils.concept_readout import CSV_COLUMNS
from train_utils.evaluation import Outputs, Readout, evaluate, write_results
from train_utils.precision import apply_precision, make_accelerator
from train_utils.run_folder import load_run
from train_utils.tokenizer import load_tokenizer


def input_files(source: Path) -> list[Path]:
    if not source.exists():
        raise CoTexNetError(f"--input {source}: {why_missing(source, 'file or folder')}")
    if source.is_file():
        return [source]
    names = list_files(source)
    nested = [name for name in names if "/" in name]
    if nested:
        print(f"warning: --input {source}: {len(nested)} images in sub-folders are not read, e.g. {nested[:3]}; "
              "pass a sub-folder as --input", file=sys.stderr)
    files = [source / name for name in names if "/" not in name]
    if not files:
        raise CoTexNetError(f"--input {source}: no images ({', '.join(sorted(IMAGE_EXTS))})")
    check_unique_stems([path.name for path in files], f"--input {source}")
    return files


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run folder written by train.py")
    parser.add_argument("--input", required=True, help="an image, or a folder of images")
    parser.add_argument("--output", required=True, help="folder for the masks (not the input folder)")
    parser.add_argument("--overlay", action="store_true", help="also write image | prediction pictures")
    parser.add_argument("--checkpoint", default="best", choices=["best", "last"], help="which checkpoint (default: best)")
    parser.add_argument("--clipseg", help="CLIPSeg base folder or hub id, if not the one the run recorded")
    parser.add_argument("--batch-size", type=int, help="images per batch (default: the run's TRAIN.batch_size)")
    parser.add_argument("--readout", action="store_true", help="also write concept.csv: the concept the model "
                        "sees in each image, as an attribute sentence")
    args = parser.parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        parser.error(f"--batch-size: must be at least 1, got {args.batch_size}")

    source = Path(args.input)
    files = input_files(source)
    # Every output path checked before anything is written: never the input folder, nor an input
    # wherever a symlink puts it.
    output = OutputFolder(args.output, "--output", [source if source.is_dir() else source.parent], files)
    outputs = Outputs(mask=lambda name: output.path(f"{Path(name).stem}.png"), overlays=len(files) * args.overlay,
                      overlay=lambda name: output.path(f"overlays/{Path(name).stem}.png"))
    for path in files:
        outputs.mask(path.name)
        if args.overlay:
            outputs.overlay(path.name)
    for name in ("unreadable.txt", "concept.csv"):  # written at the end, checked now
        output.path(name)
    cfg, model, _ = load_run(args.run, args.checkpoint, args.clipseg)
    if args.batch_size is not None:
        cfg.TRAIN.batch_size = args.batch_size
    accelerator = make_accelerator(cfg)
    apply_precision(model, accelerator, cfg.TRAIN.compile)
    readout = Readout(load_tokenizer(args.clipseg or cfg.MODEL.clipseg_hf_api), cfg.spec().keyword) if args.readout else None
    result = evaluate(model.to(accelerator.device), data.readable_loader(cfg, data.ImageFiles(files, cfg.TRAIN.input_size)),
                      accelerator, model.num_classes, original_size=True, outputs=outputs, readout_with=readout,
                      desc="predict")
    write_results(output, result)
    folder = output.folder
    print(f"{result.images} mask(s) written to {folder}" + (f", overlays in {folder / 'overlays'}" if args.overlay else "")
          + (f", concepts in {folder / 'concept.csv'} ({', '.join(CSV_COLUMNS)})" if result.concepts else ""))
    if not result.images:
        raise CoTexNetError(f"--input {args.input}: none of the images could be read")


if __name__ == "__main__":
    run_cli(main)
