"""Evaluate a trained run on a split at the ORIGINAL image resolution.

  python evaluate.py --run runs/kvasir_20260101-120000 [--split test] [--checkpoint best]
  python evaluate.py --run runs/kvasir_20260101-120000 --dataset clinicdb --split all   # cross-dataset
  python evaluate.py --run runs/kvasir_20260101-120000 --readout   # + the concept the model sees, per image

The prediction (made at the training input size) is resized back to each image's own size
before the metrics, so the figures compare with work that evaluates at full resolution.
Writes to RUN_DIR/eval_<split>/ (another dataset: RUN_DIR/eval_<dataset>_<split>/; or --out):
masks/<image stem>.png (sub-folders kept), overlays/ (the first --overlays images: image | truth | prediction),
per_image.csv, metrics.json, and report.html (train_utils/report_page.py: every image's picture from gallery/,
the metrics with confidence intervals; it also rewrites the run's report.html). Evaluation uses the images only: another dataset needs no text. Binary runs
also get the paper's figures (paper_dice, ...: soft Dice on probabilities, means over batches).
--readout adds concept.csv (train_utils/concept_readout.py: the attribute sentence the model sees, from
the image and its PREDICTED mask) and, in metrics.json and the printout, each attribute's agreement
with the geometry describer on the TRUE mask, beside chance and the majority rate.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common.errors import CoTexNetError, run_cli
from common.output_folders import OutputFolder
from data_process import layout
from data_process.layout import SPLITS
from data_process.splits import KINDS
from train_utils import data, report_page, reporting
from train_utils.config import PROTOCOLS, apply_protocol
from train_utils.evaluation import Outputs, Readout, evaluate, staged_output, write_results
from train_utils.metrics import class_names
from train_utils.pictures import picture_path
from train_utils.precision import apply_precision, make_accelerator
from train_utils.run_folder import evaluation_target, load_run
from train_utils.tokenizer import load_tokenizer


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run folder written by train.py")
    parser.add_argument("--split", default="test", choices=(*SPLITS, "all"),
                        help="split to evaluate (default: test); all: the union of the three, each image once")
    parser.add_argument("--dataset", help="a registered dataset to evaluate on, if not the run's own (it must "
                        "have the run's classes); its images under --root, its rows in the --split-dir CSVs")
    parser.add_argument("--root", help="folder of the dataset folders (default: the run's DATASET.root_dir)")
    parser.add_argument("--split-dir", help="folder of the split CSVs (default: the run's DATASET.split_dir)")
    parser.add_argument("--checkpoint", default="best", choices=["best", "last"], help="which checkpoint (default: best)")
    parser.add_argument("--clipseg", help="CLIPSeg base folder or hub id, if not the one the run recorded")
    parser.add_argument("--out", help="output folder, replaced as a whole (default: RUN/eval_<split>, another "
                        "dataset: RUN/eval_<dataset>_<split>)")
    parser.add_argument("--allow-split-overlap", action="store_true", help="evaluate even if an image is in two "
                        "splits (a benchmark whose val and test are the same files); default: the run's setting")
    parser.add_argument("--protocol", choices=PROTOCOLS,
                        help="read the truth masks as this protocol does (paper: DATASET.binarize paper); "
                             "default: as the run was trained")
    parser.add_argument("--overlays", type=int, default=8, help="number of overlay pictures (default: 8)")
    parser.add_argument("--readout", action="store_true", help="also read back the concept the model sees in each "
                        "image (concept.csv) and its agreement with the geometry describer on the true masks")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg, model, extra = load_run(args.run, args.checkpoint, args.clipseg)
    cfg = apply_protocol(cfg, args.protocol) if args.protocol else cfg
    cfg, folder_name = evaluation_target(cfg, args.run, model.num_classes, args.split, args.dataset, args.root,
                                         args.split_dir, args.allow_split_overlap)
    accelerator = make_accelerator(cfg)
    apply_precision(model, accelerator, cfg.TRAIN.compile)
    split = data.dataset(cfg, args.split)
    layout.check_unique_stems([image for image, _ in split.rows], f"{args.split} split of {cfg.DATASET.dataset_name}")
    # Never an input, whatever the paths: the images and masks, the split files, the run's config and checkpoint.
    run, folder = Path(args.run), split.folder
    target = OutputFolder(args.out or run / folder_name, "--out", [folder / "images", folder / "masks", run / args.checkpoint],
                          [run / "config.yaml", *(layout.split_csv(cfg.DATASET.split_dir, s) for s in KINDS)])
    loader = accelerator.prepare(data.readable_loader(cfg, split, num_processes=accelerator.num_processes))
    readout = Readout(load_tokenizer(args.clipseg or cfg.MODEL.clipseg_hf_api), split.spec.keyword) if args.readout else None

    with staged_output(target, accelerator) as out:
        def path(kind: str):  # image name -> its file of that kind, the image's sub-folders kept
            return lambda name: out.path(f"{kind}/{layout.stem(name)}.png")

        outputs = Outputs(mask=path("masks"), overlay=path("overlays"), overlays=args.overlays,
                          picture=lambda name, _: out.path(picture_path("gallery", name).as_posix()))
        result = evaluate(model.to(accelerator.device), loader, accelerator, model.num_classes,
                          class_names(model.num_classes, split.spec.categories), original_size=True, outputs=outputs,
                          readout_with=readout, desc=f"evaluate {args.split}")
        if accelerator.is_main_process:
            write_results(out, result, run=str(args.run), checkpoint=args.checkpoint, epoch=extra.get("epoch"),
                          dataset=cfg.DATASET.dataset_name, split=args.split, resolution="original")
        if not result.rows:  # nothing replaces an earlier evaluation
            raise CoTexNetError(f"{args.split} split of {cfg.DATASET.dataset_name}: no images evaluated")
    if accelerator.is_main_process:
        out = target.folder
        print(f"report: {report_page.write_report(out, args.run)} (the run's: {report_page.write_report(args.run)})")
        print(reporting.format_table({args.split: result.summary}))
        if result.agreement:
            print("\n" + reporting.format_agreement(result.agreement) + f"\nper image: {out / 'concept.csv'}")
        print(f"\nmasks: {out / 'masks'}  overlays: {out / 'overlays'}  per image: {out / 'per_image.csv'}  "
              f"summary: {out / 'metrics.json'}")


if __name__ == "__main__":
    run_cli(main)
