"""One table of every run x every dataset/split it was evaluated on.

    python tools/results_table.py runs/* [--out results.md]

Rows come from each run folder's metrics.json (train.py: val and test at the training input
size) and eval_*/metrics.json (evaluate.py, at the original image size; a cross-dataset
evaluation names its dataset inside). Columns: Dice and IoU mean ± std over images (ours, and
the paper's protocol figures `paper_dice` / `paper_iou` where the metrics hold them, else -),
image count, epochs trained (log.csv), best epoch, and the config keys whose values differ
between the runs (config.yaml). Printed as Markdown and written to --out (Markdown) with a
CSV of the same rows beside it (numbers in separate mean / std columns).
"""

import sys, pathlib; sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])  # noqa: E401,E702,I001

import argparse
import json
import math
from pathlib import Path

import pandas as pd
import yaml

from common.errors import CoTexNetError, run_cli
from common.io import atomic_path, not_utf8, read_csv, write_text

METRICS = ("dice", "iou", "paper_dice", "paper_iou")
# Keys that name a run rather than configure it.
IDENTITY_KEYS = ("TRAIN.run_name", "TRAIN.run_dir")


def _load(path: Path, parse):
    try:
        return parse(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise not_utf8(path, err) from err
    except (ValueError, yaml.YAMLError) as err:
        raise CoTexNetError(f"{path}: not readable ({str(err).splitlines()[0]})") from err


def flatten(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _dataset_name(config: dict) -> str:
    name = config.get("DATASET", {}).get("dataset_name", "-")
    return "+".join(map(str, name)) if isinstance(name, list) else str(name)


def _row(run: Path, dataset: str, split: str, resolution, summary: dict, epochs, best_epoch) -> dict:
    row = dict(run=run.name, dataset=dataset, split=split, resolution=resolution, images=summary.get("images"),
               epochs=epochs, best_epoch=best_epoch)
    for key in METRICS:
        row[key], row[f"{key}_std"] = summary.get(key), summary.get(f"{key}_std")
    return row


def run_rows(run: str | Path) -> tuple[list[dict], dict]:
    """The table rows of one run folder and its flattened config; ([], {}) for a folder that is
    not a run or has no metrics yet."""
    run = Path(run)
    if not (run / "config.yaml").is_file():
        return [], {}
    config = _load(run / "config.yaml", yaml.safe_load) or {}
    dataset = _dataset_name(config)
    epochs = None
    if (run / "log.csv").is_file():
        log = read_csv(run / "log.csv", ["epoch"])
        epochs = int(pd.to_numeric(log["epoch"]).max()) if len(log) else 0
    rows = []
    if (run / "metrics.json").is_file():
        metrics = _load(run / "metrics.json", json.loads)
        for split in ("val", "test"):
            if isinstance(metrics.get(split), dict):
                rows.append(_row(run, dataset, split, metrics.get("resolution"), metrics[split], epochs,
                                 metrics.get("best_epoch")))
    for folder in sorted(run.glob("eval_*")):
        if not (folder / "metrics.json").is_file():
            continue
        metrics = _load(folder / "metrics.json", json.loads)
        # eval_<split>/ (the run's dataset) or eval_<dataset>_<split>/; the names inside win.
        named = folder.name.removeprefix("eval_").rsplit("_", 1)
        split = metrics.get("split") or named[-1]
        other = metrics.get("dataset") or (named[0] if len(named) == 2 else dataset)
        rows.append(_row(run, str(other), split, metrics.get("resolution"), metrics, epochs, metrics.get("epoch")))
    return rows, flatten(config)


def config_differences(configs: dict[str, dict]) -> dict[str, dict]:
    """Run -> {key: value} for the config keys whose values differ between the runs (absent = None)."""
    keys = sorted({key for config in configs.values() for key in config} - set(IDENTITY_KEYS))
    differ = [key for key in keys if len({json.dumps(c.get(key), sort_keys=True) for c in configs.values()}) > 1]
    return {run: {key: config.get(key) for key in differ} for run, config in configs.items()}


def collect(runs) -> tuple[list[dict], list[str]]:
    """Every row of every run folder in `runs`, with the differing config keys; and those keys."""
    rows, configs = [], {}
    for run in map(Path, runs):
        found, config = run_rows(run)
        if found:
            rows += found
            configs[run.name] = config
    if not rows:
        raise CoTexNetError(f"{', '.join(map(str, runs)) or 'no folders'}: no run folder with metrics "
                            f"(train.py writes RUN/metrics.json, evaluate.py RUN/eval_*/metrics.json)")
    differences = config_differences(configs)
    keys = list(next(iter(differences.values())))
    for row in rows:
        row.update(differences[row["run"]])
    return rows, keys


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)


def _cell(mean, std) -> str:
    if not _number(mean):
        return "-"
    return f"{mean:.4f} ± {std:.4f}" if _number(std) else f"{mean:.4f}"


def markdown(rows: list[dict], keys: list[str]) -> str:
    header = ["run", "dataset", "split", "resolution", "images", "Dice", "IoU", "paper Dice", "paper IoU", "epochs",
              "best epoch", *keys]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        cells = [row["run"], row["dataset"], row["split"], row["resolution"], row["images"],
                 *(_cell(row[key], row[f"{key}_std"]) for key in METRICS), row["epochs"], row["best_epoch"],
                 *(row[key] for key in keys)]
        lines.append("| " + " | ".join("-" if c is None else str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders (folders without config.yaml are skipped)")
    parser.add_argument("--out", default="results.md", help="Markdown file to write; the CSV goes beside it "
                                                            "(default: results.md and results.csv)")
    args = parser.parse_args(argv)
    rows, keys = collect(args.runs)
    table = markdown(rows, keys)
    out = Path(args.out)
    write_text(out, table)
    with atomic_path(out.with_suffix(".csv")) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)
    print(table)
    print(f"{len(rows)} rows: {out} and {out.with_suffix('.csv')}")


if __name__ == "__main__":
    run_cli(main)
