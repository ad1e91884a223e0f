"""One table of every run x every dataset/split it was evaluated on, with confidence intervals,
seeds pooled, and paired comparisons with a baseline run.

    python tools/results_table.py runs/* [--out results.md]
    python tools/results_table.py runs/* --baseline runs/A [--intersect]

Rows come from each run folder's metrics.json (train.py: val and test at the training input
size) and eval_*/metrics.json (evaluate.py, at the original image size; a cross-dataset
evaluation names its dataset inside). Columns: Dice and IoU mean ± std over images (ours, and
the paper's protocol figures `paper_dice` / `paper_iou` where the metrics hold them, else -),
the bootstrap 95% confidence interval of the mean Dice (and of the mean paper_dice over images)
from the per-image CSV beside each metrics.json, image count, epochs trained (log.csv), best
epoch, and the config keys whose values differ between the runs (config.yaml).

Runs whose configs differ only in TRAIN.random_seed are pooled into one row first: the mean
± std across seeds and the number of seeds; every run is still listed below.

--baseline RUN compares every other run with RUN on the images both evaluated (same dataset,
split and resolution): the mean Dice difference with its paired bootstrap 95% CI, the
Wilcoxon signed-rank p-value, Holm's adjustment over all comparisons of the table, and the
counts of images better, worse and tied. Runs evaluated on different image sets are refused
unless --intersect.

Printed as Markdown and written to --out (Markdown), with the CSV of every run beside it
(numbers in separate columns) and the CSV of the pooled rows (<out>_seeds.csv).
"""

import argparse
from pathlib import Path

from common.atomic import write_text
from common.errors import CoTexNetError, run_cli
from common.output_folders import OutputFolder
from train_utils.reporting import write_csv
from train_utils.run_results import (
    SEED_KEY,
    add_intervals,
    collect,
    compare_with,
    formatted,
    pool_seeds,
    with_differences,
)
from train_utils.statistics import Bootstrap

PER_RUN = {"run": "run", "dataset": "dataset", "split": "split", "resolution": "resolution", "images": "images",
           "dice": "Dice", "dice_ci": "Dice 95% CI", "iou": "IoU", "paper_dice": "paper Dice",
           "paper_dice_ci": "paper Dice 95% CI", "paper_iou": "paper IoU", "epochs": "epochs",
           "best_epoch": "best epoch"}
VERSUS = {"delta_dice": "Δ Dice", "delta_ci": "Δ 95% CI", "p_wilcoxon": "p Wilcoxon", "p_holm": "p Holm",
          "n_paired": "paired", "counts": "better/worse/tied"}
POOLED = {"runs": "runs", "seeds": "seeds", "n_seeds": "n seeds", "dataset": "dataset", "split": "split",
          "resolution": "resolution", "images": "images", "dice": "Dice (seeds)", "iou": "IoU (seeds)",
          "paper_dice": "paper Dice (seeds)", "paper_iou": "paper IoU (seeds)"}


def markdown(rows: list[dict], columns: dict[str, str], keys: list[str]) -> str:
    header = [*columns.values(), *keys]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in map(formatted, rows):
        cells = [row.get(key) for key in [*columns, *keys]]
        lines.append("| " + " | ".join("-" if c is None else str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def report(rows: list[dict], pooled: list[dict], run_keys: list[str], group_keys: list[str], baseline: str | None,
           settings: Bootstrap) -> str:
    """The Markdown page: seeds pooled, then every run (with the comparison columns), then what the
    intervals and the p-values are."""
    grouped = any(row["n_seeds"] > 1 for row in pooled)
    text = ["## Seeds pooled", "",
            markdown(pooled, POOLED, group_keys) if grouped else f"(no runs differ only in {SEED_KEY})\n",
            "## Every run" + (f" (Δ: run - {baseline}, on the images both evaluated)" if baseline else ""), "",
            markdown(rows, {**PER_RUN, **(VERSUS if baseline else {})}, run_keys),
            f"95% CI: bootstrap (BCa, scipy.stats.bootstrap) of the mean over images, {settings.resamples} resamples, "
            f"seed {settings.seed}. (seeds): mean ± std (ddof 1) over the runs' means."]
    if baseline:
        text[-1] += (" Δ 95% CI: the same bootstrap of the mean per-image difference; p Wilcoxon: two-sided "
                     "signed-rank test of the per-image differences (ties dropped); p Holm: adjusted over every "
                     "comparison in this table.")
    return "\n".join(text) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders (folders without config.yaml are skipped)")
    parser.add_argument("--out", default="results.md", help="Markdown file to write; the CSVs go beside it "
                                                            "(default: results.md, results.csv, results_seeds.csv)")
    parser.add_argument("--baseline", metavar="RUN", help="compare every other run with this run folder (or name)")
    parser.add_argument("--intersect", action="store_true", help="with --baseline: compare runs evaluated on "
                        "different image sets on the images they share (default: refuse)")
    parser.add_argument("--resamples", type=int, default=Bootstrap.resamples,
                        help=f"bootstrap resamples (default: {Bootstrap.resamples})")
    parser.add_argument("--seed", type=int, default=Bootstrap.seed, help=f"bootstrap seed (default: {Bootstrap.seed})")
    args = parser.parse_args(argv)
    if args.resamples < 100:
        raise CoTexNetError(f"--resamples {args.resamples}: too few for a 95% interval; use 1000 or more")
    settings = Bootstrap(resamples=args.resamples, seed=args.seed)
    runs = list(args.runs)
    baseline = Path(args.baseline).name if args.baseline else None
    if args.baseline and baseline not in {Path(run).name for run in runs}:
        runs.append(args.baseline)
    evaluations, configs = collect(runs)
    out = Path(args.out)
    OutputFolder(out.parent, "--out", [run for run in runs if Path(run).name in configs])  # never among what it reads
    add_intervals(evaluations, settings)
    if baseline:
        compare_with(evaluations, baseline, args.intersect, settings)
    rows, run_keys = with_differences(evaluations, configs)
    pooled, group_keys = pool_seeds(evaluations, configs)

    table = report(rows, pooled, run_keys, group_keys, baseline, settings)
    csv, seeds_csv = out.with_suffix(".csv"), out.with_name(f"{out.stem}_seeds.csv")
    write_csv(csv, rows)
    write_csv(seeds_csv, pooled)
    write_text(out, table)
    print(table)
    print(f"{len(rows)} rows, {len(pooled)} pooled: {out}, {csv} and {seeds_csv}")


if __name__ == "__main__":
    run_cli(main)
