"""The per-pixel half of the multi-crop augmentation, compiled with numba: one call renders one crop.

:func:`render_crop` takes a resized crop (``(S, S, 3)`` uint8, as torch's resize leaves it) and writes the final
``(3, S, S)`` uint8 crop: horizontal flip, colour jitter in the crop's drawn order, greyscale, Gaussian blur,
rounding and solarisation. The arithmetic is float32 on 0..255 values, as the PIL/torchvision recipe on
``[0, 1]`` floats scaled by 255, rounded once at the end.

Why compiled loops instead of array operations: a crop is small (a 224 px crop is 600 kB as float32), and written
as numpy/torch calls the colour jitter alone is ~40 passes over it (hue is a dozen ops per pixel) plus the
overhead of every call. Here each operation is one loop over a row of pixels that stays in L1 cache, with the
row's three channels processed together, and all the steps run row by row: without blur a crop is one pass (load,
jitter, grey, round, solarise, store); with blur that pass ends in the horizontal blur and a second pass does the
vertical blur and the store; when contrast is drawn, one more pass in front computes the mean luma of the image
as it is at contrast's turn.

Everything is plain float32 arithmetic without ``fastmath``, so results do not depend on the vector width.
Numba compiles these functions on first use (a few seconds, cached on disk when the package folder or numba's
user cache is writable).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

#: Colour-jitter operation ids (also the columns of the factors array); -1 in an order means "skip".
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3
#: ITU-R 601-2 luma weights, PIL's ``convert("L")`` and torchvision's ``rgb_to_grayscale``.
LUMA_R, LUMA_G, LUMA_B = 0.299, 0.587, 0.114

_JIT = {"cache": True, "nogil": True, "boundscheck": False}


@njit(**_JIT)
def _clamp(v, lo, hi):
    return min(max(v, lo), hi)


@njit(**_JIT)
def _op_row(r, g, b, op, f, mean):
    """Colour operation ``op`` with factor ``f`` on one row (three float32 channel rows, in place)."""
    n = r.shape[0]
    lo = np.float32(0.0)
    hi = np.float32(255.0)
    if op == BRIGHTNESS:  # x * f, clamped
        ff = np.float32(f)
        for i in range(n):
            r[i] = _clamp(r[i] * ff, lo, hi)
            g[i] = _clamp(g[i] * ff, lo, hi)
            b[i] = _clamp(b[i] * ff, lo, hi)
    elif op == CONTRAST:  # blend with the mean luma of the image: f * x + (1 - f) * mean, clamped
        ff = np.float32(f)
        add = np.float32((1.0 - f) * mean)
        for i in range(n):
            r[i] = _clamp(r[i] * ff + add, lo, hi)
            g[i] = _clamp(g[i] * ff + add, lo, hi)
            b[i] = _clamp(b[i] * ff + add, lo, hi)
    elif op == SATURATION:  # blend with the pixel's luma: y + f * (x - y), clamped
        ff = np.float32(f)
        wr, wg, wb = np.float32(LUMA_R), np.float32(LUMA_G), np.float32(LUMA_B)
        for i in range(n):
            y = r[i] * wr + g[i] * wg + b[i] * wb
            r[i] = _clamp(y + ff * (r[i] - y), lo, hi)
            g[i] = _clamp(y + ff * (g[i] - y), lo, hi)
            b[i] = _clamp(y + ff * (b[i] - y), lo, hi)
    elif op == HUE:  # rotate the HSV hue by f turns; S and V (so max, min and chroma) are kept
        d = np.float32(6.0 * f)  # in sextants
        one, two, three, four, six = (np.float32(1.0), np.float32(2.0), np.float32(3.0), np.float32(4.0),
                                      np.float32(6.0))
        tiny = np.float32(1e-6)
        sixth = np.float32(1.0 / 6.0)
        for i in range(n):
            rr, gg, bb = r[i], g[i], b[i]
            mx = max(max(rr, gg), bb)
            mn = min(min(rr, gg), bb)
            c = mx - mn
            # hue in sextants, [-1, 5): (g - b) / c where red is the max, 2 + (b - r) / c where green is,
            # 4 + (r - g) / c where blue is (red wins ties, then green)
            num = rr - gg + four * c
            num = (bb - rr + two * c) if gg == mx else num
            num = (gg - bb) if rr == mx else num
            h = num / max(c, tiny) + d  # c == 0 (grey): num == 0 and the output is mn whatever h is
            h = h - six * math.floor(h * sixth)  # into [0, 6)
            # hexcone ramps: k_r = clamp(|h - 3| - 1), k_g = clamp(2 - |h - 2|), k_b = clamp(2 - |h - 4|)
            r[i] = mn + c * _clamp(abs(h - three) - one, np.float32(0.0), one)
            g[i] = mn + c * _clamp(two - abs(h - two), np.float32(0.0), one)
            b[i] = mn + c * _clamp(two - abs(h - four), np.float32(0.0), one)


@njit(**_JIT)
def _luma_sum_row(r, g, b):
    s = 0.0
    for i in range(r.shape[0]):
        s += LUMA_R * r[i] + LUMA_G * g[i] + LUMA_B * b[i]
    return s


@njit(**_JIT)
def _gray_row(r, g, b):
    wr, wg, wb = np.float32(LUMA_R), np.float32(LUMA_G), np.float32(LUMA_B)
    for i in range(r.shape[0]):
        y = r[i] * wr + g[i] * wg + b[i] * wb
        r[i] = y
        g[i] = y
        b[i] = y


# What a row pass does with each row once its colour operations are done.
_KEEP, _STORE, _HBLUR = 0, 1, 2


@njit(**_JIT)
def _load_row(src, flip, y, r, g, b):
    """Row y of the (S, S, 3) uint8 ``src`` (mirrored when ``flip``) into three float32 channel rows."""
    wid = r.shape[0]
    row = src[y]
    if flip:
        for i in range(wid):
            j = wid - 1 - i
            r[i] = row[j, 0]
            g[i] = row[j, 1]
            b[i] = row[j, 2]
    else:
        for i in range(wid):
            r[i] = row[i, 0]
            g[i] = row[i, 1]
            b[i] = row[i, 2]


@njit(**_JIT)
def _store_row(src, dst, solarize, threshold):
    """uint8 row from float32: round half to even (as numpy's rint), clamp, then invert values >= threshold."""
    t = np.float32(threshold)
    for i in range(dst.shape[0]):
        v = min(max(np.rint(src[i]), np.float32(0.0)), np.float32(255.0))
        if solarize and v >= t:
            v = np.float32(255.0) - v
        dst[i] = np.uint8(v)


@njit(**_JIT)
def _hblur_row(row, kernel, pad, out):
    """``out`` = ``row`` convolved with the odd symmetric ``kernel``, edges replicated (``pad``: scratch row of
    length >= len(row) + len(kernel) - 1). Tap-major, so the inner loop is a vectorisable multiply-add."""
    wid = row.shape[0]
    r = (kernel.shape[0] - 1) // 2
    for i in range(r):
        pad[i] = row[0]
        pad[r + wid + i] = row[wid - 1]
    for i in range(wid):
        pad[r + i] = row[i]
    k0 = kernel[0]
    for i in range(wid):
        out[i] = k0 * pad[i]
    for t in range(1, 2 * r + 1):
        kt = kernel[t]
        for i in range(wid):
            out[i] += kt * pad[i + t]


@njit(**_JIT)
def _row_pass(x, src, load, flip, order, first, stop, factors, mean, gray, want_mean, mode, out, solarize, threshold,
              kernel, tmp, pad):
    """One pass over the crop ``x`` (3, H, W) float32, row by row: load the row from ``src`` (when ``load``),
    run the operations ``order[first:stop]``, greyscale when ``gray``, then per ``mode`` keep the row, store it
    as uint8 into ``out`` or blur it horizontally into ``tmp``. Returns the mean luma of the rows after the
    operations when ``want_mean`` (else 0)."""
    _, hgt, wid = x.shape
    s = 0.0
    for y in range(hgt):
        r, g, b = x[0, y], x[1, y], x[2, y]
        if load:
            _load_row(src, flip, y, r, g, b)
        for j in range(first, stop):
            op = order[j]
            if op >= 0:
                _op_row(r, g, b, op, factors[op], mean)
        if gray:
            _gray_row(r, g, b)
        if want_mean:
            s += _luma_sum_row(r, g, b)
        if mode == _STORE:
            _store_row(r, out[0, y], solarize, threshold)
            _store_row(g, out[1, y], solarize, threshold)
            _store_row(b, out[2, y], solarize, threshold)
        elif mode == _HBLUR:
            _hblur_row(r, kernel, pad, tmp[0, y])
            _hblur_row(g, kernel, pad, tmp[1, y])
            _hblur_row(b, kernel, pad, tmp[2, y])
    return s / (hgt * wid)


@njit(**_JIT)
def _contrast_at(order):
    for j in range(4):
        if order[j] == CONTRAST:
            return j
    return -1


@njit(**_JIT)
def _colour_passes(x, src, load, flip, order, factors, gray, mode, out, solarize, threshold, kernel, tmp, pad):
    """The colour operations ``order`` and greyscale on ``x``, in one :func:`_row_pass` that ends per ``mode``,
    or two when contrast is drawn: contrast blends with the mean luma of the image as it is when its turn comes,
    so the operations before it run as a first pass that also sums the luma (loading the rows when ``load``)."""
    at = _contrast_at(order)
    first = 0
    mean = 0.0
    if at >= 0:
        mean = _row_pass(x, src, load, flip, order, 0, at, factors, 0.0, False, True, _KEEP, out, solarize,
                         threshold, kernel, tmp, pad)
        load = False  # the second pass works on x
        first = at
    _row_pass(x, src, load, flip, order, first, 4, factors, mean, gray, False, mode, out, solarize, threshold,
              kernel, tmp, pad)


@njit(**_JIT)
def jitter_(x, order, factors, gray):
    """In place on one C-contiguous (3, H, W) float32 crop: the colour operations ``order`` ((4,) int64 op ids,
    -1 = skip) with ``factors[op]`` ((4,) float64), then greyscale when ``gray``."""
    no_row = np.empty(0, dtype=np.float32)
    _colour_passes(x, np.empty((0, 0, 3), dtype=np.uint8), False, False, order, factors, gray, _KEEP,
                   np.empty((3, 0, 0), dtype=np.uint8), False, 0.0, no_row, np.empty((3, 0, 0), dtype=np.float32),
                   no_row)


@njit(**_JIT)
def _blur_column_row(tmp, kernel, c, y, acc):
    """Row y of channel c of the vertical pass over ``tmp`` (edges replicated) into ``acc``."""
    hgt, wid = tmp.shape[1], tmp.shape[2]
    r = (kernel.shape[0] - 1) // 2
    src = tmp[c, max(y - r, 0)]
    k0 = kernel[0]
    for i in range(wid):
        acc[i] = k0 * src[i]
    for t in range(1, 2 * r + 1):
        src = tmp[c, min(max(y - r + t, 0), hgt - 1)]
        kt = kernel[t]
        for i in range(wid):
            acc[i] += kt * src[i]


@njit(**_JIT)
def blur_rows_(x, kernel, tmp, pad):
    """Horizontal pass of the separable blur: ``tmp[c, y]`` = row ``x[c, y]`` convolved with the odd symmetric
    ``kernel``, edges replicated; ``pad`` is a float32 scratch row of length >= W + len(kernel) - 1."""
    for c in range(3):
        for y in range(x.shape[1]):
            _hblur_row(x[c, y], kernel, pad, tmp[c, y])


@njit(**_JIT)
def blur_cols_(tmp, kernel, out):
    """Vertical pass of the blur from ``tmp`` into the float32 crop ``out`` (3, H, W), edges replicated."""
    for c in range(3):
        for y in range(tmp.shape[1]):
            _blur_column_row(tmp, kernel, c, y, out[c, y])


def scratch_size(size: int, kernel_len: int) -> int:
    """float32 elements of scratch :func:`render_crop` needs for crops of side ``size`` and kernels up to
    ``kernel_len`` taps."""
    return 6 * size * size + 2 * (size + kernel_len)


@njit(**_JIT)
def render_crop(src, flip, out, order, factors, gray, kernel, solarize, threshold, scratch):
    """One crop: ``src`` (S, S, 3) uint8 resized crop -> ``out`` (3, S, S) uint8.

    ``order`` (4,) int64 op ids in the drawn order, -1 for the skipped ones (all -1 without jitter); ``factors``
    (4,) float64 indexed by op id; ``gray`` greyscale after the jitter; ``kernel`` the blur's odd 1-D float32
    kernel (length 1 for no blur); ``solarize`` invert values >= ``threshold`` after rounding. ``scratch``: a 1-D
    float32 array of at least :func:`scratch_size` elements (carved into contiguous views here, so that every
    row loop sees contiguous arrays and vectorises).

    Passes over the crop: one (load, jitter, grey, round, solarise, store) without blur; with blur the same pass
    ends in the horizontal blur and a second pass does the vertical blur and the store; one more in front when
    contrast is drawn (it needs the mean of the image as it is at its turn).
    """
    hgt, wid, _ = src.shape
    n = 3 * hgt * wid
    x = scratch[:n].reshape((3, hgt, wid))
    tmp = scratch[n: 2 * n].reshape((3, hgt, wid))
    m = wid + kernel.shape[0]
    pad = scratch[2 * n: 2 * n + m]
    acc = scratch[2 * n + m: 2 * n + 2 * m]
    blur = kernel.shape[0] > 1 or kernel[0] != 1.0
    _colour_passes(x, src, True, flip, order, factors, gray, _HBLUR if blur else _STORE, out, solarize, threshold,
                   kernel, tmp, pad)
    if blur:
        for c in range(3):
            for y in range(hgt):
                _blur_column_row(tmp, kernel, c, y, acc)
                _store_row(acc, out[c, y], solarize, threshold)


def warm_up() -> None:
    """Compile (or load from numba's cache) the render kernel now, e.g. when an augmenting actor starts, rather
    than inside its first batch."""
    size, kernel = 4, np.full(3, 1.0 / 3.0, dtype=np.float32)
    render_crop(np.zeros((size, size, 3), dtype=np.uint8), True, np.zeros((3, size, size), dtype=np.uint8),
                np.array([HUE, CONTRAST, -1, -1], dtype=np.int64), np.ones(4), True, kernel, True, 128.0,
                np.zeros(scratch_size(size, len(kernel)), dtype=np.float32))


__all__ = [
    "BRIGHTNESS",
    "CONTRAST",
    "SATURATION",
    "HUE",
    "jitter_",
    "blur_rows_",
    "blur_cols_",
    "render_crop",
    "scratch_size",
    "warm_up",
]
