"""Read the learned concept back as words: which attribute sentence matches what the model
computed from the image alone.

Candidates are the sentences of the concept dictionary (numbers 1..3, the location, shape,
size and colour words of stage 2) in stage 2's template, for the dataset's keyword. A
candidate is encoded as in training: the frozen text encoder with the ROI pseudo-token,
T = sigmoid(text projection); the ROI is the image masked by the model's own PREDICTED mask,
so no ground truth enters. Its score is the training distillation KL(softmax(T) || softmax(I))
against the image's pseudo text I (lower is closer).

The full dictionary has 3 x 9 x 8 x 3 x 11 = 7128 sentences, and the ROI token differs per
image, so the search is coordinate-wise: from a start sentence, each attribute in turn takes
its best word with the others fixed, cycling until the other four attributes have been
visited without a change (3 + 9 + 8 + 3 + 11 = 34 text-encoder passes per image for one full
sweep). The result is never worse than the start and no single-attribute change improves it
(unless `max_sweeps` cut the search short); it need not be the global optimum.

An image whose predicted mask is empty gets stage 2's empty row: number 0, no words, no KL.
`agreement` scores readouts against what the geometry describer says of the TRUE masks.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from common.atomic import atomic_path
from common.errors import CoTexNetError
from llava_inference.attributes import KEYS, VOCABULARIES, Attributes
from llava_inference.geometry import measure
from llava_inference.sentence_template import plural, sentence

NUMBERS = (1, 2, 3)
DICTIONARY: dict[str, tuple] = {"number": NUMBERS, **VOCABULARIES}
CSV_COLUMNS = ("name", "sentence", *KEYS, "kl")


def kl_per_row(text_embedding: torch.Tensor, img_embedding: torch.Tensor) -> torch.Tensor:
    """`train_utils.losses.distillation_kl` for each row: KL(softmax(T) || softmax(I)) (N,)."""
    teacher = F.log_softmax(text_embedding.float(), dim=-1)
    student = F.log_softmax(img_embedding.float(), dim=-1)
    return (teacher.exp() * (teacher - student)).sum(-1)


class _Scorer:
    """KL of (image, sentence) pairs for a fixed set of images, in text batches of `batch_size`."""

    def __init__(self, model, tokenizer, pixel_values: torch.Tensor, masks: torch.Tensor, batch_size: int):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        pixel_values = pixel_values.to(next(model.parameters()).device)
        masks = torch.as_tensor(masks).to(pixel_values.device).bool()
        if masks.shape != pixel_values.shape[:1] + pixel_values.shape[2:]:
            raise CoTexNetError(f"predicted_masks: shape {tuple(masks.shape)} does not match images "
                                f"{tuple(pixel_values.shape)} (need B,H,W)")
        # The ROI as in training: the normalised image, 0 outside the mask.
        _, cls = model.encode_images(torch.cat([pixel_values, pixel_values * masks[:, None]]))
        count = pixel_values.shape[0]
        self.img_embedding = model.img2text(cls[:count])
        self.roi_embedding = model.roi_mapper(cls[count:])

    def __call__(self, pairs: list[tuple[int, str]]) -> torch.Tensor:
        out = []
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start:start + self.batch_size]
            index = torch.tensor([i for i, _ in chunk], device=self.img_embedding.device)
            tokens = self.tokenizer([text for _, text in chunk], padding=True, truncation=True, return_tensors="pt")
            text = torch.sigmoid(self.model.text_features(tokens["input_ids"].to(index.device),
                                                          tokens["attention_mask"].to(index.device),
                                                          self.roi_embedding[index]))
            out.append(kl_per_row(text, self.img_embedding[index]))
        return torch.cat(out).cpu()


def _coordinate_search(scorer: _Scorer, count: int, keyword: str, dictionary: dict, start: dict,
                       max_sweeps: int) -> list[dict]:
    current = [dict(start) for _ in range(count)]
    best = [math.inf] * count
    scores = [{} for _ in range(count)]
    # Attributes visited since an image's last change: once the other four are visited without
    # a change, every attribute is optimal given the others and the image is done.
    unchanged = [-1] * count
    for step in range(max_sweeps * len(KEYS)):
        active = [i for i in range(count) if unchanged[i] < len(KEYS) - 1]
        if not active:
            break
        key = KEYS[step % len(KEYS)]
        words = dictionary[key]
        pairs = [(i, sentence(Attributes(**{**current[i], key: w}), keyword)) for i in active for w in words]
        kl = scorer(pairs).view(len(active), len(words))
        for row, i in enumerate(active):
            scores[i][key] = dict(zip(words, kl[row].tolist(), strict=True))
            k = int(kl[row].argmin())
            # Strictly better only: ties and float noise of another batch layout keep the word.
            if float(kl[row, k]) < best[i]:
                if words[k] != current[i][key] or best[i] == math.inf:
                    unchanged[i] = -1
                current[i][key], best[i] = words[k], float(kl[row, k])
            unchanged[i] += 1
    return [dict(sentence=sentence(Attributes(**c), keyword), **c, kl=b, scores=s)
            for c, b, s in zip(current, best, scores, strict=True)]


def _empty(keyword: str) -> dict:
    return dict(sentence=f"no {plural(keyword)} in the image.", number=0, **{k: "" for k in KEYS[1:]},
                kl=math.nan, scores={})


def readout(model, tokenizer, images: torch.Tensor, predicted_masks: torch.Tensor, keyword: str,
            batch_size: int = 8, *, dictionary: dict | None = None, start: dict | None = None,
            max_sweeps: int = 5, progress: bool = True) -> list[dict]:
    """The concept the model sees in each image, by coordinate search over the concept dictionary.

    `images`: (B,3,H,W) normalised as for the model (the evaluation transform); `predicted_masks`:
    (B,H,W), nonzero = predicted region (the model's own prediction for the images); `batch_size`: images
    searched together (a text-encoder call then holds up to 11 x batch_size sentences, 11 colours).
    `dictionary` / `start`: a sub-dictionary (attribute -> words) and the start words (default:
    one region, then each vocabulary's first word); `max_sweeps`: at most that many visits of
    each attribute. Returns per image: sentence, number, location, shape, size, color, kl (of the
    sentence) and scores (attribute -> {word: KL with the other attributes as in the result}).
    """
    if batch_size < 1:
        raise CoTexNetError(f"batch_size: {batch_size} (need at least 1)")
    dictionary = {**DICTIONARY, **(dictionary or {})}
    start = {key: words[0] for key, words in dictionary.items()} | (start or {})
    predicted_masks = torch.as_tensor(predicted_masks)  # numpy masks too
    widest = max(len(words) for words in dictionary.values())
    model.eval()
    results = [None if predicted_masks[i].any() else _empty(keyword) for i in range(images.shape[0])]
    non_empty = [i for i, found in enumerate(results) if found is None]
    with torch.inference_mode(), tqdm(total=images.shape[0], desc="concept readout", unit="image",
                                      leave=False, disable=not progress) as bar:
        bar.update(images.shape[0] - len(non_empty))
        for begin in range(0, len(non_empty), batch_size):
            chunk = non_empty[begin:begin + batch_size]
            scorer = _Scorer(model, tokenizer, images[chunk], predicted_masks[chunk], batch_size * widest)
            for i, found in zip(chunk, _coordinate_search(scorer, len(chunk), keyword, dictionary, start, max_sweeps),
                                strict=True):
                results[i] = found
            bar.update(len(chunk))
    return results


def true_attributes(mask: np.ndarray, image: np.ndarray) -> dict | None:
    """What the geometry describer says of a TRUE mask (HxW, nonzero = region) in its HxWx3 uint8
    RGB image (the describer's colour is the mean inside the mask), in the dictionary's words:
    its number 3 stands for 3 or more regions. None for a mask without a region."""
    try:
        truth = measure(np.asarray(mask), np.asarray(image))
    except CoTexNetError:
        return None
    return {key: min(truth.number, NUMBERS[-1]) if key == "number" else getattr(truth, key) for key in KEYS}


def agreement(readouts: list[dict], truths: list[dict | None]) -> dict:
    """Per attribute, how often the readout names what the describer says of the TRUE mask
    (`true_attributes`), beside chance (1 / number of words) and the majority rate (how often the
    describer's most frequent word occurs: what a readout that always says that word gets).
    Images whose true mask has no region are left out (`no_region`); an empty prediction agrees
    with nothing."""
    pairs = [(found, truth) for found, truth in zip(readouts, truths, strict=True) if truth is not None]

    def rate(hits: int) -> float:
        return hits / len(pairs) if pairs else math.nan

    said = {key: [truth[key] for _, truth in pairs] for key in KEYS}
    return dict(images=len(pairs), no_region=len(truths) - len(pairs),
                **{key: dict(agreement=rate(sum(found[key] == truth[key] for found, truth in pairs)),
                             chance=1 / len(DICTIONARY[key]), majority=rate(max(map(said[key].count, said[key]), default=0)))
                   for key in KEYS})


def write_csv(path: str | Path, names: list[str], readouts: list[dict]) -> None:
    """concept.csv: one row per image, CSV_COLUMNS (kl empty for an empty prediction)."""
    rows = [dict(name=name, **{k: found[k] for k in CSV_COLUMNS[1:]}) for name, found in
            zip(names, readouts, strict=True)]
    with atomic_path(path) as tmp:
        pd.DataFrame(rows, columns=list(CSV_COLUMNS)).to_csv(tmp, index=False)
