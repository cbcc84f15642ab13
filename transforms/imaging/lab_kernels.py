"""colour.lab_target's elementwise float32 steps fused into compiled loops, bit for bit.

`colour.lab_target` spent about 30 passes of numpy over the 224 x 224 x 3 floats (each add, multiply and
the masked blends of the two thresholds one pass each), 0.45 ms of about 2 ms an image. The same float32
operations, in the same order, run here in four loops (numba, compiled once per machine and cached); the
transcendental steps stay numpy's (log2, exp2 and cbrt: their SIMD implementations decide the bits) and
the colour matrix stays OpenCV's `transform`. +, -, * of float32 are exact IEEE operations, and numba
emits no fused multiply-add unless asked (no fastmath), so every output bit is the one the numpy passes
give; tests/test_colour.py compares them on thousands of real images.
"""
from __future__ import annotations

import cv2
import numba
import numpy as np

_F = np.float32
_SRGB_OFFSET, _SRGB_SCALE = _F(0.055), _F(1 / 1.055)     # ((x + 0.055) / 1.055) ** 2.4 above ...
_SRGB_EXPONENT = _F(2.4)
_SRGB_KNEE, _SRGB_LINEAR = _F(0.04045), _F(1 / 12.92)    # ... x / 12.92 at or below the knee
_LAB_KNEE, _LAB_SLOPE, _LAB_OFFSET = _F(0.008856), _F(7.787), _F(16.0 / 116.0)


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _to_unit(rgb: np.ndarray, out: np.ndarray) -> None:
    """out = float32(rgb) * float32(1/255), as `rgb.astype(np.float32) * np.float32(1/255)`."""
    scale = np.float32(1.0 / 255.0)
    flat_in, flat_out = rgb.reshape(-1), out.reshape(-1)
    for i in range(flat_in.size):
        flat_out[i] = np.float32(flat_in[i]) * scale


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _gamma_base(x: np.ndarray, out: np.ndarray) -> None:
    """out = (x + 0.055) * (1/1.055) in float32 (the base of sRGB's power)."""
    for i in range(x.size):
        out[i] = (x[i] + _SRGB_OFFSET) * _SRGB_SCALE


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _scale_in_place(values: np.ndarray, factor: np.float32) -> None:
    for i in range(values.size):
        values[i] = values[i] * factor


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _linear(x: np.ndarray, power: np.ndarray) -> None:
    """power[i] = power[i] where x[i] > the knee, else x[i] * (1/12.92): linear sRGB, in place."""
    for i in range(x.size):
        if not x[i] > _SRGB_KNEE:
            power[i] = x[i] * _SRGB_LINEAR


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _lab_norm(t: np.ndarray, root: np.ndarray, l_out: np.ndarray, ab_out: np.ndarray,
              l_scale: np.float32, l_offset: np.float32, a_scale: np.float32, b_scale: np.float32) -> None:
    """From t = (X/Xn, Y/Yn, Z/Zn) per pixel and its cube roots: f = root above the knee, else
    t * 7.787 + 16/116; L' = fy * l_scale - l_offset, a' = (fx - fy) * a_scale, b' = (fy - fz) * b_scale."""
    for p in range(l_out.size):
        f0, f1, f2 = root[3 * p], root[3 * p + 1], root[3 * p + 2]
        t0, t1, t2 = t[3 * p], t[3 * p + 1], t[3 * p + 2]
        if not t0 > _LAB_KNEE:
            f0 = t0 * _LAB_SLOPE + _LAB_OFFSET
        if not t1 > _LAB_KNEE:
            f1 = t1 * _LAB_SLOPE + _LAB_OFFSET
        if not t2 > _LAB_KNEE:
            f2 = t2 * _LAB_SLOPE + _LAB_OFFSET
        l_out[p] = f1 * l_scale - l_offset
        ab_out[2 * p] = (f0 - f1) * a_scale
        ab_out[2 * p + 1] = (f1 - f2) * b_scale


def unit_float(rgb: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [0, 1] (x * float32(1/255)) in one pass."""
    out = np.empty(rgb.shape, dtype=np.float32)
    _to_unit(np.ascontiguousarray(rgb), out)
    return out


def lab_norm(rgb: np.ndarray, xyzn_from_rgb: np.ndarray, l_scale: float, l_offset: float, a_scale: float,
             b_scale: float):
    """RGB float32 in [0, 1] (h, w, 3) -> (L' (h, w), ab' (h, w, 2)) float32: sRGB -> linear -> XYZ / white
    (OpenCV's transform with `xyzn_from_rgb`, 3 x 3) -> f -> the normalised Lab of colour.lab_target."""
    h, w, _ = rgb.shape
    x = np.ascontiguousarray(rgb, dtype=np.float32)
    flat = x.reshape(-1)
    power = np.empty_like(flat)
    _gamma_base(flat, power)
    np.log2(power, out=power)
    _scale_in_place(power, _SRGB_EXPONENT)
    np.exp2(power, out=power)
    _linear(flat, power)
    t = cv2.transform(power.reshape(h, w, 3), xyzn_from_rgb)
    flat_t = t.reshape(-1)
    root = np.cbrt(flat_t)
    l_out = np.empty((h, w), dtype=np.float32)
    ab_out = np.empty((h, w, 2), dtype=np.float32)
    _lab_norm(flat_t, root, l_out.reshape(-1), ab_out.reshape(-1), _F(l_scale), _F(l_offset), _F(a_scale),
              _F(b_scale))
    return l_out, ab_out
