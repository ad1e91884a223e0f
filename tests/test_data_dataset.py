"""SegDataset, collate, one dataset's rows of a split file and the joint transforms."""

from functools import partial

import pandas as pd
import pytest
import torch
from torchvision import tv_tensors

from common.errors import CoTexNetError
from data_process import splits as split_files
from data_process.my_dataset import SegDataset, collate
from data_process.pairing import pair_files
from data_process.registry import get_spec
from data_process.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, train_transform
from model.CoTexNet import ROI_POSITION

PROMPTS = ["one round small red polyp area, located in the left of the image.", "polyp area"]


def split_of(root, name) -> pd.DataFrame:
    pairs = pair_files(root / name, get_spec(name)).pairs
    return pd.DataFrame([(name, image, mask) for image, mask in pairs], columns=["dataset", "img_name", "mask_name"])


def prompts_for(split: pd.DataFrame) -> dict[str, str]:
    return {name[: -len(".jpg")]: PROMPTS[i % 2] for i, name in enumerate(split["img_name"])}


@pytest.mark.parametrize("make", [train_transform, eval_transform])
def test_items_shapes_dtypes_and_roi_zeroing(synthetic_root, tokenizer, make):
    split = split_of(synthetic_root, "synthetic")
    data = SegDataset(synthetic_root, "synthetic", split, get_spec("synthetic"), make(96), tokenizer, prompts_for(split))
    assert len(data) == 12
    for index in range(3):
        item = data[index]
        assert item["pixel_values"].shape == (3, 96, 96) and item["pixel_values"].dtype == torch.float32
        assert item["label"].shape == (96, 96) and item["label"].dtype == torch.int64
        assert set(item["label"].unique().tolist()) <= {0, 1}
        roi, pixels, inside = item["roi_pixel_values"], item["pixel_values"], item["label"] > 0
        assert (roi[:, ~inside] == 0).all() and torch.equal(roi[:, inside], pixels[:, inside])
        assert item["input_ids"][0] == 49406 and item["input_ids"][-1] == 49407
        assert item["attention_mask"].sum() == len(item["input_ids"])
        assert item["name"] == split["img_name"][index] and len(item["orig_size"]) == 2
        assert 180 <= min(item["orig_size"]) and item["orig_size"][0] != item["orig_size"][1]


def test_train_transform_on_odd_sizes_keeps_labels_and_pads_with_zero():
    image = tv_tensors.Image(torch.full((3, 37, 251), 255, dtype=torch.uint8))
    label = tv_tensors.Mask(torch.randint(1, 3, (37, 251), dtype=torch.uint8))
    black = (torch.zeros(3) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.manual_seed(0)
    padded_seen = 0
    for _ in range(30):  # the shorter side becomes 61..77 px: below 64 the crop pads
        pixels, out = train_transform(64)(image, label)
        assert pixels.shape == (3, 64, 64) and out.shape == (64, 64)
        assert set(out.unique().tolist()) <= {0, 1, 2}  # nearest neighbour: no new label values
        padded = (pixels - black[:, None, None]).abs().sum(0) < 1e-4
        assert torch.equal(padded, out == 0)  # padding: black image, background label
        padded_seen += bool(padded.any())
    assert 0 < padded_seen < 30
    pixels, out = eval_transform(64)(image, label)
    assert pixels.shape == (3, 64, 64) and torch.allclose(pixels[:, 0, 0], (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD))


def test_multiclass_labels(synthetic_root):
    split = split_of(synthetic_root, "synthetic_multiclass")
    data = SegDataset(synthetic_root, "synthetic_multiclass", split, get_spec("synthetic_multiclass"), eval_transform(64))
    labels = torch.stack([data[i]["label"] for i in range(len(data))])
    assert set(labels.unique().tolist()) == {0, 1, 2} and "input_ids" not in data[0]


def test_collate_pads_prompts(synthetic_root, tokenizer):
    split = split_of(synthetic_root, "synthetic")
    data = SegDataset(synthetic_root, "synthetic", split, get_spec("synthetic"), eval_transform(32), tokenizer,
                      prompts_for(split))
    batch = collate([data[0], data[1], data[2]], tokenizer.pad_token_id, ROI_POSITION)
    lengths = [len(data[i]["input_ids"]) for i in range(3)]
    assert batch["pixel_values"].shape == (3, 3, 32, 32) and batch["label"].shape == (3, 32, 32)
    assert batch["input_ids"].shape == (3, max(lengths)) and batch["input_ids"].dtype == torch.int64
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["input_ids"][batch["attention_mask"] == 0] == 49407).all()
    assert batch["name"] == split["img_name"][:3].tolist() and len(batch["orig_size"]) == 3
    short = collate([dict(data[1], input_ids=torch.tensor([49406, 49407]), attention_mask=torch.ones(2, dtype=torch.long))],
                    tokenizer.pad_token_id, ROI_POSITION)
    assert short["input_ids"].shape == (1, 6) and short["attention_mask"].tolist() == [[1, 1, 0, 0, 0, 0]]
    assert "input_ids" not in collate([{k: v for k, v in data[0].items() if "input" not in k and "attention" not in k}])


def train_rows(split_dir, name):
    return split_files.read(split_dir).of(name, split_dir / name).split("train")


def test_split_file_errors(tmp_path):
    good = tmp_path / "train_data.csv"
    pd.DataFrame({"dataset": ["isic", "busi"], "img_name": ["a.jpg", "b.png"], "mask_name": ["a.png", "b_mask.png"]}) \
        .to_csv(good, index=False)
    assert train_rows(tmp_path, "busi")["img_name"].tolist() == ["b.png"]
    with pytest.raises(CoTexNetError, match=r"no rows for dataset 'kvasir'.*\['busi', 'isic'\]"):
        train_rows(tmp_path, "kvasir")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "train_data.csv").write_text("dataset,image\nkvasir,a.jpg\n")
    with pytest.raises(CoTexNetError, match=r"bad/train_data.csv: missing columns \['img_name', 'mask_name'\]"):
        train_rows(tmp_path / "bad", "kvasir")
    with pytest.raises(CoTexNetError, match="absent/train_data.csv: no such file"):
        train_rows(tmp_path / "absent", "kvasir")


def test_missing_prompts_are_listed(synthetic_root, tokenizer):
    split = split_of(synthetic_root, "synthetic")
    prompts = prompts_for(split)
    for stem in ("syn_0003", "syn_0009"):
        del prompts[stem]
    with pytest.raises(CoTexNetError, match=r"2 of 12 images .*syn_0003.jpg.*syn_0009.jpg"):
        SegDataset(synthetic_root, "synthetic", split, get_spec("synthetic"), eval_transform(32), tokenizer, prompts)


def test_dataloader_with_workers_and_real_kvasir(kvasir_dir, tokenizer):
    names = sorted(p.name for p in (kvasir_dir / "images").iterdir())[:4]
    split = pd.DataFrame({"dataset": "kvasir-seg", "img_name": names, "mask_name": names})
    data = SegDataset(kvasir_dir.parent, "kvasir-seg", split, get_spec("kvasir"), train_transform(64), tokenizer,
                      {n[:-4]: PROMPTS[0] for n in names})
    loader = torch.utils.data.DataLoader(data, batch_size=2, num_workers=2, collate_fn=partial(collate, pad_id=tokenizer.pad_token_id, roi_position=ROI_POSITION))
    batches = list(loader)
    assert len(batches) == 2 and batches[0]["label"].dtype == torch.int64
    assert 0 < torch.cat([b["label"] for b in batches]).float().mean() < 1
