"""report.html: a run, or one evaluation of it, as a page that opens from disk with no server and
no network (plain HTML and a little JavaScript, rendered with Jinja2 from templates/report.html.j2).

It shows the config keys that differ from the shipped YAML, the curves, the metrics with their
bootstrap confidence intervals, and a gallery of every evaluated image (image | truth |
prediction, its Dice, the concept readout where one was computed), worst first, sortable by
Dice and name and filterable by a Dice threshold in the page.

A run folder's page holds train.py's evaluations (val and test at the input size), links each
eval_*/report.html, and its gallery is the test split (pictures in RUN/test_gallery/). An
evaluation folder's page holds that evaluation, its gallery (pictures in gallery/, at the
original size) and concept.csv. Pictures are linked relatively; the curves are embedded.
"""

from __future__ import annotations

import base64
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from jinja2 import Environment, FileSystemLoader, StrictUndefined

from common.atomic import write_text
from common.csv_reader import read_csv
from common.errors import CoTexNetError
from train_utils.config import load_config
from train_utils.pictures import picture_path
from train_utils.run_results import (
    IDENTITY_KEYS,
    Evaluation,
    add_intervals,
    eval_folder_evaluation,
    flatten,
    formatted,
    load,
    run_config,
    run_evaluations,
)
from train_utils.statistics import DEFAULT, Bootstrap

REPORT = "report.html"
SHIPPED_CONFIG = Path(__file__).resolve().parents[1] / "dataset_config" / "train_config.yaml"
TEMPLATES = Environment(loader=FileSystemLoader(Path(__file__).with_name("templates")), autoescape=True,
                        undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)


@dataclass
class Card:
    """One evaluated image of the gallery."""

    key: str  # the image's name (dataset/name where an evaluation mixes datasets): unique in the gallery
    dice: float
    figures: str  # the other figures, as shown under the picture
    picture: str | None  # its URL relative to the page; None when no picture was written
    concept: str | None


def _shown(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def shipped_differences(config: dict) -> list[tuple[str, str, str]]:
    """(key, shipped value, this run's value) for each config key that differs from
    dataset_config/train_config.yaml (the run's name and folder aside)."""
    shipped = flatten(load_config(SHIPPED_CONFIG).to_dict())
    keys = [key for key in dict.fromkeys([*shipped, *config]) if key not in IDENTITY_KEYS]
    return [(key, _shown(shipped.get(key)), _shown(config.get(key))) for key in keys
            if json.dumps(shipped.get(key), sort_keys=True) != json.dumps(config.get(key), sort_keys=True)]


def _metrics_rows(evaluations: list[Evaluation], settings: Bootstrap) -> list[dict]:
    """The evaluations' rows as shown, with their intervals; a row whose per-image figures cannot
    be read keeps its summary and says why it has no interval."""
    rows = []
    for evaluation in evaluations:
        try:
            add_intervals([evaluation], settings)
            note = ""
        except CoTexNetError as err:
            note = f"no interval: {err}"
        rows.append(dict(formatted(evaluation.row), note=note))
    return rows


def _url(path: Path, page_folder: Path) -> str:
    return quote(Path(os.path.relpath(path, page_folder)).as_posix())


def _cards(evaluation: Evaluation, pictures: Path, page_folder: Path, concept_csv: Path | None) -> list[Card]:
    """Every image of the evaluation's per-image CSV, worst Dice first (then by name)."""
    table = read_csv(evaluation.per_image, ["name", "dice"])
    concepts = {}
    if concept_csv is not None and concept_csv.is_file():
        concepts = dict(read_csv(concept_csv, ["name", "sentence"])[["name", "sentence"]].itertuples(index=False))
    cards = []
    for row in table.to_dict("records"):
        dataset = row.get("dataset") or None
        figures = [f"{label} {float(row[key]):.4f}" for key, label in (("iou", "IoU"), ("paper_dice", "paper Dice"))
                   if row.get(key, "") != ""]
        figures += [label for key, label in (("empty_pred", "empty prediction"), ("empty_truth", "empty truth"))
                    if row.get(key, "0") not in ("", "0")]
        picture = picture_path(pictures, row["name"], dataset)
        cards.append(Card(key=f"{dataset}/{row['name']}" if dataset else row["name"], dice=float(row["dice"]),
                          figures=" · ".join(figures), picture=_url(picture, page_folder) if picture.is_file() else None,
                          concept=concepts.get(row["name"]) or None))
    return sorted(cards, key=lambda card: (card.dice, card.key))


def _embedded_png(path: Path) -> str | None:
    return f"data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}" if path.is_file() else None


def _page(folder: Path, run: Path | None) -> dict:
    """What differs between a run's page and an evaluation's: title, evaluations, gallery, links."""
    if (folder / "config.yaml").is_file():
        evaluations, config = run_evaluations(folder)
        tests = [e for e in evaluations if e.folder == folder and e.row["split"] == "test"]
        links = [(f"{e.folder.name}: {e.row['dataset']} {e.row['split']}, {e.row['resolution']} size",
                  _url(e.folder / REPORT, folder)) for e in evaluations if e.folder != folder]
        return dict(title=f"run {folder.name}", run=folder, config=config, evaluations=evaluations,
                    gallery=tests[0] if tests else None, pictures=folder / "test_gallery", concept=None, links=links,
                    gallery_title=f"test split at the training input size ({tests[0].row['resolution']} px)"
                    if tests else "")
    if not (folder / "metrics.json").is_file():
        raise CoTexNetError(f"{folder}: neither a run folder (config.yaml) nor an evaluation folder (metrics.json)")
    if run is None:
        recorded = load(folder / "metrics.json", json.loads).get("run")
        run = folder.parent if (folder.parent / "config.yaml").is_file() else Path(recorded or folder.parent)
    config = run_config(run)
    if config is None:
        raise CoTexNetError(f"{folder}: its run folder {run} has no config.yaml; pass the run folder (--run)")
    evaluation = eval_folder_evaluation(folder, run, config)
    row = evaluation.row
    return dict(title=f"run {run.name}: {row['dataset']} {row['split']} at the {row['resolution']} size",
                run=run, config=config, evaluations=[evaluation], gallery=evaluation, pictures=folder / "gallery",
                concept=folder / "concept.csv", links=[(f"run {run.name}", _url(run / REPORT, folder))],
                gallery_title=f"{row['dataset']} {row['split']} at the {row['resolution']} image size",
                agreement=load(folder / "metrics.json", json.loads).get("concept"))


def agreement_rows(figures: dict) -> list[tuple]:
    """metrics.json's concept agreement as (attribute, agreement, chance, majority)."""
    return [(key, f["agreement"], f["chance"], f["majority"]) for key, f in figures.items() if isinstance(f, dict)]


def write_report(folder: str | Path, run: str | Path | None = None, settings: Bootstrap = DEFAULT) -> Path:
    """Write `folder`/report.html for a run folder or an evaluation folder (`run`: its run folder,
    found from the folder when not given); returns its path."""
    folder = Path(folder)
    page = _page(folder, Path(run) if run is not None else None)
    gallery = page["gallery"]
    cards = _cards(gallery, page["pictures"], folder, page["concept"]) if gallery and gallery.per_image.is_file() else []
    html = TEMPLATES.get_template("report.html.j2").render(
        title=page["title"], folder=str(folder), written=time.strftime("%Y-%m-%d %H:%M"),
        differences=shipped_differences(page["config"]), shipped=SHIPPED_CONFIG.relative_to(SHIPPED_CONFIG.parents[1]),
        curves=_embedded_png(page["run"] / "curves.png"), metrics=_metrics_rows(page["evaluations"], settings),
        settings=settings, links=page["links"], cards=cards, gallery_title=page["gallery_title"],
        has_concept=any(card.concept for card in cards), agreement=agreement_rows(page.get("agreement") or {}),
        missing_pictures=sum(card.picture is None for card in cards))
    write_text(folder / REPORT, html)
    return folder / REPORT
