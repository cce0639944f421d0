"""Patch masks for iBOT's masked image modelling: BEiT-style blocks or uniform random patches.

The block algorithm is the one of iBOT's ``ImageFolderMask`` (itself BEiT's), restated:

* ``target = num_masked`` (a float), ``count = 0``; while ``count < target`` run a *round*:
  ``remaining = target - count``; up to 10 attempts, each drawing ``area ~ U(low, remaining)`` with
  ``low = (min(h, w) // 3) ** 2``, an aspect ratio log-uniform in ``(aspect_min, 1 / aspect_min)``,
  ``bh = round(sqrt(area * aspect))``, ``bw = round(sqrt(area / aspect))``; when ``bh < h`` and ``bw < w`` a
  uniformly placed box whose newly covered cells ``new`` satisfy ``0 < new <= remaining`` is accepted and the
  round ends. A round that accepts nothing ends the mask. So a mask never exceeds ``target``.

Speed: the 10 attempts of a round are drawn at once and judged together against an integral image of the mask
(the first acceptable one wins, which has the same distribution as trying them one by one), and every mask of a
batch advances by one round per step, so a batch costs ~20 numpy calls per round instead of Python loops over
cells. Each mask consumes random numbers only from its own generator, in an order that does not depend on the
other masks of the batch, so results are reproducible however the masks are batched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ibot_ray.config import MaskingConfig

ATTEMPTS = 10  # tries per round, as in BEiT / iBOT
_DRAWS = 256  # uniforms fetched from a generator at a time (4 per attempt)


def _check_grid(h: int, w: int) -> None:
    if h < 1 or w < 1:
        raise ValueError(f"mask grid must be at least 1x1, got {h}x{w}")


def _rows_repeat(h: int, w: int) -> list[int]:
    """``rep[k]`` has bit 0 of each of the first ``k`` rows set (bit ``i * w``), to stamp a row pattern k times."""
    rep = [0]
    for i in range(h):
        rep.append(rep[-1] | (1 << (i * w)))
    return rep


def _block_mask_bits(h: int, w: int, target: float, rng: np.random.Generator, aspect_min: float, rep: list[int]) -> int:
    """One block mask as a Python int whose bit ``y * w + x`` is cell (y, x); see the module docstring."""
    low = float((min(h, w) // 3) ** 2)
    log_lo = math.log(aspect_min)
    span = math.log(1.0 / aspect_min) - log_lo
    mask = 0
    count = 0
    buf: list[float] = []
    pos = 0
    while count < target:
        remaining = target - count
        delta = 0
        for _ in range(ATTEMPTS):
            if pos + 4 > len(buf):
                buf = rng.random(_DRAWS).tolist()
                pos = 0
            u_area, u_aspect, u_top, u_left = buf[pos], buf[pos + 1], buf[pos + 2], buf[pos + 3]
            pos += 4
            area = low + (remaining - low) * u_area  # U(low, remaining), also when remaining < low
            aspect = math.exp(log_lo + span * u_aspect)
            bh = round(math.sqrt(area * aspect))
            bw = round(math.sqrt(area / aspect))
            if bh < h and bw < w:
                top = min(int(u_top * (h - bh + 1)), h - bh)
                left = min(int(u_left * (w - bw + 1)), w - bw)
                box = ((((1 << bw) - 1) << left) * rep[bh]) << (top * w)
                new = bh * bw - (mask & box).bit_count()
                if 0 < new <= remaining:
                    mask |= box
                    delta = new
                    break
        if delta == 0:
            break
        count += delta
    return mask


def _bits_to_array(bits: int, h: int, w: int) -> np.ndarray:
    raw = np.frombuffer(bits.to_bytes((h * w + 7) // 8, "little"), dtype=np.uint8)
    return np.unpackbits(raw, bitorder="little")[: h * w].reshape(h, w).astype(bool)


def block_masks(
    h: int,
    w: int,
    num_masked: Sequence[float] | np.ndarray,
    rngs: Sequence[np.random.Generator],
    aspect_min: float = 0.3,
) -> np.ndarray:
    """Block masks for a batch: mask ``k`` targets ``num_masked[k]`` patches and draws only from ``rngs[k]``.

    Masks are made in order, so a generator shared by several masks serves them one after the other. Returns a
    bool array (n, h, w).
    """
    _check_grid(h, w)
    if not 0 < aspect_min <= 1:
        raise ValueError(f"aspect_min must be in (0, 1], got {aspect_min}")
    targets = np.asarray(num_masked, dtype=np.float64).reshape(-1)
    if len(rngs) != len(targets):
        raise ValueError(f"need one generator per mask: {len(targets)} targets, {len(rngs)} generators")
    if np.any(targets < 0) or np.any(~np.isfinite(targets)):
        raise ValueError(f"num_masked must be finite and >= 0, got {targets.tolist()}")
    out = np.zeros((len(targets), h, w), dtype=bool)
    rep = _rows_repeat(h, w)
    for k, (t, rng) in enumerate(zip(targets.tolist(), rngs)):
        if t > 0:
            bits = _block_mask_bits(h, w, t, rng, aspect_min, rep)
            if bits:
                out[k] = _bits_to_array(bits, h, w)
    return out


def block_mask(h: int, w: int, num_masked: float, rng: np.random.Generator, aspect_min: float = 0.3) -> np.ndarray:
    """One BEiT/iBOT block mask: bool (h, w) with at most ``num_masked`` True cells (see the module docstring)."""
    return block_masks(h, w, [num_masked], [rng], aspect_min)[0]


def random_masks(
    h: int, w: int, num_masked: Sequence[float] | np.ndarray, rngs: Sequence[np.random.Generator]
) -> np.ndarray:
    """Uniform random masks for a batch: mask ``k`` has exactly ``int(num_masked[k])`` True cells."""
    _check_grid(h, w)
    counts = np.asarray(num_masked, dtype=np.float64).reshape(-1)
    if len(rngs) != len(counts):
        raise ValueError(f"need one generator per mask: {len(counts)} targets, {len(rngs)} generators")
    if np.any(counts < 0) or np.any(counts > h * w):
        raise ValueError(f"num_masked must be in [0, {h * w}], got {counts.tolist()}")
    counts = counts.astype(np.int64)  # int(): truncation, as the reference
    out = np.zeros((len(counts), h * w), dtype=bool)
    for k, (c, rng) in enumerate(zip(counts, rngs)):
        if c:
            out[k, rng.permutation(h * w)[:c]] = True
    return out.reshape(len(counts), h, w)


def random_mask(h: int, w: int, num_masked: float, rng: np.random.Generator) -> np.ndarray:
    """Exactly ``int(num_masked)`` uniformly chosen True cells in a bool (h, w) mask."""
    return random_masks(h, w, [num_masked], [rng])[0]


class MaskGenerator:
    """Per-crop masks of a ``grid`` (h, w) of patches, following a :class:`MaskingConfig`.

    Each crop draws its own ratio (see :meth:`sample_ratios`) and gets ``ratio * h * w`` as its target.
    """

    def __init__(self, cfg: MaskingConfig, grid: tuple[int, int]) -> None:
        h, w = int(grid[0]), int(grid[1])
        _check_grid(h, w)
        if cfg.shape not in ("block", "rand"):
            raise ValueError(f"masking.shape must be 'block' or 'rand', got {cfg.shape!r}")
        if len(cfg.ratio) < 1 or len(cfg.ratio) != len(cfg.ratio_var):
            raise ValueError(
                f"masking.ratio {cfg.ratio} and masking.ratio_var {cfg.ratio_var} need equal, non-zero lengths")
        self.cfg = cfg
        self.grid = (h, w)
        self._ratio = np.asarray(cfg.ratio, dtype=np.float64)
        self._var = np.asarray(cfg.ratio_var, dtype=np.float64)

    def active(self, epoch: int) -> bool:
        """Whether crops can be masked at this epoch (enabled and ``epoch >= start_epoch``)."""
        return bool(self.cfg.enabled) and epoch >= self.cfg.start_epoch

    def sample_ratios(self, n: int, epoch: int, rng: np.random.Generator) -> np.ndarray:
        """Mask ratio per crop: 0 when inactive, else one of ``cfg.ratio`` (uniform) then ``U(r - var, r + var)``."""
        if not self.active(epoch) or n == 0:
            return np.zeros(n, dtype=np.float64)
        pick = rng.integers(len(self._ratio), size=n)
        r, v = self._ratio[pick], self._var[pick]
        u = rng.random(n)
        return np.where(v > 0, r - v + 2 * v * u, r)

    def masks_for(self, ratios: np.ndarray, rngs: Sequence[np.random.Generator]) -> np.ndarray:
        """Masks (n, h, w) for given per-crop ratios, crop ``k`` drawing from ``rngs[k]``."""
        h, w = self.grid
        targets = np.asarray(ratios, dtype=np.float64) * (h * w)
        if self.cfg.shape == "rand":
            return random_masks(h, w, targets, rngs)
        return block_masks(h, w, targets, rngs, self.cfg.aspect_min)

    def __call__(self, n: int, epoch: int, rng: np.random.Generator) -> np.ndarray:
        """Bool masks (n, h, w): ratios from :meth:`sample_ratios`, then the configured shape."""
        ratios = self.sample_ratios(n, epoch, rng)
        return self.masks_for(ratios, [rng] * n)


__all__ = ["block_mask", "block_masks", "random_mask", "random_masks", "MaskGenerator", "ATTEMPTS"]
