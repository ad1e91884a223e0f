"""tools/results_table.py on run folders in today's formats (written here: config.yaml, log.csv,
metrics.json and the per-image CSVs), and on a real tiny run.

The statistics are held to scipy's own calls, restated here on the per-image CSVs the tests
write: `stats.bootstrap` (BCa, 10,000 resamples, a generator seeded with 0) and `stats.wilcoxon`;
Holm's adjustment is restated from its definition."""

import json
import re

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats

from common.errors import CoTexNetError
from tests.train_fixtures import REPO, run_script, train_setup  # noqa: F401
from tools.results_table import main
from train_utils.statistics import Bootstrap, compare_paired, holm, mean_ci


def scipy_ci(values, resamples=10_000, seed=0):
    result = stats.bootstrap((np.asarray(values, dtype=float),), np.mean, n_resamples=resamples,
                             confidence_level=0.95, rng=np.random.default_rng(seed))
    return result.confidence_interval.low, result.confidence_interval.high


def write_per_image(path, dice, paper=None, names=None, **columns) -> dict:
    """A per-image CSV as train.py / evaluate.py write it; returns its summary as metrics.json holds it."""
    dice = np.asarray(dice, dtype=float)
    names = names or [f"img_{i:03d}.jpg" for i in range(len(dice))]
    table = pd.DataFrame(dict(name=names, dice=dice, iou=dice * 0.9, miou=0.5, pixel_acc=0.9, hd95=3.0,
                              empty_pred=0, empty_truth=0, **columns))
    if paper is not None:
        table["paper_dice"] = paper
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, index=False)
    summary = dict(images=len(dice), dice=dice.mean(), dice_std=dice.std(), iou=(dice * 0.9).mean(),
                   iou_std=(dice * 0.9).std(), empty_pred=0, empty_truth=0, hd95_undefined=0)
    if paper is not None:
        summary.update(paper_dice=float(np.mean(paper)), paper_iou=0.5)
    return summary


def make_run(root, name, lr=3e-4, seed=666, epochs=5, dataset="kvasir", val=None, test=None, evals=()):
    """A run folder: config, log, metrics.json with val/test (per-image Dice lists, or (dice, paper)
    pairs) and eval folders given as (folder, dice, paper, extra metrics)."""
    run = root / name
    run.mkdir(parents=True)
    config = dict(MODEL=dict(clipseg_hf_api="CIDAS/clipseg-rd64-refined"),
                  DATASET=dict(dataset_name=dataset, num_classes=2),
                  TRAIN=dict(lr=lr, epochs=10, random_seed=seed, batch_size=16, run_name=name, run_dir=str(root)))
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    pd.DataFrame(dict(epoch=range(1, epochs + 1), train_loss=0.5)).to_csv(run / "log.csv", index=False)
    metrics = dict(best_epoch=2, resolution=224)
    for split, figures in (("val", val), ("test", test)):
        if figures is not None:
            dice, paper = figures if isinstance(figures, tuple) else (figures, None)
            metrics[split] = write_per_image(run / f"{split}_per_image.csv", dice, paper)
    if val is not None or test is not None:
        (run / "metrics.json").write_text(json.dumps(metrics))
    for folder, dice, paper, extra in evals:
        summary = write_per_image(run / folder / "per_image.csv", dice, paper)
        (run / folder / "metrics.json").write_text(json.dumps(dict(run=str(run), checkpoint="best", epoch=2,
                                                                   resolution="original", **extra, **summary)))
    return run


def test_every_run_and_evaluation_is_a_row_with_its_interval_and_the_config_differences(tmp_path, capsys):
    make_run(tmp_path, "a", 3e-4, epochs=7, val=[0.7, 0.9], test=[0.65, 0.75, 0.85],
             evals=[("eval_test", [0.64, 0.74, 0.84], None, dict(split="test")),
                    ("eval_clinicdb_test", [0.2, 0.4, 0.6, 0.8], None, dict(split="test", dataset="clinicdb"))])
    make_run(tmp_path, "b", 1e-3, epochs=4, val=[0.5, 0.7], test=([0.45, 0.55, 0.65], [0.88, 0.9, 0.92]),
             evals=[("eval_etis_val", [0.1, 0.2, 0.3, 0.4, 0.5], None, {})])
    (tmp_path / "not_a_run").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    make_run(tmp_path, "still_training", epochs=1)  # config and log, no metrics yet
    out = tmp_path / "tables" / "results.md"
    main([*map(str, sorted(tmp_path.iterdir())), "--out", str(out)])
    table = out.read_text()
    assert table in capsys.readouterr().out

    def interval(values):
        low, high = scipy_ci(values)
        return f"[{low:.4f}, {high:.4f}]"

    lines = table.split("## Every run")[1].strip().splitlines()
    assert lines[0] == ("| run | dataset | split | resolution | images | Dice | Dice 95% CI | IoU | paper Dice | "
                        "paper Dice 95% CI | paper IoU | epochs | best epoch | TRAIN.lr |")
    assert lines[2:8] == [
        f"| a | kvasir | val | 224 | 2 | 0.8000 ± 0.1000 | {interval([0.7, 0.9])} | 0.7200 ± 0.0900 | - | - | - | 7 | 2 "
        "| 0.0003 |",
        f"| a | kvasir | test | 224 | 3 | 0.7500 ± 0.0816 | {interval([0.65, 0.75, 0.85])} | 0.6750 ± 0.0735 | - | - | "
        "- | 7 | 2 | 0.0003 |",
        f"| a | clinicdb | test | original | 4 | 0.5000 ± 0.2236 | {interval([0.2, 0.4, 0.6, 0.8])} | 0.4500 ± 0.2012 "
        "| - | - | - | 7 | 2 | 0.0003 |",
        f"| a | kvasir | test | original | 3 | 0.7400 ± 0.0816 | {interval([0.64, 0.74, 0.84])} | 0.6660 ± 0.0735 | - "
        "| - | - | 7 | 2 | 0.0003 |",
        f"| b | kvasir | val | 224 | 2 | 0.6000 ± 0.1000 | {interval([0.5, 0.7])} | 0.5400 ± 0.0900 | - | - | - | 4 | 2 "
        "| 0.001 |",
        f"| b | kvasir | test | 224 | 3 | 0.5500 ± 0.0816 | {interval([0.45, 0.55, 0.65])} | 0.4950 ± 0.0735 | 0.9000 | "
        f"{interval([0.88, 0.9, 0.92])} | 0.5000 | 4 | 2 | 0.001 |",
    ]
    assert lines[8].startswith("| b | etis | val | original | 5 | 0.3000 ± 0.1414 |")
    csv = pd.read_csv(out.with_suffix(".csv"))
    assert len(csv) == 7 and {"dice", "dice_std", "dice_ci_low", "dice_ci_high", "paper_dice", "paper_dice_ci_low",
                              "TRAIN.lr"} <= set(csv.columns)
    assert csv["paper_dice"].isna().sum() == 6 and csv["dice"].iloc[2] == 0.5
    assert (csv["dice_ci_low"].iloc[2], csv["dice_ci_high"].iloc[2]) == pytest.approx(scipy_ci([0.2, 0.4, 0.6, 0.8]))


def test_one_run_has_no_difference_columns_and_no_pooled_seeds(tmp_path, capsys):
    a = make_run(tmp_path, "a", val=[0.7, 0.9], test=[0.6, 0.8])
    main([str(a), "--out", str(tmp_path / "r.md")])
    table = (tmp_path / "r.md").read_text()
    assert "(no runs differ only in TRAIN.random_seed)" in table
    assert table.split("## Every run")[1].strip().splitlines()[0].endswith("| epochs | best epoch |")


def three_runs(root, n=30, seed=0):
    """A baseline, a run better on most images, one worse on most, on the same n test images."""
    rng = np.random.default_rng(seed)
    base = rng.beta(6, 1.5, n)
    better = np.clip(base + rng.normal(0.03, 0.04, n), 0, 1)
    worse = np.clip(base + rng.normal(-0.01, 0.04, n), 0, 1)
    worse[:3] = base[:3]  # ties
    paper = {name: np.clip(d - 0.1, 0, 1) for name, d in (("A", base), ("B", better), ("C", worse))}
    runs = {}
    for name, lr, dice in (("A", 3e-4, base), ("B", 1e-3, better), ("C", 1e-4, worse)):
        runs[name] = make_run(root, name, lr, evals=[("eval_test", dice, paper[name], dict(split="test"))])
    return runs, dict(A=base, B=better, C=worse), paper


def test_comparison_figures_equal_scipys_on_the_per_image_files(tmp_path, capsys):
    runs, dice, paper = three_runs(tmp_path)
    out = tmp_path / "results.md"
    main([*map(str, runs.values()), "--baseline", str(runs["A"]), "--out", str(out)])
    csv = pd.read_csv(out.with_suffix(".csv"))
    for column in ("dice_ci_low", "dice_ci_high", "delta_dice", "delta_ci_low", "delta_ci_high", "p_wilcoxon",
                   "p_holm", "n_paired", "n_better", "n_worse"):
        assert column in csv.columns, column
    tests = csv.set_index("run")
    # The per-image files as the test wrote them, read back: the figures the tool must have used.
    read = {name: pd.read_csv(run / "eval_test" / "per_image.csv") for name, run in runs.items()}
    p_values = {}
    for name in "ABC":
        row = tests.loc[name]
        assert (row["dice_ci_low"], row["dice_ci_high"]) == pytest.approx(scipy_ci(read[name]["dice"]), abs=1e-12)
        assert (row["paper_dice_ci_low"], row["paper_dice_ci_high"]) == pytest.approx(
            scipy_ci(read[name]["paper_dice"]), abs=1e-12)
        if name == "A":
            assert pd.isna(row["delta_dice"]) and pd.isna(row["p_wilcoxon"])
            continue
        difference = read[name]["dice"] - read["A"]["dice"]
        assert row["delta_dice"] == pytest.approx(difference.mean(), abs=1e-12)
        assert (row["delta_ci_low"], row["delta_ci_high"]) == pytest.approx(scipy_ci(difference), abs=1e-12)
        p_values[name] = stats.wilcoxon(read[name]["dice"], read["A"]["dice"]).pvalue
        assert row["p_wilcoxon"] == pytest.approx(p_values[name], rel=1e-12)
        assert (row["n_paired"], row["n_better"], row["n_worse"], row["n_tied"]) == (
            30, (difference > 0).sum(), (difference < 0).sum(), (difference == 0).sum())
    # Holm over the two comparisons: the smaller p doubled, the larger kept (never below the first).
    small, large = sorted(p_values, key=p_values.get)
    assert tests.loc[small, "p_holm"] == pytest.approx(min(1, 2 * p_values[small]))
    assert tests.loc[large, "p_holm"] == pytest.approx(max(min(1, 2 * p_values[small]), p_values[large]))
    assert tests.loc["B", "n_better"] > 20 and tests.loc["C", "n_tied"] >= 3
    printed = capsys.readouterr().out
    assert "Δ Dice" in printed and "p Holm" in printed and f"{tests.loc['B', 'delta_dice']:+.4f}" in printed


def test_identical_runs_give_a_delta_of_zero_and_p_one(tmp_path):
    dice = np.random.default_rng(3).beta(5, 2, 25)
    a = make_run(tmp_path, "a", 3e-4, test=dice)
    b = make_run(tmp_path, "b", 1e-3, test=dice)
    main([str(a), str(b), "--baseline", "a", "--out", str(tmp_path / "r.md")])
    row = pd.read_csv(tmp_path / "r.csv").set_index("run").loc["b"]
    assert (row["delta_dice"], row["delta_ci_low"], row["delta_ci_high"]) == (0, 0, 0)
    assert row["p_wilcoxon"] == 1 and row["p_holm"] == 1
    assert (row["n_paired"], row["n_better"], row["n_worse"], row["n_tied"]) == (25, 0, 0, 25)


def test_seeds_are_pooled_and_other_config_differences_are_not(tmp_path):
    means = {}
    for name, lr, seed, shift in (("a1", 3e-4, 1, 0.0), ("a2", 3e-4, 2, 0.02), ("a3", 3e-4, 3, -0.01),
                                  ("b1", 1e-3, 1, 0.05)):
        dice = np.clip(np.linspace(0.5, 0.95, 12) + shift, 0, 1)
        means[name] = dice.mean()
        make_run(tmp_path, name, lr, seed=seed, test=dice)
    out = tmp_path / "r.md"
    main([*map(str, sorted(tmp_path.iterdir())), "--out", str(out)])
    pooled = pd.read_csv(tmp_path / "r_seeds.csv")
    assert pooled[["runs", "seeds", "n_seeds"]].values.tolist() == [["a1, a2, a3", "1, 2, 3", 3], ["b1", "1", 1]]
    a = [means["a1"], means["a2"], means["a3"]]
    assert pooled["dice"].iloc[0] == pytest.approx(np.mean(a)) and pooled["dice_std"].iloc[0] == pytest.approx(
        np.std(a, ddof=1))
    assert pd.isna(pooled["dice_std"].iloc[1]) and pooled["TRAIN.lr"].tolist() == [3e-4, 1e-3]
    assert "TRAIN.random_seed" not in pooled.columns
    assert len(pd.read_csv(tmp_path / "r.csv")) == 4  # every run still listed
    table = out.read_text()
    assert f"| a1, a2, a3 | 1, 2, 3 | 3 | kvasir | test | 224 | 12 | {np.mean(a):.4f} ± {np.std(a, ddof=1):.4f} |" in table


@pytest.mark.parametrize("damage, message", [
    ("missing", r"eval_test/per_image.csv: no such file \(evaluate.py writes it"),
    ("nan", r"per_image.csv: 2 of 4 rows have no number in dice/paper_dice \(NaN, empty or text\), e.g. \['img_001.jpg'"),
    ("single", r"per_image.csv: 1 image\(s\); a confidence interval needs at least 2 images"),
    ("count", r"per_image.csv: 4 images, but its metrics.json counts 5"),
    ("repeated", r"per_image.csv: image 'img_000.jpg' is listed twice"),
])
def test_bad_per_image_files_are_one_line_each(tmp_path, damage, message):
    run = make_run(tmp_path, "a", evals=[("eval_test", [0.5, 0.6, 0.7, 0.8], [0.4, 0.5, 0.6, 0.7], dict(split="test"))])
    folder = run / "eval_test"
    table = pd.read_csv(folder / "per_image.csv")
    metrics = json.loads((folder / "metrics.json").read_text())
    if damage == "missing":
        (folder / "per_image.csv").unlink()
    elif damage == "nan":
        table.loc[1, "dice"] = np.nan
        table.loc[3, "paper_dice"] = np.nan
    elif damage == "single":
        table = table.iloc[:1]
        metrics["images"] = 1
    elif damage == "count":
        metrics["images"] = 5
    else:
        table.loc[1, "name"] = "img_000.jpg"
    if damage != "missing":
        table.to_csv(folder / "per_image.csv", index=False)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    result = run_script(REPO / "tools" / "results_table.py", run, "--out", tmp_path / "r.md", check=False)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("error: ") and re.search(message, result.stderr), result.stderr
    assert not (tmp_path / "r.md").exists() and not (tmp_path / "r.csv").exists()


def test_runs_on_different_image_sets_are_refused_unless_intersect(tmp_path):
    rng = np.random.default_rng(5)
    names = [f"img_{i:03d}.jpg" for i in range(12)]
    a = make_run(tmp_path, "a", 3e-4, evals=[("eval_test", rng.uniform(0.5, 1, 10), None, dict(split="test"))])
    b = make_run(tmp_path, "b", 1e-3)
    summary = write_per_image(b / "eval_test" / "per_image.csv", rng.uniform(0.5, 1, 10), names=names[2:])
    (b / "eval_test" / "metrics.json").write_text(json.dumps(dict(split="test", resolution="original", **summary)))
    result = run_script(REPO / "tools" / "results_table.py", a, b, "--baseline", a, "--out", tmp_path / "r.md",
                        check=False)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "b/eval_test/per_image.csv: 10 images, the baseline's" in result.stderr
    assert "a/eval_test/per_image.csv: 10, 8 in both" in result.stderr and "--intersect" in result.stderr
    main([str(a), str(b), "--baseline", str(a), "--intersect", "--out", str(tmp_path / "r.md")])
    row = pd.read_csv(tmp_path / "r.csv").set_index("run").loc["b"]
    ours = pd.read_csv(b / "eval_test" / "per_image.csv").set_index("name")["dice"]
    theirs = pd.read_csv(a / "eval_test" / "per_image.csv").set_index("name")["dice"]
    shared = [name for name in ours.index if name in theirs.index]
    assert row["n_paired"] == 8 and row["delta_dice"] == pytest.approx((ours[shared] - theirs[shared]).mean())
    assert row["p_wilcoxon"] == pytest.approx(stats.wilcoxon(ours[shared], theirs[shared]).pvalue)


def test_an_unknown_baseline_is_one_line(tmp_path):
    a = make_run(tmp_path, "a", test=[0.5, 0.7])
    with pytest.raises(CoTexNetError, match=r"--baseline zzz: not one of the runs with metrics \(a\)"):
        main([str(a), "--baseline", "zzz", "--out", str(tmp_path / "r.md")])


@pytest.mark.parametrize("out", ["a/test_per_image.md", "a/sub/r.md"])
def test_the_table_is_never_written_among_what_it_reads(tmp_path, out):
    a = make_run(tmp_path, "a", test=[0.5, 0.7])
    kept = (a / "test_per_image.csv").read_bytes()
    result = run_script(REPO / "tools" / "results_table.py", a, "--out", tmp_path / out, check=False)
    assert result.returncode == 2 and f"--out {(tmp_path / out).parent}: inside the input folder" in result.stderr
    assert (a / "test_per_image.csv").read_bytes() == kept and not (tmp_path / out).exists()


def test_no_run_with_metrics_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_script(REPO / "tools" / "results_table.py", tmp_path / "empty", "--out", tmp_path / "r.md", check=False)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "no run folder with metrics" in result.stderr
    assert not (tmp_path / "r.md").exists()


# BCa intervals cover a little under 95% at these sizes (about 93-94% at 40 to 60 images in long
# simulations); the bounds allow that and the binomial noise of a few hundred samples (sd about
# 1 point), and still fail an interval of another level or of another statistic.
def test_the_interval_covers_the_true_mean_at_about_the_nominal_rate():
    """400 samples of 40 skewed Dice-like figures (Beta(6, 1.5), mean 0.8)."""
    rng = np.random.default_rng(2024)
    covered = [low <= 0.8 <= high for low, high in
               (mean_ci(rng.beta(6, 1.5, 40), Bootstrap(resamples=2000, seed=i)) for i in range(400))]
    assert 0.91 <= np.mean(covered) <= 0.98


def test_the_paired_interval_covers_the_true_difference_and_the_test_holds_its_level():
    """500 pairs of runs on 60 images whose differences have a known mean (0.02): its interval
    covers it at about 95%; with a mean of zero (symmetric differences) Wilcoxon's p falls below
    0.05 in about 5% of them."""
    rng = np.random.default_rng(7)
    covered, rejected = [], []
    for i in range(500):
        base = rng.beta(6, 1.5, 60)
        shifted = compare_paired(base + 0.02 + rng.normal(0, 0.05, 60), base, Bootstrap(resamples=2000, seed=i))
        covered.append(shifted.ci_low <= 0.02 <= shifted.ci_high)
        rejected.append(compare_paired(base + rng.normal(0, 0.05, 60), base, Bootstrap(resamples=200, seed=i))
                        .p_wilcoxon < 0.05)
    assert 0.91 <= np.mean(covered) <= 0.98 and 0.02 <= np.mean(rejected) <= 0.08, (np.mean(covered), np.mean(rejected))


def test_holm_on_the_textbook_example():
    # m = 4: sorted p 0.005, 0.01, 0.03, 0.04 -> 4*0.005, 3*0.01, max(2*0.03, .), max(1*0.04, 0.06)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0]) and holm([0.2]) == [0.2]


@pytest.mark.slow
def test_a_real_tiny_run_and_its_evaluation(train_setup, tmp_path):  # noqa: F811
    run_script("train.py", "--config", train_setup["config"], "TRAIN.epochs=1", "TRAIN.run_name=table")
    run = train_setup["runs"] / "table"
    run_script("evaluate.py", "--run", run, "--split", "test")
    result = run_script(REPO / "tools" / "results_table.py", run, "--out", tmp_path / "results.md")
    rows = pd.read_csv(tmp_path / "results.csv")
    assert rows[["dataset", "split", "resolution"]].values.tolist() == [
        ["synthetic", "val", "64"], ["synthetic", "test", "64"], ["synthetic", "test", "original"]]
    assert rows["epochs"].tolist() == [1, 1, 1] and rows["best_epoch"].tolist() == [1, 1, 1]
    assert rows["images"].tolist() == [2, 2, 2]
    assert rows["dice_ci_low"].notna().all() and rows["paper_dice_ci_high"].notna().all()
    assert "| table | synthetic | test | original | 2 |" in result.stdout
