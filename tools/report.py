"""Write report.html into run folders and evaluation folders, from what they hold.

    python tools/report.py runs/A                  # the run's page: runs/A/report.html
    python tools/report.py runs/A/eval_test        # an evaluation's page
    python tools/report.py runs/*  runs/*/eval_*   # all of them

train.py and evaluate.py write these pages themselves; this rewrites them (after a later
evaluation, or for a run trained before the pages existed). The page opens from disk in any
browser: no server, no network.
"""

import argparse

from common.errors import run_cli
from train_utils.report_page import write_report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", help="run folders (config.yaml) or evaluation folders (metrics.json)")
    parser.add_argument("--run", help="the run folder of an evaluation folder written outside it (evaluate.py --out)")
    args = parser.parse_args(argv)
    for folder in args.folders:
        print(write_report(folder, args.run))


if __name__ == "__main__":
    run_cli(main)
