"""Geometry against the synthetic ground truth; the text CSV (geometry run, resume, paper format)."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import get_text
from common.errors import CoTexNetError
from data_process import layout
from data_process.decoding import read_image, read_mask
from data_process.registry import get_spec
from llava_inference import geometry, text_stage
from llava_inference.attributes import LOCATIONS, SIZES, Attributes, location_words
from llava_inference.text_csv_reader import load_prompts
from llava_inference.text_csv_writer import COLUMNS, PAPER_COLUMNS
from tests.text_fixtures import *  # noqa: F403 (session fixtures)

KVASIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "kvasir-seg"


def _truth_checks(folder: Path, spec, truth: pd.DataFrame, label_of) -> int:
    checked = 0
    for row in truth.itertuples():
        image = read_image(folder / "images" / row.img_name)
        mask = read_mask(folder / "masks" / row.mask_name, spec) == label_of(row)
        if row.number == 0:
            assert geometry.count_regions(mask) == 0
            continue
        attrs = geometry.measure(mask, image)
        assert attrs.number == row.number, row.img_name
        assert attrs.location == location_words(row.cx, row.cy), row.img_name
        # JPEG edges move the area a little: exact unless the truth is within 5 % of a threshold
        if all(abs(row.area_fraction - t) > 0.05 * t for t in (geometry.SMALL_BELOW, geometry.LARGE_FROM)):
            assert attrs.size == geometry.size_word(row.area_fraction), row.img_name
        checked += 1
    return checked


def test_geometry_matches_synthetic_truth(synthetic):
    truth = pd.read_csv(synthetic / "truth.csv")
    assert _truth_checks(synthetic, get_spec("synthetic"), truth, lambda row: 1) >= 40


def test_geometry_matches_synthetic_truth_multiclass(synthetic_multiclass):
    spec = get_spec("synthetic_multiclass")
    truth = pd.read_csv(synthetic_multiclass / "truth.csv")
    assert _truth_checks(synthetic_multiclass, spec, truth, lambda row: spec.categories.index(row.category) + 1) > 5


def test_shape_and_colour_words():
    import cv2

    canvas = np.zeros((200, 300), np.uint8)
    circle = cv2.circle(canvas.copy(), (150, 100), 50, 1, -1)
    ellipse = cv2.ellipse(canvas.copy(), (150, 100), (80, 35), 30, 0, 360, 1, -1)
    star = cv2.fillPoly(canvas.copy(), [np.array([[150, 20], [170, 90], [250, 100], [170, 115], [150, 190],
                                                  [130, 115], [50, 100], [130, 90]])], 1)
    roi = np.zeros((200, 300, 3), np.uint8)
    roi[:] = (190, 40, 40)
    assert [geometry.measure(m, roi).shape for m in (circle, ellipse, star)] == ["round", "oval", "irregular"]
    assert geometry.measure(circle, roi).color == "red"
    assert geometry.color_word((230, 150, 160)) == "pink" and geometry.color_word((128, 128, 130)) == "gray"


def _run(folder: Path, out: Path, *extra) -> pd.DataFrame:
    get_text.main(["--dataset-name", folder.name, "--dataset-path", str(folder), "--out", str(out), *extra])
    return pd.read_csv(out)


def test_geometry_csv_for_the_synthetic_set(synthetic, tmp_path):
    table = _run(synthetic, tmp_path / "out.csv", "--describer", "geometry")
    assert list(table.columns) == list(COLUMNS)
    assert len(table) == len(list((synthetic / "ROIs").glob("*.jpg"))) and table["roi_name"].is_unique
    described = table[table["number"] > 0]
    assert described["location"].between(0, len(LOCATIONS) - 1).all() and described["size"].between(0, len(SIZES) - 1).all()
    assert (table["source"] == "geometry").all()
    # the empty mask of the set gets its own sentence, not a made-up region
    assert table.loc[table["number"] == 0, "text_prompt"].str.startswith("no polyp areas").all()
    prompts = load_prompts(tmp_path / "out.csv", get_spec("synthetic"))
    assert prompts["syn_0000"].endswith("of the image.") and len(prompts) == len(table)
    assert not list(tmp_path.glob("*.partial*"))


def test_multiclass_prompts_join_categories_in_order(synthetic_multiclass, tmp_path):
    spec = get_spec("synthetic_multiclass")
    table = _run(synthetic_multiclass, tmp_path / "mc.csv", "--describer", "geometry")
    assert len(table) == 12 * len(spec.categories)
    prompts = load_prompts(tmp_path / "mc.csv", spec)
    first = table[table["roi_name"].str.startswith("syn_0000__")].set_index("roi_name")["text_prompt"]
    assert prompts["syn_0000"] == " ".join(first[layout.roi_name("syn_0000", c)] for c in spec.categories)


def test_resume_after_interruption_gives_the_same_rows(synthetic, tmp_path, monkeypatch):
    reference = _run(synthetic, tmp_path / "ref.csv", "--describer", "geometry")
    out = tmp_path / "resumed.csv"
    calls = {"n": 0}
    measure = geometry.measure

    def dies_after_20(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 20:
            raise KeyboardInterrupt
        return measure(*args, **kwargs)

    monkeypatch.setattr(geometry, "measure", dies_after_20)
    with pytest.raises(KeyboardInterrupt):
        _run(synthetic, out, "--describer", "geometry")
    monkeypatch.setattr(geometry, "measure", measure)
    partial = out.with_name("resumed.partial.csv")
    assert not out.exists() and len(pd.read_csv(partial)) >= 20
    with partial.open("a") as f:  # a kill -9 in the middle of a line
        f.write("syn_0049.jpg,\"{\"\"number")
    resumed = _run(synthetic, out, "--describer", "geometry")
    pd.testing.assert_frame_equal(resumed, reference)
    assert not partial.exists()
    # a rerun of a finished CSV describes nothing again and changes nothing
    pd.testing.assert_frame_equal(_run(synthetic, out, "--describer", "geometry"), reference)


def test_a_finished_csv_without_final_newline_is_read_whole_and_left_alone(synthetic, tmp_path):
    """Only partial CSVs lose a last line cut by a kill; a finished --out (an edited file, one
    from another tool) keeps every row on a rerun."""
    out = tmp_path / "out.csv"
    reference = _run(synthetic, out, "--describer", "geometry")
    out.write_bytes(out.read_bytes().rstrip(b"\n"))
    pd.testing.assert_frame_equal(_run(synthetic, out, "--describer", "geometry"), reference)


@pytest.mark.parametrize("img_format", [".jpg", "jpg"])  # with or without the dot, as in every stage
def test_img_format_picks_one_of_two_images_with_the_same_stem(synthetic, tmp_path, img_format):
    import shutil

    folder = tmp_path / "unregistered"  # no image extension in the registry: every image format pairs
    shutil.copytree(synthetic, folder)
    shutil.copy(folder / "images" / "syn_0000.jpg", folder / "images" / "syn_0000.png")
    with pytest.raises(CoTexNetError, match=r"two images with stem 'syn_0000' \(syn_0000.jpg\); pass --img-format"):
        _run(folder, tmp_path / "a.csv", "--describer", "geometry")
    assert len(_run(folder, tmp_path / "b.csv", "--describer", "geometry", "--img-format", img_format)) == len(
        list((folder / "ROIs").glob("*.jpg")))


def test_describers_yield_every_row_in_batches_and_write_nothing(synthetic):
    """The row generators only read: run() is the one place that writes. The model is asked per
    slice of --batch-size ROIs less their empty masks; no answer -> the geometry row as fallback;
    hybrid -> shape and colour from the model, the rest from the mask."""
    spec = get_spec("synthetic")
    items = text_stage.list_rois(synthetic, spec, ("polyp area",))
    files = sorted(synthetic.rglob("*"))
    by_mask = {row["roi_name"]: row for row in text_stage.geometry_rows(items, spec)}
    assert list(by_mask) == [item.roi_name for item in items]
    empty = {name for name, row in by_mask.items() if row["number"] == 0}
    assert 0 < len(empty) < len(items) and all(by_mask[name]["source"] == "geometry" for name in by_mask)
    calls = []
    answer = Attributes(1, "center", "crescent", "large", "blue")

    class Scripted:  # Describer.ask's contract: (attributes or None, answers drawn) per ROI
        def ask(self, images, keywords, max_numbers, max_retries):
            calls.append(len(images))
            return [(None, max_retries) if len(calls) == 1 else (answer, 1)] * len(images)

    rows = list(text_stage.model_rows(items, spec, Scripted(), hybrid=True, batch_size=8, max_retries=3))
    assert sorted(row["roi_name"] for row in rows) == sorted(by_mask)
    assert calls == [sum(item.roi_name not in empty for item in items[i:i + 8]) for i in range(0, len(items), 8)]
    first_batch = {item.roi_name for item in items[:8]} - empty
    for row in rows:
        mask_row = by_mask[row["roi_name"]]
        if row["roi_name"] in empty:
            assert row == mask_row
        elif row["roi_name"] in first_batch:
            assert row == {**mask_row, "source": "fallback", "tries": 3}
        else:
            assert row["source"] == "hybrid" and row["tries"] == 1
            assert [row[k] for k in ("number", "location", "size")] == [mask_row[k] for k in ("number", "location", "size")]
            assert (row["shape"], row["color"]) == (answer.codes()["shape"], answer.codes()["color"])
    assert sorted(synthetic.rglob("*")) == files


def test_paper_format_csv_loads(tmp_path):
    spec = get_spec("kvasir")
    paper = pd.DataFrame({
        "roi_name": ["a.jpg", "b.jpg"],
        "text": ['{"number": 1, "location": "center", "shape": "round", "size": "small", "color": "pink"}',
                 "{'number': 2, 'location': [0.0, 0.0, 0.2, 0.2], 'shape': 'oval', 'size': 'large', 'color': 'red'}"],
        "text_prompt": ["1 round small pink polyp area, located in the center of the image.", ""],
        "number": [1, 2], "location": [0, 1], "shape": [0, 1], "size": [0, 2], "color": [0, 1],
    })
    paper.to_csv(tmp_path / "kvasir_text_out.csv")  # index=True: the paper's unnamed first column
    prompts = load_prompts(tmp_path / "kvasir_text_out.csv", spec)
    assert prompts == {"a": "1 round small pink polyp area, located in the center of the image.",
                       "b": "2 oval large red polyp areas, located in the top left of the image."}
    paper.drop(columns=["text_prompt"]).iloc[:, :1].to_csv(tmp_path / "bad.csv")
    with pytest.raises(CoTexNetError, match="roi_name and text_prompt"):
        load_prompts(tmp_path / "bad.csv", spec)


def test_missing_rois_and_orphan_roi_are_named(synthetic, tmp_path):
    import shutil

    with pytest.raises(CoTexNetError, match="no ROI folder"):
        _run(tmp_path, tmp_path / "x.csv", "--describer", "geometry")
    copy = tmp_path / "synthetic"
    shutil.copytree(synthetic, copy)
    (copy / "masks" / "syn_0003.jpg").unlink()
    (copy / "images" / "syn_0003.jpg").unlink()
    with pytest.raises(CoTexNetError, match="syn_0003.jpg: ROI without a mask"):
        _run(copy, tmp_path / "x.csv", "--describer", "geometry")


@pytest.mark.skipif(not KVASIR.is_dir(), reason=f"real Kvasir-SEG not found at {KVASIR}")
def test_geometry_on_real_kvasir_sample(tmp_path):
    import shutil

    from data_process import make_ROI_img

    folder = tmp_path / "kvasir"
    masks = sorted((KVASIR / "masks").glob("*.jpg"))[:12]
    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True)
        for mask in masks:
            shutil.copy(KVASIR / sub / mask.name, folder / sub / mask.name)
    make_ROI_img.main(["--dataset-name", "kvasir", "--dataset-path", str(folder), "--workers", "1"])
    table = _run(folder, tmp_path / "kvasir_text_out.csv", "--describer", "geometry")
    assert list(table.columns[: len(PAPER_COLUMNS)]) == list(PAPER_COLUMNS) and len(table) == 12
    assert (table["number"] >= 1).all() and table["text_prompt"].str.contains("polyp area").all()


def test_a_partial_csv_that_cannot_be_rewritten_is_one_line(synthetic, tmp_path, monkeypatch, capsys):
    """A rerun must cut the line a kill left half-written; where the partial CSV is read-only
    that is one line naming it (exit 2), and the file is left as it was."""
    import errno
    import os

    from common.errors import run_cli

    out = tmp_path / "text.csv"
    _run(synthetic, out, "--describer", "geometry")
    lines = out.read_bytes().splitlines(keepends=True)
    out.unlink()
    partial = tmp_path / "text.partial.csv"
    partial.write_bytes(b"".join(lines[:3]) + lines[3][:25])
    if os.geteuid() == 0:  # root may write a read-only file: refuse the write as the kernel does for a user
        write_bytes = Path.write_bytes

        def read_only(self, data):
            if self == partial:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
            return write_bytes(self, data)

        monkeypatch.setattr(Path, "write_bytes", read_only)
    else:
        partial.chmod(0o444)
    before = partial.read_bytes()
    with pytest.raises(SystemExit) as exit_:
        run_cli(get_text.main, ["--dataset-name", "synthetic", "--dataset-path", str(synthetic), "--out", str(out),
                                "--describer", "geometry"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {partial}: cannot be rewritten (Permission denied); check its permissions, or move it away and rerun")
    assert partial.read_bytes() == before and not out.exists()


def test_a_rerun_removes_only_the_temporaries_of_its_own_csv(tmp_path):
    from common.atomic import remove_stale_temporaries

    own = [tmp_path / ".text.csv.k3j4h5g6.tmp.csv", tmp_path / ".text.settings.json.a1b2_3d4.tmp.json"]
    others = [tmp_path / ".other.csv.k3j4h5g6.tmp.csv", tmp_path / ".text.csv.tmp.csv", tmp_path / "sub" / own[0].name]
    for path in own + others:
        path.parent.mkdir(exist_ok=True)
        path.write_text("half")
    assert remove_stale_temporaries(tmp_path, ("text.csv", "text.settings.json")) == 2
    assert [p.exists() for p in own + others] == [False, False, True, True, True]
