"""What run folders hold as results: one `Evaluation` per run x dataset/split evaluated (its
summary from metrics.json, its per-image figures, the run's config), with confidence intervals,
seeds pooled and paired comparisons with a baseline run.

train.py writes RUN/metrics.json (val and test at the training input size) with
RUN/<split>_per_image.csv; evaluate.py writes RUN/eval_*/metrics.json (at the original image
size) with per_image.csv beside it. The statistics are `train_utils.statistics`.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from common.csv_reader import read_csv
from common.errors import CoTexNetError, not_utf8
from train_utils.statistics import DEFAULT, Bootstrap, compare_paired, holm, mean_ci

METRICS = ("dice", "iou", "paper_dice", "paper_iou")
WITH_INTERVALS = ("dice", "paper_dice")  # the figures whose mean gets a confidence interval
# Keys that name a run rather than configure it; the seed, which pooled runs may differ in.
IDENTITY_KEYS = ("TRAIN.run_name", "TRAIN.run_dir")
SEED_KEY = "TRAIN.random_seed"
COMPARISON_COLUMNS = ("delta_dice", "delta_ci_low", "delta_ci_high", "p_wilcoxon", "p_holm", "n_paired",
                      "n_better", "n_worse", "n_tied")


@dataclass
class Evaluation:
    """One run x dataset/split: its table row, the CSV of its per-image figures, and the folder
    of its files (the run folder for train.py's, the eval_* folder for evaluate.py's)."""

    row: dict
    per_image: Path
    folder: Path

    @property
    def key(self) -> tuple:
        """What an evaluation of another run must share to be compared with this one."""
        return self.row["dataset"], self.row["split"], str(self.row["resolution"])


def load(path: Path, parse):
    """A JSON or YAML file parsed by `parse`, or a one-line error naming it."""
    try:
        return parse(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise not_utf8(path, err) from err
    except (ValueError, yaml.YAMLError) as err:
        raise CoTexNetError(f"{path}: not readable ({str(err).splitlines()[0]})") from err


def flatten(config: dict, prefix: str = "") -> dict:
    """{"TRAIN": {"lr": 1}} -> {"TRAIN.lr": 1}."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def run_config(run: Path) -> dict | None:
    """The flattened config.yaml of a run folder; None for a folder that is not a run."""
    return flatten(load(run / "config.yaml", yaml.safe_load) or {}) if (run / "config.yaml").is_file() else None


def _dataset_name(config: dict) -> str:
    name = config.get("DATASET.dataset_name", "-")
    return "+".join(map(str, name)) if isinstance(name, list) else str(name)


def _row(run: Path, dataset: str, split: str, resolution, summary: dict, epochs, best_epoch) -> dict:
    row = dict(run=run.name, dataset=dataset, split=split, resolution=resolution, images=summary.get("images"),
               epochs=epochs, best_epoch=best_epoch)
    for key in METRICS:
        row[key], row[f"{key}_std"] = summary.get(key), summary.get(f"{key}_std")
    return row


def _epochs(run: Path):
    if not (run / "log.csv").is_file():
        return None
    log = read_csv(run / "log.csv", ["epoch"])
    return int(pd.to_numeric(log["epoch"]).max()) if len(log) else 0


def eval_folder_evaluation(folder: Path, run: Path, config: dict, epochs=None) -> Evaluation | None:
    """The evaluation that evaluate.py wrote into `folder` for `run`; None before its metrics.json."""
    if not (folder / "metrics.json").is_file():
        return None
    metrics = load(folder / "metrics.json", json.loads)
    # eval_<split>/ (the run's dataset) or eval_<dataset>_<split>/; the names inside win.
    named = folder.name.removeprefix("eval_").rsplit("_", 1)
    split = metrics.get("split") or named[-1]
    dataset = metrics.get("dataset") or (named[0] if len(named) == 2 else _dataset_name(config))
    row = _row(run, str(dataset), split, metrics.get("resolution"), metrics, epochs, metrics.get("epoch"))
    return Evaluation(row, folder / "per_image.csv", folder)


def run_evaluations(run: str | Path) -> tuple[list[Evaluation], dict]:
    """Every evaluation of one run folder and its flattened config; ([], {}) for a folder that
    is not a run or has no metrics yet."""
    run = Path(run)
    config = run_config(run)
    if config is None:
        return [], {}
    dataset, epochs = _dataset_name(config), _epochs(run)
    found = []
    if (run / "metrics.json").is_file():
        metrics = load(run / "metrics.json", json.loads)
        for split in ("val", "test"):
            if isinstance(metrics.get(split), dict):
                row = _row(run, dataset, split, metrics.get("resolution"), metrics[split], epochs,
                           metrics.get("best_epoch"))
                found.append(Evaluation(row, run / f"{split}_per_image.csv", run))
    found += filter(None, (eval_folder_evaluation(folder, run, config, epochs) for folder in sorted(run.glob("eval_*"))))
    return found, config


def collect(runs) -> tuple[list[Evaluation], dict[str, dict]]:
    """Every evaluation of every run folder in `runs` (folders that are not runs are skipped),
    and each run's flattened config by run name."""
    evaluations, configs = [], {}
    for run in map(Path, runs):
        found, config = run_evaluations(run)
        if found:
            if run.name in configs:
                raise CoTexNetError(f"{run}: two run folders are named {run.name!r}; the table names runs by folder")
            evaluations += found
            configs[run.name] = config
    if not evaluations:
        raise CoTexNetError(f"{', '.join(map(str, runs)) or 'no folders'}: no run folder with metrics "
                            f"(train.py writes RUN/metrics.json, evaluate.py RUN/eval_*/metrics.json)")
    return evaluations, configs


def config_differences(configs: dict[str, dict]) -> dict[str, dict]:
    """Run -> {key: value} for the config keys whose values differ between the runs (absent = None)."""
    keys = sorted({key for config in configs.values() for key in config} - set(IDENTITY_KEYS))
    differ = [key for key in keys if len({json.dumps(c.get(key), sort_keys=True) for c in configs.values()}) > 1]
    return {run: {key: config.get(key) for key in differ} for run, config in configs.items()}


def seed_groups(configs: dict[str, dict]) -> list[list[str]]:
    """The runs grouped by their config without the seed: runs that differ only in
    TRAIN.random_seed share a group (in the order of `configs`)."""
    groups: dict[str, list[str]] = {}
    for run, config in configs.items():
        rest = {key: value for key, value in config.items() if key not in (*IDENTITY_KEYS, SEED_KEY)}
        groups.setdefault(json.dumps(rest, sort_keys=True, default=str), []).append(run)
    return list(groups.values())


def per_image_figures(evaluation: Evaluation) -> pd.DataFrame:
    """The per-image figures of an evaluation, indexed by image (dataset/name where the CSV names
    datasets), with `dice` and, where present, `paper_dice` as floats. One line for a missing
    file, a missing column, a figure that is not a number, a repeated image, one image only, or
    a count other than metrics.json's."""
    path = evaluation.per_image
    writer = "evaluate.py" if path.name == "per_image.csv" else "train.py"
    table = read_csv(path, ["name", "dice"], missing_hint=f"{writer} writes it with metrics.json; rerun it")
    keys = (table["dataset"] + "/" + table["name"]) if "dataset" in table else table["name"]
    repeated = keys[keys.duplicated()].tolist()
    if repeated:
        raise CoTexNetError(f"{path}: image {repeated[0]!r} is listed twice")
    columns = [key for key in WITH_INTERVALS if key in table]
    figures = table[columns].apply(pd.to_numeric, errors="coerce").set_axis(keys.tolist())
    bad = figures.index[figures.isna().any(axis=1)].tolist()
    if bad:
        raise CoTexNetError(f"{path}: {len(bad)} of {len(figures)} rows have no number in {'/'.join(columns)} "
                            f"(NaN, empty or text), e.g. {bad[:3]}; the evaluation that wrote it is damaged, rerun it")
    if len(figures) < 2:
        raise CoTexNetError(f"{path}: {len(figures)} image(s); a confidence interval needs at least 2 images")
    counted = evaluation.row.get("images")
    if counted is not None and counted != len(figures):
        raise CoTexNetError(f"{path}: {len(figures)} images, but its metrics.json counts {counted}; both must come "
                            "from one evaluation, rerun it")
    return figures


def add_intervals(evaluations: list[Evaluation], settings: Bootstrap = DEFAULT) -> None:
    """Give each row the bootstrap interval of its mean Dice (`dice_ci_low`, `dice_ci_high`) and
    of its mean `paper_dice` over images where the per-image figures hold it (else None)."""
    for evaluation in evaluations:
        figures = per_image_figures(evaluation)
        for key in WITH_INTERVALS:
            low, high = mean_ci(figures[key], settings) if key in figures else (None, None)
            evaluation.row[f"{key}_ci_low"], evaluation.row[f"{key}_ci_high"] = low, high


def is_number(value) -> bool:
    """A real number, not None, NaN or a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)


def with_differences(evaluations: list[Evaluation], configs: dict[str, dict]) -> tuple[list[dict], list[str]]:
    """The rows of the evaluations, each with the config keys that differ between the runs; and those keys."""
    differences = config_differences(configs)
    return [{**e.row, **differences[e.row["run"]]} for e in evaluations], list(next(iter(differences.values())))


def pool_seeds(evaluations: list[Evaluation], configs: dict[str, dict]) -> tuple[list[dict], list[str]]:
    """One row per group of runs that differ only in their seed (`seed_groups`) and per
    dataset/split/resolution: the mean over the runs of each run's mean, its std across runs
    (ddof 1: the spread one more seed would show) and the number of seeds; each row with the
    config keys in which the groups differ (the seed aside). Returns the rows and those keys."""
    groups = seed_groups(configs)
    differences = config_differences({group[0]: {key: value for key, value in configs[group[0]].items()
                                                  if key != SEED_KEY} for group in groups})
    rows = []
    for group in groups:
        by_key = defaultdict(list)
        for evaluation in evaluations:
            if evaluation.row["run"] in group:
                by_key[evaluation.key].append(evaluation.row)
        for (dataset, split, resolution), found in by_key.items():
            row = dict(runs=", ".join(r["run"] for r in found), seeds=", ".join(
                str(configs[r["run"]].get(SEED_KEY)) for r in found), n_seeds=len(found), dataset=dataset,
                split=split, resolution=resolution, images=found[0]["images"])
            for key in METRICS:
                values = np.array([r[key] for r in found if is_number(r[key])], dtype=np.float64)
                row[key] = float(values.mean()) if len(values) else None
                row[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else None
            rows.append({**row, **differences[group[0]]})
    return rows, list(next(iter(differences.values())))


def _pair(evaluation: Evaluation, base: Evaluation, intersect: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    ours, theirs = per_image_figures(evaluation), per_image_figures(base)
    shared = ours.index.intersection(theirs.index, sort=False)
    if len(shared) != len(ours) or len(shared) != len(theirs):
        if not intersect:
            raise CoTexNetError(f"{evaluation.per_image}: {len(ours)} images, the baseline's {base.per_image}: "
                                f"{len(theirs)}, {len(shared)} in both; different image sets are not compared "
                                "(--intersect compares the shared ones)")
        if len(shared) < 2:
            raise CoTexNetError(f"{evaluation.per_image}: {len(shared)} image(s) in common with the baseline's "
                                f"{base.per_image}; a paired comparison needs at least 2")
    return ours.loc[shared], theirs.loc[shared]


def compare_with(evaluations: list[Evaluation], baseline: str, intersect: bool = False,
                 settings: Bootstrap = DEFAULT) -> int:
    """Compare every evaluation of the other runs with the baseline run's evaluation of the same
    dataset/split/resolution, pairing images by name (`COMPARISON_COLUMNS` in each row; the
    baseline's rows and rows without a counterpart get None). p_holm adjusts over every
    comparison of the table. Returns the number of comparisons."""
    bases = {e.key: e for e in evaluations if e.row["run"] == baseline}
    if not bases:
        raise CoTexNetError(f"--baseline {baseline}: not one of the runs with metrics "
                            f"({', '.join(dict.fromkeys(e.row['run'] for e in evaluations))})")
    compared = []
    for evaluation in evaluations:
        evaluation.row.update(dict.fromkeys(COMPARISON_COLUMNS))
        base = bases.get(evaluation.key)
        if evaluation.row["run"] == baseline or base is None:
            continue
        ours, theirs = _pair(evaluation, base, intersect)
        c = compare_paired(ours["dice"], theirs["dice"], settings)
        evaluation.row.update(delta_dice=c.delta, delta_ci_low=c.ci_low, delta_ci_high=c.ci_high,
                              p_wilcoxon=c.p_wilcoxon, n_paired=c.n_paired, n_better=c.n_better, n_worse=c.n_worse,
                              n_tied=c.n_tied)
        compared.append(evaluation.row)
    for row, adjusted in zip(compared, holm([row["p_wilcoxon"] for row in compared]), strict=True):
        row["p_holm"] = adjusted
    return len(compared)


def _fixed(value, sign: str = "") -> str:
    return f"{value:{sign}.4f}" if is_number(value) else "-"


def formatted(row: dict) -> dict:
    """A row with its numbers as tables show them: `dice` "mean ± std", `dice_ci` "[low, high]", `delta_ci`,
    p-values to 3 figures, `counts` "better/worse/tied"; "-" where there is no number."""
    cells = dict(row)
    for key in METRICS:
        mean, std = row.get(key), row.get(f"{key}_std")
        cells[key] = f"{_fixed(mean)} ± {_fixed(std)}" if is_number(mean) and is_number(std) else _fixed(mean)
        low, high = row.get(f"{key}_ci_low"), row.get(f"{key}_ci_high")
        cells[f"{key}_ci"] = f"[{_fixed(low)}, {_fixed(high)}]" if is_number(low) else "-"
    low, high = row.get("delta_ci_low"), row.get("delta_ci_high")
    cells["delta_dice"] = _fixed(row.get("delta_dice"), "+")
    cells["delta_ci"] = f"[{_fixed(low, '+')}, {_fixed(high, '+')}]" if is_number(low) else "-"
    for key in ("p_wilcoxon", "p_holm"):
        cells[key] = f"{row[key]:.3g}" if is_number(row.get(key)) else "-"
    cells["counts"] = (f"{row['n_better']}/{row['n_worse']}/{row['n_tied']}" if is_number(row.get("n_better"))
                       else "-")
    return cells
