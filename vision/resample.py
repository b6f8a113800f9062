"""Pillow's BILINEAR resize of RGB uint8 pixels, bit for bit, compiled with numba and free of the GIL.

The reference resizes every tile with `PIL.Image.resize(..., BILINEAR)`, so parity needs Pillow's exact
integer arithmetic: per output pixel a window of source pixels weighted by a triangle filter stretched
over the scale factor (antialiasing), weights normalised in float64 then rounded to 22-bit fixed point,
sums rounded and clipped to uint8 after each of the two separable passes. Which pass runs first matters
for the rounding; Pillow 13 runs the vertical pass first when the height shrinks by more than twice as
many pixels as the width (`_vertical_first` probes the installed Pillow once to follow it).

Speed comes from layout, not from cutting corners: the horizontal pass reads a transposed copy of the
source (made once per image, shared by every tile cut from it) so that each tap weighs a contiguous run
of 64 source rows, which the compiler vectorises; the vertical pass reads contiguous rows. Crops are
windows into the same arrays.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import cv2  # cv2.transpose: an optimised byte transpose, several times numpy's strided copy
import numpy as np
from numba import njit

from vision.pan_and_scan import Box

_PRECISION_BITS = 22  # Pillow's fixed-point weight precision for 8-bit images (32 - 8 - 2)
_HALF = 1 << (_PRECISION_BITS - 1)
_ROWS = 64  # source rows per step of the horizontal pass: one cache line of each transposed row


@dataclass(frozen=True, eq=False)
class ResizeSource:
    pixels: np.ndarray  # (H, W * 3) uint8, C-contiguous: the decoded RGB image, rows of interleaved RGB
    transposed: np.ndarray | None  # (W * 3, H) uint8: pixels.T made contiguous, for horizontal-first tiles


def prepare_source(rgb: np.ndarray, boxes: list[Box], size: int) -> ResizeSource:
    """Wrap (H, W, 3) uint8 pixels for `resize_bilinear` of the given crop boxes to size x size; the
    transposed copy is made only when some tile resizes horizontally first."""
    height, width, channels = rgb.shape
    if channels != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected (H, W, 3) uint8 pixels, got {rgb.dtype} {rgb.shape}")
    pixels = np.ascontiguousarray(rgb).reshape(height, width * 3)  # (H, W * 3)
    needs_transpose = any(
        (x1 - x0) != size and _horizontal_first(x1 - x0, y1 - y0, size) for x0, y0, x1, y1 in boxes
    )
    return ResizeSource(pixels, cv2.transpose(pixels) if needs_transpose else None)


def resize_bilinear(source: ResizeSource, box: Box, size: int) -> np.ndarray:
    """`Image.crop(box).resize((size, size), BILINEAR)` as (size, size, 3) uint8, identical to Pillow."""
    x0, y0, x1, y1 = box
    in_w, in_h = x1 - x0, y1 - y0
    need_horizontal, need_vertical = in_w != size, in_h != size
    if not (need_horizontal or need_vertical):
        return source.pixels[y0:y1, x0 * 3 : x1 * 3].reshape(size, size, 3).copy()
    if need_horizontal:
        h_bounds, h_weights = _coefficients(in_w, size)
    if need_vertical:
        v_bounds, v_weights = _coefficients(in_h, size)

    if not _horizontal_first(in_w, in_h, size):
        tmp = np.empty((size, in_w * 3), np.uint8)  # (size, in_w * 3)
        _vertical_pass(source.pixels, y0, x0 * 3, v_bounds, v_weights, tmp)
        if not need_horizontal:
            return tmp.reshape(size, size, 3)
        out_t = np.empty((size * 3, size), np.uint8)  # (size * 3, size)
        _horizontal_pass(cv2.transpose(tmp), 0, 0, h_bounds, h_weights, out_t)
        return cv2.transpose(out_t).reshape(size, size, 3)

    if not need_horizontal:  # vertical only, straight from the source
        out = np.empty((size, in_w * 3), np.uint8)
        _vertical_pass(source.pixels, y0, x0 * 3, v_bounds, v_weights, out)
        return out.reshape(size, size, 3)
    if source.transposed is None:
        raise ValueError(f"box {box} resizes horizontally first: prepare_source must be given it")
    # Only the source rows the vertical pass will read are resampled horizontally (as Pillow does).
    first, last = (v_bounds[0, 0], v_bounds[-1, 0] + v_bounds[-1, 1]) if need_vertical else (0, in_h)
    tmp_t = np.empty((size * 3, last - first), np.uint8)  # (size * 3, rows used)
    _horizontal_pass(source.transposed, y0 + first, x0 * 3, h_bounds, h_weights, tmp_t)
    tmp = cv2.transpose(tmp_t)  # (rows used, size * 3)
    if not need_vertical:
        return tmp.reshape(size, size, 3)
    out = np.empty((size, size * 3), np.uint8)
    _vertical_pass(tmp, -first, 0, v_bounds, v_weights, out)
    return out.reshape(size, size, 3)


def _horizontal_first(in_w: int, in_h: int, size: int) -> bool:
    shrink_h, shrink_w = in_h - size, in_w - size
    return not (_vertical_first() and shrink_h > 0 and shrink_h > shrink_w * 2)


@functools.cache
def _vertical_first() -> bool:
    """Whether the installed Pillow ever runs the vertical pass first (Pillow 13 does when the height
    shrinks far more than the width; older releases always start horizontally). Probed once on a tiny
    random image whose two pass orders give different results."""
    from PIL import Image

    rgb = np.random.default_rng(7).integers(0, 256, (40, 7, 3), dtype=np.uint8)
    pillow = np.asarray(Image.fromarray(rgb).resize((5, 5), Image.Resampling.BILINEAR))
    pixels = rgb.reshape(40, 21)
    h_bounds, h_weights = _coefficients(7, 5)
    v_bounds, v_weights = _coefficients(40, 5)
    vertical = np.empty((5, 21), np.uint8)
    _vertical_pass(pixels, 0, 0, v_bounds, v_weights, vertical)
    vertical_then_horizontal = np.empty((15, 5), np.uint8)  # transposed
    _horizontal_pass(np.ascontiguousarray(vertical.T), 0, 0, h_bounds, h_weights, vertical_then_horizontal)
    if np.array_equal(pillow.reshape(5, 15), vertical_then_horizontal.T):
        return True
    horizontal = np.empty((15, 40), np.uint8)  # transposed
    _horizontal_pass(np.ascontiguousarray(pixels.T), 0, 0, h_bounds, h_weights, horizontal)
    horizontal_then_vertical = np.empty((5, 15), np.uint8)
    _vertical_pass(np.ascontiguousarray(horizontal.T), 0, 0, v_bounds, v_weights, horizontal_then_vertical)
    if np.array_equal(pillow.reshape(5, 15), horizontal_then_vertical):
        return False
    raise RuntimeError(
        f"the installed Pillow {Image.__version__} resizes differently from vision.resample; tiles would "
        "not match the reference image processor (vision.resample knows the horizontal-first pass order and "
        "Pillow 13's vertical-first rule)"
    )


@njit(cache=True, nogil=True)
def _coefficients(in_size, out_size):
    """Per output pixel: (first source pixel, tap count) and 22-bit fixed-point weights, as Pillow's
    precompute_coeffs + normalize_coeffs_8bpc compute them for the bilinear (triangle) filter."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = filterscale  # the triangle's support (1.0) stretched when shrinking
    ksize = int(math.ceil(support)) * 2 + 1
    bounds = np.zeros((out_size, 2), np.int64)
    weights = np.zeros((out_size, ksize), np.int32)
    taps = np.zeros(ksize, np.float64)
    inv_filterscale = 1.0 / filterscale
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        total = 0.0
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        for x in range(xmax):
            distance = abs((x + xmin - center + 0.5) * inv_filterscale)
            taps[x] = 1.0 - distance if distance < 1.0 else 0.0
            total += taps[x]
        for x in range(xmax):
            weight = taps[x] / total if total != 0.0 else taps[x]
            rounding = -0.5 if weight < 0 else 0.5
            weights[xx, x] = int(rounding + weight * (1 << _PRECISION_BITS))
        bounds[xx, 0] = xmin
        bounds[xx, 1] = xmax
    return bounds, weights


@njit(cache=True, nogil=True, inline="always")
def _clip8(total):
    value = total >> _PRECISION_BITS
    return 0 if value < 0 else (255 if value > 255 else value)


@njit(cache=True, nogil=True)
def _horizontal_pass(transposed, row0, col0, bounds, weights, out_transposed):
    """out_transposed[3 * xx + c, r] for source rows row0 + r. Both sides are transposed, (W * 3, H)
    in and (size * 3, rows) out, so every step reads and writes runs of consecutive source rows.
    col0 is the box's first byte column (3 * x0)."""
    rows = out_transposed.shape[1]
    acc = np.empty(_ROWS, np.int32)
    for r0 in range(0, rows - _ROWS + 1, _ROWS):
        start = row0 + r0
        for xx in range(bounds.shape[0]):
            xmin, taps = bounds[xx, 0], bounds[xx, 1]
            for c in range(3):
                acc[:] = _HALF
                for k in range(taps):
                    weight = weights[xx, k]
                    run = transposed[col0 + (xmin + k) * 3 + c, start : start + _ROWS]
                    for r in range(_ROWS):
                        acc[r] += np.int32(run[r]) * weight
                target = out_transposed[xx * 3 + c, r0 : r0 + _ROWS]
                for r in range(_ROWS):
                    target[r] = _clip8(acc[r])
    r0 = rows - rows % _ROWS  # the last, partial run of rows
    for xx in range(bounds.shape[0]):
        xmin, taps = bounds[xx, 0], bounds[xx, 1]
        for c in range(3):
            for r in range(r0, rows):
                total = np.int32(_HALF)
                for k in range(taps):
                    total += np.int32(transposed[col0 + (xmin + k) * 3 + c, row0 + r]) * weights[xx, k]
                out_transposed[xx * 3 + c, r] = _clip8(total)


@njit(cache=True, nogil=True)
def _vertical_pass(pixels, row0, col0, bounds, weights, out):
    """out[yy] from rows row0 + bounds of `pixels` (any height, rows of interleaved RGB), byte columns
    col0 .. col0 + out.shape[1]."""
    width = out.shape[1]
    acc = np.empty(width, np.int32)
    for yy in range(out.shape[0]):
        acc[:] = _HALF
        for k in range(bounds[yy, 1]):
            weight = weights[yy, k]
            run = pixels[row0 + bounds[yy, 0] + k, col0 : col0 + width]
            for i in range(width):
                acc[i] += np.int32(run[i]) * weight
        target = out[yy]
        for i in range(width):
            target[i] = _clip8(acc[i])
