"""report.html (train_utils/report_page.py, tools/report.py) on a run folder and an evaluation
folder written here in the formats train.py and evaluate.py write (real synthetic images, masks
and gallery pictures), read as HTML and opened in a real headless Chromium."""

import json
import re
import shutil

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml

from common.errors import CoTexNetError, run_cli
from data_process.decoding import read_image, read_mask
from data_process.registry import get_spec
from tests.browser_fixtures import browser, card_names, open_page  # noqa: F401
from tools import report as report_tool
from train_utils import reporting
from train_utils.config import load_config
from train_utils.pictures import picture_path, write_picture
from train_utils.report_page import SHIPPED_CONFIG, write_report
from train_utils.statistics import mean_ci

ODD_NAME = "a&b <c> d.jpg"  # escaped in the HTML, quoted in the picture's URL


def _dice(pred, truth) -> float:
    both = pred.sum() + truth.sum()
    return 1.0 if both == 0 else 2 * float((pred & truth).sum()) / both


def write_evaluation(folder, pictures, images, root, shifts) -> dict:
    """Pictures and a per-image CSV as evaluate.py writes them: each prediction is the true mask
    shifted right by `shifts[i]` pixels (its Dice computed); returns the metrics summary."""
    spec, rows = get_spec("synthetic"), []
    for name, shift in zip(images, shifts, strict=True):
        source = name if name != ODD_NAME else images[0]
        image = read_image(root / "synthetic" / "images" / source)
        truth = read_mask(root / "synthetic" / "masks" / source, spec, size=image.shape[1::-1]).astype(np.uint8)
        pred = np.roll(truth, shift, axis=1)
        write_picture(picture_path(pictures, name), image, truth, pred)
        dice = _dice(pred > 0, truth > 0)
        rows.append(dict(name=name, dice=dice, iou=dice / (2 - dice), empty_pred=int(pred.sum() == 0),
                         empty_truth=int(truth.sum() == 0), paper_dice=dice * 0.9))
    table = pd.DataFrame(rows)
    table.to_csv(folder / ("per_image.csv" if pictures.name == "gallery" else "test_per_image.csv"), index=False)
    return dict(images=len(rows), dice=table["dice"].mean(), dice_std=table["dice"].std(ddof=0),
                iou=table["iou"].mean(), iou_std=table["iou"].std(ddof=0), paper_dice=table["paper_dice"].mean())


@pytest.fixture(scope="module")
def run_folder(synthetic_root, tmp_path_factory):
    """A run with train.py's files (config, log, curves, metrics, per-image CSVs, test pictures)
    and one evaluate.py folder (per_image.csv, gallery/, concept.csv, metrics.json), pages written."""
    run = tmp_path_factory.mktemp("runs") / "A"
    run.mkdir()
    config = load_config(SHIPPED_CONFIG, ["TRAIN.lr=0.001", "TRAIN.epochs=3", "DATASET.dataset_name=synthetic",
                                          f"DATASET.root_dir={synthetic_root}", "TRAIN.run_name=A"])
    (run / "config.yaml").write_text(config.to_yaml())
    log = reporting.EpochLog(run / "log.csv")
    for epoch in (1, 2, 3):
        log.append(dict(epoch=epoch, train_loss=1 / epoch, train_seg=0.5 / epoch, train_kl=0.1 / epoch, lr=1e-3,
                        val_dice=0.5 + epoch / 10, val_iou=0.4 + epoch / 10))
    log.plot(run / "curves.png")
    names = sorted(p.name for p in (synthetic_root / "synthetic" / "images").iterdir())
    test = write_evaluation(run, run / "test_gallery", names[:4], synthetic_root, [0, 3, 9, 20])
    pd.read_csv(run / "test_per_image.csv").to_csv(run / "val_per_image.csv", index=False)
    (run / "metrics.json").write_text(json.dumps(dict(best_epoch=3, resolution=64, val=test, test=test)))
    evaluation = run / "eval_test"
    evaluation.mkdir()
    images = [*names[4:10], ODD_NAME]
    summary = write_evaluation(evaluation, evaluation / "gallery", images, synthetic_root, [1, 2, 30, 0, 6, 12, 4])
    pd.DataFrame(dict(name=images, sentence=[f"{k} round small pink polyp area." for k in range(len(images))],
                      number=1, location="center", shape="round", size="small", color="pink", kl=0.1)
                 ).to_csv(evaluation / "concept.csv", index=False)
    (evaluation / "metrics.json").write_text(json.dumps(dict(run=str(run), checkpoint="best", epoch=3, dataset="synthetic",
                                                             split="test", resolution="original", **summary)))
    write_report(run)
    write_report(evaluation)
    return run


def test_the_run_page_shows_the_config_differences_curves_metrics_and_every_test_image(run_folder):
    html = (run_folder / "report.html").read_text()
    shipped = yaml.safe_load(SHIPPED_CONFIG.read_text())
    differences = re.findall(r"<tr><td>([A-Z]+\.\w+)</td><td>([^<]*)</td><td>([^<]*)</td></tr>", html)
    assert {key for key, _, _ in differences} == {"TRAIN.lr", "TRAIN.epochs", "DATASET.dataset_name", "DATASET.root_dir"}
    assert ("TRAIN.epochs", str(shipped["TRAIN"]["epochs"]), "3") in differences  # the run name is not listed
    assert 'src="data:image/png;base64,' in html  # the curves, embedded
    per_image = pd.read_csv(run_folder / "test_per_image.csv")
    low, high = mean_ci(per_image["dice"])
    assert f"[{low:.4f}, {high:.4f}]" in html
    cards = re.findall(r'<figure class="card" data-name="([^"]+)" data-dice="([^"]+)">', html)
    assert len(cards) == len(per_image) == 4
    assert [float(d) for _, d in cards] == sorted(per_image["dice"])  # worst first
    assert 'href="eval_test/report.html"' in html
    assert "http://" not in html and "https://" not in html  # nothing that a browser would fetch from afar


def test_the_evaluation_page_shows_the_readout_escapes_names_and_links_pictures_relatively(run_folder):
    folder = run_folder / "eval_test"
    html = (folder / "report.html").read_text()
    per_image = pd.read_csv(folder / "per_image.csv")
    assert len(re.findall(r'<figure class="card"', html)) == len(per_image) == 7
    assert "a&amp;b &lt;c&gt; d.jpg" in html and ODD_NAME not in html
    assert 'src="gallery/a%26b%20%3Cc%3E%20d.jpg"' in html
    assert (folder / "gallery" / "a&b <c> d.jpg").is_file()
    assert "readout: 6 round small pink polyp area." in html
    assert 'href="../report.html"' in html


def test_a_damaged_per_image_file_leaves_the_page_with_its_reason(run_folder, tmp_path):
    run = tmp_path / "A"
    shutil.copytree(run_folder, run)
    (run / "val_per_image.csv").unlink()  # a run from before val_per_image.csv
    write_report(run)
    html = (run / "report.html").read_text()
    assert "no interval: " in html and "val_per_image.csv: no such file" in html
    assert len(re.findall(r'<figure class="card"', html)) == 4


def test_the_report_tool_rewrites_pages_and_refuses_other_folders(run_folder, tmp_path, capsys):
    (run_folder / "report.html").unlink()
    run_cli(report_tool.main, [str(run_folder), str(run_folder / "eval_test")])
    assert capsys.readouterr().out.split() == [str(run_folder / "report.html"),
                                               str(run_folder / "eval_test" / "report.html")]
    assert (run_folder / "report.html").is_file()
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as stopped:
        run_cli(report_tool.main, [str(tmp_path / "empty")])
    assert stopped.value.code == 2 and capsys.readouterr().err == (
        f"error: {tmp_path / 'empty'}: neither a run folder (config.yaml) nor an evaluation folder (metrics.json)\n")
    with pytest.raises(CoTexNetError, match="has no config.yaml; pass the run folder"):
        write_report(run_folder / "eval_test", run=tmp_path / "empty")


@pytest.mark.parametrize("page", ["report.html", "eval_test/report.html"])
def test_the_page_in_a_browser_sorts_filters_and_stays_offline(browser, run_folder, page, tmp_path):  # noqa: F811
    html = run_folder / page
    per_image = pd.read_csv(html.parent / ("per_image.csv" if "eval" in page else "test_per_image.csv"))
    opened = open_page(browser, html)
    assert opened.errors == [] and opened.remote == []
    assert sum(url.startswith("file:") and url.endswith(".jpg") for url in opened.requests) == len(per_image)
    assert opened.page.evaluate("Array.from(document.images).every(img => img.naturalWidth > 0)")
    worst_first = per_image.sort_values(["dice", "name"])["name"].tolist()
    assert card_names(opened.page) == worst_first
    assert opened.page.text_content("#shown") == f"{len(per_image)} of {len(per_image)} images shown"

    opened.page.select_option("#order", "name")
    assert card_names(opened.page) == sorted(per_image["name"]) != worst_first
    opened.page.select_option("#order", "dice-desc")
    assert card_names(opened.page) == per_image.sort_values(["dice", "name"], ascending=[False, True])["name"].tolist()
    threshold = float(np.median(per_image["dice"]))
    opened.page.fill("#limit", f"{threshold}")
    kept = per_image[per_image["dice"] <= threshold].sort_values(["dice", "name"], ascending=[False, True])
    assert 0 < len(kept) < len(per_image) and card_names(opened.page) == kept["name"].tolist()
    assert opened.page.text_content("#shown") == f"{len(kept)} of {len(per_image)} images shown"

    screenshot = tmp_path / "report.png"
    opened.page.screenshot(path=str(screenshot), full_page=True)
    picture = cv2.imread(str(screenshot))
    assert picture is not None and picture.shape[1] == 1280 and picture.shape[0] > 900
    assert opened.errors == [] and opened.remote == []
