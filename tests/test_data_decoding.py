"""Decoding images and masks as a person sees the file, by one path for every stage: the mask
threshold comes from the registry (per dataset), never from a file's own values; what the
decoder cannot read unambiguously is said in a warning naming the file, or refused."""

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from common.errors import CoTexNetError
from data_process.registry import get_spec, read_image, read_mask
from tests.train_fixtures import run_script

KVASIR = get_spec("kvasir")


def _circle(h=48, w=64) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    cv2.circle(mask, (w // 2, h // 2), 12, 255, -1)
    return mask


def _dataset(tmp_path, masks: dict[str, np.ndarray | Image.Image]):
    """A `kvasir`-registered dataset of smooth RGB images and the given masks (.jpg/.png by name)."""
    root = tmp_path / "kvasir"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for name, mask in masks.items():
        image = np.full((48, 64, 3), 160, np.uint8)
        cv2.imwrite(str(root / "images" / f"{name.split('.')[0]}.jpg"), image)
        if isinstance(mask, Image.Image):
            mask.save(root / "masks" / name)
        else:
            cv2.imwrite(str(root / "masks" / name), mask, [cv2.IMWRITE_JPEG_QUALITY, 95])
    return root


def test_empty_jpeg_mask_with_faint_noise_is_empty_in_every_stage(tmp_path):
    """Values 1-5 (JPEG noise) and a few specks of 10 in a 0/255 dataset: background for the ROI,
    the text and the label alike (they once disagreed: ROI and label foreground, or text empty
    while the label had 430 pixels)."""
    rng = np.random.default_rng(0)
    noise = (rng.random((48, 64)) < 0.3).astype(np.uint8) * rng.integers(1, 6, (48, 64)).astype(np.uint8)
    specks = np.zeros((48, 64), np.uint8)
    specks[rng.integers(0, 48, 20), rng.integers(0, 64, 20)] = 10
    root = _dataset(tmp_path, {"noise.png": noise, "specks.png": specks, "real.png": _circle()})
    assert not read_mask(root / "masks" / "noise.png", KVASIR).any()
    assert not read_mask(root / "masks" / "specks.png", KVASIR).any()
    done = run_script("data_process/make_ROI_img.py", "--dataset-name", "kvasir", "--dataset-path", root,
                      "--mask-format", ".png", "--workers", 1)
    assert not read_image(root / "ROIs" / "noise.jpg").any() and not read_image(root / "ROIs" / "specks.jpg").any()
    for name, largest in (("noise.png", 5), ("specks.png", 10)):
        line = [x for x in done.stderr.splitlines() if name in x]
        assert len(line) == 1 and f"largest {largest}" in line[0] and "read as empty" in line[0]
    out = tmp_path / "text.csv"
    run_script("get_text.py", "--dataset-name", "kvasir", "--dataset-path", root, "--mask-format", ".png",
               "--describer", "geometry", "--out", out)
    table = pd.read_csv(out)
    prompts = dict(zip(table["roi_name"].map(lambda name: str(name).split(".")[0]), table["text_prompt"], strict=True))
    assert "no polyp areas" in prompts["noise"] and "no polyp areas" in prompts["specks"]
    assert "no polyp areas" not in prompts["real"]


def test_zero_one_masks_follow_the_registry_threshold(tmp_path, capsys):
    mask = (_circle() > 0).astype(np.uint8)
    Image.fromarray(mask).save(tmp_path / "m.png")
    assert (read_mask(tmp_path / "m.png", get_spec("QaTa-COV19")) == mask).all()  # mask_threshold 1
    assert not read_mask(tmp_path / "m.png", KVASIR).any()  # a 0/255 dataset: not decided per file
    assert "mask_threshold: 1" in capsys.readouterr().err


def test_exif_orientation_is_applied_and_said(tmp_path, capsys):
    image = np.zeros((20, 40, 3), np.uint8)
    image[:, :20] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    Image.fromarray(image).save(tmp_path / "turned.jpg", exif=exif.tobytes(), quality=95)
    Image.fromarray(image[:, :, 0]).save(tmp_path / "turned_mask.png", exif=exif.tobytes())
    seen = read_image(tmp_path / "turned.jpg")
    assert seen.shape == (40, 20, 3) and seen[:20].mean() > 200 and seen[20:].mean() < 50  # white on top
    label = read_mask(tmp_path / "turned_mask.png", KVASIR)
    assert label.shape == (40, 20) and label[:20].all() and not label[20:].any()
    err = capsys.readouterr().err
    assert "turned.jpg: EXIF orientation 6" in err and "turned_mask.png: EXIF orientation 6" in err


def test_other_colour_models_images_converted_masks_refused(tmp_path, capsys):
    rgb = Image.fromarray(np.full((16, 16, 3), (200, 40, 40), np.uint8))
    rgb.convert("CMYK").save(tmp_path / "cmyk.jpg")
    image = read_image(tmp_path / "cmyk.jpg")
    assert image.shape == (16, 16, 3) and abs(int(image[..., 0].mean()) - 200) < 30
    assert "cmyk.jpg: CMYK colour model: converted to RGB" in capsys.readouterr().err
    Image.fromarray(_circle()).convert("RGB").convert("CMYK").save(tmp_path / "cmyk_mask.jpg")
    with pytest.raises(CoTexNetError, match=r"cmyk_mask.jpg: mask in the CMYK colour model"):
        read_mask(tmp_path / "cmyk_mask.jpg", KVASIR)
    Image.new("LAB", (8, 8)).save(tmp_path / "lab.tif")
    with pytest.raises(CoTexNetError, match=r"lab.tif: mask in the LAB colour model"):
        read_mask(tmp_path / "lab.tif", KVASIR)


def test_16_bit_colour_is_read_at_8_bits_and_said(tmp_path, capsys):
    deep = (np.random.default_rng(1).random((8, 8, 3)) * 65535).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "deep.png"), deep)
    assert (read_image(tmp_path / "deep.png") == (deep[:, :, ::-1] >> 8)).all()
    mask = np.dstack([_circle().astype(np.uint16) * 257] * 3)
    cv2.imwrite(str(tmp_path / "deep_mask.png"), mask)
    assert (read_mask(tmp_path / "deep_mask.png", KVASIR) == (_circle() > 0)).all()
    err = capsys.readouterr().err
    assert "deep.png: 16 bits per colour channel" in err and "deep_mask.png: 16 bits per colour channel" in err


def test_palette_mask_with_a_voc_boundary_index(tmp_path, capsys):
    index = np.zeros((30, 30), np.uint8)
    index[8:22, 8:22] = 255  # the boundary band
    index[10:20, 10:20] = 1  # the object inside it
    voc = Image.fromarray(index, mode="L").convert("P")
    voc.putpalette([0, 0, 0, 128, 0, 0] + [0, 0, 0] * 253 + [224, 224, 192])
    voc.save(tmp_path / "voc.png")
    assert (read_mask(tmp_path / "voc.png", KVASIR) == (index == 1)).all()
    assert "voc.png: palette mask with index 255 beside other classes" in capsys.readouterr().err
    plain = Image.fromarray((index > 0).astype(np.uint8), mode="L").convert("P")  # indices 0/1, no boundary
    plain.save(tmp_path / "plain.png")
    assert (read_mask(tmp_path / "plain.png", KVASIR) == (index > 0)).all()
    assert capsys.readouterr().err == ""


def test_transparency_is_said_and_an_alpha_only_mask_read_from_alpha(tmp_path, capsys):
    alpha_only = np.zeros((48, 64, 4), np.uint8)  # black strokes on transparent: the mask is the alpha
    alpha_only[..., 3] = _circle()
    Image.fromarray(alpha_only, "RGBA").save(tmp_path / "alpha.png")
    assert (read_mask(tmp_path / "alpha.png", KVASIR) == (_circle() > 0)).all()
    image = np.dstack([np.full((8, 8, 3), 90, np.uint8), np.full((8, 8), 100, np.uint8)])
    Image.fromarray(image, "RGBA").save(tmp_path / "see_through.png")
    assert (read_image(tmp_path / "see_through.png") == 90).all()
    err = capsys.readouterr().err
    assert "alpha.png: transparent mask whose colours hold no foreground: read from its alpha" in err
    assert "see_through.png: transparent pixels: alpha dropped" in err


def test_grey_with_alpha_mask_reads_the_grey(tmp_path):
    """A grey + alpha mask (mode LA), opaque: its grey is the mask, its alpha channel is not a colour."""
    la = np.dstack([_circle(), np.full((48, 64), 255, np.uint8)])
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    assert (read_mask(tmp_path / "la.png", KVASIR) == (_circle() > 0)).all()


def test_pure_red_mask_registry_and_paper_readings(tmp_path):
    """Registry: the brightest channel, red counts; the paper's convert("L") makes red 76 < 128."""
    red = np.zeros((48, 64, 3), np.uint8)
    red[..., 0] = _circle()
    Image.fromarray(red).save(tmp_path / "red.png")
    assert (read_mask(tmp_path / "red.png", KVASIR) == (_circle() > 0)).all()
    assert not read_mask(tmp_path / "red.png", KVASIR, binarize="paper").any()
    white = Image.fromarray(_circle())
    white.save(tmp_path / "white.png")
    assert (read_mask(tmp_path / "white.png", KVASIR, binarize="paper") == (_circle() > 0)).all()
