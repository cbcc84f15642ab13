"""Resizing and the Imagenet32/64 row layout (SPEC §2), as pure functions.

The published Imagenet8/16/32/64 files were made with `img.convert("RGB").resize((S, S), BOX)`: the whole
image squashed to a square, no crop, aspect ratio not kept. Rows are channel-planar like CIFAR.
"""
from __future__ import annotations

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


def letterbox(img: Image.Image, size: int = 299, background: Tuple[int, int, int] = WHITE) -> Image.Image:
    """Fit the whole image into size x size, keeping its aspect ratio, centred on white (SPEC §3).

    Like deep-koalarization's resize step: when both sides are smaller than `size` the image is first
    enlarged by min(size/w, size/h) (sides truncated, so 100x50 -> 299x149); then it is shrunk with Lanczos
    to fit (Pillow's `thumbnail`, whose rounding keeps the aspect ratio: 400x200 -> 299x150) and pasted at
    offsets rounded up ((0, 75) for 299x150). `img` is RGB; it may be modified.
    """
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
