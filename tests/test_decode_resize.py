"""Decode by content and resize, on real photos; the oracle is Pillow's convert("RGB").resize(BOX)."""
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from imagebeam import sample as sample_lib
from imagebeam.transforms.imaging import decode, resize


def oracle_row(data, size, algorithm=Image.Resampling.BOX):
    img = Image.open(io.BytesIO(data)).convert("RGB").resize((size, size), algorithm)
    return np.asarray(img)


@pytest.mark.parametrize("size", [8, 16, 32, 64])
def test_exact_path_equals_pillow_reference(good_jpeg, size):
    row = resize.planar_row(resize.squash(decode.decode_rgb(good_jpeg), size))
    assert row.dtype == np.uint8 and row.shape == (3 * size * size,)
    expected = oracle_row(good_jpeg, size)
    # planar: all R, then all G, then all B
    np.testing.assert_array_equal(row[: size * size].reshape(size, size), expected[..., 0])
    np.testing.assert_array_equal(row[2 * size * size:].reshape(size, size), expected[..., 2])
    np.testing.assert_array_equal(resize.rows_to_nhwc(row[None], size)[0], expected)


@pytest.mark.parametrize("name", ["cmyk.JPEG", "png_named.JPEG", "grey.JPEG", "palette_transparent.png",
                                  "rgba_logo.png", "animated.gif", "multipage.tif", "exif_rotated.jpg"])
def test_awkward_encodings_decode_like_convert_rgb(name):
    data = sample_lib.oddities()[name]
    got = np.asarray(resize.squash(decode.decode_rgb(data), 32))
    np.testing.assert_array_equal(got, oracle_row(data, 32))


def test_sixteen_bit_is_scaled_not_clipped():
    data = sample_lib.oddities()["sixteen_bit.png"]
    src = np.asarray(Image.open(io.BytesIO(data)))
    assert src.dtype == np.uint16 or Image.open(io.BytesIO(data)).mode.startswith("I")
    rgb = np.asarray(decode.decode_rgb(data))
    assert rgb.shape[2] == 3
    np.testing.assert_array_equal(rgb[..., 0], (src.astype(np.int64) >> 8).astype(np.uint8))
    assert rgb.std() > 10  # Pillow's plain convert would clip nearly everything to 255


def test_png_named_jpeg_is_decoded_by_content():
    data = sample_lib.oddities()["png_named.JPEG"]
    assert data.startswith(b"\x89PNG")
    assert decode.open_image(data).format == "PNG"


def test_exif_transpose_is_opt_in():
    data = sample_lib.oddities()["exif_rotated.jpg"]
    assert decode.decode_rgb(data).size == (240, 160)
    assert decode.decode_rgb(data, exif_transpose=True).size == (160, 240)


@pytest.mark.parametrize("name,reason", [
    ("corrupt.JPEG", "corrupt JPEG"),
    ("empty.JPEG", "empty file"),
    ("notes.JPEG", "not an image"),
    ("truncated.JPEG", "truncated"),
])
def test_bad_inputs_have_reasons(good_jpeg, name, reason):
    with pytest.raises(decode.DecodeError, match=reason):
        decode.decode_rgb(sample_lib.bad_inputs(good_jpeg)[name])


def _png_claiming(width, height):
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), "white").save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = bytes(data[12:16]) + struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr) & 0xFFFFFFFF)
    return bytes(data)


def test_decompression_bomb_is_refused_before_decoding():
    with pytest.raises(decode.DecodeError, match="decompression bomb"):
        decode.decode_rgb(_png_claiming(30000, 30000))
    with pytest.raises(decode.DecodeError, match="decompression bomb"):
        decode.decode_rgb(_png_claiming(200, 200), max_pixels=10_000)


def test_fast_decode_is_close_and_smaller_work(good_jpeg):
    exact = resize.planar_row(resize.squash(decode.decode_rgb(good_jpeg), 32)).astype(int)
    img = decode.decode_rgb(good_jpeg, draft_size=resize.fast_draft_size(32))
    assert img.size[0] < 500 and min(img.size) >= 32  # DCT scaling happened, never below the target
    fast = resize.planar_row(resize.squash(img, 32)).astype(int)
    assert 0 < np.abs(exact - fast).mean() < 8


def test_unknown_algorithm_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown resize algorithm"):
        resize.resample_filter("bogus")


def _outcome(data, draft):
    try:
        decode.decode_rgb(data, draft_size=draft)
        return "ok"
    except decode.DecodeError as exc:
        return str(exc).split(":")[0]


def test_check_at_one_eighth_fails_where_the_full_decode_fails(good_jpeg):
    """colorize's staging checks JPEGs at 1/8 scale (CHECK_DRAFT): every entropy-coded byte is still read,
    so each input must fail (with the same reason) or pass exactly as the full decode does."""
    inputs = {**sample_lib.oddities(), **sample_lib.bad_inputs(good_jpeg), "good.jpg": good_jpeg}
    for cut in (0.05, 0.3, 0.6, 0.9, 0.99):
        inputs[f"cut{cut}"] = good_jpeg[: int(len(good_jpeg) * cut)]
    inputs["no_eoi"] = good_jpeg[:-2]
    garbled = bytearray(good_jpeg)
    garbled[len(garbled) // 2: len(garbled) // 2 + 64] = bytes(range(64))
    inputs["garbled"] = bytes(garbled)
    for name, data in inputs.items():
        assert _outcome(data, None) == _outcome(data, decode.CHECK_DRAFT), name


def test_letterbox_draft_keeps_the_content_size_covered():
    """--fast-decode on colorize: DCT scaling stops while the image still covers the letterbox's content."""
    photo = sample_lib.load_photos()[1].convert("RGB")
    for size, decoded in [((1600, 1200), (400, 300)), ((500, 375), (500, 375)), ((1200, 400), (300, 100)),
                          ((3000, 3000), (375, 375))]:
        data = sample_lib.jpeg_bytes(photo.resize(size))
        img = decode.decode_rgb(data, draft_size=lambda w, h: resize.fit_draft_size(w, h, 299, "letterbox"))
        assert img.size == decoded, size
        content = resize.thumbnail_size(*size, 299)
        assert img.size[0] >= content[0] and img.size[1] >= content[1]
