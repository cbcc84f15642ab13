"""SPEC §3 maths without a pipeline: letterbox geometry, grey, 224 resize, Lab, records, compact values.

Oracles: scikit-image (resize, rgb2lab), TensorFlow (rgb_to_grayscale, Example serialisation and
parse_single_example with the reference feature spec).
"""
import io

import numpy as np
import pytest
from PIL import Image
from skimage import color as skcolor
from skimage import transform as sktransform

from imagebeam import sample as sample_lib
from imagebeam.transforms.imaging import colour
from imagebeam.transforms.formats import lab_records, tfrecord
from imagebeam.transforms.imaging.decode import decode_rgb
from imagebeam.transforms.imaging.resize import center_crop, fit, letterbox, stretch


@pytest.fixture(scope="module")
def photos():
    """Real photos (colour and grey) as RGB, letterboxed to 299 like the job does."""
    return [letterbox(img.convert("RGB")) for img in sample_lib.load_photos()]


def _content_box(arr: np.ndarray):
    ys, xs = np.nonzero((arr != 255).any(axis=-1))
    return xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1


@pytest.mark.parametrize("size, box", [
    ((400, 200), (0, 75, 299, 150)),
    ((100, 50), (0, 75, 299, 149)),    # upscaled first: int(50 * 2.99) = 149
    ((300, 1200), (112, 0, 75, 299)),
    ((299, 299), (0, 0, 299, 299)),
])
def test_letterbox_geometry_on_white(size, box):
    photo = sample_lib.load_photos()[0].convert("RGB")
    dark = Image.fromarray((np.asarray(photo.resize(size)) // 2).astype(np.uint8))  # never pure white
    out = np.asarray(letterbox(dark))
    assert out.shape == (299, 299, 3)
    assert _content_box(out) == box
    x, y, w, h = box
    outside = np.ones((299, 299), bool)
    outside[y:y + h, x:x + w] = False
    assert (out[outside] == 255).all()
    assert (out[y:y + h, x:x + w] != 255).any(axis=-1).all()


def test_letterbox_content_is_pillow_lanczos_thumbnail():
    photo = sample_lib.load_photos()[1].convert("RGB").resize((500, 375))
    expected = photo.copy()
    expected.thumbnail((299, 299), Image.Resampling.LANCZOS)
    out = np.asarray(letterbox(photo.copy()))
    assert expected.size == (299, 224)
    np.testing.assert_array_equal(out[38:38 + 224], np.asarray(expected))  # offset ceil(75 / 2)


def test_other_fit_modes():
    photo = sample_lib.load_photos()[0].convert("RGB").resize((400, 300))
    assert stretch(photo).size == (299, 299)
    crop = np.asarray(center_crop(photo), dtype=np.int16)
    ref = np.asarray(photo.crop((50, 0, 350, 300)).resize((299, 299), Image.Resampling.LANCZOS), dtype=np.int16)
    assert np.abs(crop - ref).max() <= 1
    with pytest.raises(ValueError, match="unknown fit mode"):
        fit(photo, 299, "zoom")


def test_grey_matches_tensorflow_bit_for_bit(photos):
    import tensorflow as tf

    for img in photos:
        rgb = np.asarray(img)
        np.testing.assert_array_equal(colour.grey_uint8(rgb), tf.image.rgb_to_grayscale(rgb).numpy()[..., 0])
    every = np.stack(np.meshgrid(np.arange(256), np.arange(256), np.arange(0, 256, 5)), -1).astype(np.uint8)
    np.testing.assert_array_equal(colour.grey_uint8(every), tf.image.rgb_to_grayscale(every).numpy()[..., 0])


def test_inception_input_scaling():
    grey = np.array([[0, 51, 255]], np.uint8)
    x = colour.inception_input(grey)
    assert x.shape == (1, 3, 3) and x.dtype == np.float32
    np.testing.assert_allclose(x[0, :, 0], [-1.0, 2 * 51 / 255 - 1, 1.0], atol=1e-7)
    assert (x[..., 0] == x[..., 1]).all() and (x[..., 1] == x[..., 2]).all()


def test_224_resize_matches_skimage(photos):
    for img in photos:
        rgb = np.asarray(img)
        ours = colour.resize_bilinear(rgb, 224)
        ref = sktransform.resize(rgb, (224, 224), order=1, mode="constant", anti_aliasing=False)
        assert ours.shape == (224, 224, 3)
        assert np.abs(ours - ref).max() < 1 / 255


def test_lab_matches_skimage(photos):
    for img in photos:
        small = sktransform.resize(np.asarray(img), (224, 224), order=1, mode="constant", anti_aliasing=False)
        ref = skcolor.rgb2lab(small)
        ours = colour.rgb_to_lab(small.astype(np.float32))
        assert np.abs(ours - ref).max() < 1e-3
        l_norm, ab_norm = colour.lab_target(np.asarray(img))
        assert np.abs((l_norm + 1) * 50 - ref[..., 0]).max() < 1e-3
        assert np.abs(ab_norm * 127 - ref[..., 1:]).max() < 1e-3
    # the whole RGB cube, extremes included
    cube = np.stack(np.meshgrid(*[np.linspace(0, 1, 18)] * 3), -1).reshape(-1, 1, 3)
    assert np.abs(colour.rgb_to_lab(cube.astype(np.float32)) - skcolor.rgb2lab(cube)).max() < 1e-3


N_LAB_CROPS = 2000


def numpy_lab_target(rgb299: np.ndarray):
    """lab_target as separate float32 numpy / OpenCV passes (the implementation lab_kernels.py replaced):
    each step's bits are those of one IEEE operation, so the fused loops must give the same bits."""
    import cv2

    f32 = np.float32
    x = cv2.resize(rgb299.astype(f32) * f32(1 / 255), (224, 224), interpolation=cv2.INTER_LINEAR)
    gamma = np.exp2(f32(2.4) * np.log2((x + f32(0.055)) * f32(1 / 1.055)))
    lin = np.where(x > f32(0.04045), gamma, x * f32(1 / 12.92))
    t = cv2.transform(lin, colour._XYZN_FROM_RGB_T.T)
    f = np.where(t > f32(0.008856), np.cbrt(t), t * f32(7.787) + f32(16.0 / 116.0))
    fx, fy, fz = f[..., 0], f[..., 1], f[..., 2]
    l_norm = fy * f32(116.0 / 50) - f32(16.0 / 50 + 1.0)
    ab_norm = np.stack([(fx - fy) * f32(500.0 / 127), (fy - fz) * f32(200.0 / 127)], axis=-1)
    return l_norm, ab_norm


def test_lab_target_bits_equal_numpy_passes_on_real_crops():
    """The compiled Lab (lab_kernels.py) against the numpy passes, bit for bit, on letterboxes of 2,000
    random crops of real photos (any size and aspect ratio), flat colours, noise, and values at both
    thresholds (sRGB's 0.04045, Lab's 0.008856)."""
    import random

    from test_lanczos import random_crop
    from imagebeam.transforms.imaging.resize import letterbox_array

    rng, noise = random.Random(21), np.random.default_rng(21)
    real = [p.convert("RGB") for p in sample_lib.load_photos()]
    images = [letterbox_array(random_crop(real[i % len(real)], rng, 700)) for i in range(N_LAB_CROPS)]
    images += [np.full((299, 299, 3), v, np.uint8) for v in range(0, 256, 5)]
    images += [noise.integers(0, 256, (299, 299, 3), dtype=np.uint8) for _ in range(5)]
    images += [noise.integers(0, 30, (299, 299, 3), dtype=np.uint8) for _ in range(5)]  # near both knees
    differ = []
    for i, rgb in enumerate(images):
        got, want = colour.lab_target(rgb), numpy_lab_target(rgb)
        if not all(g.dtype == np.float32 and g.shape == w.shape and np.array_equal(g.view(np.uint32), w.view(np.uint32))
                   for g, w in zip(got, want)):
            differ.append(i)
    assert not differ, f"{len(differ)} of {len(images)} images differ, e.g. {differ[:5]}"
    f32 = np.float32
    knees = np.array([np.nextafter(f32(k), f32(d)) if d else f32(k) for k in (0.04045, 0.008856, 0.5)
                      for d in (0, -1, 1)], dtype=f32)
    cube = np.stack(np.meshgrid(knees, knees, knees), -1).reshape(-1, 1, 3)
    lab = colour.rgb_to_lab(cube)
    assert lab.shape == cube.shape and np.abs(lab - skcolor.rgb2lab(cube.astype(np.float64))).max() < 1e-3


def test_example_bytes_equal_tensorflow_and_parse_with_reference_spec(photos):
    import tensorflow as tf

    l_norm, ab_norm = colour.lab_target(np.asarray(photos[0]))
    emb = np.random.default_rng(0).normal(size=1001).astype(np.float32)
    ours = lab_records.encode_example("n01440764/x.JPEG", l_norm, ab_norm, emb)

    def floats(v):
        return tf.train.Feature(float_list=tf.train.FloatList(value=v.reshape(-1)))

    reference = tf.train.Example(features=tf.train.Features(feature={
        "image_name": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"n01440764/x.JPEG"])),
        "image_l": floats(l_norm), "image_ab": floats(ab_norm), "image_embedding": floats(emb)}))
    assert ours == reference.SerializeToString(deterministic=True)
    parsed = tf.io.parse_single_example(ours, lab_records.reference_feature_spec(1001))
    np.testing.assert_array_equal(parsed["image_ab"].numpy().reshape(224, 224, 2), ab_norm)
    np.testing.assert_array_equal(parsed["image_embedding"].numpy(), emb)
    assert parsed["image_name"].numpy() == b"n01440764/x.JPEG"


def test_compact_values_within_one_step(photos):
    for img in photos:
        l_norm, ab_norm = colour.lab_target(np.asarray(img))
        assert np.abs(colour.dequantise_l(colour.quantise_l(l_norm)) - l_norm).max() <= 1 / 255 + 1e-6
        assert np.abs(colour.dequantise_ab(colour.quantise_ab(ab_norm)) - ab_norm).max() <= 0.5 / 127 + 1e-6


def test_tfrecord_framing_read_by_tensorflow_and_crc_checked(tmp_path, photos):
    import tensorflow as tf

    l_norm, ab_norm = colour.lab_target(np.asarray(photos[0]))
    records = [lab_records.encode_example(f"img{i}", l_norm, ab_norm, None) for i in range(3)]
    path = tmp_path / "x.tfrecord"
    blob = b"".join(tfrecord.frame_record(r) for r in records)
    path.write_bytes(blob)
    assert [r.numpy() for r in tf.data.TFRecordDataset(str(path))] == records
    assert list(tfrecord.iter_records(blob)) == records
    corrupt = bytearray(blob)
    corrupt[100] ^= 1
    with pytest.raises(ValueError, match="corrupt"):
        list(tfrecord.iter_records(bytes(corrupt)))


def test_decoded_photo_path_matches_direct_letterbox():
    data = next(sample_lib.imagenet_like_jpegs(1, seed=5))
    via_decode = np.asarray(letterbox(decode_rgb(data)))
    direct = np.asarray(letterbox(Image.open(io.BytesIO(data)).convert("RGB")))
    np.testing.assert_array_equal(via_decode, direct)
