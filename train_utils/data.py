"""What a run reads, built from its config: the datasets of its splits (the train split with its
augmented copies and prompts; several datasets mixed as one) or of new images, in loaders.

Evaluation and prediction read through `readable_loader`: an unreadable file keeps its place in
its batch as an error, so that the rest goes on and per-batch gathers stay aligned.
"""

from __future__ import annotations

import bisect
import weakref
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset
from torchvision import tv_tensors

from common.errors import CoTexNetError
from data_process import splits
from data_process.decoding import read_image
from data_process.layout import AUGMENTED, dataset_dir
from data_process.my_dataset import SegDataset, collate
from data_process.transforms import eval_transform, train_transform
from llava_inference.text_csv_reader import load_prompts
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
    found = SegDataset(d.root_dir, name, frame, cfg.spec(name), transform, tokenizer=tokenizer, prompts=prompts,
                       binarize=d.binarize)
    copies = dataset_splits(cfg, name).copies_of(frame) if split == "train" and d.augmented else []
    if not len(copies):
        return found
    return WithCopies(found, SegDataset(d.root_dir, f"{name}/{AUGMENTED}", copies, cfg.spec(name), transform,
                                        tokenizer=tokenizer, prompts=prompts, binarize=d.binarize))


class Mixed(ConcatDataset):
    """The same split of several datasets as one dataset; each item carries its dataset's name."""

    def __init__(self, parts: dict):
        super().__init__(list(parts.values()))
        self.names = list(parts)
        self.folders = {name: part.folder for name, part in parts.items()}

    def __getitem__(self, index: int) -> dict:
        item = super().__getitem__(index)
        part = bisect.bisect_right(self.cumulative_sizes, index % len(self))
        return dict(item, dataset=self.names[part])


def split_set(cfg: Config, split: str, tokenizer=None):
    """A split of the configured dataset(s): a SegDataset for one dataset, a `Mixed` of them for
    several (each dataset keeps its registry entry, text CSV and split rows). With a tokenizer,
    each dataset's items carry the prompts of its own text CSV."""
    sets, several = {}, len(cfg.datasets()) > 1
    for name, csv in cfg.text_csvs().items():
        prompts = None
        if tokenizer is not None:
            try:
                prompts = load_prompts(csv, cfg.spec(name))
            except CoTexNetError as err:
                # The default text CSV names its dataset; a path of one's own may not.
                raise CoTexNetError(f"dataset {name}: {err}" if several else str(err)) from None
        sets[name] = dataset(cfg, split, tokenizer, prompts, name=name)
    return Mixed(sets) if several else sets[cfg.datasets()[0]]


def image_paths(data, batch: dict) -> list:
    """The image files of a batch of `data` (a SegDataset or a `Mixed`)."""
    if "dataset" in batch:
        return [data.folders[part] / "images" / name for part, name in zip(batch["dataset"], batch["name"], strict=True)]
    return [data.folder / "images" / name for name in batch["name"]]


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
    return DataLoader(data, batch_size=process_batch_size(cfg, num_processes), shuffle=shuffle,
                      num_workers=cfg.TRAIN.num_workers, collate_fn=collate_fn, generator=generator,
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
    """Image files of one folder without masks (prediction), resized and normalised exactly as in
    validation; an item is named by its file name."""

    def __init__(self, paths: list[Path], size: int):
        self.paths, self.transform = {path.name: path for path in paths}, eval_transform(size)
        self.names = list(self.paths)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict:
        name = self.names[index]
        image = read_image(self.paths[name])
        pixels = self.transform(tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1)))
        return dict(pixel_values=pixels.as_subclass(torch.Tensor), name=name, orig_size=image.shape[:2])


def collate_readable(batch: list[dict]) -> dict:
    """A batch of the readable items (name == [] when none is) plus `errors`: for every item in
    its place, None or the message of a file that could not be read.

    Items of a SegDataset go through its `collate`; those of ImageFiles carry no label to stack."""
    good = [item for item in batch if "error" not in item]
    if not good:
        out = {"name": []}
    elif "label" in good[0]:
        out = collate(good)
    else:
        out = dict(pixel_values=torch.stack([item["pixel_values"] for item in good]),
                   name=[item["name"] for item in good], orig_size=[item["orig_size"] for item in good])
    out["errors"] = [item.get("error") for item in batch]
    return out


def readable_loader(cfg: Config, data, num_processes: int = 1) -> DataLoader:
    """A loader of `data` in which an unreadable file is listed in the batch's `errors`, not raised."""
    return loader(cfg, SkipUnreadable(data), collate_fn=collate_readable, num_processes=num_processes)
