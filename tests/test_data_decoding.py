"""Decoding images and masks as a person sees the file, by one path for every stage: the mask
threshold comes from the registry (per dataset), never from a file's own values; what the
decoder cannot read unambiguously is said in a warning naming the file, or refused."""

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from common.errors import CoTexNetError
from data_process.decoding import read_image, read_mask
from data_process.registry import get_spec
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


def test_zero_one_palette_mask_follows_the_threshold_as_a_zero_one_grey_mask(tmp_path, capsys):
    """Indices 0/1 in Pillow's grey palette show black on black: a 0/1 mask, read by the dataset's
    threshold like a grey one (the paper's convert("L") gives 0/1 too)."""
    plain = Image.fromarray((_circle() > 0).astype(np.uint8)).convert("P")
    plain.save(tmp_path / "plain.png")
    assert (read_mask(tmp_path / "plain.png", get_spec("QaTa-COV19")) == (_circle() > 0)).all()
    assert not read_mask(tmp_path / "plain.png", KVASIR).any()
    assert "plain.png: no value reaches the foreground threshold 128" in capsys.readouterr().err


def test_transparency_is_said_and_an_alpha_only_mask_read_from_alpha(tmp_path, capsys):
    alpha_only = np.zeros((48, 64, 4), np.uint8)  # black strokes on transparent: the mask is the alpha
    alpha_only[..., 3] = _circle()
    Image.fromarray(alpha_only, "RGBA").save(tmp_path / "alpha.png")
    assert (read_mask(tmp_path / "alpha.png", KVASIR) == (_circle() > 0)).all()
    image = np.dstack([np.full((8, 8, 3), 90, np.uint8), np.full((8, 8), 100, np.uint8)])
    Image.fromarray(image, "RGBA").save(tmp_path / "see_through.png")
    assert (read_image(tmp_path / "see_through.png") == 90).all()
    err = capsys.readouterr().err
    assert "alpha.png: its colours show no object, its transparency does: mask read from the alpha channel" in err
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


WHITE, BLACK = (255, 255, 255), (0, 0, 0)


def _palette_png(path, inside: np.ndarray, colours, object_index: int, background_index: int,
                 transparent: int | None = None, **save) -> None:
    index = np.where(inside, object_index, background_index).astype(np.uint8)
    image = Image.frombytes("P", (inside.shape[1], inside.shape[0]), index.tobytes())
    image.putpalette([value for colour in colours for value in colour])
    if transparent is not None:
        image.info["transparency"] = transparent
    image.save(path, **save)


def _pil_paper_reading(path) -> np.ndarray:
    """The paper's reading of a mask file, re-stated: Pillow's grey value, foreground from 128."""
    return np.array(Image.open(path).convert("L")) >= 128


def test_palette_masks_are_read_through_their_palette(tmp_path, capsys):
    """Whatever the order of the palette, the mask is the white a viewer shows, in both readings."""
    inside = _circle() > 0
    _palette_png(tmp_path / "white_at_0.png", inside, [WHITE, BLACK], 0, 1)
    _palette_png(tmp_path / "unused_0.png", inside, [(255, 0, 255), BLACK, WHITE], 2, 1)
    _palette_png(tmp_path / "one_bit.png", inside, [WHITE, BLACK], 0, 1, bits=1)
    _palette_png(tmp_path / "indexed.bmp", inside, [BLACK] * 7 + [WHITE], 7, 3)
    Image.fromarray(_circle()).convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "adaptive.png")
    Image.fromarray(_circle()).save(tmp_path / "grey.gif")
    for name in ("white_at_0.png", "unused_0.png", "one_bit.png", "indexed.bmp", "adaptive.png", "grey.gif"):
        assert Image.open(tmp_path / name).mode == "P", name
        assert (read_mask(tmp_path / name, KVASIR) == inside).all(), name
        paper = read_mask(tmp_path / name, KVASIR, binarize="paper")
        assert (paper == _pil_paper_reading(tmp_path / name)).all() and (paper == inside).all(), name
    assert capsys.readouterr().err == ""


def test_paper_reading_is_pillows_grey_value_for_every_format(tmp_path):
    """DATASET.binarize paper keeps the paper's reading exactly, transparency and colour included."""
    inside = _circle() > 0
    red = np.zeros((48, 64, 3), np.uint8)
    red[inside] = (255, 0, 0)
    Image.fromarray(red).save(tmp_path / "red.png")
    Image.fromarray(np.dstack([np.full(inside.shape, 255, np.uint8)] * 3 + [_circle()])).save(tmp_path / "rgba.png")
    Image.fromarray(np.dstack([np.full(inside.shape, 200, np.uint8), _circle()])).save(tmp_path / "la.png")
    Image.fromarray(_circle().astype(np.uint16) * 257).save(tmp_path / "deep.png")
    cv2.imwrite(str(tmp_path / "artefacts.jpg"), _circle(), [cv2.IMWRITE_JPEG_QUALITY, 40])
    _palette_png(tmp_path / "trns.png", inside, [WHITE, WHITE], 0, 1, transparent=1)
    for name in ("red.png", "rgba.png", "la.png", "deep.png", "artefacts.jpg", "trns.png"):
        assert (read_mask(tmp_path / name, KVASIR, binarize="paper") == _pil_paper_reading(tmp_path / name)).all(), name


def test_transparency_decides_where_the_colours_show_no_object(tmp_path, capsys):
    """One colour everywhere (RGBA, grey + alpha, a palette with tRNS): the alpha channel is the
    mask. Colours and alpha that agree (up to an antialiased edge): the colours. Colours whose
    object is partly transparent: refused, naming the file."""
    inside = _circle() > 0
    full = np.full(inside.shape, 255, np.uint8)
    Image.fromarray(np.dstack([full] * 3 + [_circle()])).save(tmp_path / "white_rgba.png")
    Image.fromarray(np.dstack([full // 2, _circle()])).save(tmp_path / "grey_la.png")
    _palette_png(tmp_path / "trns.png", inside, [WHITE, WHITE], 0, 1, transparent=1)
    soft = cv2.GaussianBlur(_circle(), (7, 7), 2.0)  # alpha antialiased beyond the colours' edge
    Image.fromarray(np.dstack([_circle()] * 3 + [soft])).save(tmp_path / "agree.png")
    for name in ("white_rgba.png", "grey_la.png", "trns.png", "agree.png"):
        assert (read_mask(tmp_path / name, KVASIR) == inside).all(), name
    err = capsys.readouterr().err
    assert err.count("its colours show no object, its transparency does") == 3 and "agree.png" not in err
    moved = np.roll(_circle(), 20, axis=1)  # the alpha shows the circle elsewhere
    Image.fromarray(np.dstack([_circle()] * 3 + [moved])).save(tmp_path / "disagree.png")
    with pytest.raises(CoTexNetError, match=r"disagree.png: its colours and its transparency show different masks"):
        read_mask(tmp_path / "disagree.png", KVASIR)


def _pictures(tmp_path) -> list:
    """Pictures given as masks: a colour photograph (JPEG), its grey, and a 12-bit grey scan in 16 bits."""
    from data_process.make_synthetic import make_synthetic

    make_synthetic(tmp_path / "syn", count=1, seed=3)
    photo = next((tmp_path / "syn" / "synthetic" / "images").iterdir())
    grey = cv2.imread(str(photo), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(tmp_path / "grey.png"), grey)
    cv2.imwrite(str(tmp_path / "scan.png"), grey.astype(np.uint16) * 16)
    return [photo, tmp_path / "grey.png", tmp_path / "scan.png"]


def test_a_picture_given_as_a_mask_is_said_and_masks_are_not(tmp_path, capsys):
    for path in _pictures(tmp_path):
        read_mask(path, KVASIR)
        read_mask(path, get_spec("QaTa-COV19"), binarize="paper")
        err = capsys.readouterr().err
        assert err.count(f"{path}: does not look like a mask of") == 2 and "a photograph?" in err, err
    big = np.zeros((480, 640), np.uint8)
    cv2.circle(big, (320, 240), 100, 255, -1)
    cv2.imwrite(str(tmp_path / "small.png"), cv2.resize(big, (64, 48), interpolation=cv2.INTER_AREA))  # antialiased
    cv2.imwrite(str(tmp_path / "rough.jpg"), big, [cv2.IMWRITE_JPEG_QUALITY, 20])
    ids = np.zeros((48, 64), np.uint8)
    for k in range(1, 40):  # an instance map (GLaS): 39 glands of ids 1..39
        ids[(k // 8) * 9 + 1:(k // 8) * 9 + 8, (k % 8) * 8 + 1:(k % 8) * 8 + 7] = k
    Image.fromarray(ids).save(tmp_path / "ids.bmp")
    for name, spec in (("small.png", KVASIR), ("rough.jpg", KVASIR), ("ids.bmp", get_spec("GLaS"))):
        assert read_mask(tmp_path / name, spec).any()
    assert "does not look like a mask" not in capsys.readouterr().err


def test_real_kvasir_masks_are_masks_and_its_images_are_not(kvasir_dir, capsys):
    names = sorted(path.name for path in (kvasir_dir / "masks").iterdir())[::50]
    for name in names:
        read_mask(kvasir_dir / "masks" / name, KVASIR)
    assert "does not look like a mask" not in capsys.readouterr().err
    for name in names:
        read_mask(kvasir_dir / "images" / name, KVASIR)
    assert capsys.readouterr().err.count("does not look like a mask of kvasir") == len(names)


def test_pixel_limit_switch(tmp_path, monkeypatch, capsys):
    """COTEXNET_MAX_IMAGE_PIXELS is Pillow's decompression-bomb limit: above it one warning line
    per file (however often the file is read), above twice it refused with the size; 0: none."""
    Image.fromarray(_circle()).save(tmp_path / "m.png")  # 64x48 = 3072 pixels
    for limit, said in (("2000", "above Pillow's decompression-bomb limit of 2,000"), ("3072", ""), ("0", "")):
        monkeypatch.setenv("COTEXNET_MAX_IMAGE_PIXELS", limit)
        for _ in range(3):
            assert (read_mask(tmp_path / "m.png", KVASIR) == (_circle() > 0)).all()
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == (1 if said else 0) and said in "".join(lines), lines
    monkeypatch.setenv("COTEXNET_MAX_IMAGE_PIXELS", "1000")
    with pytest.raises(CoTexNetError, match=r"m.png: image too large: 64x48 = 3,072 pixels, more than twice "
                                            r"Pillow's decompression-bomb limit of 1,000; .*=3072"):
        read_image(tmp_path / "m.png")
    monkeypatch.setenv("COTEXNET_MAX_IMAGE_PIXELS", "-5")
    with pytest.raises(CoTexNetError, match=r"COTEXNET_MAX_IMAGE_PIXELS='-5': expected a whole number"):
        read_image(tmp_path / "m.png")


def test_a_faint_object_in_the_alpha_channel_is_said(tmp_path, capsys):
    """White everywhere, the object drawn at 40% opacity: the alpha holds the object but never
    reaches the threshold; read as empty, and the warning says so (not that the file disagrees)."""
    faint = (_circle() > 0).astype(np.uint8) * 100
    Image.fromarray(np.dstack([np.full(faint.shape, 255, np.uint8)] * 3 + [faint])).save(tmp_path / "faint.png")
    assert not read_mask(tmp_path / "faint.png", KVASIR).any()
    assert "faint.png: its colours show no object, its transparency does: mask read from the alpha channel (none " \
           "at the threshold 128: largest 100, read as empty)" in capsys.readouterr().err
    assert (read_mask(tmp_path / "faint.png", get_spec("QaTa-COV19")) == (faint > 0)).all()
