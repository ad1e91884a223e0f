"""Datasets and loaders of a run, from its config: the splits, the prompts, the transforms."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from common.errors import CoTexNetError
from common.io import write_text
from data_process.layout import split_csv
from data_process.my_dataset import SegDataset, collate, read_split
from data_process.registry import get_spec
from data_process.transforms import eval_transform, train_transform
from train_utils.config import Config


def split_frame(cfg: Config, split: str):
    """The rows of `split` for the configured dataset; the training split subsampled by
    `train_data_ratio` (a seeded random subset, in the split file's order)."""
    d = cfg.DATASET
    frame = read_split(split_csv(d.split_dir, split), d.dataset_name)
    if split == "train" and cfg.TRAIN.train_data_ratio < 1:
        keep = max(1, round(len(frame) * cfg.TRAIN.train_data_ratio))
        frame = frame.sample(n=keep, random_state=cfg.TRAIN.random_seed).sort_index()
    return frame


def dataset(cfg: Config, split: str, tokenizer=None, prompts=None) -> SegDataset:
    """A split as a SegDataset; the train split gets the random transform and the text."""
    d, size = cfg.DATASET, cfg.TRAIN.input_size
    transform = train_transform(size) if split == "train" else eval_transform(size)
    return SegDataset(d.root_dir, d.dataset_name, split_frame(cfg, split), spec(cfg), transform,
                      tokenizer=tokenizer, prompts=prompts, binarize=d.binarize)


def spec(cfg: Config):
    return get_spec(cfg.DATASET.dataset_name, cfg.DATASET.keyword)


def process_batch_size(cfg: Config, num_processes: int) -> int:
    """The batch of one process: TRAIN.batch_size over the processes when TRAIN.global_batch
    (the paper's hyperparameters assume a batch of 16 on one GPU), else TRAIN.batch_size each."""
    t = cfg.TRAIN
    if not t.global_batch:
        return t.batch_size
    if t.batch_size % num_processes:
        raise CoTexNetError(f"TRAIN.batch_size: {t.batch_size} does not divide over {num_processes} processes "
                            f"(TRAIN.global_batch: true); use a multiple of {num_processes}, or TRAIN.global_batch=false "
                            f"for {t.batch_size} per process")
    return t.batch_size // num_processes


def loader(cfg: Config, data, shuffle: bool = False, generator: torch.Generator | None = None,
           collate_fn=collate, num_processes: int = 1) -> DataLoader:
    t = cfg.TRAIN
    return DataLoader(data, batch_size=process_batch_size(cfg, num_processes), shuffle=shuffle, num_workers=t.num_workers,
                      collate_fn=collate_fn, generator=generator,
                      pin_memory=torch.cuda.is_available())


class SkipUnreadable(Dataset):
    """Wraps a dataset so that an unreadable file yields {"error": message} instead of stopping
    evaluation or prediction; `collate_readable` lists those and batches the rest."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        try:
            return self.dataset[index]
        except CoTexNetError as err:
            return {"error": str(err)}


def collate_readable(batch: list[dict]) -> dict:
    """A batch of the readable items (name == [] when none is) plus `errors`, the messages of the others."""
    good = [item for item in batch if "error" not in item]
    out = collate(good) if good else {"name": []}
    out["errors"] = [item["error"] for item in batch if "error" in item]
    return out


def report_unreadable(errors: list[str], path: Path) -> None:
    """Print the files that could not be read, and list them in `path`."""
    if errors:
        print(f"{len(errors)} unreadable file(s) skipped (listed in {path}):\n  " + "\n  ".join(errors[:10]))
        write_text(path, "\n".join(errors) + "\n")
