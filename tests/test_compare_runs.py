"""A comparison end to end, as a researcher makes one: three tiny runs trained by train.py (A; B
with another learning rate; C with A's config and another seed), each evaluated by
evaluate.py, then `tools/results_table.py runs/* --baseline runs/A`. Its figures are held to
scipy's on the same per-image CSVs, and every run's report.html is opened in a real browser."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats

import evaluate
from tests.browser_fixtures import browser, card_names, open_page  # noqa: F401
from tests.train_fixtures import REPO, run_script, train_setup  # noqa: F401

pytestmark = pytest.mark.slow


def scipy_interval(values):
    """scipy's bootstrap as the table calls it; where every value is the same, every resample's
    mean is that value, and so is the interval (scipy's BCa returns NaN there)."""
    values = np.asarray(values, dtype=float)
    if (values == values[0]).all():
        return values[0], values[0]
    ci = stats.bootstrap((values,), np.mean, n_resamples=10_000, rng=np.random.default_rng(0)).confidence_interval
    return ci.low, ci.high


@pytest.fixture(scope="module")
def three_runs(train_setup, tmp_path_factory):  # noqa: F811
    """Splits of 6 train / 2 val / 4 test images; runs A, B (TRAIN.lr) and C (TRAIN.random_seed)
    of 2 epochs each, each evaluated on its test split at the original size."""
    work = tmp_path_factory.mktemp("compare")
    names = train_setup["names"]
    for split, chunk in (("train", names[:6]), ("val", names[6:8]), ("test", names[8:])):
        pd.DataFrame(dict(dataset="synthetic", img_name=chunk, mask_name=chunk)).to_csv(work / f"{split}_data.csv",
                                                                                      index=False)
    runs = work / "runs"
    common = ["--config", train_setup["config"], "TRAIN.epochs=2", f"DATASET.split_dir={work}", f"TRAIN.run_dir={runs}"]
    for name, change in (("A", []), ("B", ["TRAIN.lr=0.01"]), ("C", ["TRAIN.random_seed=1"])):
        run_script("train.py", *common, f"TRAIN.run_name={name}", *change)
        evaluate.main(["--run", str(runs / name), "--split", "test"])  # in-process: the same path, less start-up
    return runs


def test_the_table_compares_with_the_baseline_as_scipy_does(three_runs, tmp_path):
    runs = three_runs
    result = run_script(REPO / "tools" / "results_table.py", *sorted(runs.iterdir()), "--baseline", runs / "A",
                        "--out", tmp_path / "results.md")
    table = pd.read_csv(tmp_path / "results.csv")
    assert {"dice_ci_low", "dice_ci_high", "delta_dice", "delta_ci_low", "delta_ci_high", "p_wilcoxon", "p_holm",
            "n_paired", "n_better", "n_worse"} <= set(table.columns)
    assert len(table) == 9  # 3 runs x (val, test at 64 px; test at the original size)
    per_image = {}
    for row in table.to_dict("records"):
        run = runs / row["run"]
        path = run / ("eval_test/per_image.csv" if row["resolution"] == "original" else f"{row['split']}_per_image.csv")
        figures = per_image[row["run"], row["split"], row["resolution"]] = pd.read_csv(path).set_index("name")
        assert (row["dice_ci_low"], row["dice_ci_high"]) == pytest.approx(scipy_interval(figures["dice"]), abs=1e-12)
        assert (row["paper_dice_ci_low"], row["paper_dice_ci_high"]) == pytest.approx(
            scipy_interval(figures["paper_dice"]), abs=1e-12)
    p_values = []
    for row in table[table["run"] != "A"].to_dict("records"):
        ours = per_image[row["run"], row["split"], row["resolution"]]["dice"]
        base = per_image["A", row["split"], row["resolution"]]["dice"].loc[ours.index]
        difference = ours - base
        assert row["n_paired"] == len(ours) and row["delta_dice"] == pytest.approx(difference.mean(), abs=1e-12)
        assert (row["delta_ci_low"], row["delta_ci_high"]) == pytest.approx(scipy_interval(difference), abs=1e-12)
        p = stats.wilcoxon(ours, base).pvalue if difference.any() else 1.0  # all tied: no image differs
        assert row["p_wilcoxon"] == pytest.approx(p)
        assert (row["n_better"], row["n_worse"]) == ((difference > 0).sum(), (difference < 0).sum())
        p_values.append(p)
    # Holm over the 6 comparisons, from its definition: the k-th smallest p times (m - k + 1),
    # never below the one before, at most 1.
    m, running, expected = len(p_values), 0.0, {}
    for k, i in enumerate(np.argsort(p_values, kind="stable")):
        running = max(running, min(1.0, (m - k) * p_values[i]))
        expected[i] = running
    assert table[table["run"] != "A"]["p_holm"].tolist() == pytest.approx([expected[i] for i in range(m)])
    seeds = pd.read_csv(tmp_path / "results_seeds.csv")
    assert sorted(seeds.drop_duplicates("runs")[["runs", "n_seeds"]].values.tolist()) == [["A, C", 2], ["B", 1]]
    assert "| A, C | 666, 1 | 2 |" in result.stdout and "p Holm" in result.stdout


def test_every_run_folder_holds_a_report_that_a_browser_opens_sorts_and_filters(three_runs, browser, tmp_path):  # noqa: F811
    for name in "ABC":
        for html, per_image in ((three_runs / name / "report.html", three_runs / name / "test_per_image.csv"),
                                (three_runs / name / "eval_test" / "report.html",
                                 three_runs / name / "eval_test" / "per_image.csv")):
            figures = pd.read_csv(per_image)
            opened = open_page(browser, html)
            assert opened.errors == [] and opened.remote == []
            assert card_names(opened.page) == figures.sort_values(["dice", "name"])["name"].tolist()
            opened.page.select_option("#order", "name")
            assert card_names(opened.page) == sorted(figures["name"])
            opened.page.fill("#limit", "-1")
            assert card_names(opened.page) == [] and opened.page.text_content("#shown").startswith("0 of ")
            opened.page.screenshot(path=str(tmp_path / f"{name}.png"), full_page=True)
            assert (tmp_path / f"{name}.png").stat().st_size > 10_000
