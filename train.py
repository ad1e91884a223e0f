"""Stage 3: train CoTexNet, reload the best checkpoint, evaluate validation and test.

  python train.py                                   # dataset_config/train_config.yaml
  python train.py --config my.yaml TRAIN.epochs=50 DATASET.dataset_name=clinicdb
  python train.py --resume runs/kvasir_20260101-120000   # continue where it stopped
  python train.py --protocol paper                  # the paper's protocol: every switch at its value
  accelerate launch --num_processes 4 train.py ...  # several GPUs (or nodes)

Everything goes to runs/<name>/: config.yaml (resolved), log.csv (one row per epoch),
curves.png, best/ and last/ checkpoints, overlays/, metrics.json, test_per_image.csv, val_per_image.csv,
report.html (train_utils/report_page.py; the pictures of its gallery of the test split in test_gallery/).
DATASET.dataset_name=[kvasir,clinicdb] trains on both at once (metrics per dataset and overall).
Ctrl-C or SIGTERM finishes the current epoch, saves last/ and exits with status 130
(a second one quits at once).
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch
from accelerate.utils import set_seed

from common.atomic import write_json
from common.errors import EXIT_INTERRUPTED, CoTexNetError, run_cli
from data_process.my_dataset import collate
from model.checkpoint import read_extra
from model.CoTexNet import CoTexNet
from train_utils import data, report_page, reporting, run_folder
from train_utils.config import PROTOCOLS, load_config
from train_utils.evaluation import Outputs, evaluate
from train_utils.loops import Outcome, Training, fit
from train_utils.losses import CoTexNetLoss
from train_utils.metrics import class_names
from train_utils.optim import build_optimizer, build_scheduler
from train_utils.pictures import picture_path
from train_utils.precision import apply_precision, make_accelerator
from train_utils.tokenizer import load_tokenizer
from train_utils.trackers import check_trackers

DEFAULT_CONFIG = "dataset_config/train_config.yaml"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"YAML config (default: {DEFAULT_CONFIG})")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue this run with its saved config and state "
                        "(a run stopped before its first last/ checkpoint starts over from epoch 1)")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="ours",
                        help="paper: set every switch of the README's 'What differs' table to the paper's value, "
                             "on top of the config and the overrides (default: ours)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. TRAIN.epochs=5")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.resume and (args.overrides or args.protocol != "ours"):
        raise CoTexNetError("--resume continues a run with its saved config; overrides and --protocol are not allowed")
    cfg = (run_folder.run_config(args.resume) if args.resume
           else load_config(args.config, args.overrides, args.protocol))
    # Everything is checked before the run folder is written: a wrong setting leaves nothing behind.
    cfg.check_num_classes()
    num_classes, several = cfg.num_classes(), len(cfg.datasets()) > 1
    check_trackers(cfg.TRAIN.log_with)  # installed here, before the run folder is written
    tokenizer = load_tokenizer(cfg.MODEL.clipseg_hf_api)
    run = Path(args.resume) if args.resume else run_folder.run_folder(cfg)
    accelerator = make_accelerator(cfg)
    data.process_batch_size(cfg, accelerator.num_processes)  # a batch that does not divide is refused here
    main_process = accelerator.is_main_process
    set_seed(cfg.TRAIN.random_seed)  # the same on every process: they draw the same shuffles

    # Data: the training split carries the text prompts; validation and test are images only.
    # Several datasets: each split is all of theirs, mixed in the shuffled batches.
    names = class_names(num_classes, cfg.spec().categories)
    train_set = data.split_set(cfg, "train", tokenizer)
    val_set, test_set = data.split_set(cfg, "val"), data.split_set(cfg, "test")

    # Model, loss, optimizer, schedule; a resumed run restores them, and the rest, from its last/.
    model = CoTexNet.from_clipseg(cfg.MODEL.clipseg_hf_api, num_classes)
    apply_precision(model, accelerator, cfg.TRAIN.compile)
    generator = torch.Generator().manual_seed(cfg.TRAIN.random_seed)
    processes = accelerator.num_processes
    # Prompts padded with the tokenizer's pad token, and past the model's ROI position.
    prompts = functools.partial(collate, pad_id=tokenizer.pad_token_id, roi_position=model.roi_position)
    train_loader = data.loader(cfg, train_set, shuffle=True, generator=generator, collate_fn=prompts,
                               num_processes=processes)
    val_loader, test_loader = (data.loader(cfg, val_set, num_processes=processes),
                               data.loader(cfg, test_set, num_processes=processes))
    criterion = CoTexNetLoss(num_classes, cfg.TRAIN.seg_weight, cfg.TRAIN.kl_weight, cfg.TRAIN.loss_input)
    optimizer = build_optimizer(model, cfg)
    model, optimizer, train_loader, val_loader, test_loader = accelerator.prepare(
        model, optimizer, train_loader, val_loader, test_loader)
    # After prepare: the optimiser steps of one process per epoch. Not prepared: accelerate would
    # step it once per process at every optimiser step.
    scheduler = build_scheduler(optimizer, cfg, len(train_loader))
    if main_process:
        print(cfg.to_yaml())
    if not args.resume:  # the run folder's first write, once every input has been read and checked
        run = run_folder.create_run(run, cfg.to_yaml(), accelerator, default_name=not cfg.TRAIN.run_name)
    training = Training(cfg, run, accelerator, model, criterion, optimizer, scheduler, train_loader, val_loader,
                        generator, names)
    if args.resume:
        training.resume()

    if fit(training) is Outcome.INTERRUPTED:
        if main_process:
            print(f"stopped; last/ saved. Continue with: python train.py --resume {run}", flush=True)
        sys.exit(EXIT_INTERRUPTED)

    # Final evaluation of the best checkpoint (or the last weights when TRAIN.save_best is false).
    best = cfg.TRAIN.save_best and (run / "best").is_dir()
    if cfg.TRAIN.save_best and not best and main_process:
        # The paper's rule keeps an epoch only above 0: a run whose score stayed 0 has no best.
        print(f"warning: no epoch scored {cfg.TRAIN.select_metric} above 0, so there is no best/: testing the last weights")
    if best:
        model = CoTexNet.from_pretrained(run / "best")
        apply_precision(model, accelerator)
        model.to(accelerator.device)
    results, per_image = {}, {}
    gallery = Outputs(picture=lambda name, dataset: picture_path(run / "test_gallery", name, dataset))
    for split, split_loader in (("val", val_loader), ("test", test_loader)):
        result = evaluate(model, split_loader, accelerator, num_classes, names, desc=split,
                          outputs=gallery if split == "test" else None)
        per_image[split], results[split] = result.rows, result.summary
    if main_process:
        best_epoch = read_extra(run / "best")["epoch"] if best else None
        mixed = dict(datasets=cfg.datasets(), select_overall=cfg.TRAIN.select_overall) if several else {}
        write_json(run / "metrics.json", dict(best_epoch=best_epoch, select_metric=cfg.TRAIN.select_metric,
                                              resolution=cfg.TRAIN.input_size, **mixed, **results))
        reporting.write_csv(run / "test_per_image.csv", per_image["test"])
        reporting.write_csv(run / "val_per_image.csv", per_image["val"])
        print(f"report: {report_page.write_report(run)}")
        print(f"\nbest epoch: {best_epoch}  (metrics at {cfg.TRAIN.input_size}x{cfg.TRAIN.input_size}; "
              f"evaluate.py gives them at the original image size)")
        print(reporting.format_table(results))
        print(f"\nrun folder {run}: config.yaml, log.csv, curves.png, best/, last/, overlays/, "
              f"metrics.json, test_per_image.csv")


if __name__ == "__main__":
    run_cli(main)
