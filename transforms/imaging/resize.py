"""Resizing and the Imagenet32/64 row layout (SPEC §2), as pure functions.

The published Imagenet8/16/32/64 files were made with `img.convert("RGB").resize((S, S), BOX)`: the whole
image squashed to a square, no crop, aspect ratio not kept. Rows are channel-planar like CIFAR.
"""
from __future__ import annotations

import math
from typing import Tuple

import numpy as np
from PIL import Image

# Pillow's filters by the names users pass to `--algorithm` (the reference resizer's `-a` choices).
RESAMPLE_FILTERS = {
    "box": Image.Resampling.BOX,
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "hamming": Image.Resampling.HAMMING,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}

SIZES = (8, 16, 32, 64)
_REDUCING_GAP = 2.0  # Pillow's thumbnail default: reduce by integer factors while >= 2x the target remains


def resample_filter(name: str) -> Image.Resampling:
    try:
        return RESAMPLE_FILTERS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown resize algorithm {name!r}; choose from {sorted(RESAMPLE_FILTERS)}") from None


def squash(img: Image.Image, size: int, algorithm: str = "box") -> Image.Image:
    """Resize the whole image to size x size (SPEC §2): no crop, aspect ratio not kept."""
    return img.resize((size, size), resample_filter(algorithm))


def fast_draft_size(size: int) -> Tuple[int, int]:
    """The JPEG draft request for `--fast-decode`: DCT scaling as far as it goes while staying >= S.

    libjpeg scales by 1/2, 1/4 or 1/8 in the IDCT, so a 500x375 photo decodes straight to 63x47 for
    S=32; the BOX filter then averages that. The pixel error against the exact path is in README.
    """
    return (size, size)


def planar_row(img: Image.Image) -> np.ndarray:
    """An RGB image (S x S) as one uint8 row: all R (row-major), then all G, then all B."""
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB image, got array of shape {arr.shape}")
    return np.ascontiguousarray(arr.transpose(2, 0, 1)).reshape(-1)


def rows_to_nhwc(rows: np.ndarray, size: int) -> np.ndarray:
    """Inverse of `planar_row` for a batch: (n, 3*S*S) -> (n, S, S, 3), as the seed's loader does."""
    rows = np.asarray(rows)
    return rows.reshape(rows.shape[0], 3, size, size).transpose(0, 2, 3, 1)


# --- SPEC §3: the 299x299 input of the colourisation pipeline ------------------------------------------

WHITE = (255, 255, 255)


def thumbnail_size(width: int, height: int, size: int) -> Tuple[int, int]:
    """The size Pillow's `thumbnail((size, size))` gives a width x height image (its aspect rounding)."""
    if size >= width and size >= height:
        return width, height
    aspect = width / height

    def round_aspect(number: float, key) -> int:
        return max(min(math.floor(number), math.ceil(number), key=key), 1)

    if 1 >= aspect:  # x / y >= aspect with x = y = size
        return round_aspect(size * aspect, key=lambda n: abs(aspect - n / size)), size
    return size, round_aspect(size / aspect, key=lambda n: 0 if n == 0 else abs(aspect - size / n))


def _thumbnail_array(img: Image.Image, size: int) -> np.ndarray:
    """`img.thumbnail((size, size), LANCZOS)` as an array, bit for bit: Pillow's `reduce` by the integer
    factor its reducing_gap of 2 allows (Pillow's C), then the exact Lanczos of lanczos.py on the rest."""
    from imagebeam.transforms.imaging import lanczos  # numba: 0.3 s to import, for colorize only

    w, h = img.size
    target = thumbnail_size(w, h, size)
    if target == (w, h):
        return np.asarray(img)
    box = (0.0, 0.0, float(w), float(h))
    factor_x = int(w / target[0] / _REDUCING_GAP) or 1
    factor_y = int(h / target[1] / _REDUCING_GAP) or 1
    if factor_x > 1 or factor_y > 1:
        # Image.resize reduces the filter's safe box, which for the whole image is the whole image, and
        # maps the box into the reduced image.
        img = img.reduce((factor_x, factor_y))
        box = (0.0, 0.0, w / factor_x, h / factor_y)
    return lanczos.resample(np.asarray(img), target, box)


def letterbox_array(img: Image.Image, size: int = 299, background: Tuple[int, int, int] = WHITE) -> np.ndarray:
    """Fit the whole image into size x size, keeping its aspect ratio, centred on white (SPEC §3).

    Like deep-koalarization's resize step: when both sides are smaller than `size` the image is first
    enlarged by min(size/w, size/h) (sides truncated, so 100x50 -> 299x149); then it is shrunk with Lanczos
    to fit (Pillow's `thumbnail`, whose rounding keeps the aspect ratio: 400x200 -> 299x150) and pasted at
    offsets rounded up ((0, 75) for 299x150). `img` is RGB. The pixels are Pillow's (`letterbox`'s),
    computed by lanczos.py in about a fifth of Pillow's time.
    """
    from imagebeam.transforms.imaging import lanczos

    if img.mode != "RGB":
        return np.asarray(letterbox(img, size, background))
    w, h = img.size
    enlarge = min(size / w, size / h)
    if enlarge > 1:  # the enlarged sides are truncated to <= size, so the thumbnail step leaves them
        content = lanczos.resample(np.asarray(img), (int(w * enlarge), int(h * enlarge)))
    else:
        content = _thumbnail_array(img, size)
    ch, cw = content.shape[:2]
    canvas = np.full((size, size, 3), background[0], dtype=np.uint8)  # a memset: 100x a broadcast copy
    if len(set(background)) > 1:
        canvas[...] = np.asarray(background, dtype=np.uint8)
    top, left = (size - ch + 1) // 2, (size - cw + 1) // 2
    canvas[top:top + ch, left:left + cw] = content
    return canvas


def letterbox(img: Image.Image, size: int = 299, background: Tuple[int, int, int] = WHITE) -> Image.Image:
    """`letterbox_array` done by Pillow itself (the oracle of lanczos.py, and any mode); `img` may be
    modified."""
    w, h = img.size
    enlarge = min(size / w, size / h)
    if enlarge > 1:
        img = img.resize((int(w * enlarge), int(h * enlarge)), Image.Resampling.LANCZOS)
    img.thumbnail((size, size), Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (size, size), background)
    canvas.paste(img, ((size - img.width + 1) // 2, (size - img.height + 1) // 2))
    return canvas


def stretch(img: Image.Image, size: int = 299) -> Image.Image:
    """The whole image squashed to size x size with Lanczos (aspect ratio not kept)."""
    return img.resize((size, size), Image.Resampling.LANCZOS)


def center_crop(img: Image.Image, size: int = 299) -> Image.Image:
    """The central square (side = the shorter side) resized to size x size with Lanczos, in one pass."""
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return img.resize((size, size), Image.Resampling.LANCZOS, box=(left, top, left + side, top + side))


FIT_MODES = {"letterbox": letterbox, "stretch": stretch, "center-crop": center_crop}


def fit(img: Image.Image, size: int = 299, mode: str = "letterbox") -> Image.Image:
    try:
        return FIT_MODES[mode](img, size)
    except KeyError:
        raise ValueError(f"unknown fit mode {mode!r}; choose from {sorted(FIT_MODES)}") from None


def fit_array(img: Image.Image, size: int = 299, mode: str = "letterbox") -> np.ndarray:
    """`fit` as a uint8 (size, size, 3) array; the letterbox through lanczos.py (same pixels, faster)."""
    if mode == "letterbox":
        return letterbox_array(img, size)
    return np.asarray(fit(img, size, mode), dtype=np.uint8)


def fit_draft_size(width: int, height: int, size: int = 299, mode: str = "letterbox") -> Tuple[int, int]:
    """The `--fast-decode` draft request of a fit mode for a width x height JPEG (see `fast_draft_size`).

    For the letterbox it is the thumbnail's own size, so DCT scaling stops while the image still covers
    it, as Pillow's thumbnail drafted in the Pillow the reference pinned (1000x750 decodes at 500x375,
    500x375 at full size); for the other modes the size x size output.
    """
    return thumbnail_size(width, height, size) if mode == "letterbox" else fast_draft_size(size)
