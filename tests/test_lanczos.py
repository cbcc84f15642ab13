"""lanczos.py and the array letterbox against their oracle, Pillow itself, on thousands of real crops.

Crops of the real photos scikit-image and scikit-learn ship, of random sizes and aspect ratios (1 to 700
pixels a side), resized up and down to random sizes, with and without a fractional box; then whole
letterboxes (enlarged, shrunk, and shrunk through Pillow's `reduce` for large photos). Every pixel must
equal Pillow's.
"""
import random

import numpy as np
import pytest
from PIL import Image

from imagebeam import sample as sample_lib
from imagebeam.transforms.imaging import lanczos
from imagebeam.transforms.imaging.resize import fit, fit_array, letterbox, letterbox_array, thumbnail_size

N_RESAMPLE_CROPS = 2400
N_LETTERBOX_CROPS = 300


@pytest.fixture(scope="module")
def photos():
    return [p.convert("RGB") for p in sample_lib.load_photos()]


def random_crop(photo: Image.Image, rng: random.Random, max_side: int) -> Image.Image:
    """A crop of random size and aspect ratio; resized up when the photo is smaller than asked."""
    w, h = rng.randint(1, max_side), rng.randint(1, max_side)
    if rng.random() < 0.15:  # strips: extreme aspect ratios
        w, h = (w, rng.randint(1, 8)) if rng.random() < 0.5 else (rng.randint(1, 8), h)
    pw, ph = photo.size
    cw, ch = min(w, pw), min(h, ph)
    x, y = rng.randint(0, pw - cw), rng.randint(0, ph - ch)
    crop = photo.crop((x, y, x + cw, y + ch))
    return crop if crop.size == (w, h) else crop.resize((w, h), Image.Resampling.BICUBIC)


def test_resample_equals_pillow_on_real_crops(photos):
    rng = random.Random(16)
    mismatched, kinds = [], {"down": 0, "up": 0, "mixed": 0, "box": 0}
    for i in range(N_RESAMPLE_CROPS):
        crop = random_crop(photos[i % len(photos)], rng, 700)
        w, h = crop.size
        size = (rng.randint(1, 400), rng.randint(1, 400))
        box = None
        if rng.random() < 0.25:
            x0, y0 = rng.uniform(0, w * 0.4), rng.uniform(0, h * 0.4)
            box = (x0, y0, rng.uniform(x0 + 0.5, w), rng.uniform(y0 + 0.5, h))
            kinds["box"] += 1
        down = size[0] < w and size[1] < h
        up = size[0] > w and size[1] > h
        kinds["down" if down else "up" if up else "mixed"] += 1
        got = lanczos.resample(np.asarray(crop), size, box)
        want = np.asarray(crop.resize(size, Image.Resampling.LANCZOS, box=box))
        if got.shape != want.shape or not np.array_equal(got, want):
            mismatched.append(((w, h), size, box))
    assert not mismatched, f"{len(mismatched)} of {N_RESAMPLE_CROPS} differ from Pillow, e.g. {mismatched[:5]}"
    assert min(kinds.values()) > 100, kinds  # every kind of resize is well covered


def test_letterbox_array_equals_pillow_letterbox(photos):
    rng = random.Random(299)
    sizes = set()
    for i in range(N_LETTERBOX_CROPS):
        # up to 1400 a side: reduce factors 2 (>= 1196) are reached, as in big ImageNet photos
        crop = random_crop(photos[i % len(photos)], rng, 1400 if i % 3 == 0 else 600)
        sizes.add(crop.size)
        got = letterbox_array(crop)
        want = np.asarray(letterbox(crop.copy()))
        assert np.array_equal(got, want), f"letterbox of a {crop.size} crop differs from Pillow's"
    assert any(max(s) >= 1196 for s in sizes) and any(max(s) < 299 for s in sizes)


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (1600, 1200), (4000, 100), (100, 4000), (299, 299),
                                  (300, 299), (100, 50), (1, 1), (2, 900), (30000, 3)])
def test_letterbox_array_on_awkward_sizes(photos, size):
    img = photos[1].resize(size, Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(letterbox_array(img), np.asarray(letterbox(img.copy())))


def test_thumbnail_size_is_pillows():
    rng = random.Random(1)
    for _ in range(400):
        w, h = rng.randint(1, 2500), rng.randint(1, 2500)
        img = Image.new("1", (w, h))
        img.thumbnail((299, 299))  # mode "1" resamples with NEAREST: cheap, the same size rounding
        assert thumbnail_size(w, h, 299) == img.size


def test_fit_array_modes_match_fit(photos):
    img = photos[0].resize((400, 300))
    for mode in ("stretch", "center-crop"):
        np.testing.assert_array_equal(fit_array(img, 299, mode), np.asarray(fit(img, 299, mode)))
    grey = photos[0].convert("L")
    np.testing.assert_array_equal(letterbox_array(grey), np.asarray(letterbox(grey.copy())))
