"""Property test of the image and mask decoders: whatever the file holds, `read_image` and
`read_mask` return a valid array or raise CoTexNetError, never anything else."""

import io

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from common.errors import CoTexNetError
from data_process.decoding import read_image, read_mask
from data_process.registry import get_spec

SPECS = [get_spec("kvasir"), get_spec("QaTa-COV19"), get_spec("camus"), get_spec("synthetic_multiclass")]
SETTINGS = settings(max_examples=50, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
# (numpy dtype, channels) -> what Pillow makes of it
KINDS = [(np.uint8, None), (np.uint8, 3), (np.uint8, 4), (np.uint16, None), (np.int32, None), (np.float32, None),
         (np.bool_, None)]
SIGNATURES = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"BM", b"GIF89a", b"II*\x00"]


@st.composite
def image_files(draw) -> tuple[bytes, tuple[int, int] | None]:
    """(file bytes, (h, w) when the bytes are a complete image): real encodings of random arrays
    in varied dtypes and modes, palette and 1-bit images, and damaged or random bytes."""
    dtype, channels = draw(st.sampled_from(KINDS))
    shape = (draw(st.integers(1, 9)), draw(st.integers(1, 9))) + ((channels,) if channels else ())
    array = draw(arrays(dtype, shape, elements=st.integers(0, 255) if dtype == np.uint8 else None))
    image = Image.fromarray(array)
    image = image.convert(draw(st.sampled_from([image.mode, image.mode, "P", "1", "LA"]))) \
        if image.mode in ("L", "RGB", "RGBA") else image
    fmt = draw(st.sampled_from(["PNG", "JPEG", "BMP"]))
    buffer = io.BytesIO()
    try:
        image.save(buffer, fmt)
    except (OSError, ValueError, KeyError):  # a mode this format cannot store: random bytes instead
        return draw(st.sampled_from(SIGNATURES)) + draw(st.binary(max_size=64)), None
    data = buffer.getvalue()
    damage = draw(st.sampled_from(["none", "none", "cut", "flip", "random"]))
    if damage == "cut":
        return data[: draw(st.integers(0, len(data) - 1))], None
    if damage == "flip":
        at = draw(st.integers(0, len(data) - 1))
        return data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1:], None
    if damage == "random":
        return draw(st.sampled_from(SIGNATURES)) + draw(st.binary(max_size=64)), None
    return data, shape[:2]


@SETTINGS
@given(image_files(), st.sampled_from(SPECS), st.sampled_from([".png", ".jpg", ".bmp"]))
def test_read_mask_gives_a_label_map_or_our_error(tmp_path, file, spec, suffix):
    data, shape = file
    path = tmp_path / f"m{suffix}"
    path.write_bytes(data)
    try:
        label = read_mask(path, spec)
    except CoTexNetError as err:
        assert str(path) in str(err)
        return
    assert label.dtype == np.uint8 and label.ndim == 2
    assert int(label.max()) <= len(spec.categories) or (not spec.categories and int(label.max()) <= 1)
    if shape:
        assert label.shape == shape
    try:
        resized = read_mask(path, spec, size=(5, 3))
    except CoTexNetError as err:  # a mask of another shape than its image is refused, naming itself
        assert str(path) in str(err) and "not the image at another scale" in str(err)
    else:
        assert resized.shape == (3, 5)


@SETTINGS
@given(image_files(), st.sampled_from([".png", ".jpg", ".bmp"]))
def test_read_image_gives_rgb_or_our_error(tmp_path, file, suffix):
    data, shape = file
    path = tmp_path / f"i{suffix}"
    path.write_bytes(data)
    try:
        image = read_image(path)
    except CoTexNetError as err:
        assert str(path) in str(err)
        return
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    if shape:
        assert image.shape[:2] == shape
