"""The dataset registry: specs, image decoding, mask decoding, names and pairing."""

import cv2
import numpy as np
import pytest
from PIL import Image

from common.errors import CoTexNetError
from data_process import registry
from data_process.decoding import read_image, read_mask
from data_process.layout import normalise_ext, parse_roi_name, roi_name, stem
from data_process.pairing import image_stem, pair_files
from data_process.registry import get_spec

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (31, 47, 3), dtype=np.uint8)  # odd, non-square


def test_every_dataset_of_the_paper_is_registered():
    expected = {"kvasir": ".jpg", "clinicdb": ".png", "bkai": ".jpeg", "busi": ".png", "dfu": ".png", "isic": ".png",
                "GLaS": ".bmp", "DDTI": ".PNG", "camus": ".png", "acdc": ".png"}
    for name, mask_ext in expected.items():
        assert get_spec(name).mask_ext == mask_ext
    assert get_spec("kvasir").keyword == "polyp area" and get_spec("isic").keyword == "skin lesion area"
    assert get_spec("camus").num_classes == 4 and get_spec("acdc").mask_encoding == "labelmap"
    assert get_spec("QaTa-COV19").mask_prefix == "mask_" and get_spec("mosmeddata+").num_classes == 2
    assert get_spec("synthetic_multiclass").categories == ("polyp area", "lesion area")


def test_unknown_dataset_gets_defaults_and_keyword():
    spec = get_spec("my_scans", keyword="nodule area")
    assert (spec.name, spec.keyword, spec.image_ext, spec.mask_encoding, spec.num_classes) == \
        ("my_scans", "nodule area", "", "binary", 2)
    assert get_spec("camus", keyword="lv area, myo area, la area").categories == ("lv area", "myo area", "la area")
    with pytest.raises(CoTexNetError, match="3 categories"):
        get_spec("camus", keyword="one area")


def test_mask_names_map_to_image_stems():
    assert image_stem("ISIC_0000001_Segmentation.png", get_spec("isic")) == "ISIC_0000001"
    assert image_stem("ISIC_0000001_segmentation.png", get_spec("isic")) == "ISIC_0000001"  # ISIC 2018 spelling
    assert image_stem("mask_covid_1.png", get_spec("QaTa-COV19")) == "covid_1"
    assert image_stem("benign (3)_mask.png", get_spec("busi")) == "benign (3)"
    assert image_stem("train_1_anno.bmp", get_spec("GLaS")) == "train_1"
    assert image_stem("patient1/frame.v2.png", get_spec("unknown")) == "patient1/frame.v2"


def test_roi_names_round_trip():
    assert roi_name("cju0") == "cju0.jpg" and parse_roi_name("cju0.jpg", per_category=False) == ("cju0", None)
    name = roi_name("p1/img_07", "left atrium area")
    assert name == "p1/img_07__left atrium area.jpg"
    assert parse_roi_name(name, per_category=True) == ("p1/img_07", "left atrium area")
    # In a binary dataset the separator is part of the name, not a category.
    assert parse_roi_name("case__01.jpg", per_category=False) == ("case__01", None)


def test_extensions_are_normalised_once():
    assert normalise_ext("jpg") == normalise_ext(".jpg") == ".jpg"
    assert normalise_ext(None) is None and normalise_ext("") == ""
    assert stem("sub/a.v2.png") == "sub/a.v2" and stem("noext") == "noext"


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "L", "I;16"])
def test_read_image_any_mode_gives_rgb_uint8(tmp_path, mode):
    path = tmp_path / f"x_{mode.replace(';', '')}.png"
    if mode == "I;16":  # 12-bit scanner data in a 16-bit file: stretched to 0..255
        Image.fromarray(RGB[:, :, 0].astype(np.uint16) * 16).save(path)
    else:
        Image.fromarray(RGB).convert(mode).save(path)
    image = read_image(path)
    assert image.shape == (31, 47, 3) and image.dtype == np.uint8
    if mode in ("RGB", "RGBA"):
        assert (image == RGB).all()
    if mode == "I;16":
        red = RGB[:, :, 0].astype(float)
        assert image.max() == 255 and np.abs(image[:, :, 0] - red * 255 / red.max()).max() <= 1


def test_unreadable_and_truncated_images_name_the_file(tmp_path):
    cv2.imwrite(str(tmp_path / "full.jpg"), RNG.integers(0, 256, (200, 200, 3), dtype=np.uint8))
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.png").write_text("not an image")
    for name in ("cut.jpg", "text.png", "absent.png"):
        with pytest.raises(CoTexNetError, match=name):
            read_image(tmp_path / name)


def test_jpeg_mask_with_artefacts_and_speckle_is_binary(tmp_path):
    mask = np.zeros((61, 83), np.uint8)
    cv2.circle(mask, (40, 30), 17, 255, -1)
    cv2.imwrite(str(tmp_path / "m.jpg"), np.dstack([mask] * 3), [cv2.IMWRITE_JPEG_QUALITY, 60])
    raw = cv2.imread(str(tmp_path / "m.jpg"))
    assert len(np.unique(raw)) > 2  # real artefacts
    label = read_mask(tmp_path / "m.jpg", get_spec("kvasir"))
    assert label.dtype == np.uint8 and set(np.unique(label)) == {0, 1}
    assert (label != (mask > 0)).mean() < 0.01


def test_zero_one_colour_and_instance_masks(tmp_path):
    mask = np.zeros((20, 30), np.uint8)
    mask[5:10, 5:12], mask[12:18, 20:28] = 1, 2
    Image.fromarray(mask).save(tmp_path / "ids.png")  # 0/1 (QaTa) and instance ids (GLaS) stay below 128
    assert (read_mask(tmp_path / "ids.png", get_spec("QaTa-COV19")) == (mask > 0)).all()
    red_green = np.zeros((20, 30, 3), np.uint8)  # BKAI: red and green classes, both foreground
    red_green[mask == 1, 0], red_green[mask == 2, 1] = 255, 255
    Image.fromarray(red_green).save(tmp_path / "rg.png")
    assert (read_mask(tmp_path / "rg.png", get_spec("bkai")) == (mask > 0)).all()


def test_label_maps_plain_scaled_and_palette(tmp_path):
    spec = get_spec("camus")
    label = np.zeros((24, 36), np.uint8)
    label[2:8, 2:8], label[10:20, 5:15], label[3:9, 20:30] = 1, 2, 3
    Image.fromarray(label).save(tmp_path / "plain.png")
    Image.fromarray(label * 85).save(tmp_path / "scaled.png")  # saved for viewing: 0, 85, 170, 255
    palette = Image.fromarray(label, mode="L").convert("P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756)
    palette.save(tmp_path / "palette.png")
    for name in ("plain.png", "scaled.png", "palette.png"):
        assert (read_mask(tmp_path / name, spec) == label).all(), name
    Image.fromarray(label * 7).save(tmp_path / "bad.png")
    with pytest.raises(CoTexNetError, match="bad.png"):
        read_mask(tmp_path / "bad.png", spec)


def test_mask_of_another_size_is_resized_with_nearest(tmp_path):
    label = np.zeros((10, 16), np.uint8)
    label[:, 8:] = 2
    label[:5, :8] = 1
    Image.fromarray(label).save(tmp_path / "small.png")
    big = read_mask(tmp_path / "small.png", get_spec("camus"), size=(33, 21))
    assert big.shape == (21, 33) and set(np.unique(big)) == {0, 1, 2}


def test_pairing_reports_orphans_both_ways(tmp_path):
    for folder, names in {"images": ["ISIC_1.jpg", "ISIC_2.jpg", "ISIC_3.jpg"],
                          "masks": ["ISIC_1_Segmentation.png", "ISIC_2_Segmentation.png", "ISIC_9_Segmentation.png"]}.items():
        (tmp_path / folder).mkdir()
        for name in names:
            cv2.imwrite(str(tmp_path / folder / name), RGB)
    pairing = pair_files(tmp_path, get_spec("isic"))
    assert pairing.pairs == [("ISIC_1.jpg", "ISIC_1_Segmentation.png"), ("ISIC_2.jpg", "ISIC_2_Segmentation.png")]
    assert pairing.masks_without_image == ["ISIC_9_Segmentation.png"]
    assert pairing.images_without_mask == ["ISIC_3.jpg"]


def test_registry_file_is_where_the_stages_look():
    assert registry.REGISTRY_FILE.name == "datasets.yaml" and registry.REGISTRY_FILE.exists()
