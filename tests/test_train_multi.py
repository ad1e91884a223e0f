"""Beyond one dataset: evaluating a run on another dataset, and training on two at once.

Two binary synthetic datasets of different formats share one root: `synthetic` (registered,
JPEG masks) and `synthetic_png` (not in the registry, so the defaults: PNG masks found by any
extension, keyword "target area"). The scripts' `main` run in-process on the tiny model."""

import json
from functools import partial
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

import evaluate
import train
from common.errors import CoTexNetError
from data_process.make_synthetic import make_synthetic
from data_process.my_dataset import collate
from model.checkpoint import read_extra
from model.CoTexNet import ROI_POSITION
from train_utils import data, loops
from train_utils.config import load_config
from train_utils.metrics import overall, summarize

pytestmark = pytest.mark.slow

PROMPT = "1 round small red polyp area, located in the center of the image."
# The metrics.json keys a single-dataset run wrote before several datasets existed.
SINGLE_TOP = {"best_epoch", "resolution", "val", "test"}
SINGLE_SPLIT = {"images", "dice", "dice_std", "iou", "iou_std", "miou", "miou_std", "pixel_acc", "pixel_acc_std",
                "hd95", "hd95_std", "empty_pred", "empty_truth", "hd95_undefined"}


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> dict:
    """Root with both datasets (8 images each: 4 train / 2 val / 2 test), split CSVs holding both,
    one text CSV each, a tiny CLIPSeg, and the config of a fast two-dataset run."""
    from model.tiny import save_clipseg_folder

    work = tmp_path_factory.mktemp("multi")
    root = work / "data"
    make_synthetic(root, count=8, seed=1)
    make_synthetic(root, name="synthetic_png", count=8, seed=3, mask_format="png")
    names = {}
    for name in ("synthetic", "synthetic_png"):
        names[name] = sorted(p.name for p in (root / name / "images").iterdir())
        masks = sorted(p.name for p in (root / name / "masks").iterdir())
        assert masks[0].endswith(".jpg" if name == "synthetic" else ".png")
        pd.DataFrame(dict(roi_name=names[name], text="{}", text_prompt=PROMPT)).to_csv(work / f"{name}_text.csv",
                                                                                       index=False)
    for split, part in (("train", slice(0, 4)), ("val", slice(4, 6)), ("test", slice(6, 8))):
        rows = [dict(dataset=name, img_name=image, mask_name=mask)
                for name in names
                for image, mask in zip(names[name][part],
                                       sorted(p.name for p in (root / name / "masks").iterdir())[part], strict=True)]
        pd.DataFrame(rows).to_csv(work / f"{split}_data.csv", index=False)
    config = dict(
        MODEL=dict(clipseg_hf_api=str(save_clipseg_folder(work / "tiny_clipseg"))),
        DATASET=dict(dataset_name=["synthetic", "synthetic_png"], root_dir=str(root), split_dir=str(work),
                     text_csv=[str(work / "synthetic_text.csv"), str(work / "synthetic_png_text.csv")]),
        TRAIN=dict(input_size=64, batch_size=4, num_workers=0, epochs=2, lr=1e-3, cpu_threads=2, num_overlays=1,
                   run_dir=str(work / "runs"), select_overall="datasets"),
    )
    only = work / "onlyone"  # synthetic_png in the training split only
    only.mkdir()
    for split in ("train", "val", "test"):
        frame = pd.read_csv(work / f"{split}_data.csv")
        (frame if split == "train" else frame[frame["dataset"] == "synthetic"]).to_csv(only / f"{split}_data.csv",
                                                                                        index=False)
    (work / "multi.yaml").write_text(yaml.safe_dump(config))
    single = dict(config, DATASET=dict(dataset_name="synthetic", root_dir=str(root), split_dir=str(work),
                                       text_csv=str(work / "synthetic_text.csv")),
                  TRAIN=dict(config["TRAIN"], select_overall="images"))
    (work / "single.yaml").write_text(yaml.safe_dump(single))
    return dict(work=work, root=root, names=names, runs=work / "runs", multi=work / "multi.yaml",
                single=work / "single.yaml")


@pytest.fixture(scope="module")
def single_run(two):
    train.main(["--config", str(two["single"]), "TRAIN.run_name=single"])
    return two["runs"] / "single"


@pytest.fixture(scope="module")
def multi_run(two):
    train.main(["--config", str(two["multi"]), "TRAIN.run_name=multi"])
    return two["runs"] / "multi"


def test_single_dataset_run_writes_as_before(single_run):
    metrics = json.loads((single_run / "metrics.json").read_text())
    assert SINGLE_TOP <= set(metrics) and not {"datasets", "select_overall"} & set(metrics)
    for split in ("val", "test"):
        assert SINGLE_SPLIT <= set(metrics[split])
        assert not {"datasets", "mean_over_datasets"} & set(metrics[split])
    assert list(pd.read_csv(single_run / "test_per_image.csv").columns)[0] == "name"
    assert "val_dice_datasets" not in pd.read_csv(single_run / "log.csv").columns


def test_cross_dataset_evaluation_on_another_layout(single_run, two, capsys):
    evaluate.main(["--run", str(single_run), "--dataset", "synthetic_png", "--split", "all", "--overlays", "1"])
    out = single_run / "eval_synthetic_png_all"
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["dataset"], metrics["split"], metrics["images"]) == ("synthetic_png", "all", 8)
    rows = pd.read_csv(out / "per_image.csv")
    assert sorted(rows["name"]) == two["names"]["synthetic_png"]  # every image of the three splits, once
    assert len(list((out / "masks").glob("*.png"))) == 8
    evaluate.main(["--run", str(single_run), "--dataset", "synthetic_png", "--split", "all", "--split-dir",
                   str(two["work"] / "onlyone"), "--out", str(two["work"] / "train_only")])
    assert json.loads((two["work"] / "train_only" / "metrics.json").read_text())["images"] == 4  # the split holding it
    evaluate.main(["--run", str(single_run), "--dataset", "synthetic_png", "--split", "val"])
    assert json.loads((single_run / "eval_synthetic_png_val" / "metrics.json").read_text())["images"] == 2
    # The run's own dataset keeps the folder existing tooling reads.
    evaluate.main(["--run", str(single_run), "--split", "test"])
    own = json.loads((single_run / "eval_test" / "metrics.json").read_text())
    assert (own["dataset"], own["split"], own["images"]) == ("synthetic", "test", 2)


def test_cross_dataset_evaluation_needs_the_runs_classes(single_run):
    with pytest.raises(CoTexNetError, match=r"--dataset synthetic_multiclass: it has 3 classes.*predicts 2"):
        evaluate.main(["--run", str(single_run), "--dataset", "synthetic_multiclass"])
    with pytest.raises(CoTexNetError, match=r"no rows for dataset 'elsewhere'"):
        evaluate.main(["--run", str(single_run), "--dataset", "elsewhere"])
    with pytest.raises(CoTexNetError, match=r"no split CSV \(train_data.csv, val_data.csv, test_data.csv\) has rows "
                                            r"for dataset 'elsewhere'"):
        evaluate.main(["--run", str(single_run), "--dataset", "elsewhere", "--split", "all"])


def test_two_dataset_run_reports_each_dataset_and_both_overall_figures(multi_run, two):
    metrics = json.loads((multi_run / "metrics.json").read_text())
    assert metrics["datasets"] == ["synthetic", "synthetic_png"] and metrics["select_overall"] == "datasets"
    for split in ("val", "test"):
        summary = metrics[split]
        assert summary["images"] == 4 and SINGLE_SPLIT <= set(summary)
        assert {name: s["images"] for name, s in summary["datasets"].items()} == {"synthetic": 2, "synthetic_png": 2}
        dice = [s["dice"] for s in summary["datasets"].values()]
        assert summary["mean_over_datasets"]["dice"] == pytest.approx(sum(dice) / 2)
        # Equal image counts: the mean over images is the mean over datasets too.
        assert summary["dice"] == pytest.approx(summary["mean_over_datasets"]["dice"])
    per_image = pd.read_csv(multi_run / "test_per_image.csv")
    assert sorted(per_image["dataset"]) == ["synthetic"] * 2 + ["synthetic_png"] * 2
    log = pd.read_csv(multi_run / "log.csv")
    assert {"val_dice", "val_dice_synthetic", "val_dice_synthetic_png", "val_dice_datasets"} <= set(log.columns)
    # TRAIN.select_overall=datasets: the best so far follows the mean over datasets.
    assert list(log["best_dice"]) == pytest.approx(list(log["val_dice_datasets"].cummax()))
    extra = read_extra(multi_run / "best")
    assert extra["epoch"] == metrics["best_epoch"] == int(log["val_dice_datasets"].idxmax()) + 1
    assert yaml.safe_load((multi_run / "config.yaml").read_text())["DATASET"]["dataset_name"] == \
        ["synthetic", "synthetic_png"]
    with pytest.raises(CoTexNetError, match=r"trained on synthetic, synthetic_png; name the one"):
        evaluate.main(["--run", str(multi_run)])
    evaluate.main(["--run", str(multi_run), "--dataset", "synthetic_png"])
    assert json.loads((multi_run / "eval_synthetic_png_test" / "metrics.json").read_text())["images"] == 2


@pytest.mark.parametrize("how, best_epoch, best_dice", [("images", 1, [0.6, 0.6]), ("datasets", 2, [0.2, 0.5])])
def test_select_overall_picks_the_best_epoch(two, monkeypatch, how, best_epoch, best_dice):
    """Validation figures scripted so that the two overall means disagree on the best epoch."""
    real, scores = loops.evaluate, iter([(0.6, 0.2), (0.4, 0.5)])  # (over images, over datasets) of epochs 1, 2

    def scripted(*args, **kwargs):
        result = real(*args, **kwargs)
        result.summary["dice"], result.summary["mean_over_datasets"]["dice"] = next(scores)
        return result

    monkeypatch.setattr(loops, "evaluate", scripted)
    train.main(["--config", str(two["multi"]), f"TRAIN.select_overall={how}", f"TRAIN.run_name=select_{how}"])
    run = two["runs"] / f"select_{how}"
    assert json.loads((run / "metrics.json").read_text())["best_epoch"] == best_epoch
    assert read_extra(run / "best")["val_dice"] == best_dice[-1]
    assert list(pd.read_csv(run / "log.csv")["best_dice"]) == best_dice


def test_training_batches_mix_the_datasets(two, tokenizer):
    cfg = load_config(two["multi"])
    train_set = data.split_set(cfg, "train", tokenizer)
    loader = data.loader(cfg, train_set, shuffle=True, generator=torch.Generator().manual_seed(0),
                         collate_fn=partial(collate, pad_id=tokenizer.pad_token_id, roi_position=ROI_POSITION))
    batches = [(batch["dataset"], batch["name"]) for batch in loader]
    assert any(len(set(parts)) == 2 for parts, _ in batches)  # shuffled together, not one dataset after the other
    seen = sorted((part, name) for parts, names in batches for part, name in zip(parts, names, strict=True))
    assert seen == sorted((part, name) for part in two["names"] for name in two["names"][part][:4])
    # Each dataset's items carry its own text (the prompt's keyword is in both CSVs; its tokens are there).
    assert all("input_ids" in train_set[i] for i in (0, len(train_set) - 1))


def test_summary_overall_selects_by_images_or_datasets():
    rows = [dict(dataset="a", name="1", dice=1.0, iou=1.0, miou=1.0, pixel_acc=1.0, hd95=0.0, empty_pred=0,
                 empty_truth=0)] + [dict(dataset="b", name=str(i), dice=0.0, iou=0.0, miou=0.5, pixel_acc=0.5,
                                         hd95=float("nan"), empty_pred=1, empty_truth=0) for i in range(3)]
    summary = summarize(rows)
    assert summary["dice"] == pytest.approx(0.25)  # 4 images
    assert summary["mean_over_datasets"]["dice"] == pytest.approx(0.5)  # 2 datasets
    assert summary["datasets"]["b"]["hd95"] is None and summary["mean_over_datasets"]["hd95"] == 0.0
    assert overall(summary, "images") is summary
    assert overall(summary, "datasets")["dice"] == pytest.approx(0.5)


@pytest.mark.parametrize("override, match", [
    ("DATASET.text_csv=[{work}/synthetic_text.csv,{work}/none.csv]",
     r"dataset synthetic_png: .*none.csv: no such file"),
    ("DATASET.split_dir={work}/onlyone", r"val_data.csv: no rows for dataset 'synthetic_png'"),
    ("DATASET.dataset_name=[synthetic,synthetic_multiclass]",
     r"same classes; the registry gives synthetic 2, synthetic_multiclass 3"),
])
def test_a_dataset_missing_its_text_or_rows_is_one_line(two, override, match):
    with pytest.raises(CoTexNetError, match=match) as err:
        train.main(["--config", str(two["multi"]), override.format(work=two["work"]), "TRAIN.run_name=bad"])
    assert "\n" not in str(err.value)
    assert not (two["runs"] / "bad").exists()


@pytest.mark.parametrize("override, match", [
    ("DATASET.dataset_name=[a,a]", "names a dataset twice"),
    ("DATASET.dataset_name=[]", "must not be empty"),
    ("DATASET.dataset_name=[a,1.5]", "expected str or list of str"),
    ("DATASET.text_csv=t.csv", "one path per dataset"),
    ("DATASET.text_csv=[t.csv]", "one path per dataset"),
    ("TRAIN.select_overall=best", "images or datasets"),
    ("DATASET.keyword=lesion", "must be null with several datasets"),
])
def test_multi_dataset_config_mistakes_name_the_key(override, match):
    with pytest.raises(CoTexNetError, match=match):
        load_config(None, ["DATASET.dataset_name=[kvasir,clinicdb]", override])


def test_multi_dataset_config_reads_lists_and_defaults():
    cfg = load_config(None, ["DATASET.dataset_name=[kvasir,clinicdb]", "DATASET.text_csv=['',my.csv]"])
    assert cfg.datasets() == ["kvasir", "clinicdb"]
    assert {k: str(v) for k, v in cfg.text_csvs().items()} == {
        "kvasir": "text_file/kvasir/kvasir_text_out.csv", "clinicdb": "my.csv"}
    assert load_config(None, ["DATASET.dataset_name=[kvasir,clinicdb]"]).text_csvs()["clinicdb"].name == \
        "clinicdb_text_out.csv"
    assert load_config(None).text_csvs() == {"kvasir": Path("text_file/kvasir/kvasir_text_out.csv")}
