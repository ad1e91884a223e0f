"""Stage 3: train CoTexNet, reload the best checkpoint, evaluate validation and test.

  python train.py                                   # dataset_config/train_config.yaml
  python train.py --config my.yaml TRAIN.epochs=50 DATASET.dataset_name=clinicdb
  python train.py --resume runs/kvasir_20260101-120000   # continue where it stopped
  accelerate launch --num_processes 4 train.py ...  # several GPUs (or nodes)

Everything goes to runs/<name>/: config.yaml (resolved), log.csv (one row per epoch),
curves.png, best/ and last/ checkpoints, overlays/, metrics.json, test_per_image.csv.
Ctrl-C finishes the current epoch and saves last/ (a second Ctrl-C quits at once).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from accelerate.utils import set_seed
from transformers import AutoConfig, AutoTokenizer

from common.errors import CoTexNetError, run_cli
from common.io import write_json, write_text
from data_process.registry import REGISTRY_FILE, known_datasets
from llava_inference.text_to_csv import load_prompts
from model.checkpoint import load_checkpoint
from model.CoTexNet import CoTexNet
from train_utils import data, engine, reporting
from train_utils.config import load_config
from train_utils.losses import CoTexNetLoss
from train_utils.metrics import class_names

DEFAULT_CONFIG = "dataset_config/train_config.yaml"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"YAML config (default: {DEFAULT_CONFIG})")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue this run with its saved config and state "
                        "(a run stopped before its first last/ checkpoint starts over from epoch 1)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. TRAIN.epochs=5")
    return parser.parse_args(argv)


def run_folder(cfg, resume: str | None) -> Path:
    if resume:
        return Path(resume)
    t = cfg.TRAIN
    run = Path(t.run_dir) / (t.run_name or f"{cfg.DATASET.dataset_name}_{time.strftime('%Y%m%d-%H%M%S')}")
    if run.exists() and any(run.iterdir()):
        raise CoTexNetError(f"{run}: exists and is not empty; choose another TRAIN.run_name, or --resume {run}")
    return run


def check_num_classes(cfg, spec) -> None:
    """DATASET.num_classes must be the registry's: the head, the loss and the masks' labels follow it."""
    name, wanted = cfg.DATASET.dataset_name, spec.num_classes
    if cfg.DATASET.num_classes != wanted:
        where = (f"{REGISTRY_FILE} gives {name} {wanted}" if name.lower() in map(str.lower, known_datasets())
                 else f"{name} is not in {REGISTRY_FILE}, so it is binary: 2")
        raise CoTexNetError(f"DATASET.num_classes: {cfg.DATASET.num_classes}, but {where} "
                            "(categories + 1 background); fix the config or the registry entry")


def load_tokenizer(name: str):
    """The tokenizer of the CLIPSeg folder (or hub id), checked against the model's text vocabulary:
    transformers builds an empty tokenizer (special tokens only) for a folder without tokenizer files."""
    key, local = "MODEL.clipseg_hf_api", Path(name)
    # A path-like value that is no folder would reach the hub as a malformed repo id.
    if not local.is_dir() and (local.is_absolute() or name.startswith(".") or local.exists() or name.count("/") > 1):
        raise CoTexNetError(f"{key}: no tokenizer at {name}: no such folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        vocab = getattr(getattr(AutoConfig.from_pretrained(name), "text_config", None), "vocab_size", None)
    except (OSError, ValueError) as err:
        raise CoTexNetError(f"{key}: no tokenizer at {name} ({str(err).splitlines()[0]})") from err
    if vocab is not None and len(tokenizer) != vocab:  # None: not a CLIPSeg config, the model load says so
        raise CoTexNetError(f"{key}: {name}: its tokenizer has {len(tokenizer)} tokens but the model's text "
                            f"vocabulary {vocab}; tokenizer files missing or of another model "
                            "(needs vocab.json + merges.txt, or tokenizer.json)")
    return tokenizer


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.resume:
        if args.overrides:
            raise CoTexNetError("--resume continues a run with its saved config; overrides are not allowed")
        if not (Path(args.resume) / "config.yaml").is_file():
            raise CoTexNetError(f"--resume {args.resume}: not a run folder of train.py (no config.yaml)")
        cfg = load_config(Path(args.resume) / "config.yaml")
        state = engine.load_training_state(Path(args.resume))
        if state is None:
            print(f"{args.resume}: no last/ checkpoint (stopped during its first epoch): starting over from "
                  "epoch 1 with its config.yaml")
    else:
        cfg, state = load_config(args.config, args.overrides), None
    # Checked before the run folder is made: a wrong setting leaves nothing behind.
    spec = data.spec(cfg)
    check_num_classes(cfg, spec)
    tokenizer = load_tokenizer(cfg.MODEL.clipseg_hf_api)
    run = run_folder(cfg, args.resume)
    accelerator = engine.make_accelerator(cfg)
    main_process = accelerator.is_main_process
    if main_process:
        print(cfg.to_yaml())
        write_text(run / "config.yaml", cfg.to_yaml())
    set_seed(cfg.TRAIN.random_seed)  # the same on every process: they draw the same shuffles

    # Data: the training split carries the text prompts; validation and test are images only.
    names = class_names(cfg.DATASET.num_classes, spec.categories)
    prompts = load_prompts(cfg.text_csv(), spec)
    train_set = data.dataset(cfg, "train", tokenizer, prompts)
    val_set, test_set = data.dataset(cfg, "val"), data.dataset(cfg, "test")
    generator = torch.Generator().manual_seed(cfg.TRAIN.random_seed)
    train_loader = data.loader(cfg, train_set, shuffle=True, generator=generator)
    val_loader, test_loader = data.loader(cfg, val_set), data.loader(cfg, test_set)

    # Model, loss, optimizer, schedule (restored from last/ when resuming).
    if state is None:
        model = CoTexNet.from_clipseg(cfg.MODEL.clipseg_hf_api, cfg.DATASET.num_classes)
    else:
        model, _ = load_checkpoint(run / "last", num_classes=cfg.DATASET.num_classes)
    engine.apply_precision(model, accelerator, cfg.TRAIN.compile)
    criterion = CoTexNetLoss(cfg.DATASET.num_classes, cfg.TRAIN.seg_weight, cfg.TRAIN.kl_weight)
    optimizer = engine.build_optimizer(model, cfg)
    scheduler = engine.build_scheduler(optimizer, cfg, len(train_loader))
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    model, optimizer, train_loader, val_loader, test_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, val_loader, test_loader, scheduler)

    finished = engine.fit(cfg, run, accelerator, model, criterion, optimizer, scheduler, train_loader, val_loader,
                          generator, state, names)
    if not finished:
        print(f"stopped; last/ saved. Continue with: python train.py --resume {run}")
        raise KeyboardInterrupt

    # Final evaluation of the best checkpoint (or the last weights when TRAIN.save_best is false).
    if cfg.TRAIN.save_best:
        model, extra = load_checkpoint(run / "best")
        model.to(accelerator.device)
    results, per_image = {}, {}
    for split, split_loader in (("val", val_loader), ("test", test_loader)):
        per_image[split], results[split], _ = engine.evaluate(model, split_loader, accelerator,
                                                              cfg.DATASET.num_classes, names, desc=split)
    if main_process:
        best_epoch = extra["epoch"] if cfg.TRAIN.save_best else None
        write_json(run / "metrics.json", dict(best_epoch=best_epoch, resolution=cfg.TRAIN.input_size, **results))
        reporting.write_csv(run / "test_per_image.csv", per_image["test"])
        print(f"\nbest epoch: {best_epoch}  (metrics at {cfg.TRAIN.input_size}x{cfg.TRAIN.input_size}; "
              f"evaluate.py gives them at the original image size)")
        print(reporting.format_table(results))
        print(f"\nrun folder {run}: config.yaml, log.csv, curves.png, best/, last/, overlays/, "
              f"metrics.json, test_per_image.csv")


if __name__ == "__main__":
    run_cli(main)
