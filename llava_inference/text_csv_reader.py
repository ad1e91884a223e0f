"""The text CSV read back for training: image stem -> its text prompt."""

from __future__ import annotations

import sys
from pathlib import Path

from common.csv_reader import read_csv
from common.errors import SHOW, CoTexNetError
from data_process import layout
from llava_inference.attributes import AnswerError, parse_answer
from llava_inference.sentence_template import sentence

MISSING_TEXT = ("nan", "none", "null", "n/a")


def load_prompts(csv_path: str | Path, spec) -> dict[str, str]:
    """Image stem -> text prompt, from our text CSV or the paper's (extra index column, JSON text).
    Multi-class: the sentences of an image's categories joined by a space, in category order.
    A row without `text_prompt` gets the sentence rebuilt from the JSON in `text`."""
    csv_path = Path(csv_path)
    table = read_csv(csv_path, missing_hint="the text CSV: run get_text.py first")
    table = table.loc[:, [c for c in table.columns if not c.startswith("Unnamed:")]]
    if "roi_name" not in table.columns or not {"text", "text_prompt"} & set(table.columns):
        raise CoTexNetError(f"{csv_path}: needs columns roi_name and text_prompt (or text); has {list(table.columns)}")
    if table.empty:
        raise CoTexNetError(f"{csv_path}: no rows")
    order = {c: i for i, c in enumerate(spec.categories)}
    parts: dict[str, dict[str | None, str]] = {}
    replaced: list[str] = []
    for row in table.to_dict("records"):
        stem, category = layout.parse_roi_name(row["roi_name"], bool(spec.categories))
        prompt = row.get("text_prompt", "").strip()
        if not prompt or prompt.lower() in MISSING_TEXT:  # what a spreadsheet or pandas writes for an empty cell
            try:
                prompt = sentence(parse_answer(row.get("text", "")), category or spec.keyword)
            except AnswerError as err:
                raise CoTexNetError(f"{csv_path}: row {row['roi_name']}: no text_prompt and {err}") from None
        # One sentence per (image, category): a repeated row replaces the earlier one, loudly if it differs.
        earlier = parts.setdefault(stem, {}).get(category)
        if earlier is not None and earlier != prompt:
            replaced.append(row["roi_name"])
        parts[stem][category] = prompt
    if replaced:
        print(f"warning: {csv_path}: {len(replaced)} ROIs have several rows with different prompts; the last row "
              f"is used, e.g. {replaced[:SHOW]}", file=sys.stderr)
    # sorted() is stable: categories unknown to the spec keep their file order, after the known ones.
    return {stem: " ".join(by_category[c] for c in sorted(by_category, key=lambda c: order.get(c, len(order))))
            for stem, by_category in parts.items()}

