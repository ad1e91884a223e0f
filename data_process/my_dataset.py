"""The torch Dataset of the paper: image, label map, ROI tensor, tokenised text prompt, names.

    split = splits.read("data_process").of("kvasir", "data_process/kvasir").split("train")
    data = SegDataset("data_process", "kvasir", split, get_spec("kvasir"), train_transform(),
                      tokenizer, prompts=load_prompts(text_csv, spec))
    pad = partial(collate, pad_id=tokenizer.pad_token_id, roi_position=model.roi_position)
    loader = DataLoader(data, batch_size=16, collate_fn=pad)

Prompts are tokenised once here, not per item. Without prompts (evaluation, prediction)
items carry no text.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import torch
from torchvision import tv_tensors

from common.errors import SHOW, CoTexNetError
from data_process.decoding import read_image, read_mask
from data_process.layout import stem, why_missing
from data_process.pairing import mask_files
from data_process.registry import DatasetSpec


class SegDataset(torch.utils.data.Dataset):
    def __init__(self, root, dataset_name: str, split_df: pd.DataFrame, spec: DatasetSpec, transform,
                 tokenizer=None, prompts: dict[str, str] | None = None, max_length: int = 77,
                 binarize: str = "registry"):
        self.folder, self.binarize = Path(root) / dataset_name, binarize
        self.rows = list(zip(split_df["img_name"], split_df["mask_name"], strict=True))
        self.spec, self.transform = spec, transform
        self._check_files_exist(dataset_name)
        self.tokens = None
        if prompts is not None:
            if tokenizer is None:
                raise ValueError("SegDataset: prompts given without a tokenizer")
            missing = [image for image, _ in self.rows if stem(image) not in prompts]
            if missing:
                raise CoTexNetError(f"text prompts of {dataset_name}: {len(missing)} of {len(self.rows)} images have "
                                    f"none, e.g. {missing[:SHOW]} (run get_text.py for them)")
            texts = [prompts[stem(image)] for image, _ in self.rows]
            # One token more than allowed shows which prompts the truncation cuts (CLIP's limit is 77).
            self.tokens = tokenizer(texts, truncation=True, max_length=max_length + 1)["input_ids"]
            long = [i for i, ids in enumerate(self.tokens) if len(ids) > max_length]
            if long:
                print(f"warning: text prompts of {dataset_name}: {len(long)} of {len(texts)} are longer than "
                      f"{max_length} tokens and are cut to {max_length}, e.g. {[self.rows[i][0] for i in long[:SHOW]]}",
                      file=sys.stderr)
                cut = tokenizer([texts[i] for i in long], truncation=True, max_length=max_length)["input_ids"]
                for i, ids in zip(long, cut, strict=True):
                    self.tokens[i] = ids

    def _check_files_exist(self, dataset_name: str) -> None:
        """Every listed file is there, checked before any epoch: a missing validation image must
        not surface after a whole training epoch (nor from inside a DataLoader worker)."""
        missing = []
        for image, mask in self.rows:
            files = (self.folder / "images" / image, *mask_files(self.folder / "masks" / mask, self.spec))
            missing += [path for path in files if not path.is_file()]
        if missing:
            more = f" (and {len(missing) - 1} more missing files)" if len(missing) > 1 else ""
            raise CoTexNetError(f"{missing[0]}: {why_missing(missing[0])}, but listed in the split of {dataset_name}{more}")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        image_name, mask_name = self.rows[index]
        image = read_image(self.folder / "images" / image_name)
        h, w = image.shape[:2]
        label = read_mask(self.folder / "masks" / mask_name, self.spec, size=(w, h), binarize=self.binarize)
        pixels, label = self.transform(tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1)),
                                       tv_tensors.Mask(torch.from_numpy(label)))
        pixels, label = pixels.as_subclass(torch.Tensor), label.as_subclass(torch.Tensor).long()
        item = dict(pixel_values=pixels, label=label, roi_pixel_values=pixels * (label > 0),
                    name=image_name, orig_size=(h, w))
        if self.tokens is not None:
            ids = torch.tensor(self.tokens[index], dtype=torch.long)
            item.update(input_ids=ids, attention_mask=torch.ones_like(ids))
        return item


def collate(batch: list[dict], pad_id: int | None = None, roi_position: int = 0) -> dict:
    """Stack the tensors; pad input_ids with `pad_id` (the tokenizer's) and attention_mask with 0 to
    the longest prompt, and past `roi_position` (the model's: the token the ROI pseudo-token replaces)."""
    out = {key: torch.stack([item[key] for item in batch]) for key in ("pixel_values", "label", "roi_pixel_values")}
    out.update(name=[item["name"] for item in batch], orig_size=[item["orig_size"] for item in batch])
    if "dataset" in batch[0]:  # items of several datasets (train_utils.data.Mixed)
        out["dataset"] = [item["dataset"] for item in batch]
    if "input_ids" in batch[0]:
        if pad_id is None:
            raise ValueError("collate: prompts need the tokenizer's pad_id")
        length = max(roi_position + 1, *(len(item["input_ids"]) for item in batch))
        ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), length), dtype=torch.long)
        for row, item in enumerate(batch):
            ids[row, : len(item["input_ids"])] = item["input_ids"]
            attention[row, : len(item["input_ids"])] = 1
        out.update(input_ids=ids, attention_mask=attention)
    return out
