"""Evaluate a trained run on a split at the ORIGINAL image resolution.

  python evaluate.py --run runs/kvasir_20260101-120000 [--split test] [--checkpoint best]

The prediction (made at the training input size) is resized back to each image's own size
before the metrics, so the figures compare with work that evaluates at full resolution.
Writes to RUN_DIR/eval_<split>/ (or --out): masks/<image stem>.png, overlays/ (the first
--overlays images: image | truth | prediction), per_image.csv and metrics.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm.auto import tqdm

from common.errors import CoTexNetError, run_cli
from common.io import write_json
from data_process.layout import SPLITS
from data_process.registry import read_image, read_mask
from train_utils import data, reporting
from train_utils.inference import predict_batches
from train_utils.metrics import class_names, image_metrics, summarize
from train_utils.precision import make_accelerator
from train_utils.run_state import load_run


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run folder written by train.py")
    parser.add_argument("--split", default="test", choices=SPLITS, help="split to evaluate (default: test)")
    parser.add_argument("--checkpoint", default="best", choices=["best", "last"], help="which checkpoint (default: best)")
    parser.add_argument("--clipseg", help="CLIPSeg base folder or hub id, if not the one the run recorded")
    parser.add_argument("--out", help="output folder (default: RUN/eval_<split>)")
    parser.add_argument("--overlays", type=int, default=8, help="number of overlay pictures (default: 8)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg, model, extra = load_run(args.run, args.checkpoint, args.clipseg)
    out = Path(args.out or Path(args.run) / f"eval_{args.split}")
    accelerator = make_accelerator(cfg)
    split = data.dataset(cfg, args.split)
    masks_of = dict(split.rows)  # image name -> mask name
    folder, spec, k = split.folder, data.spec(cfg), cfg.DATASET.num_classes
    names = class_names(k, spec.categories)
    model = model.to(accelerator.device)
    loader = accelerator.prepare(data.readable_loader(cfg, split))

    rows, unreadable, overlays = [], [], 0
    batches = tqdm(loader, desc=f"evaluate {args.split}", disable=not accelerator.is_main_process)
    for batch, preds in predict_batches(model, batches, accelerator):
        # Every process gathers every batch, even one of unreadable images only: a process that
        # skipped a gather would leave the others waiting in it.
        unreadable += accelerator.gather_for_metrics(batch["errors"], use_gather_object=True)
        batch_rows = []
        for name, pred in zip(batch["name"], preds, strict=True):
            h, w = pred.shape
            truth = torch.from_numpy(read_mask(folder / "masks" / masks_of[name], spec, size=(w, h)))
            batch_rows.append(dict(name=name, **image_metrics(pred[None], truth[None], k, names)[0]))
            stem = Path(name).stem
            reporting.write_mask(out / "masks" / f"{stem}.png", pred.numpy(), k)
            if accelerator.is_main_process and overlays < args.overlays:
                image = read_image(folder / "images" / name)
                reporting.write_overlay(out / "overlays" / f"{stem}.png", image, truth.numpy(), pred.numpy())
                overlays += 1
        rows += accelerator.gather_for_metrics(batch_rows, use_gather_object=True)
    # Unreadable images leave the batches uneven, so accelerate's trimming of the samples it
    # repeated to even out the last batch can miss one: each image counts once, by name.
    rows = list({row["name"]: row for row in rows}.values())
    unreadable = list(dict.fromkeys(unreadable))

    if accelerator.is_main_process:
        data.report_unreadable(unreadable, out / "unreadable.txt")
        summary = summarize(rows)
        write_json(out / "metrics.json", dict(run=str(args.run), checkpoint=args.checkpoint, epoch=extra.get("epoch"),
                                              split=args.split, resolution="original", **summary))
        reporting.write_csv(out / "per_image.csv", rows)
        print(reporting.format_table({args.split: summary}))
        print(f"\nmasks: {out / 'masks'}  overlays: {out / 'overlays'}  per image: {out / 'per_image.csv'}  "
              f"summary: {out / 'metrics.json'}")
    if not rows:
        raise CoTexNetError(f"{args.split} split of {cfg.DATASET.dataset_name}: no images evaluated")


if __name__ == "__main__":
    run_cli(main)
