"""iBOT / DINO multi-crop augmentation on decoded uint8 images, batched for speed.

The recipe (``DataAugmentationiBOT``), per crop, in this order:

1. RandomResizedCrop to ``S`` (torchvision's algorithm: 10 tries of ``area = U(scale) * A`` and a log-uniform aspect
   ratio, else a centre crop clamped to the ratio range), bicubic, antialiased like PIL;
2. horizontal flip (``flip_p``);
3. ColorJitter(brightness, contrast, saturation, hue) with probability ``color_jitter_p``, the four operations in a
   random order, clamping to the valid range after each (brightness multiplies; contrast blends with the mean
   greyscale level; saturation blends with the greyscale image; hue rotates H in HSV);
4. greyscale (``grayscale_p``, ITU-R 601 luma as PIL's ``convert("L")``);
5. Gaussian blur with sigma ``U(blur_sigma)`` (global crop ``i``: ``global_blur_p[i]``; local crops: ``local_blur_p``);
6. solarisation (invert pixels ``>= solarize_threshold``) with ``global_solarize_p[i]`` on global crops only.

Normalisation is *not* done here: crops stay uint8 (4x less to move) and the training side normalises.

How it is fast (same distribution as the PIL/torchvision pipeline, not bit-identical; ~4x less CPU per image):
* every random number of an image is drawn up front (:meth:`MultiCropAugmentation.sample_params`), so the crop boxes
  are known before decoding (the caller can pick a reduced JPEG decode scale);
* crop + resize in one antialiased bicubic resample of a dense copy of the box (torch's uint8 kernel, which
  reproduces PIL's filter to within +-3 levels and runs ~4x faster than PIL on one core); flipped afterwards;
* the colour operations, greyscale, blur and solarisation run in float32 on chunks of ~6 MB of crops of one size
  with per-crop factors broadcast (each numpy/torch call then does enough work to hide its overhead). Crops are
  sorted by their jitter order so that most jitter operations run in place on contiguous runs of crops; the other
  steps gather the crops that drew them. Operations are written as few memory passes as possible: torch's fused
  kernels (lerp, addcmul, clamp) where they are fastest, numpy for comparisons, clamps skipped when no factor can
  leave [0, 255], hue in ~40 passes without ``where``/``remainder``;
* the blur applies, as one separable kernel, exactly the filter PIL's ``GaussianBlur(radius=sigma)`` uses (three
  extended box filters of variance sigma^2 / 3, see :func:`blur_kernels`), edges replicated, grouped by length.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ibot_ray.config import CropsConfig

#: Colour-jitter operation ids, the columns of :attr:`CropParams.factors`.
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, PIL's convert("L") and torchvision's rgb_to_grayscale
RRC_TRIES = 10
BLUR_TAIL = 1e-3  # kernel tails lighter than this are cut (at most 0.26 grey levels on a 0/255 step edge)
_MAX_RUNS = 13  # a jitter slot split into at most this many runs is processed run by run, without gathers
_HUE_BLOCK_BYTES = 1 << 20  # adjust_hue works through blocks of at most this many bytes (crops or row bands)
DEFAULT_CHUNK_BYTES = 6 << 20  # float32 working set per processing chunk (see _render_group)


@dataclass
class CropParams:
    """Every random choice for the crops of one image: ``G`` global crops, then ``L`` local crops.

    ``boxes`` are ``(x0, y0, x1, y1)`` pixel boxes in an image of size ``size = (width, height)``; ``order`` is a
    permutation of the jitter operations (BRIGHTNESS, CONTRAST, SATURATION, HUE) per crop; ``factors`` holds the
    brightness, contrast and saturation factors and the hue shift (in turns); the boolean arrays say whether each
    optional step happens.
    """

    size: tuple[int, int]
    boxes: np.ndarray  # (n, 4) int64
    flip: np.ndarray  # (n,) bool
    jitter: np.ndarray  # (n,) bool
    order: np.ndarray  # (n, 4) int64
    factors: np.ndarray  # (n, 4) float64
    gray: np.ndarray  # (n,) bool
    blur: np.ndarray  # (n,) bool
    sigma: np.ndarray  # (n,) float64
    solarize: np.ndarray  # (n,) bool


def _range(center_spread: float, name: str) -> tuple[float, float]:
    if center_spread < 0:
        raise ValueError(f"crops.{name} must be >= 0, got {center_spread}")
    return max(0.0, 1.0 - center_spread), 1.0 + center_spread


def rrc_boxes(
    width: int,
    height: int,
    scales: np.ndarray,
    ratio: tuple[float, float],
    rng: np.random.Generator,
) -> np.ndarray:
    """RandomResizedCrop boxes for one image, one per row of ``scales`` ((n, 2) min/max area fractions).

    torchvision's algorithm: up to 10 tries of ``area = U(scale) * W * H`` and ``log(aspect) ~ U(log ratio)``,
    ``w = round(sqrt(area * aspect))``, ``h = round(sqrt(area / aspect))``; the first try with ``0 < w <= W`` and
    ``0 < h <= H`` gets a uniform position; without one, a centre crop of the whole image clamped to the ratio range.
    The tries are drawn together (same distribution as drawing them one at a time). Returns (n, 4) int64
    ``(x0, y0, x1, y1)``.
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    scales = np.asarray(scales, dtype=np.float64).reshape(-1, 2)
    n = len(scales)
    area = float(width * height)
    log_r0, log_r1 = math.log(ratio[0]), math.log(ratio[1])
    u = rng.random((n, RRC_TRIES, 2))
    target = area * (scales[:, :1] + (scales[:, 1:] - scales[:, :1]) * u[..., 0])
    aspect = np.exp(log_r0 + (log_r1 - log_r0) * u[..., 1])
    w = np.rint(np.sqrt(target * aspect)).astype(np.int64)
    h = np.rint(np.sqrt(target / aspect)).astype(np.int64)
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    found = ok.any(axis=1)
    first = ok.argmax(axis=1)
    rows = np.arange(n)
    cw, ch = w[rows, first], h[rows, first]
    # Fallback: the whole image, clamped to the aspect-ratio range, centred.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        fw, fh = int(round(height * ratio[1])), height
    else:
        fw, fh = width, height
    cw = np.where(found, cw, fw)
    ch = np.where(found, ch, fh)
    # Positions: uniform over the valid range (drawn for every crop, so the draw count is fixed).
    pos = rng.random((n, 2))
    top = np.minimum((pos[:, 0] * (height - ch + 1)).astype(np.int64), height - ch)
    left = np.minimum((pos[:, 1] * (width - cw + 1)).astype(np.int64), width - cw)
    top = np.where(found, top, (height - ch) // 2)
    left = np.where(found, left, (width - cw) // 2)
    return np.stack([left, top, left + cw, top + ch], axis=1).astype(np.int64)


class MultiCropAugmentation:
    """``G`` global and ``L`` local crops per image, as uint8, following a :class:`CropsConfig`."""

    def __init__(self, crops: CropsConfig, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 torch_threads: Optional[int] = 1) -> None:
        """``torch_threads``: intra-op threads for the torch kernels while rendering (the process-wide setting is
        restored afterwards, so concurrent renders in threads of one process should pass ``None``). The default 1 is
        right for one augmenting process per core (the Ray actor pool): these per-crop operations are far too small
        to gain from threads, and on a busy machine idle-spinning worker threads make them several times slower.
        ``chunk_bytes``: float32 working set per processing chunk (see ``_render_group``)."""
        c = crops
        self.cfg = c
        self.chunk_bytes = int(chunk_bytes)
        self.torch_threads = torch_threads
        self.n_global = int(c.global_crops_number)
        self.n_local = int(c.local_crops_number)
        if self.n_global < 1 or self.n_local < 0:
            raise ValueError(f"need >= 1 global and >= 0 local crops, got {self.n_global} and {self.n_local}")
        self.global_size = int(c.global_crops_size)
        self.local_size = int(c.local_crops_size)
        if self.global_size < 1 or self.local_size < 1:
            raise ValueError(f"crop sizes must be positive, got {self.global_size} and {self.local_size}")
        for name in ("global_crops_scale", "local_crops_scale"):
            lo, hi = getattr(c, name)
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"crops.{name} must satisfy 0 < min <= max <= 1, got {(lo, hi)}")
        if not 0 < c.crop_ratio[0] <= c.crop_ratio[1]:
            raise ValueError(f"crops.crop_ratio must satisfy 0 < min <= max, got {c.crop_ratio}")
        if not 0 < c.blur_sigma[0] <= c.blur_sigma[1]:
            raise ValueError(f"crops.blur_sigma must satisfy 0 < min <= max, got {c.blur_sigma}")
        if not 0 <= c.hue <= 0.5:
            raise ValueError(f"crops.hue must be in [0, 0.5], got {c.hue}")
        n = self.n_global + self.n_local
        self.n_crops = n
        self.sizes = np.array([self.global_size] * self.n_global + [self.local_size] * self.n_local)
        self.scales = np.array([c.global_crops_scale] * self.n_global + [c.local_crops_scale] * self.n_local,
                               dtype=np.float64).reshape(n, 2)

        def per_global(values: Sequence[float], name: str) -> list[float]:
            if len(values) < 1:
                raise ValueError(f"crops.{name} needs at least one probability")
            return [float(values[min(i, len(values) - 1)]) for i in range(self.n_global)]

        self.blur_p = np.array(per_global(c.global_blur_p, "global_blur_p") + [c.local_blur_p] * self.n_local)
        self.solarize_p = np.array(per_global(c.global_solarize_p, "global_solarize_p") + [0.0] * self.n_local)
        for name, p in (("flip_p", c.flip_p), ("color_jitter_p", c.color_jitter_p), ("grayscale_p", c.grayscale_p)):
            if not 0 <= p <= 1:
                raise ValueError(f"crops.{name} must be a probability in [0, 1], got {p}")
        if np.any(self.blur_p < 0) or np.any(self.blur_p > 1) or np.any(self.solarize_p < 0) \
                or np.any(self.solarize_p > 1):
            raise ValueError(f"blur/solarize probabilities must be in [0, 1]: blur {self.blur_p.tolist()}, "
                             f"solarize {self.solarize_p.tolist()}")
        b_lo, b_hi = _range(c.brightness, "brightness")
        c_lo, c_hi = _range(c.contrast, "contrast")
        s_lo, s_hi = _range(c.saturation, "saturation")
        self._factor_lo = np.array([b_lo, c_lo, s_lo, -c.hue])
        self._factor_hi = np.array([b_hi, c_hi, s_hi, c.hue])
        # torchvision skips an operation whose parameter is 0 (its factor range is the identity).
        self._op_enabled = np.array([c.brightness > 0, c.contrast > 0, c.saturation > 0, c.hue > 0])

    # ---- random parameters ---------------------------------------------------------------------------

    def sample_boxes(self, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
        """RandomResizedCrop boxes ``(x0, y0, x1, y1)`` for the G global then L local crops: (G+L, 4) int64."""
        return rrc_boxes(width, height, self.scales, self.cfg.crop_ratio, rng)

    def sample_params(self, width: int, height: int, rng: np.random.Generator) -> CropParams:
        """All random choices for one image of size ``width`` x ``height`` (boxes first, then per-crop draws)."""
        boxes = self.sample_boxes(width, height, rng)
        n = self.n_crops
        u = rng.random((n, 6))
        factors = self._factor_lo + (self._factor_hi - self._factor_lo) * rng.random((n, 4))
        order = np.argsort(rng.random((n, 4)), axis=1)
        c = self.cfg
        s_lo, s_hi = c.blur_sigma
        return CropParams(
            size=(int(width), int(height)),
            boxes=boxes,
            flip=u[:, 0] < c.flip_p,
            jitter=u[:, 1] < c.color_jitter_p,
            order=order,
            factors=factors,
            gray=u[:, 2] < c.grayscale_p,
            blur=u[:, 3] < self.blur_p,
            sigma=s_lo + (s_hi - s_lo) * u[:, 4],
            solarize=u[:, 5] < self.solarize_p,
        )

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_local", None)  # per-thread scratch buffers: not picklable, rebuilt on demand
        return state

    # ---- rendering -------------------------------------------------------------------------------------

    def _workspace(self, chunk: int, size: int) -> np.ndarray:
        """The float32 chunk buffer for crops of ``size``, kept between calls (a fresh multi-MB array would be
        paged in again on every call); one per thread, so concurrent calls never share it."""
        local = self.__dict__.setdefault("_local", threading.local())
        ws = getattr(local, "buffers", None)
        if ws is None:
            ws = local.buffers = {}
        buf = ws.get(size)
        if buf is None or buf.shape[0] < chunk:
            buf = ws[size] = np.empty((chunk, 3, size, size), dtype=np.float32)
        return buf[:chunk]

    def __call__(self, images: list[np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Crops of each (H, W, 3) uint8 image, parameters drawn from ``rng`` image by image.

        Returns ``{"global_crops": (B, G, 3, S, S) uint8, "local_crops": (B, L, 3, s, s) uint8}``.
        """
        params = []
        for i, img in enumerate(images):
            _check_image(img, i)
            params.append(self.sample_params(img.shape[1], img.shape[0], rng))
        return self.render(images, params)

    def render(self, images: Sequence[np.ndarray], params: Sequence[CropParams]) -> dict[str, np.ndarray]:
        """Apply sampled parameters. An image may be a reduced decode of the one the boxes were drawn for
        (``params.size``): boxes are scaled to its actual size."""
        if len(images) != len(params):
            raise ValueError(f"{len(images)} images but {len(params)} parameter sets")
        b, g, lc = len(images), self.n_global, self.n_local
        out = {
            "global_crops": np.empty((b, g, 3, self.global_size, self.global_size), np.uint8),
            "local_crops": np.empty((b, lc, 3, self.local_size, self.local_size), np.uint8),
        }
        if b == 0:
            return out
        for i, img in enumerate(images):
            _check_image(img, i)
        with _torch_threads(self.torch_threads):
            for key, sl, size in (("global_crops", slice(0, g), self.global_size),
                                  ("local_crops", slice(g, g + lc), self.local_size)):
                if sl.stop - sl.start == 0:
                    continue
                self._render_group(images, params, sl, size, out[key].reshape(-1, 3, size, size))
        return out

    def _render_group(self, images: Sequence[np.ndarray], params: Sequence[CropParams], sl: slice, size: int,
                      out: np.ndarray) -> None:
        """Crops ``sl`` of every image, all of side ``size``, into ``out`` ((B * n, 3, size, size) uint8).

        Crops with nothing but crop + flip go straight to ``out``; the others go through float32 chunks of about
        :attr:`chunk_bytes` (measured on one core: ~1 MB chunks, which stay in L2, lose more to per-call overhead
        than they gain in cache hits; much beyond 6 MB the memory traffic costs more).
        """

        def cat(name: str) -> np.ndarray:
            return np.concatenate([getattr(p, name)[sl] for p in params])

        flip, jitter, gray, blur, solar = cat("flip"), cat("jitter"), cat("gray"), cat("blur"), cat("solarize")
        order, factors = cat("order"), cat("factors")
        n = len(flip)
        kernels = np.zeros((n, 1))
        radius = np.zeros(n, dtype=np.int64)
        if blur.any():
            kernels, radius = blur_kernels(cat("sigma"))
        sources = []  # (source tensor, box) per crop
        for img, p in zip(images, params):
            src = _as_tensor(img).permute(2, 0, 1).unsqueeze(0)  # (1, 3, H, W) view, channels-last strides
            for box in _scale_boxes(p.boxes[sl], p.size, (img.shape[1], img.shape[0])).tolist():
                sources.append((src, box))

        def resized(k: int) -> torch.Tensor:
            """Crop k resized (and flipped): (3, size, size) uint8."""
            src, (x0, y0, x1, y1) = sources[k]
            # A dense copy of the box first: torch's fast uint8 kernel wants a contiguous channels-last input,
            # and takes a path 1.2-2.5x slower on a strided view of the whole image. The flip is done on the
            # (smaller) result.
            box = src[:, :, y0:y1, x0:x1].contiguous(memory_format=torch.channels_last)
            crop = _resize_aa(box, size)[0]
            return crop.flip(-1) if flip[k] else crop

        out_t = torch.from_numpy(out)
        needs_float = jitter | gray | blur | solar
        for k in np.flatnonzero(~needs_float).tolist():  # nothing but crop + flip: straight into the output
            out_t[k].copy_(resized(k))
        work = np.flatnonzero(needs_float)
        if not work.size:
            return
        # Crops sorted by their jitter order (no jitter first): see the jitter loop below.
        perm_code = order[work] @ np.array([64, 16, 4, 1])
        work = work[np.argsort(np.where(jitter[work], perm_code, -1), kind="stable")]
        chunk = max(1, min(len(work), int(self.chunk_bytes // (3 * size * size * 4))))
        chunk = -(-len(work) // -(-len(work) // chunk))  # equal chunks (32 crops by 10: 11, 11, 10, not 10, 10, 10, 2)
        buf = self._workspace(chunk, size)
        threshold = float(self.cfg.solarize_threshold)
        for start in range(0, len(work), chunk):
            ks = work[start: start + chunk]  # the crops of this chunk, in the order they sit in the buffer
            x = buf[: len(ks)]
            xt = torch.from_numpy(x)
            for j, k in enumerate(ks.tolist()):
                xt[j].copy_(resized(k))
            # Colour jitter, slot by slot. The work list is sorted by each crop's order of operations, so in slots
            # 0 and 1 (and in every slot of a small chunk) the crops doing the same operation form a few contiguous
            # runs, processed in place as views; where a slot splits into many runs, each operation runs once on
            # its crops gathered and scattered back instead.
            code = np.where(jitter[ks, None], order[ks], -1)
            for slot in range(4):
                col = code[:, slot]
                starts = [0] + (np.flatnonzero(col[1:] != col[:-1]) + 1).tolist()
                if len(starts) <= _MAX_RUNS:
                    for lo, hi in zip(starts, starts[1:] + [len(col)]):
                        op = int(col[lo])
                        if op >= 0 and self._op_enabled[op]:
                            _JITTER_OPS[op](x[lo:hi], factors[ks[lo:hi], op])
                    continue
                for op in np.unique(col).tolist():
                    if op >= 0 and self._op_enabled[op]:
                        idx = np.flatnonzero(col == op)
                        _apply_subset(x, idx, _JITTER_OPS[op], factors[ks[idx], op])
            idx = np.flatnonzero(gray[ks])
            if idx.size:
                _apply_subset(x, idx, grayscale, None)
            idx = np.flatnonzero(blur[ks])
            if idx.size:
                rad = radius[ks[idx]]
                for r in np.unique(rad).tolist():  # one pass per kernel length: short kernels skip the long taps
                    sub = idx[rad == r]
                    k = kernels[ks[sub]]
                    half = (k.shape[1] - 1) // 2
                    blur_subset_(x, sub, k[:, half - r: half + r + 1])
            np.rint(x, out=x)
            idx = np.flatnonzero(solar[ks])
            if idx.size:
                _apply_subset(x, idx, solarize, threshold)
            if len(ks) == 1 or np.all(np.diff(ks) == 1):  # a run of consecutive crops, in order
                np.copyto(out[ks[0]: ks[-1] + 1], x, casting="unsafe")
            else:
                out[ks] = x


# ---- helpers ------------------------------------------------------------------------------------------


def _resize_aa(box: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased bicubic resize of a (1, 3, h, w) uint8 tensor to (1, 3, size, size): F.interpolate's kernel,
    called directly when this torch exposes it (the Python wrapper's checks cost ~5 us a call, 12 calls an image)."""
    if _AA_BICUBIC is not None:
        return _AA_BICUBIC(box, [size, size], False)
    return F.interpolate(box, size=(size, size), mode="bicubic", antialias=True, align_corners=False)


_AA_BICUBIC = getattr(torch._C._nn, "_upsample_bicubic2d_aa", None)


@contextmanager
def _torch_threads(n: Optional[int]) -> Iterator[None]:
    """Run a block with ``n`` torch intra-op threads, restoring the previous count (no-op for None)."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    if before != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if before != n:
            torch.set_num_threads(before)


def _check_image(img: np.ndarray, i: int) -> None:
    if not isinstance(img, np.ndarray) or img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        desc = f"{img.dtype} {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
        raise ValueError(f"image {i}: expected an (H, W, 3) uint8 array, got {desc}")
    if img.shape[0] < 1 or img.shape[1] < 1:
        raise ValueError(f"image {i}: empty image of shape {img.shape}")


def _as_tensor(img: np.ndarray) -> torch.Tensor:
    """A torch view of a numpy image. Arrays decoded by PIL are read-only and torch warns about those; we only
    read from the view, so the warning is silenced instead of paying for a copy."""
    if img.flags.writeable:
        return torch.from_numpy(img)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(img)


def _scale_boxes(boxes: np.ndarray, size: tuple[int, int], actual: tuple[int, int]) -> np.ndarray:
    """Map boxes drawn for an image of ``size`` onto the same image decoded at ``actual`` (both (W, H))."""
    if tuple(size) == tuple(actual):
        return boxes
    sx, sy = actual[0] / size[0], actual[1] / size[1]
    b = np.rint(boxes * np.array([sx, sy, sx, sy])).astype(np.int64)
    aw, ah = actual
    b[:, 0] = np.clip(b[:, 0], 0, aw - 1)
    b[:, 1] = np.clip(b[:, 1], 0, ah - 1)
    b[:, 2] = np.clip(np.maximum(b[:, 2], b[:, 0] + 1), 1, aw)
    b[:, 3] = np.clip(np.maximum(b[:, 3], b[:, 1] + 1), 1, ah)
    return b


def _apply_subset(x: np.ndarray, idx: np.ndarray, fn, arg) -> None:
    """``x[idx] = fn(x[idx], arg)`` for the crops ``idx`` of a chunk (the gather is skipped when idx is all)."""
    if idx.size == x.shape[0]:
        res = fn(x, arg)
        if res is not x:
            x[...] = res
        return
    x[idx] = fn(x[idx], arg)


def _bcast(v: np.ndarray) -> torch.Tensor:
    """Per-crop values as a (n, 1, 1, 1) float32 tensor that broadcasts over (n, C, H, W)."""
    return torch.from_numpy(np.asarray(v, dtype=np.float32).reshape(-1, 1, 1, 1))


def _luma_t(xt: torch.Tensor) -> torch.Tensor:
    g = torch.mul(xt[:, 0:1], _LUMA[0])
    g.add_(xt[:, 1:2], alpha=_LUMA[1])
    return g.add_(xt[:, 2:3], alpha=_LUMA[2])


def luma(x: np.ndarray) -> np.ndarray:
    """(n, 3, H, W) float32 -> (n, 1, H, W) ITU-R 601-2 luma (PIL's ``convert("L")`` weights)."""
    return _luma_t(torch.from_numpy(x)).numpy()


# The colour operations below work in place on (n, 3, H, W) float32 numpy arrays holding 0..255, with one factor
# per crop, and return the array. Each is a few passes of torch's fused kernels (lerp, addcmul, clamp) through a
# shared-memory view; numpy is used where it is faster (comparisons, bool masks).


def adjust_brightness(x: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """``x * factor`` (factor >= 0), clamped to 255 (only needed when some factor exceeds 1)."""
    f = np.asarray(factor, dtype=np.float64)
    torch.from_numpy(x).mul_(_bcast(f))
    if np.any(f > 1):
        torch.from_numpy(x).clamp_(max=255.0)
    return x


def adjust_contrast(x: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """Blend each crop with its mean luma, ``mean + factor * (x - mean)``, clamped to [0, 255] (a factor <= 1
    blends towards a value inside the range, so the clamp is skipped when no factor exceeds 1)."""
    xt = torch.from_numpy(x)
    mean = xt.mean(dim=(2, 3)).double().numpy() @ np.array(_LUMA)  # (n,)
    f = np.asarray(factor, dtype=np.float64)
    # (torch's lerp_/addcmul_ with two broadcast operands take a slow path: two single-broadcast passes instead)
    xt.mul_(_bcast(f)).add_(_bcast((1.0 - f) * mean))
    if np.any(f > 1):
        xt.clamp_(0.0, 255.0)
    return x


def adjust_saturation(x: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """Blend each crop with its greyscale image, ``gray + factor * (x - gray)``, clamped to [0, 255] (only needed
    when some factor exceeds 1)."""
    xt = torch.from_numpy(x)
    g = _luma_t(xt)
    f = np.asarray(factor, dtype=np.float64)
    xt.lerp_(g.expand_as(xt), _bcast(1.0 - f))
    if np.any(f > 1):
        xt.clamp_(0.0, 255.0)
    return x


def adjust_hue(x: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Rotate the HSV hue of every pixel by ``shift`` turns (per crop, in [-0.5, 0.5]); S and V are kept.

    With ``M``/``m`` the max/min channel and ``C = M - m``, a pixel of hue ``h`` (in sextants, [0, 6)) is
    ``m + C * k_c(h)`` per channel with the hexcone ramps ``k_r = clamp(|h - 3| - 1)``, ``k_g = clamp(2 - |h - 2|)``,
    ``k_b = clamp(2 - |h - 4|)``, so only ``h`` changes. About 40 passes over the crop planes, with no
    ``where``/``remainder`` (several times slower than arithmetic on one core).
    """
    n = x.shape[0]
    block = _HUE_BLOCK_BYTES
    per = max(1, block // max(1, x[0].nbytes))
    if n > per:  # ~40 passes: keep each block's planes and temporaries in cache
        for i in range(0, n, per):
            adjust_hue(x[i: i + per], np.asarray(shift)[i: i + per])
        return x
    rows = x.shape[2]
    band = max(1, rows * block // max(1, x.nbytes))
    if band < rows:  # one crop larger than a block: bands of rows (the operation is per pixel)
        for i in range(0, rows, band):
            adjust_hue(x[:, :, i: i + band], shift)
        return x
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    mx = np.maximum(r, g)
    np.maximum(mx, b, out=mx)
    mn = np.minimum(r, g)
    np.minimum(mn, b, out=mn)
    c = mx - mn
    is_r = np.equal(mx, r)
    is_g = np.equal(mx, g)
    np.greater(is_g, is_r, out=is_g)  # green is the max and red is not
    # h * C: (r - g) + 4C where blue is the max, (b - r) + 2C where green is, (g - b) where red is.
    h = r - g
    ht, ct = torch.from_numpy(h), torch.from_numpy(c)
    ht.add_(ct, alpha=4.0)
    t = b - r
    tt = torch.from_numpy(t)
    tt.add_(ct, alpha=2.0).sub_(ht)
    np.multiply(t, is_g, out=t)
    ht.add_(tt)
    np.subtract(g, b, out=t)
    tt.sub_(ht)
    np.multiply(t, is_r, out=t)
    ht.add_(tt)
    ht.div_(ct.clamp(min=1e-6))  # C == 0 (grey): the numerator is 0, and the output is m whatever h is
    d = 6.0 * np.asarray(shift, dtype=np.float64)  # in sextants
    ht.add_(float(d[0]) if len(d) == 1 else _bcast(d).view(-1, 1, 1))  # (same float32 sum either way)
    if np.all(np.abs(d) <= 1.0):  # h was in [-1, 5): now in [-2, 6), only negatives need wrapping
        ht.add_(torch.from_numpy(np.less(h, 0.0)), alpha=6.0)
    else:  # wrap into [0, 6)
        torch.mul(ht, 1.0 / 6.0, out=tt).floor_()
        ht.sub_(tt, alpha=6.0)
    mnt = torch.from_numpy(mn)
    xt = torch.from_numpy(x)
    torch.sub(ht, 3.0, out=tt).abs_().sub_(1.0).clamp_(0.0, 1.0)  # k_r
    torch.addcmul(mnt, tt, ct, out=xt[:, 0])
    torch.sub(ht, 2.0, out=tt).abs_().sub_(2.0).clamp_(-1.0, 0.0)  # -k_g
    torch.addcmul(mnt, tt, ct, value=-1.0, out=xt[:, 1])
    torch.sub(ht, 4.0, out=tt).abs_().sub_(2.0).clamp_(-1.0, 0.0)  # -k_b
    torch.addcmul(mnt, tt, ct, value=-1.0, out=xt[:, 2])
    return x


def grayscale(x: np.ndarray, _arg=None) -> np.ndarray:
    """In place: every channel set to the luma (3-channel greyscale)."""
    xt = torch.from_numpy(x)
    xt.copy_(_luma_t(xt).expand_as(xt))
    return x


def solarize(x: np.ndarray, threshold: float) -> np.ndarray:
    """In place: ``255 - x`` where ``x >= threshold`` (PIL's ``ImageOps.solarize``; applied to rounded values)."""
    np.subtract(np.float32(255), x, out=x, where=x >= threshold)
    return x


def box_blur_radius(sigma: float, passes: int = 3) -> float:
    """The extended-box radius whose ``passes``-fold repetition has variance ``sigma**2`` (PIL's GaussianBlur,
    after Gwosdek et al. 2011): integer part ``l`` plus fractional end weight ``a``."""
    s2 = sigma * sigma / passes
    big_l = math.sqrt(12.0 * s2 + 1.0)
    lo = math.floor((big_l - 1.0) / 2.0)
    a = (2 * lo + 1) * (lo * (lo + 1) - 3 * s2) / (6 * (s2 - (lo + 1) * (lo + 1)))
    return lo + a


def blur_kernels(sigma: np.ndarray, passes: int = 3, tol: float = BLUR_TAIL) -> tuple[np.ndarray, np.ndarray]:
    """1-D kernels of PIL's ``GaussianBlur(radius=sigma)``, one row per sigma, and their effective radii.

    PIL repeats ``passes`` extended box filters (weight ``w`` within the integer radius ``l``, ``a * w`` at
    ``l + 1``; see :func:`box_blur_radius`); their convolution has variance ``sigma**2`` (a sampled Gaussian's
    is much less for sigma < 1). Rows are centred in a common odd length ``2R + 1``; ``radii[i]`` is the radius
    left after cutting tails whose total weight is below ``tol`` (row ``i`` renormalised on that support).
    """
    sig = np.asarray(sigma, dtype=np.float64).reshape(-1)
    if np.any(sig <= 0):
        raise ValueError(f"blur sigma must be positive, got {sig.tolist()}")
    s2 = sig * sig / passes
    lo = np.floor((np.sqrt(12.0 * s2 + 1.0) - 1.0) / 2.0)
    a = (2 * lo + 1) * (lo * (lo + 1) - 3 * s2) / (6 * (s2 - (lo + 1) ** 2))
    w = 1.0 / (2 * (lo + a) + 1)
    big = int(lo.max()) + 1
    t = np.abs(np.arange(-big, big + 1))[None, :]
    box = np.where(t <= lo[:, None], w[:, None], np.where(t == lo[:, None] + 1, (a * w)[:, None], 0.0))
    k = box
    for _ in range(passes - 1):
        nxt = np.zeros((len(sig), k.shape[1] + box.shape[1] - 1))
        for j in range(box.shape[1]):
            nxt[:, j: j + k.shape[1]] += box[:, j: j + 1] * k
        k = nxt
    half = (k.shape[1] - 1) // 2
    tail = 2 * np.cumsum(k[:, :half], axis=1)  # weight outside radius half - j - 1 ... per side, both sides
    cut = (tail < tol).sum(axis=1)
    radii = half - cut
    keep = np.abs(np.arange(-half, half + 1))[None, :] <= radii[:, None]
    k = np.where(keep, k, 0.0)
    return k / k.sum(axis=1, keepdims=True), radii.astype(np.int64)


def blur_kernel(sigma: float, passes: int = 3, tol: float = BLUR_TAIL) -> np.ndarray:
    """The kernel of :func:`blur_kernels` for one sigma, trimmed to its radius."""
    k, r = blur_kernels(np.array([sigma]), passes, tol)
    half = (k.shape[1] - 1) // 2
    return k[0, half - r[0]: half + r[0] + 1]


def blur_subset_(x: np.ndarray, idx: np.ndarray, kernels: np.ndarray) -> None:
    """In place: blur crops ``idx`` of (n, C, H, W) float32 ``x``, each with its own odd, symmetric 1-D kernel
    (rows of (len(idx), 2R + 1)), horizontally then vertically, edges replicated (as PIL's box blur).

    The crops are copied straight into a horizontally padded buffer, the horizontal pass writes into the middle of
    a vertically padded one, and the vertical pass writes back into ``x`` (directly when ``idx`` is a run): no
    separate gather, pad and scatter copies. Each tap is one fused multiply-add pass (torch ``addcmul_`` with
    per-crop weights; the same arithmetic whatever the number of crops, so results do not depend on grouping).
    """
    m = len(idx)
    _, c, hgt, wid = x.shape
    k = np.asarray(kernels, dtype=np.float64).reshape(m, -1)
    r = (k.shape[1] - 1) // 2
    run = m > 0 and int(idx[-1]) - int(idx[0]) == m - 1 and bool(np.all(np.diff(idx) == 1))
    if r == 0:
        x[idx] = x[idx] * k[:, :1].astype(np.float32).reshape(m, 1, 1, 1)
        return
    hp = np.empty((m, c, hgt, wid + 2 * r), dtype=np.float32)
    if run:
        hp[..., r: r + wid] = x[idx[0]: idx[-1] + 1]
    else:
        for j, i in enumerate(idx.tolist()):
            hp[j, ..., r: r + wid] = x[i]
    hp[..., :r] = hp[..., r: r + 1]
    hp[..., r + wid:] = hp[..., r + wid - 1: r + wid]
    vp = torch.empty((m, c, hgt + 2 * r, wid), dtype=torch.float32)
    kt = torch.from_numpy(k.astype(np.float32)).view(m, -1, 1, 1, 1)

    def taps(src: torch.Tensor, axis: int, length: int, out: torch.Tensor) -> None:
        torch.mul(src.narrow(axis, 0, length), kt[:, 0], out=out)
        for j in range(1, 2 * r + 1):
            out.addcmul_(src.narrow(axis, j, length), kt[:, j])

    taps(torch.from_numpy(hp), 3, wid, vp[:, :, r: r + hgt])
    vp[:, :, :r] = vp[:, :, r: r + 1]
    vp[:, :, r + hgt:] = vp[:, :, r + hgt - 1: r + hgt]
    if run:
        taps(vp, 2, hgt, torch.from_numpy(x)[int(idx[0]): int(idx[-1]) + 1])
    else:
        out = torch.empty((m, c, hgt, wid), dtype=torch.float32)
        taps(vp, 2, hgt, out)
        x[idx] = out.numpy()


def gaussian_blur(x: np.ndarray, kernels: np.ndarray) -> np.ndarray:
    """A blurred copy of (n, C, H, W) float32 ``x``, crop ``i`` with kernel row ``i`` (see :func:`blur_subset_`)."""
    y = np.array(x, dtype=np.float32, copy=True)
    blur_subset_(y, np.arange(len(y)), kernels)
    return y


_JITTER_OPS = {BRIGHTNESS: adjust_brightness, CONTRAST: adjust_contrast, SATURATION: adjust_saturation,
               HUE: adjust_hue}

__all__ = [
    "CropParams",
    "MultiCropAugmentation",
    "rrc_boxes",
    "luma",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_saturation",
    "adjust_hue",
    "grayscale",
    "solarize",
    "box_blur_radius",
    "blur_kernel",
    "blur_kernels",
    "DEFAULT_CHUNK_BYTES",
    "gaussian_blur",
    "blur_subset_",
    "BRIGHTNESS",
    "CONTRAST",
    "SATURATION",
    "HUE",
]
