"""augment_data.py: copies of train images only, aligned masks in the dataset's formats, text that
follows the flip, idempotent reruns, a byte-identical undo, and a kill -9 that leaves no row
pointing at a missing file. Real Kvasir images where ../shared has them, synthetic otherwise."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from common.errors import CoTexNetError
from data_process import augment, augment_data, layout
from data_process.make_synthetic import make_synthetic
from data_process.registry import get_spec, pair_files, read_image, read_mask
from llava_inference.geometry import describe

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "data_process" / "augment_data.py"
KVASIR = (REPO / ".." / "shared" / "data" / "kvasir-seg").resolve()
FOREIGN = "isic,ISIC_1.jpg,ISIC_1_Segmentation.png\n"  # another dataset's row: never touched


def write_splits(split_dir: Path, name: str, train, val, test, end: str = "\n") -> None:
    """Split files as a user may have them: one foreign row in train, `end` line endings."""
    split_dir.mkdir(parents=True, exist_ok=True)
    for split, images in (("train", train), ("val", val), ("test", test)):
        rows = [f"{name},{image},{image}" for image in images]
        foreign = [FOREIGN.strip()] if split == "train" else []
        text = end.join(["dataset,img_name,mask_name", *foreign, *rows]) + end
        layout.split_csv(split_dir, split).write_bytes(text.encode())


def snapshot(*roots: Path) -> dict:
    return {path: (path.read_bytes(), path.stat().st_mtime_ns)
            for root in roots for path in sorted(root.rglob("*")) if path.is_file()}


def augment_cli(dataset: Path, splits: Path, *args: str) -> None:
    augment_data.main(["--dataset-name", dataset.name, "--dataset-path", str(dataset), "--split-dir", str(splits),
                       "--workers", "1", *args])


def train_rows(splits: Path, name: str) -> pd.DataFrame:
    table = pd.read_csv(layout.split_csv(splits, "train"), dtype=str)
    return table[table["dataset"] == name]


@pytest.fixture
def binary_dataset(tmp_path, synthetic_root) -> tuple[Path, Path]:
    """5 pairs (real Kvasir, else synthetic) and splits 3 train / 1 val / 1 test: (dataset, split dir)."""
    source = KVASIR if (KVASIR / "images").is_dir() else synthetic_root / "synthetic"
    name = "kvasir" if source == KVASIR else "synthetic"
    dataset = tmp_path / name
    names = sorted(p.name for p in (source / "images").iterdir())[:5]
    for folder in ("images", "masks"):
        (dataset / folder).mkdir(parents=True)
        for image in names:
            shutil.copy(source / folder / image, dataset / folder / image)
    write_splits(tmp_path / "splits", name, names[:3], names[3:4], names[4:])
    return dataset, tmp_path / "splits"


@pytest.fixture
def plain_dataset(tmp_path) -> tuple[Path, Path]:
    """PNG images that are their mask in colour (exact pixels), blobs off-centre: (dataset, split dir)."""
    dataset = tmp_path / "plain"
    for folder in ("images", "masks"):
        (dataset / folder).mkdir(parents=True)
    names = []
    for i, (w, h, cx, cy) in enumerate([(97, 64, 20, 15), (80, 121, 60, 95), (90, 90, 30, 70)]):
        mask = np.zeros((h, w), np.uint8)
        cv2.ellipse(mask, (cx, cy), (12, 8), 30, 0, 360, 255, -1)
        image = np.where(mask[:, :, None] > 0, np.uint8([40, 60, 200]), np.uint8([10, 10, 10]))  # BGR: red blob
        names.append(f"p{i}.png")
        cv2.imwrite(str(dataset / "images" / names[-1]), image)
        cv2.imwrite(str(dataset / "masks" / names[-1]), mask)
    write_splits(tmp_path / "splits", "plain", names[:2], names[2:], [])
    return dataset, tmp_path / "splits"


def test_op_names_never_read_as_a_category_and_pair_like_the_originals():
    ops = augment.parse_ops("hflip, vflip,scale0.75,scale1.25,hflip")
    assert [(op.name, op.tag) for op in ops] == [("hflip", "hflip"), ("vflip", "vflip"),
                                                 ("scale0.75", "scale75"), ("scale1.25", "scale125")]
    for bad in ("rot90", "scale1", "scale0.755", "scale9", ""):
        with pytest.raises(CoTexNetError, match="--ops"):
            augment.parse_ops(bad)
    isic, qata = get_spec("isic"), get_spec("QaTa-COV19")
    assert augment.copy_names("sub/ISIC_1.jpg", "sub/ISIC_1_segmentation.png", ops[2], isic) == \
        ("sub/ISIC_1_aug-scale75.jpg", "sub/ISIC_1_aug-scale75_segmentation.png")
    assert augment.copy_names("covid_1.png", "mask_covid_1.png", ops[0], qata) == \
        ("covid_1_aug-hflip.png", "mask_covid_1_aug-hflip.png")
    for op in ops:  # the tag adds no "__": ROI names of copies parse back to the copy and its category
        stem = layout.stem(augment.copy_names("sub/case_01.png", "sub/case_01.png", op, get_spec("camus"))[0])
        assert layout.parse_roi_name(layout.roi_name(stem), per_category=True) == (stem, None)
        assert layout.parse_roi_name(layout.roi_name(stem, "myocardium area"), True) == (stem, "myocardium area")


@pytest.mark.parametrize("op", ["hflip", "vflip", "scale0.75", "scale1.25"])
def test_image_and_mask_stay_aligned_pixel_for_pixel(plain_dataset, op):
    dataset, splits = plain_dataset
    augment_cli(dataset, splits, "--ops", op)
    spec, (applied,) = get_spec("plain"), augment.parse_ops(op)
    for source in ("p0", "p1"):
        image, mask = read_image(dataset / "images" / f"{source}_aug-{applied.tag}.png"), \
            read_mask(dataset / "masks" / f"{source}_aug-{applied.tag}.png", spec)
        original = read_mask(dataset / "masks" / f"{source}.png", spec)
        assert image.shape[:2] == mask.shape == original.shape  # the size is kept
        raw = cv2.imread(str(dataset / "masks" / f"{source}_aug-{applied.tag}.png"), cv2.IMREAD_UNCHANGED)
        assert set(np.unique(raw)) == {0, 255}  # nearest neighbour: no value between background and foreground
        red = image[:, :, 0] >= 105
        if op.endswith("flip"):
            assert (red == mask).all()
            assert (mask == (original[:, ::-1] if op == "hflip" else original[::-1])).all()
        else:
            s, h, w = applied.factor, *mask.shape
            edge = cv2.dilate(mask, np.ones((3, 3))) != cv2.erode(mask, np.ones((3, 3)))
            assert not (red != mask)[~edge].any()  # bilinear and nearest differ only on the outline
            ys, xs = np.nonzero(original)
            centre = np.array([(w - 1) / 2, (h - 1) / 2])
            expected = centre + s * (np.array([xs.mean(), ys.mean()]) - centre)
            ys, xs = np.nonzero(mask)
            assert np.abs(np.array([xs.mean(), ys.mean()]) - expected).max() < 0.6
            assert mask.sum() == pytest.approx(original.sum() * s * s, rel=0.06)


def test_real_images_only_train_copies_dataset_formats(binary_dataset):
    dataset, splits = binary_dataset
    before = {split: layout.split_csv(splits, split).read_bytes() for split in ("val", "test")}
    augment_cli(dataset, splits)
    spec, names = get_spec(dataset.name), sorted(p.name for p in (dataset / "images").iterdir())
    train, held_out = [n for n in names if "_aug-" not in n][:3], [n for n in names if "_aug-" not in n][3:]
    assert len(names) == 5 + 3 * 4
    for image in held_out:  # no val/test image ever has a copy
        assert not [n for n in names if n.startswith(layout.stem(image) + "_aug-")]
    assert {split: layout.split_csv(splits, split).read_bytes() for split in ("val", "test")} == before
    rows = train_rows(splits, dataset.name)
    assert len(rows) == 3 + 12 and FOREIGN in layout.split_csv(splits, "train").read_text()
    pairing = pair_files(dataset, spec)
    assert len(pairing.pairs) == 17 and not pairing.images_without_mask
    for source in train:
        stem = layout.stem(source)
        original, mask = read_image(dataset / "images" / source), read_mask(dataset / "masks" / source, spec)
        for op, flip in (("hflip", 1), ("vflip", 0)):
            name = f"{stem}_aug-{op}.jpg"
            copy = read_image(dataset / "images" / name)
            assert np.abs(copy.astype(int) - cv2.flip(original, flip)).mean() < 2.0  # JPEG re-encoding only
            assert (read_mask(dataset / "masks" / name, spec) == cv2.flip(mask, flip)).all()
            raw = cv2.imread(str(dataset / "masks" / name), cv2.IMREAD_UNCHANGED)
            assert ((raw <= 8) | (raw >= 247)).mean() > 0.99  # a 0/255 JPEG mask, like the source
        for tag in ("scale75", "scale125"):
            assert read_image(dataset / "images" / f"{stem}_aug-{tag}.jpg").shape == original.shape


def test_location_words_follow_the_flip(plain_dataset):
    dataset, splits = plain_dataset
    augment_cli(dataset, splits, "--ops", "hflip,vflip")
    spec = get_spec("plain")

    def location(stem):
        image, mask = read_image(dataset / "images" / f"{stem}.png"), read_mask(dataset / "masks" / f"{stem}.png", spec)
        return describe(mask, image * mask[:, :, None]).location

    assert location("p0") == "top left" and location("p1") == "bottom right"
    assert location("p0_aug-hflip") == "top right" and location("p0_aug-vflip") == "bottom left"
    assert location("p1_aug-hflip") == "bottom left" and location("p1_aug-vflip") == "top right"


def test_refuses_a_train_image_also_in_val_and_writes_nothing(binary_dataset):
    dataset, splits = binary_dataset
    names = sorted(p.name for p in (dataset / "images").iterdir())
    write_splits(splits, dataset.name, names[:3], names[2:4], names[4:])
    before = snapshot(dataset, splits)
    done = subprocess.run([sys.executable, SCRIPT, "--dataset-name", dataset.name, "--dataset-path", dataset,
                           "--split-dir", splits], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "val_data.csv" in done.stderr and names[2] in done.stderr and "nothing written" in done.stderr
    assert snapshot(dataset, splits) == before


def test_refuses_a_file_in_the_way_of_a_copy(plain_dataset):
    dataset, splits = plain_dataset
    shutil.copy(dataset / "images" / "p2.png", dataset / "images" / "p0_aug-vflip.png")
    before = snapshot(dataset, splits)
    with pytest.raises(CoTexNetError, match="p0_aug-vflip.png: exists and is not a copy"):
        augment_cli(dataset, splits)
    assert snapshot(dataset, splits) == before
    os.remove(dataset / "images" / "p0_aug-vflip.png")
    os.remove(dataset / "masks" / "p1.png")  # a source that would stop the run half-way
    before = snapshot(dataset, splits)
    with pytest.raises(CoTexNetError, match="p1.png: no such file .*nothing written"):
        augment_cli(dataset, splits)
    assert snapshot(dataset, splits) == before


def test_rerun_writes_nothing_and_other_ops_add_only_theirs(plain_dataset, capsys):
    dataset, splits = plain_dataset
    augment_cli(dataset, splits, "--ops", "hflip")
    first = snapshot(dataset, splits)
    augment_cli(dataset, splits, "--ops", "hflip")
    assert snapshot(dataset, splits) == first and "nothing to do" in capsys.readouterr().out
    augment_cli(dataset, splits, "--ops", "vflip,hflip", "--dry-run")
    assert snapshot(dataset, splits) == first
    assert capsys.readouterr().out.count("would write") == 3  # 2 copies and the summary
    augment_cli(dataset, splits, "--ops", "vflip,hflip")
    after = snapshot(dataset, splits)
    assert {p: after[p] for p in first if "_aug-hflip" in p.name} == {p: first[p] for p in first if "_aug-hflip" in p.name}
    assert sorted(p.name for p in set(after) - set(first)) == ["p0_aug-vflip.png"] * 2 + ["p1_aug-vflip.png"] * 2
    assert sorted(train_rows(splits, "plain")["img_name"]) == \
        ["p0.png", "p0_aug-hflip.png", "p0_aug-vflip.png", "p1.png", "p1_aug-hflip.png", "p1_aug-vflip.png"]
    moved = dataset.parent / "moved"  # the manifest names the split file relative to the dataset
    shutil.copytree(dataset, moved / "plain")
    shutil.copytree(splits, moved / "splits")
    augment_cli(moved / "plain", moved / "splits", "--ops", "vflip,hflip")
    assert "nothing to do" in capsys.readouterr().out


def test_undo_gives_back_every_byte(plain_dataset, capsys):
    dataset, splits = plain_dataset
    # Windows line endings and no line end after the last row: kept as they are
    path = layout.split_csv(splits, "train")
    path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n").rstrip())
    before = {p: p.read_bytes() for p in snapshot(dataset, splits)}
    augment_cli(dataset, splits, "--ops", "hflip")
    augment_cli(dataset, splits, "--ops", "scale0.75")
    assert path.read_bytes().count(b"\r\n") == 1 + 1 + 2 + 4 and b"\n" not in path.read_bytes().replace(b"\r\n", b"")
    (dataset / "ROIs").mkdir()
    shutil.copy(dataset / "images" / "p0.png", dataset / "ROIs" / "p0_aug-hflip.jpg")  # as make_ROI_img.py would
    augment_cli(dataset, splits, "--undo", "--dry-run")
    assert "would remove 4 copies" in capsys.readouterr().out and (dataset / "ROIs" / "p0_aug-hflip.jpg").exists()
    augment_cli(dataset, splits, "--undo")
    assert "byte for byte" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in snapshot(dataset, splits)} == before
    augment_cli(dataset, splits, "--undo")
    assert "nothing to undo" in capsys.readouterr().out


def test_copies_of_every_category_and_label_map(tmp_path):
    for per_category in (False, True):
        dataset = make_synthetic(tmp_path, count=3, seed=4, multiclass=True, per_category=per_category)
        spec, names = get_spec(dataset.name), [f"syn_000{i}" for i in range(3)]
        write_splits(tmp_path / "splits", dataset.name, [f"{n}.jpg" for n in names[:2]], [f"{n}.jpg" for n in names[2:]], [])
        table = pd.read_csv(layout.split_csv(tmp_path / "splits", "train"), dtype=str)
        table["mask_name"] = table["mask_name"].str.replace(".jpg", ".png")
        table.to_csv(layout.split_csv(tmp_path / "splits", "train"), index=False)
        augment_cli(dataset, tmp_path / "splits", "--ops", "hflip")
        folders = ["masks/1", "masks/2"] if per_category else ["masks"]
        for folder in folders:
            assert sorted(p.name for p in (dataset / folder).glob("*_aug-*")) == [f"{n}_aug-hflip.png" for n in names[:2]]
        for name in names[:2]:
            assert (read_mask(dataset / "masks" / f"{name}_aug-hflip.png", spec) ==
                    read_mask(dataset / "masks" / f"{name}.png", spec)[:, ::-1]).all()


def test_new_split_leaves_copies_out_and_rerun_drops_copies_of_held_out_images(binary_dataset):
    dataset, splits = binary_dataset
    augment_cli(dataset, splits, "--ops", "hflip")
    done = subprocess.run([sys.executable, REPO / "data_process" / "make_splits.py", "--dataset-name", dataset.name,
                           "--dataset-path", dataset, "--out-dir", splits, "--ratios", "2", "2", "1", "--seed", "5"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "3 augmented copies left out" in done.stdout, done.stderr
    held_out = [name for split in ("val", "test")
                for name in pd.read_csv(layout.split_csv(splits, split), dtype=str)["img_name"]]
    assert len(held_out) == 3 and not [n for n in held_out if "_aug-" in n]
    augment_cli(dataset, splits, "--ops", "hflip")
    images = {p.name for p in (dataset / "images").iterdir()}
    train = train_rows(splits, dataset.name)["img_name"].tolist()
    assert not [n for n in held_out if f"{layout.stem(n)}_aug-hflip.jpg" in images]
    assert sorted(train) == sorted([n for n in images if n not in held_out])
    assert len(augment.augmented_images(dataset)) == 2


def test_kill_9_leaves_no_row_without_its_file_and_rerun_completes(synthetic_root, tmp_path):
    source, dataset = synthetic_root / "synthetic", tmp_path / "synthetic"
    names = []
    for folder in ("images", "masks"):
        (dataset / folder).mkdir(parents=True)
    for i in range(60):  # the 12 synthetic pairs, 5 times: enough copies to be killed among
        image = f"syn_{i % 12:04d}.jpg"
        names.append(f"k{i:02d}.jpg")
        shutil.copy(source / "images" / image, dataset / "images" / names[-1])
        shutil.copy(source / "masks" / image, dataset / "masks" / names[-1])
    write_splits(tmp_path / "splits", "synthetic", names[:50], names[50:55], names[55:])
    command = [sys.executable, SCRIPT, "--dataset-name", "synthetic", "--dataset-path", dataset,
               "--split-dir", tmp_path / "splits", "--workers", "1"]
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not list((dataset / "images").glob("*_aug-*")) and time.monotonic() < deadline and run.poll() is None:
        time.sleep(0.005)
    assert run.poll() is None, "the run ended before it could be killed"
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    assert len(list((dataset / "images").glob("*_aug-*"))) < 200  # killed mid-way
    rows = train_rows(tmp_path / "splits", "synthetic")
    assert all((dataset / "images" / i).exists() and (dataset / "masks" / m).exists()
               for i, m in zip(rows["img_name"], rows["mask_name"], strict=True))
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    rows = train_rows(tmp_path / "splits", "synthetic")
    assert len(rows) == 50 * 5 and rows["img_name"].is_unique
    spec = get_spec("synthetic")
    for image, mask in zip(rows["img_name"], rows["mask_name"], strict=True):
        assert read_image(dataset / "images" / image).shape[:2] == read_mask(dataset / "masks" / mask, spec).shape
    assert not [p for p in dataset.rglob(".*") if p.is_file()]  # no temporary file left
