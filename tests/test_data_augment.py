"""augment_data.py: copies of train images only, in a folder and a split file of their own, aligned
masks in the dataset's formats, text that follows the flip, idempotent reruns, copies that follow
their origin through a re-split, removal by deleting what it made, and runs that are killed or
started together. Real Kvasir images where ../shared has them, synthetic otherwise."""

import json
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
from data_process import augment_data, augmented_copies, layout
from data_process.decoding import read_image, read_mask
from data_process.make_synthetic import make_synthetic
from data_process.pairing import pair_files
from data_process.registry import get_spec
from llava_inference.geometry import measure

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
    """Every visible file's bytes and time (the split folder's lock file is hidden)."""
    return {path: (path.read_bytes(), path.stat().st_mtime_ns)
            for root in roots for path in sorted(root.rglob("*")) if path.is_file() and not path.name.startswith(".")}


def augment_cli(dataset: Path, splits: Path, *args: str) -> None:
    augment_data.main(["--dataset-name", dataset.name, "--dataset-path", str(dataset), "--split-dir", str(splits),
                       "--workers", "1", *args])


def copy_rows(splits: Path, name: str) -> pd.DataFrame:
    path = layout.split_csv(splits, "augmented")
    table = pd.read_csv(path, dtype=str) if path.exists() else pd.DataFrame(columns=layout.AUGMENTED_COLUMNS)
    return table[table["dataset"] == name]


def copies(dataset: Path, sub: str = "images") -> list[str]:
    folder = layout.augmented_dir(dataset) / sub
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []


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
    ops = augmented_copies.parse_ops("hflip, vflip,scale0.75,scale1.25,hflip")
    assert [(op.name, op.tag) for op in ops] == [("hflip", "hflip"), ("vflip", "vflip"),
                                                 ("scale0.75", "scale75"), ("scale1.25", "scale125")]
    for bad in ("rot90", "scale1", "scale0.755", "scale9", ""):
        with pytest.raises(CoTexNetError, match="--ops"):
            augmented_copies.parse_ops(bad)
    isic, qata = get_spec("isic"), get_spec("QaTa-COV19")
    assert augmented_copies.copy_names("sub/ISIC_1.jpg", "sub/ISIC_1_segmentation.png", ops[2], isic) == \
        ("sub/ISIC_1_aug-scale75.jpg", "sub/ISIC_1_aug-scale75_segmentation.png")
    assert augmented_copies.copy_names("covid_1.png", "mask_covid_1.png", ops[0], qata) == \
        ("covid_1_aug-hflip.png", "mask_covid_1_aug-hflip.png")
    for op in ops:  # the tag adds no "__": ROI names of copies parse back to the copy and its category
        stem = layout.stem(augmented_copies.copy_names("sub/case_01.png", "sub/case_01.png", op, get_spec("camus"))[0])
        assert layout.parse_roi_name(layout.roi_name(stem), per_category=True) == (stem, None)
        assert layout.parse_roi_name(layout.roi_name(stem, "myocardium area"), True) == (stem, "myocardium area")


@pytest.mark.parametrize("op", ["hflip", "vflip", "scale0.75", "scale1.25"])
def test_image_and_mask_stay_aligned_pixel_for_pixel(plain_dataset, op):
    dataset, splits = plain_dataset
    augment_cli(dataset, splits, "--ops", op)
    spec, (applied,) = get_spec("plain"), augmented_copies.parse_ops(op)
    folder = layout.augmented_dir(dataset)
    for source in ("p0", "p1"):
        image, mask = read_image(folder / "images" / f"{source}_aug-{applied.tag}.png"), \
            read_mask(folder / "masks" / f"{source}_aug-{applied.tag}.png", spec)
        original = read_mask(dataset / "masks" / f"{source}.png", spec)
        assert image.shape[:2] == mask.shape == original.shape  # the size is kept
        raw = cv2.imread(str(folder / "masks" / f"{source}_aug-{applied.tag}.png"), cv2.IMREAD_UNCHANGED)
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


def test_real_images_only_train_copies_and_nothing_of_the_researchers_written(binary_dataset):
    dataset, splits = binary_dataset
    before = snapshot(dataset, splits)
    augment_cli(dataset, splits)
    after = snapshot(dataset, splits)
    # the dataset's folders and the three split files: every byte and time as before
    assert {p: v for p, v in after.items() if p in before} == before
    assert sorted(p for p in set(after) - set(before)) == sorted(
        [*(layout.augmented_dir(dataset) / sub / name for sub in ("images", "masks") for name in copies(dataset, sub)),
         layout.augmented_dir(dataset) / layout.AUGMENTED_RECORD, layout.split_csv(splits, "augmented")])
    spec, names = get_spec(dataset.name), sorted(p.name for p in (dataset / "images").iterdir())
    train, held_out = names[:3], names[3:]
    assert len(copies(dataset)) == 3 * 4
    for image in held_out:  # no val/test image ever has a copy
        assert not [n for n in copies(dataset) if n.startswith(layout.stem(image) + "_aug-")]
    rows = copy_rows(splits, dataset.name)
    assert sorted(rows["img_name"]) == copies(dataset) and set(rows["origin"]) == set(train)
    assert all(copy.startswith(layout.stem(origin) + "_aug-") for copy, origin in zip(rows["img_name"], rows["origin"],
                                                                                     strict=True))
    pairing = pair_files(layout.augmented_dir(dataset), spec)  # a dataset folder of its own
    assert len(pairing.pairs) == 12 and not pairing.images_without_mask
    folder = layout.augmented_dir(dataset)
    for source in train:
        stem = layout.stem(source)
        original, mask = read_image(dataset / "images" / source), read_mask(dataset / "masks" / source, spec)
        for op, flip in (("hflip", 1), ("vflip", 0)):
            name = f"{stem}_aug-{op}.jpg"
            copy = read_image(folder / "images" / name)
            assert np.abs(copy.astype(int) - cv2.flip(original, flip)).mean() < 2.0  # JPEG re-encoding only
            assert (read_mask(folder / "masks" / name, spec) == cv2.flip(mask, flip)).all()
            raw = cv2.imread(str(folder / "masks" / name), cv2.IMREAD_UNCHANGED)
            assert ((raw <= 8) | (raw >= 247)).mean() > 0.99  # a 0/255 JPEG mask, like the source
        for tag in ("scale75", "scale125"):
            assert read_image(folder / "images" / f"{stem}_aug-{tag}.jpg").shape == original.shape


def test_location_words_follow_the_flip(plain_dataset):
    dataset, splits = plain_dataset
    augment_cli(dataset, splits, "--ops", "hflip,vflip")
    spec = get_spec("plain")

    def location(stem):
        folder = layout.augmented_dir(dataset) if "_aug-" in stem else dataset
        image, mask = read_image(folder / "images" / f"{stem}.png"), read_mask(folder / "masks" / f"{stem}.png", spec)
        return measure(mask, image * mask[:, :, None]).location

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
    assert f"val_data.csv: image '{names[2]}' of {dataset.name} is also in" in done.stderr
    assert "train_data.csv" in done.stderr and "--allow-split-overlap" in done.stderr
    assert snapshot(dataset, splits) == before and not layout.augmented_dir(dataset).exists()


def test_refuses_an_original_named_like_a_copy_and_a_missing_source(plain_dataset):
    dataset, splits = plain_dataset
    shutil.copy(dataset / "images" / "p2.png", dataset / "images" / "p0_aug-vflip.png")
    before = snapshot(dataset, splits)
    with pytest.raises(CoTexNetError, match="p0_aug-vflip.png: an original image named like the vflip copy of p0.png"):
        augment_cli(dataset, splits)
    assert snapshot(dataset, splits) == before
    os.remove(dataset / "images" / "p0_aug-vflip.png")
    os.remove(dataset / "masks" / "p1.png")  # a source that would stop the run half-way
    before = snapshot(dataset, splits)
    with pytest.raises(CoTexNetError, match="p1.png: no such file .*nothing written"):
        augment_cli(dataset, splits)
    assert snapshot(dataset, splits) == before and not layout.augmented_dir(dataset).exists()


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
    assert sorted(copy_rows(splits, "plain")["img_name"]) == \
        ["p0_aug-hflip.png", "p0_aug-vflip.png", "p1_aug-hflip.png", "p1_aug-vflip.png"]
    moved = dataset.parent / "moved"  # the record names the split file relative to the copies' folder
    shutil.copytree(dataset, moved / "plain")
    shutil.copytree(splits, moved / "splits")
    augment_cli(moved / "plain", moved / "splits", "--ops", "vflip,hflip")
    assert "nothing to do" in capsys.readouterr().out


def test_undo_is_deleting_the_folder_and_the_file(plain_dataset, capsys):
    dataset, splits = plain_dataset
    path = layout.split_csv(splits, "train")  # Windows line endings, no line end after the last row: never touched
    path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n").rstrip())
    before = snapshot(dataset, splits)
    augment_cli(dataset, splits, "--ops", "hflip")
    augment_cli(dataset, splits, "--ops", "scale0.75")
    assert len(copy_rows(splits, "plain")) == 4
    rois = layout.augmented_dir(dataset) / "ROIs"
    rois.mkdir()
    shutil.copy(dataset / "images" / "p0.png", rois / "p0_aug-hflip.jpg")  # as make_ROI_img.py would
    augment_cli(dataset, splits, "--undo", "--dry-run")
    assert "would remove 4 rows" in capsys.readouterr().out and (rois / "p0_aug-hflip.jpg").exists()
    augment_cli(dataset, splits, "--undo")
    assert "removed 4 rows" in capsys.readouterr().out
    assert snapshot(dataset, splits) == before
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
        folder = layout.augmented_dir(dataset)
        subs = [p.relative_to(dataset) for p in sorted((dataset / "masks").iterdir()) if p.is_dir()] or ["masks"]
        for sub in subs:  # the category folders of the dataset, as they are named there
            assert sorted(p.name for p in (folder / sub).glob("*_aug-*")) == [f"{n}_aug-hflip.png" for n in names[:2]]
        for name in names[:2]:
            assert (read_mask(folder / "masks" / f"{name}_aug-hflip.png", spec) ==
                    read_mask(dataset / "masks" / f"{name}.png", spec)[:, ::-1]).all()
        augment_cli(dataset, tmp_path / "splits", "--undo")


def test_a_new_split_drops_copies_by_origin_and_the_rerun_removes_their_files(binary_dataset):
    dataset, splits = binary_dataset
    augment_cli(dataset, splits, "--ops", "hflip")
    done = subprocess.run([sys.executable, REPO / "data_process" / "make_splits.py", "--dataset-name", dataset.name,
                           "--dataset-path", dataset, "--out-dir", splits, "--ratios", "2", "2", "1", "--seed", "5"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    train = set(pd.read_csv(layout.split_csv(splits, "train"), dtype=str).query("dataset == @dataset.name")["img_name"])
    held_out = {name for split in ("val", "test") for name in pd.read_csv(layout.split_csv(splits, split), dtype=str)["img_name"]}
    moved = {layout.stem(name) for name in held_out} & {c.split("_aug-")[0] for c in copies(dataset)}
    assert moved and f"{len(moved)} augmented copies of images now in val or test dropped" in done.stdout
    assert set(copy_rows(splits, dataset.name)["origin"]) <= train  # by origin: no copy of a val or test image
    augment_cli(dataset, splits, "--ops", "hflip")
    rows = copy_rows(splits, dataset.name)
    assert set(rows["origin"]) == train and len(rows) == len(train) == 2
    assert copies(dataset) == sorted(rows["img_name"])  # the copies of held-out images are gone from the folder


def test_stage_1_stage_2_and_training_take_the_copies(binary_dataset, tmp_path):
    from train_utils import data
    from train_utils.config import load_config

    dataset, splits = binary_dataset
    augment_cli(dataset, splits, "--ops", "hflip,vflip")
    env = dict(os.environ, TQDM_DISABLE="1")
    for script in (["data_process/make_ROI_img.py", "--workers", "1"],
                   ["get_text.py", "--describer", "geometry", "--out", tmp_path / "text.csv"]):
        done = subprocess.run([sys.executable, REPO / script[0], "--dataset-name", dataset.name, "--dataset-path",
                               dataset, *script[1:]], capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
        assert done.returncode == 0, done.stderr
    assert copies(dataset, "ROIs") == [layout.roi_name(layout.stem(name)) for name in copies(dataset)]
    described = set(pd.read_csv(tmp_path / "text.csv")["roi_name"])
    assert described == {*os.listdir(dataset / "ROIs"), *copies(dataset, "ROIs")} and len(described) == 5 + 6
    overrides = [f"DATASET.dataset_name={dataset.name}", f"DATASET.root_dir={dataset.parent}",
                 f"DATASET.split_dir={splits}", "TRAIN.input_size=32"]
    cfg = load_config(REPO / "dataset_config" / "train_config.yaml", overrides)
    train = data.dataset(cfg, "train")
    assert len(train) == 3 + 6 and {item["name"] for item in train} == {
        *pd.read_csv(layout.split_csv(splits, "train"), dtype=str).query("dataset == @dataset.name")["img_name"],
        *copies(dataset)}
    assert len(data.dataset(cfg, "val")) == 1 and len(data.dataset(cfg, "test")) == 1
    cfg = load_config(REPO / "dataset_config" / "train_config.yaml", [*overrides, "DATASET.augmented=false"])
    assert len(data.dataset(cfg, "train")) == 3


def test_refuses_a_copies_folder_it_did_not_make_or_of_another_split_folder(plain_dataset, tmp_path):
    dataset, splits = plain_dataset
    (layout.augmented_dir(dataset) / "images").mkdir(parents=True)
    (layout.augmented_dir(dataset) / "images" / "mine.png").write_bytes(b"a researcher's file")
    before = snapshot(dataset, splits)
    for args in ((), ("--undo",)):
        with pytest.raises(CoTexNetError, match="augmented: exists and is not a folder of copies made by augment_data"):
            augment_cli(dataset, splits, *args)
        assert snapshot(dataset, splits) == before
    shutil.rmtree(layout.augmented_dir(dataset))
    augment_cli(dataset, splits, "--ops", "hflip")
    other = tmp_path / "other_splits"
    shutil.copytree(splits, other, ignore=shutil.ignore_patterns("train_augmented.csv", ".*"))
    before = snapshot(dataset, splits, other)
    with pytest.raises(CoTexNetError, match=f"listed in {splits.resolve() / 'train_augmented.csv'}"):
        augment_cli(dataset, other, "--ops", "hflip")
    assert snapshot(dataset, splits, other) == before


def test_copies_of_an_earlier_version_are_refused_then_undone(plain_dataset):
    """The earlier design put copies among the originals (images/, train_data.csv, augmented.json):
    a split would take them for images; --undo removes them."""
    dataset, splits = plain_dataset
    for sub in ("images", "masks"):
        shutil.copy(dataset / sub / "p0.png", dataset / sub / "p0_aug-hflip.png")
    (dataset / "ROIs").mkdir()
    (dataset / "ROIs" / "p0_aug-hflip.jpg").write_bytes(b"roi")
    train = layout.split_csv(splits, "train")
    original = train.read_text()
    train.write_text(original + "plain,p0_aug-hflip.png,p0_aug-hflip.png\n")
    (dataset / augmented_copies.EARLIER_MANIFEST).write_text(json.dumps({"format": 1, "copies": [
        {"source": "p0.png", "op": "hflip", "image": "p0_aug-hflip.png", "mask": "p0_aug-hflip.png"}]}))
    for script in ("augment_data.py", "make_splits.py"):
        done = subprocess.run([sys.executable, REPO / "data_process" / script, "--dataset-name", "plain",
                               "--dataset-path", dataset, "--split-dir" if script == "augment_data.py" else "--out-dir",
                               splits], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and "augmented.json: copies made by an earlier augment_data.py" in done.stderr
    augment_cli(dataset, splits, "--undo")
    assert pd.read_csv(train, dtype=str).equals(pd.read_csv(pd.io.common.StringIO(original), dtype=str))
    assert sorted(os.listdir(dataset / "images")) == ["p0.png", "p1.png", "p2.png"] and not os.listdir(dataset / "ROIs")
    assert not (dataset / augmented_copies.EARLIER_MANIFEST).exists()


# ---------------------------------------------------------------- killed, stopped, started together

def many_pairs(source: Path, dataset: Path, count: int) -> list[str]:
    names = []
    for folder in ("images", "masks"):
        (dataset / folder).mkdir(parents=True)
    for i in range(count):  # the 12 synthetic pairs, again and again: enough copies to be stopped among
        image = f"syn_{i % 12:04d}.jpg"
        names.append(f"k{i:02d}.jpg")
        for folder in ("images", "masks"):
            shutil.copy(source / folder / image, dataset / folder / names[-1])
    return names


def command(dataset: Path, splits: Path, *args) -> list:
    return [sys.executable, SCRIPT, "--dataset-name", "synthetic", "--dataset-path", dataset, "--split-dir", splits,
            "--workers", "1", *args]


def rows_name_whole_files(dataset: Path, splits: Path) -> pd.DataFrame:
    rows = copy_rows(splits, "synthetic")
    folder, spec = layout.augmented_dir(dataset), get_spec("synthetic")
    for image, mask in zip(rows["img_name"], rows["mask_name"], strict=True):
        assert read_image(folder / "images" / image).shape[:2] == read_mask(folder / "masks" / mask, spec).shape
    return rows


def test_killed_at_any_moment_leaves_the_old_list_or_the_new_and_the_rerun_completes(synthetic_root, tmp_path):
    """kill -9 once N new files are there (N from 0 to all), and at the named steps of the
    update of the split file: each time the list is the old one (the hflip copies) or the new
    one (three ops), every listed copy whole; then the rerun completes."""
    from data_process import splits as split_files

    dataset, splits = tmp_path / "synthetic", tmp_path / "splits"
    names = many_pairs(synthetic_root / "synthetic", dataset, 40)
    write_splits(splits, "synthetic", names[:30], names[30:35], names[35:])
    subprocess.run(command(dataset, splits, "--ops", "hflip"), check=True, capture_output=True, timeout=300)
    listed = layout.split_csv(splits, "augmented")
    old, backup = listed.read_bytes(), shutil.copytree(layout.augmented_dir(dataset), tmp_path / "backup")
    env = dict(os.environ, TQDM_DISABLE="1")
    kills = [("files", count) for count in (0, 5, 30, 70, 119)] + [
        ("step", step) for step in ("augment:copies written", "split_files:staged",
                                    "split_files:replacing train_augmented.csv")]
    landed = 0
    for kind, when in kills:
        shutil.rmtree(layout.augmented_dir(dataset))
        shutil.copytree(backup, layout.augmented_dir(dataset))
        listed.write_bytes(old)
        for path in splits.glob(".*"):
            path.unlink()
        run = subprocess.Popen(command(dataset, splits, "--ops", "hflip,vflip,scale0.75"), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=dict(env, COTEXNET_KILL_AT=when) if kind == "step" else env)
        if kind == "files":
            while run.poll() is None and len(copies(dataset)) - 30 < when:
                time.sleep(0.002)
            run.send_signal(signal.SIGKILL)
        landed += run.wait(timeout=300) == -signal.SIGKILL
        rows = rows_name_whole_files(dataset, splits)  # never a row without its files
        assert listed.read_bytes() == old or len(rows) == 30 * 3, (kind, when)
        if when == "split_files:replacing train_augmented.csv":  # killed after the commit: readers get the new list
            assert listed.read_bytes() == old and (splits / ".split_files.publish.json").exists()
            assert len(split_files.read(splits).tables["augmented"]) == 30 * 3 and listed.read_bytes() != old
    assert landed >= 6, landed  # the kills came while it worked, not after it finished
    again = subprocess.run(command(dataset, splits, "--ops", "hflip,vflip,scale0.75"), capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr
    rows = rows_name_whole_files(dataset, splits)
    assert len(rows) == 30 * 3 and rows["img_name"].is_unique and copies(dataset) == sorted(rows["img_name"])
    assert not [p for p in [*dataset.rglob(".*"), *splits.glob(".*")] if p.is_file() and p.suffix != ".lock"]


def test_runs_started_together_take_turns_and_list_every_copy_once(synthetic_root, tmp_path):
    dataset, splits = tmp_path / "synthetic", tmp_path / "splits"
    names = many_pairs(synthetic_root / "synthetic", dataset, 12)
    write_splits(splits, "synthetic", names[:8], names[8:10], names[10:])
    ops = ["hflip", "vflip", "scale0.75", "scale1.25", "hflip,vflip"]
    runs = [subprocess.Popen(command(dataset, splits, "--ops", op), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for op in ops]
    results = [run.communicate(timeout=600) for run in runs]
    assert all(run.returncode == 0 for run in runs), [err for _, err in results]
    listed = [name for kind in ("train", "augmented") if layout.split_csv(splits, kind).exists()
              for name in pd.read_csv(layout.split_csv(splits, kind), dtype=str)["img_name"] if "_aug-" in name]
    assert len(listed) == len(set(listed)) == 8 * 4  # every copy of every op, once, wherever it is listed
    rows = rows_name_whole_files(dataset, splits)
    assert len(rows) == 8 * 4 and rows["img_name"].is_unique  # every copy of every op, once
    assert sorted(rows["op"].value_counts().items()) == [("hflip", 8), ("scale0.75", 8), ("scale1.25", 8), ("vflip", 8)]
    assert FOREIGN in layout.split_csv(splits, "train").read_text()
    assert any("waiting for augment_data.py" in err for _, err in results)  # they did meet


def test_sigterm_stops_it_like_ctrl_c_leaving_the_old_list(synthetic_root, tmp_path):
    dataset, splits = tmp_path / "synthetic", tmp_path / "splits"
    names = many_pairs(synthetic_root / "synthetic", dataset, 40)
    write_splits(splits, "synthetic", names[:30], names[30:35], names[35:])
    run = subprocess.Popen(command(dataset, splits), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           env=dict(os.environ, TQDM_DISABLE="1"))
    deadline = time.monotonic() + 120
    while len(copies(dataset)) < 10 and time.monotonic() < deadline and run.poll() is None:
        time.sleep(0.01)
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 130 and err.strip().splitlines()[-1] == "interrupted", err[-2000:]
    assert not layout.split_csv(splits, "augmented").exists()  # the old list: none
    assert 10 <= len(copies(dataset)) < 120 and not [p for p in dataset.rglob(".*") if p.is_file()]
