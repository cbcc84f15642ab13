"""Colour maths of the koalarization records (SPEC §3), as pure numpy functions.

From one 299x299 RGB uint8 image (the letterboxed input):
- the Inception input: greyscale (weights 0.2989, 0.5870, 0.1140, quantised back to uint8 the way
  `tf.image.rgb_to_grayscale` does), copied to 3 channels, scaled to [-1, 1];
- the Lab target: bilinear resize to 224x224 (half-pixel centres, like
  `skimage.transform.resize(x, (224, 224), order=1, anti_aliasing=False)`), values in [0, 1], converted to
  CIE Lab (D65, 2° observer, `skimage.color.rgb2lab`'s constants), then `L' = 2L/100 - 1`, `ab' = ab/127`.

Everything runs in float32 (the reference computed in float64 with scikit-image); the differences are
~1e-5 in Lab units. The Lab steps are compiled loops (lab_kernels.py), bit for bit the float32 numpy passes
they replaced.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

INCEPTION_SIZE = 299
LAB_SIZE = 224

GREY_WEIGHTS = np.array([0.2989, 0.5870, 0.1140], dtype=np.float32)  # tf.image.rgb_to_grayscale

# sRGB (D65) -> CIE XYZ and the D65 / 2° reference white, as scikit-image's rgb2lab uses them.
XYZ_FROM_RGB = np.array([[0.412453, 0.357580, 0.180423],
                         [0.212671, 0.715160, 0.072169],
                         [0.019334, 0.119193, 0.950227]], dtype=np.float64)
D65_WHITE = np.array([0.95047, 1.0, 1.08883], dtype=np.float64)
# Lab is computed from XYZ / white, so fold the white point into the matrix once.
_XYZN_FROM_RGB_T = (XYZ_FROM_RGB / D65_WHITE[:, None]).T.astype(np.float32)

L_SCALE, AB_SCALE = 50.0, 127.0  # L' = L / 50 - 1 (= 2L/100 - 1), ab' = ab / 127 (127, not 128)


def grey_uint8(rgb: np.ndarray) -> np.ndarray:
    """RGB uint8 (h, w, 3) -> grey uint8 (h, w), bit-exact with tf.image.rgb_to_grayscale on uint8.

    TF converts to float32 by multiplying with float32(1/255), takes the weighted sum in float32 and
    converts back by truncating x * 255.5.
    """
    flt = rgb.astype(np.float32) * np.float32(1.0 / 255.0)
    grey = flt[..., 0] * GREY_WEIGHTS[0]
    grey += flt[..., 1] * GREY_WEIGHTS[1]
    grey += flt[..., 2] * GREY_WEIGHTS[2]
    grey *= np.float32(255.5)
    return grey.astype(np.uint8)


def inception_input(grey: np.ndarray) -> np.ndarray:
    """Grey uint8 (h, w) or (n, h, w) -> float32 (..., h, w, 3) in [-1, 1]: `2x/255 - 1`, 3 equal channels."""
    x = grey.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)
    return np.repeat(x[..., None], 3, axis=-1)


def resize_bilinear(rgb: np.ndarray, size: int = LAB_SIZE) -> np.ndarray:
    """RGB uint8 (h, w, 3) -> float32 (size, size, 3) in [0, 1], bilinear with half-pixel centres.

    OpenCV's INTER_LINEAR on float32 samples at (i + 0.5) * h / size - 0.5 without anti-aliasing, the
    same maths as skimage's `resize(order=1, anti_aliasing=False)`, about 10x faster than numpy.
    """
    import cv2

    from imagebeam.transforms.imaging import lab_kernels  # numba: compiled loops, for colorize only

    return cv2.resize(lab_kernels.unit_float(rgb), (size, size), interpolation=cv2.INTER_LINEAR)


def _lab_norm(rgb: np.ndarray, l_scale: float, l_offset: float, a_scale: float, b_scale: float):
    """RGB float in [0, 1] (..., 3) -> (l_scale fy - l_offset, (a_scale (fx - fy), b_scale (fy - fz))) with
    f the CIE f(X/Xn), f(Y/Yn), f(Z/Zn) (sRGB -> linear: ((x + 0.055) / 1.055) ** 2.4 above 0.04045,
    x / 12.92 below; f: cbrt above 0.008856, 7.787 t + 16/116 below), float32 (lab_kernels.py)."""
    from imagebeam.transforms.imaging import lab_kernels

    shape = np.shape(rgb)
    x = np.asarray(rgb, dtype=np.float32)
    x = x.reshape(-1, 1, 3) if x.ndim != 3 else x
    l_out, ab_out = lab_kernels.lab_norm(x, _XYZN_FROM_RGB_T.T, l_scale, l_offset, a_scale, b_scale)
    return l_out.reshape(shape[:-1]), ab_out.reshape(shape[:-1] + (2,))


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """RGB float in [0, 1] (..., 3) -> CIE Lab float32 (..., 3) (D65, 2°), as skimage.color.rgb2lab."""
    lum, ab = _lab_norm(rgb, 116.0, 16.0, 500.0, 200.0)
    return np.concatenate([lum[..., None], ab], axis=-1)


def lab_target(rgb299: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """The record's colour target from the 299 RGB image: (L' (224, 224), ab' (224, 224, 2)), float32.

    `rgb_to_lab` followed by L' = L/50 - 1, ab' = ab/127, with the constants folded: L' = 2.32 fy - 1.32,
    a' = 500/127 (fx - fy), b' = 200/127 (fy - fz).
    """
    return _lab_norm(resize_bilinear(rgb299, LAB_SIZE), 116.0 / L_SCALE, 16.0 / L_SCALE + 1.0,
                     500.0 / AB_SCALE, 200.0 / AB_SCALE)


# --- compact (8-bit) storage of L' and ab' -------------------------------------------------------------
# L' is stored as q = round((L' + 1) * 127.5), so L' = q / 127.5 - 1 (step 2/255; q = 2.55 L).
# ab' is stored as q = round(ab' * 127) + 128, so ab' = (q - 128) / 127 (step 1/127; q = round(ab) + 128,
# the usual 8-bit Lab encoding; sRGB colours stay within a, b in [-108, 99]).
L_Q_SCALE, L_Q_OFFSET = 127.5, 1.0
AB_Q_SCALE, AB_Q_OFFSET = 127.0, 128.0


def quantise_l(l_norm: np.ndarray) -> np.ndarray:
    q = np.rint((np.asarray(l_norm, np.float32) + np.float32(L_Q_OFFSET)) * np.float32(L_Q_SCALE))
    return np.clip(q, 0, 255).astype(np.uint8)


def quantise_ab(ab_norm: np.ndarray) -> np.ndarray:
    q = np.rint(np.asarray(ab_norm, np.float32) * np.float32(AB_Q_SCALE)) + np.float32(AB_Q_OFFSET)
    return np.clip(q, 0, 255).astype(np.uint8)


def dequantise_l(q: np.ndarray) -> np.ndarray:
    return np.asarray(q, np.float32) * np.float32(1.0 / L_Q_SCALE) - np.float32(L_Q_OFFSET)


def dequantise_ab(q: np.ndarray) -> np.ndarray:
    return (np.asarray(q, np.float32) - np.float32(AB_Q_OFFSET)) * np.float32(1.0 / AB_Q_SCALE)
