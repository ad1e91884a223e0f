"""The concept readout: format, no ground truth, the coordinate search, the agreement figures."""

import copy
import itertools
import math

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from llava_inference.attributes import KEYS, VOCABULARIES, Attributes
from llava_inference.sentence_template import sentence
from model.CoTexNet import CoTexNet, predict_labels
from model.tiny import build_clipseg, tiny_clipseg_config
from train_utils.concept_readout import (
    CSV_COLUMNS,
    DICTIONARY,
    agreement,
    kl_per_row,
    readout,
    true_attributes,
    write_csv,
)
from train_utils.losses import distillation_kl

KEYWORD = "polyp area"
SMALL = dict(number=(1, 2), location=("center", "top left"), shape=("round", "oval"), size=("small", "large"),
             color=("pink", "red"))


def predicted_foreground(model, pixel_values):
    """Where the model's evaluation path (images only) predicts any foreground class."""
    with torch.inference_mode():
        return predict_labels(model(pixel_values).logits) > 0


def kl_of_sentences(model, tokenizer, images, masks, sentences: list[list[str]]) -> list[list[float]]:
    """The readout's score of each given sentence of each image, re-stated from the model's parts:
    KL(softmax(T) || softmax(I)), T with the ROI token of the image masked by `masks`."""
    with torch.inference_mode():
        _, cls = model.encode_images(torch.cat([images, images * masks[:, None]]))
        img, roi = model.img2text(cls[:len(images)]), model.roi_mapper(cls[len(images):])
        scores = []
        for i, texts in enumerate(sentences):
            tokens = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
            text = torch.sigmoid(model.text_features(tokens["input_ids"], tokens["attention_mask"],
                                                     roi[i:i + 1].expand(len(texts), -1)))
            scores.append(kl_per_row(text, img[i:i + 1].expand(len(texts), -1)).tolist())
    return scores


def agreement_with_masks(readouts, masks, images) -> dict:
    return agreement(readouts, [true_attributes(mask, image) for mask, image in zip(masks, images, strict=True)])


@pytest.fixture(scope="module")
def model():
    return CoTexNet.from_clipseg(build_clipseg(tiny_clipseg_config(), seed=3)).eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def masks():
    masks = torch.zeros(3, 224, 224, dtype=torch.bool)
    masks[0, 60:150, 40:120] = True
    masks[1, 10:60, 10:200] = True
    return masks  # the third is empty


def test_kl_per_row_is_the_training_kl_of_each_row():
    gen = torch.Generator().manual_seed(1)
    text, img = torch.rand(4, 16, generator=gen), torch.rand(4, 16, generator=gen)
    expected = torch.stack([distillation_kl(text[k:k + 1], img[k:k + 1]) for k in range(4)])
    torch.testing.assert_close(kl_per_row(text, img), expected)


def test_readout_format_and_csv(model, tokenizer, images, masks, tmp_path):
    found = readout(model, tokenizer, images, masks, KEYWORD, batch_size=2, progress=False)
    assert len(found) == 3
    for row in found[:2]:
        assert row["number"] in (1, 2, 3)
        for key, words in VOCABULARIES.items():
            assert row[key] in words
        assert row["sentence"] == sentence(Attributes(**{k: row[k] for k in KEYS}), KEYWORD)
        assert math.isfinite(row["kl"]) and row["kl"] >= 0
        assert set(row["scores"]) == set(KEYS)
        assert set(row["scores"]["color"]) == set(VOCABULARIES["color"])
    # The reported KL is the score of the reported sentence.
    rescored = kl_of_sentences(model, tokenizer, images[:2], masks[:2], [[found[0]["sentence"]], [found[1]["sentence"]]])
    assert rescored[0][0] == pytest.approx(found[0]["kl"], rel=1e-4)
    assert rescored[1][0] == pytest.approx(found[1]["kl"], rel=1e-4)
    assert found[2]["number"] == 0 and found[2]["sentence"] == "no polyp areas in the image."
    assert math.isnan(found[2]["kl"])

    write_csv(tmp_path / "concept.csv", ["a.jpg", "b.jpg", "c.jpg"], found)
    table = pd.read_csv(tmp_path / "concept.csv")
    assert tuple(table.columns) == CSV_COLUMNS
    assert table["name"].tolist() == ["a.jpg", "b.jpg", "c.jpg"]
    assert table["sentence"][0] == found[0]["sentence"] and np.isnan(table["kl"][2])


def test_readout_uses_the_predicted_mask_not_the_truth(model, tokenizer, synthetic_root):
    from data_process.my_dataset import SegDataset, collate
    from data_process.registry import get_spec
    from data_process.transforms import eval_transform

    names = sorted(p.name for p in (synthetic_root / "synthetic" / "images").iterdir())[:2]
    split = pd.DataFrame(dict(dataset="synthetic", img_name=names, mask_name=names))
    dataset = SegDataset(synthetic_root, "synthetic", split, get_spec("synthetic"), eval_transform(224))
    batch = collate([dataset[0], dataset[1]])
    # A decoder bias that predicts some foreground, so the ROI is not empty.
    model = copy.deepcopy(model)
    model.mean.data.fill_(0.0)
    predicted = predicted_foreground(model, batch["pixel_values"])
    assert predicted.any(dim=(1, 2)).all()
    first = readout(model, tokenizer, batch["pixel_values"], predicted, KEYWORD, progress=False)

    # Another truth (labels and the training ROI): the same readout, since only images and predictions enter.
    batch["label"] = 1 - batch["label"]
    batch["roi_pixel_values"] = torch.zeros_like(batch["roi_pixel_values"])
    again = readout(model, tokenizer, batch["pixel_values"], predicted_foreground(model, batch["pixel_values"]),
                    KEYWORD, progress=False)
    assert [r["sentence"] for r in again] == [r["sentence"] for r in first]
    assert [r["kl"] for r in again] == pytest.approx([r["kl"] for r in first])

    # The predicted mask does matter: it makes the ROI token.
    other = ~predicted
    text = [[r["sentence"]] for r in first]
    changed = kl_of_sentences(model, tokenizer, batch["pixel_values"], other, text)
    assert [kl for [kl] in changed] != pytest.approx([r["kl"] for r in first])


def test_coordinate_search_is_a_local_optimum_no_worse_than_its_start(model, tokenizer, images, masks):
    found = readout(model, tokenizer, images[:2], masks[:2], KEYWORD, dictionary=SMALL, progress=False)
    every = [dict(zip(KEYS, words, strict=True)) for words in itertools.product(*(SMALL[k] for k in KEYS))]
    texts = [sentence(Attributes(**words), KEYWORD) for words in every]
    exhaustive = kl_of_sentences(model, tokenizer, images[:2], masks[:2], [texts, texts])
    start = texts.index(sentence(Attributes(**{k: SMALL[k][0] for k in KEYS}), KEYWORD))
    for row, scores in zip(found, exhaustive, strict=True):
        assert min(scores) - 1e-6 <= row["kl"] <= scores[start] + 1e-6
        result = texts.index(row["sentence"])
        # No single-attribute change scores better.
        for key in KEYS:
            for word in SMALL[key]:
                neighbour = texts.index(sentence(Attributes(**{**every[result], key: word}), KEYWORD))
                assert scores[neighbour] >= scores[result] - 1e-6


def _disc_image(size=120, radius=20, centre=(60, 60), rgb=(230, 150, 160)):
    mask = np.zeros((size, size), np.uint8)
    cv2.circle(mask, centre, radius, 1, -1)
    image = np.zeros((size, size, 3), np.uint8)
    image[mask > 0] = rgb
    return mask, image


def test_agreement_counts_per_attribute_beside_chance():
    mask, image = _disc_image()  # one round medium pink region in the centre (8.7 % of the image)
    right = dict(number=1, location="center", shape="round", size="medium", color="pink")
    wrong = dict(number=2, location="left", shape="round", size="small", color="red")
    empty = dict(number=0, location="", shape="", size="", color="")
    result = agreement_with_masks([right, wrong, empty, right], [mask, mask, mask, np.zeros_like(mask)],
                       [image, image, image, image])
    assert result["images"] == 3 and result["no_region"] == 1
    assert result["shape"]["agreement"] == pytest.approx(2 / 3)
    for key in ("number", "location", "size", "color"):
        assert result[key]["agreement"] == pytest.approx(1 / 3)
        assert result[key]["chance"] == pytest.approx(1 / len(DICTIONARY[key]))
    assert result["color"]["chance"] == pytest.approx(1 / 11)
    assert result["color"]["majority"] == 1.0  # the describer said pink three times out of three


def test_majority_rate_is_the_most_frequent_true_word():
    small, _ = _disc_image(radius=10)  # 2.2 %: small
    large, image = _disc_image(radius=40)  # 35 %: large
    readouts = [dict(number=1, location="center", shape="round", size="large", color="pink")] * 3
    result = agreement_with_masks(readouts, [small, large, large], [image, image, image])
    assert result["size"] == dict(agreement=pytest.approx(2 / 3), chance=pytest.approx(1 / 3),
                                  majority=pytest.approx(2 / 3))


def test_agreement_counts_three_or_more_regions_as_three():
    mask = np.zeros((120, 120), np.uint8)
    for x in (15, 45, 75, 105):
        cv2.circle(mask, (x, 60), 8, 1, -1)
    image = np.full((120, 120, 3), (230, 150, 160), np.uint8)
    result = agreement_with_masks([dict(number=3, location="", shape="", size="", color="")], [mask], [image])
    assert result["number"]["agreement"] == 1.0
