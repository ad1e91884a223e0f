"""Datasets and loaders of a run, from its config: the splits (and the train split's augmented
copies), the prompts, the transforms; images without masks for prediction; skipping unreadable
files in evaluation and prediction."""

from __future__ import annotations

import weakref
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset
from torchvision import tv_tensors

from common.atomic import write_text
from common.errors import CoTexNetError
from data_process import splits
from data_process.decoding import read_image
from data_process.layout import AUGMENTED, dataset_dir
from data_process.my_dataset import SegDataset, collate
from data_process.registry import get_spec
from data_process.transforms import eval_transform, train_transform
from train_utils.config import Config

_SNAPSHOTS: dict[int, tuple[weakref.ref, dict]] = {}  # id(config) -> (the config, dataset -> its splits)


def dataset_splits(cfg: Config, name: str | None = None) -> splits.DatasetSplits:
    """Dataset `name`'s rows in the split files (default: the configured one, or the first of
    several), checked to be a partition unless DATASET.allow_split_overlap. The files are read
    once per config: every split of a run comes from one moment of the files."""
    d, name = cfg.DATASET, name or cfg.datasets()[0]
    for key in [key for key, (ref, _) in _SNAPSHOTS.items() if ref() is None]:
        del _SNAPSHOTS[key]
    ref, read = _SNAPSHOTS.get(id(cfg), (None, {}))
    if ref is None or ref() is not cfg:
        ref, read = _SNAPSHOTS[id(cfg)] = (weakref.ref(cfg), {})
    if name not in read:
        read[name] = splits.read(d.split_dir).of(name, dataset_dir(d.root_dir, name), d.allow_split_overlap)
    return read[name]


def split_frame(cfg: Config, split: str, name: str | None = None):
    """The rows of `split` for dataset `name` (default: the configured one, or the first of several);
    the training split subsampled by `train_data_ratio` (a seeded random subset, in the split file's
    order). Split "all": the three splits that hold the dataset, each image once."""
    mine = dataset_splits(cfg, name)
    if split == "all":
        return mine.union(cfg.DATASET.split_dir)
    frame = mine.split(split)
    if split == "train" and cfg.TRAIN.train_data_ratio < 1:
        keep = max(1, round(len(frame) * cfg.TRAIN.train_data_ratio))
        frame = frame.sample(n=keep, random_state=cfg.TRAIN.random_seed).sort_index()
    return frame


class WithCopies(ConcatDataset):
    """The train images of a dataset, then their augmented copies (train_augmented.csv)."""

    def __init__(self, originals: SegDataset, copies: SegDataset):
        super().__init__([originals, copies])
        self.folder = originals.folder


def dataset(cfg: Config, split: str, tokenizer=None, prompts=None, name: str | None = None):
    """A split of dataset `name` (default: the configured one) as a SegDataset; the train split gets
    the random transform and the text, and its images' augmented copies unless DATASET.augmented is false."""
    d, size, name = cfg.DATASET, cfg.TRAIN.input_size, name or cfg.datasets()[0]
    transform = train_transform(size) if split == "train" else eval_transform(size)
    frame = split_frame(cfg, split, name)
    found = SegDataset(d.root_dir, name, frame, spec(cfg, name), transform, tokenizer=tokenizer, prompts=prompts,
                       binarize=d.binarize)
    copies = dataset_splits(cfg, name).copies_of(frame) if split == "train" and d.augmented else []
    if not len(copies):
        return found
    return WithCopies(found, SegDataset(d.root_dir, f"{name}/{AUGMENTED}", copies, spec(cfg, name), transform,
                                        tokenizer=tokenizer, prompts=prompts, binarize=d.binarize))


def spec(cfg: Config, name: str | None = None):
    return get_spec(name or cfg.datasets()[0], cfg.DATASET.keyword)


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


class ImageFiles(Dataset):
    """Image files without masks (prediction), resized and normalised exactly as in validation."""

    def __init__(self, paths: list[Path], size: int):
        self.paths, self.transform = paths, eval_transform(size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        image = read_image(self.paths[index])
        pixels = self.transform(tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1)))
        return dict(pixel_values=pixels.as_subclass(torch.Tensor), name=str(self.paths[index]),
                    orig_size=image.shape[:2])


def collate_readable(batch: list[dict]) -> dict:
    """A batch of the readable items (name == [] when none is) plus `errors`, the messages of the others.

    Items of a SegDataset go through its `collate`; those of ImageFiles carry no label to stack."""
    good = [item for item in batch if "error" not in item]
    if not good:
        out = {"name": []}
    elif "label" in good[0]:
        out = collate(good)
    else:
        out = dict(pixel_values=torch.stack([item["pixel_values"] for item in good]),
                   name=[item["name"] for item in good], orig_size=[item["orig_size"] for item in good])
    out["errors"] = [item["error"] for item in batch if "error" in item]
    return out


def readable_loader(cfg: Config, data, num_processes: int = 1) -> DataLoader:
    """A loader of `data` in which an unreadable file is listed in the batch's `errors`, not raised."""
    return loader(cfg, SkipUnreadable(data), collate_fn=collate_readable, num_processes=num_processes)


def report_unreadable(errors: list[str], path: Path) -> None:
    """Print the files that could not be read, and list them in `path`."""
    if errors:
        print(f"{len(errors)} unreadable file(s) skipped (listed in {path}):\n  " + "\n  ".join(errors[:10]))
        write_text(path, "\n".join(errors) + "\n")
