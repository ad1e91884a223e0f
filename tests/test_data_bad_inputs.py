"""Issue 2's bad inputs through the stage-1 scripts: each a one-line error naming the file and
exit status 2, or a warning that lists what was left out; odd image modes just work."""

import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from common.errors import CoTexNetError
from data_process import splits as split_files
from data_process.decoding import read_image

REPO = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(7)


def run(script, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, REPO / "data_process" / script, *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def assert_one_line_error(done: subprocess.CompletedProcess, *parts: str):
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and done.stderr.startswith("error: "), done.stderr
    for part in parts:
        assert part in done.stderr


@pytest.fixture
def synthetic_copy(synthetic_root, tmp_path) -> Path:
    return Path(shutil.copytree(synthetic_root / "synthetic", tmp_path / "synthetic"))


def test_16bit_rgba_palette_and_gray_inputs_end_to_end(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    # smooth colours: JPEG keeps them (it would smear pixel noise), so the ROI can be compared
    rgb = cv2.resize(RNG.integers(30, 226, (4, 5, 3), dtype=np.uint8), (67, 45), interpolation=cv2.INTER_LINEAR)
    inside = np.zeros((45, 67), bool)
    inside[10:35, 15:50] = True
    kernel = np.ones((7, 7), np.uint8)
    edge = cv2.dilate(inside.astype(np.uint8), kernel) != cv2.erode(inside.astype(np.uint8), kernel)
    images = {"deep": Image.fromarray(rgb[:, :, 1].astype(np.uint16) * 257),  # 16-bit gray
              "alpha": Image.fromarray(rgb).convert("RGBA"), "pal": Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE),
              "gray": Image.fromarray(rgb).convert("L")}
    masks = {"deep": Image.fromarray(inside.astype(np.uint16) * 65535),
             "alpha": Image.fromarray(np.dstack([inside * 255] * 3 + [np.full(inside.shape, 255)]).astype(np.uint8)),
             "pal": Image.fromarray(inside.astype(np.uint8) * 255).convert("P"),  # a grey palette, indices 0/255
             "gray": Image.fromarray(inside.astype(np.uint8) * 255)}        # a 0/255 gray mask
    for name in images:
        images[name].save(tmp_path / "images" / f"{name}.png")
        masks[name].save(tmp_path / "masks" / f"{name}.png")
    done = run("make_ROI_img.py", "--dataset-name", "odd_modes", "--dataset-path", tmp_path, "--workers", 1)
    assert done.returncode == 0, done.stderr
    assert "4 images done" in done.stdout
    for name in images:
        roi = read_image(tmp_path / "ROIs" / f"{name}.jpg").astype(int)
        expected = read_image(tmp_path / "images" / f"{name}.png").astype(int) * inside[:, :, None]
        error = np.abs(roi - expected)
        assert error.mean() < 3 and np.percentile(error[~edge], 99) <= 12, name  # JPEG error, largest along edges


def test_truncated_mask_exits_2_naming_it(synthetic_copy):
    victim = synthetic_copy / "masks" / "syn_0004.jpg"
    victim.write_bytes(victim.read_bytes()[:300])
    bad = run("make_ROI_img.py", "--dataset-name", "synthetic", "--dataset-path", synthetic_copy, "--workers", 1)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith(f"error: {victim}: unreadable or truncated")


def test_empty_or_non_image_mask_file_exits_2(synthetic_copy):
    (synthetic_copy / "masks" / "syn_0006.jpg").write_bytes(b"")
    bad = run("make_ROI_img.py", "--dataset-name", "synthetic", "--dataset-path", synthetic_copy, "--workers", 1)
    assert bad.returncode == 2 and f"{synthetic_copy / 'masks' / 'syn_0006.jpg'}: unreadable" in bad.stderr


def test_splits_mask_without_image_exits_2_and_writes_nothing(synthetic_copy, tmp_path):
    (synthetic_copy / "images" / "syn_0001.jpg").unlink()
    out = tmp_path / "splits"
    bad = run("make_splits.py", "--dataset-name", "synthetic", "--dataset-path", synthetic_copy, "--out-dir", out)
    assert_one_line_error(bad, f"{synthetic_copy / 'masks' / 'syn_0001.jpg'}: no image with its stem", "nothing written")
    assert not out.exists()


def test_splits_image_without_mask_is_warned_listed_and_left_out(synthetic_copy, tmp_path):
    for i in (2, 8):
        (synthetic_copy / "masks" / f"syn_{i:04d}.jpg").unlink()
    done = run("make_splits.py", "--dataset-name", "synthetic", "--dataset-path", synthetic_copy, "--out-dir", tmp_path)
    assert done.returncode == 0, done.stderr
    assert "warning: 2 images without a mask, left out: syn_0002.jpg, syn_0008.jpg" in done.stderr
    names = pd.concat([pd.read_csv(tmp_path / f"{s}_data.csv") for s in ("train", "val", "test")])["img_name"]
    assert len(names) == 10 and "syn_0002.jpg" not in set(names)


def test_no_masks_at_all_exits_2(synthetic_copy):
    for path in (synthetic_copy / "masks").iterdir():
        path.unlink()
    assert_one_line_error(run("make_ROI_img.py", "--dataset-name", "synthetic", "--dataset-path", synthetic_copy),
                          f"{synthetic_copy / 'masks'}: no masks found")
    assert_one_line_error(run("make_splits.py", "--dataset-name", "synthetic", "--dataset-path", synthetic_copy / "nope"),
                          f"{synthetic_copy / 'nope' / 'images'}: no such folder")


def test_split_csv_repeated_rows_are_dropped_and_clashes_refused(tmp_path, capsys):
    path = tmp_path / "train_data.csv"
    rows = [("kvasir", "a.jpg", "a.jpg"), ("kvasir", "b.jpg", "b.jpg"), ("kvasir", "a.jpg", "a.jpg"), ("isic", "a.jpg", "x")]
    pd.DataFrame(rows, columns=["dataset", "img_name", "mask_name"]).to_csv(path, index=False)
    def read_split(path, name):
        return split_files.read(path.parent).of(name, path.parent / name).split("train")

    assert read_split(path, "kvasir")["img_name"].tolist() == ["a.jpg", "b.jpg"]
    assert f"warning: {path}: 1 repeated rows of kvasir dropped, e.g. ['a.jpg']" in capsys.readouterr().err
    assert len(read_split(path, "isic")) == 1 and capsys.readouterr().err == ""  # other datasets' names don't clash
    rows.append(("kvasir", "b.jpg", "b_other.png"))
    pd.DataFrame(rows, columns=["dataset", "img_name", "mask_name"]).to_csv(path, index=False)
    with pytest.raises(CoTexNetError, match=r"train_data.csv: image 'b.jpg' of kvasir is listed with two different masks"):
        read_split(path, "kvasir")
