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
import torch.nn.functional as F
from tqdm.auto import tqdm

from common.errors import CoTexNetError, run_cli
from common.io import write_json
from data_process.registry import read_image, read_mask
from train_utils import data, engine, reporting
from train_utils.metrics import class_names, image_metrics, predict_labels, summarize


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run folder written by train.py")
    parser.add_argument("--split", default="test", choices=data.SPLITS, help="split to evaluate (default: test)")
    parser.add_argument("--checkpoint", default="best", choices=["best", "last"], help="which checkpoint (default: best)")
    parser.add_argument("--clipseg", help="CLIPSeg base folder or hub id, if not the one the run recorded")
    parser.add_argument("--out", help="output folder (default: RUN/eval_<split>)")
    parser.add_argument("--overlays", type=int, default=8, help="number of overlay pictures (default: 8)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg, model, extra = engine.load_run(args.run, args.checkpoint, args.clipseg)
    out = Path(args.out or Path(args.run) / f"eval_{args.split}")
    accelerator = engine.make_accelerator(cfg)
    engine.apply_precision(model, accelerator, cfg.TRAIN.compile)
    split = data.dataset(cfg, args.split)
    masks_of = dict(split.rows)  # image name -> mask name
    folder, spec, k = split.folder, data.spec(cfg), cfg.DATASET.num_classes
    names = class_names(k, spec.categories)
    model = model.to(accelerator.device)
    loader = accelerator.prepare(data.loader(cfg, data.SkipUnreadable(split), collate_fn=data.collate_readable))

    rows, unreadable, overlays = [], [], 0
    for batch in tqdm(loader, desc=f"evaluate {args.split}", disable=not accelerator.is_main_process):
        # Every process gathers every batch, even one of unreadable images only: a process that
        # skipped a gather would leave the others waiting in it.
        unreadable += accelerator.gather_for_metrics(batch["errors"], use_gather_object=True)
        batch_rows = []
        if batch["name"]:
            with torch.no_grad(), accelerator.autocast():
                logits = model(batch["pixel_values"]).logits.float()
        for i, (name, (h, w)) in enumerate(zip(batch["name"], batch["orig_size"], strict=True)):
            # Resize logits (not labels): a smooth upsampling, then the decision at full size.
            pred = predict_labels(F.interpolate(logits[i : i + 1], size=(int(h), int(w)), mode="bilinear",
                                                align_corners=False))[0].cpu()
            truth = torch.from_numpy(read_mask(folder / "masks" / masks_of[name], spec, size=(int(w), int(h))))
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
