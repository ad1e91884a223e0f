"""tools/results_table.py on run folders in today's formats (written here), and on a real tiny run."""

import json
import sys

import pandas as pd
import pytest
import yaml

from tests.train_fixtures import REPO, run_script, train_setup  # noqa: F401

sys.path.insert(0, str(REPO / "tools"))
from results_table import collect, main  # noqa: E402


def _summary(images, dice, iou, **extra):
    return dict(images=images, dice=dice, dice_std=0.1, iou=iou, iou_std=0.05, miou=0.5, miou_std=0.01,
                empty_pred=0, empty_truth=0, hd95_undefined=0, **extra)


def _run(root, name, lr, epochs, dataset="kvasir", metrics=None, evals=()):
    run = root / name
    run.mkdir(parents=True)
    config = dict(MODEL=dict(clipseg_hf_api="CIDAS/clipseg-rd64-refined"),
                  DATASET=dict(dataset_name=dataset, num_classes=2),
                  TRAIN=dict(lr=lr, epochs=10, batch_size=16, run_name=name, run_dir=str(root)))
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    pd.DataFrame(dict(epoch=range(1, epochs + 1), train_loss=0.5)).to_csv(run / "log.csv", index=False)
    if metrics is not None:
        (run / "metrics.json").write_text(json.dumps(metrics))
    for folder, content in evals:
        (run / folder).mkdir()
        (run / folder / "metrics.json").write_text(json.dumps(content))
    return run


@pytest.fixture
def runs(tmp_path):
    a = _run(tmp_path, "a", 3e-4, 7, metrics=dict(best_epoch=5, resolution=224, val=_summary(2, 0.8, 0.7),
                                                   test=_summary(3, 0.75, 0.65)),
             evals=[("eval_test", dict(run="a", checkpoint="best", epoch=5, split="test", resolution="original",
                                       **_summary(3, 0.74, 0.64))),
                    ("eval_clinicdb_test", dict(run="a", checkpoint="best", epoch=5, split="test", dataset="clinicdb",
                                                resolution="original", **_summary(4, 0.5, 0.4)))])
    b = _run(tmp_path, "b", 1e-3, 4, metrics=dict(best_epoch=2, resolution=224, val=_summary(2, 0.6, 0.5),
                                                   test=_summary(3, 0.55, 0.45, paper_dice=0.9, paper_iou=0.82,
                                                                 paper_dice_std=0.02)),
             evals=[("eval_etis_val", dict(run="b", checkpoint="best", epoch=2, resolution="original",
                                           **_summary(5, 0.3, 0.2)))])
    (tmp_path / "not_a_run").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    _run(tmp_path, "still_training", 3e-4, 1)  # config and log, no metrics yet
    return tmp_path, a, b


def test_every_run_and_evaluation_is_a_row_with_the_config_differences(runs, capsys):
    root, a, b = runs
    out = root / "tables" / "results.md"
    main([*map(str, sorted(root.iterdir())), "--out", str(out)])
    table = out.read_text()
    assert table in capsys.readouterr().out
    lines = table.strip().splitlines()
    assert lines[0] == ("| run | dataset | split | resolution | images | Dice | IoU | paper Dice | paper IoU | epochs "
                        "| best epoch | TRAIN.lr |")
    assert lines[2:] == [
        "| a | kvasir | val | 224 | 2 | 0.8000 ± 0.1000 | 0.7000 ± 0.0500 | - | - | 7 | 5 | 0.0003 |",
        "| a | kvasir | test | 224 | 3 | 0.7500 ± 0.1000 | 0.6500 ± 0.0500 | - | - | 7 | 5 | 0.0003 |",
        "| a | clinicdb | test | original | 4 | 0.5000 ± 0.1000 | 0.4000 ± 0.0500 | - | - | 7 | 5 | 0.0003 |",
        "| a | kvasir | test | original | 3 | 0.7400 ± 0.1000 | 0.6400 ± 0.0500 | - | - | 7 | 5 | 0.0003 |",
        "| b | kvasir | val | 224 | 2 | 0.6000 ± 0.1000 | 0.5000 ± 0.0500 | - | - | 4 | 2 | 0.001 |",
        "| b | kvasir | test | 224 | 3 | 0.5500 ± 0.1000 | 0.4500 ± 0.0500 | 0.9000 ± 0.0200 | 0.8200 | 4 | 2 | 0.001 |",
        "| b | etis | val | original | 5 | 0.3000 ± 0.1000 | 0.2000 ± 0.0500 | - | - | 4 | 2 | 0.001 |",
    ]
    csv = pd.read_csv(out.with_suffix(".csv"))
    assert len(csv) == 7 and {"dice", "dice_std", "paper_dice", "TRAIN.lr"} <= set(csv.columns)
    assert csv["paper_dice"].isna().sum() == 6 and csv["dice"].iloc[2] == 0.5


def test_one_run_has_no_difference_columns(runs):
    _, a, _ = runs
    rows, keys = collect([a])
    assert keys == [] and len(rows) == 4


def test_no_run_with_metrics_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_script(REPO / "tools" / "results_table.py", tmp_path / "empty", "--out", tmp_path / "r.md", check=False)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "no run folder with metrics" in result.stderr
    assert not (tmp_path / "r.md").exists()


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
    assert "| table | synthetic | test | original | 2 |" in result.stdout
