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

How it is fast (same distribution as the PIL/torchvision pipeline, not bit-identical; ~6x less CPU per image):
* every random number of an image is drawn up front (:meth:`MultiCropAugmentation.sample_params`), so the crop boxes
  are known before decoding (the caller can pick a reduced JPEG decode scale);
* crop + resize in one antialiased bicubic resample of a dense copy of the box (torch's uint8 kernel, which
  reproduces PIL's filter to within +-3 levels and runs ~4x faster than PIL on one core);
* flip, colour jitter, greyscale, blur, rounding and solarisation in one compiled call per crop
  (:mod:`ibot_ray.crop_kernels`): float32 row loops that stay in cache, 2-5 passes over the crop in all;
* the blur applies, as one separable kernel, exactly the filter PIL's ``GaussianBlur(radius=sigma)`` uses (three
  extended box filters of variance sigma^2 / 3, see :func:`blur_kernels`), edges replicated.
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

from ibot_ray import crop_kernels
from ibot_ray.config import AUTO, CropsConfig
from ibot_ray.crop_kernels import BRIGHTNESS, CONTRAST, HUE, SATURATION  # the columns of CropParams.factors
from ibot_ray.recipe import blur_sigma_for

RRC_TRIES = 10
BLUR_TAIL = 1e-3  # kernel tails lighter than this are cut (at most 0.26 grey levels on a 0/255 step edge)
_NO_BLUR = np.ones(1, dtype=np.float32)  # the kernel of a crop that draws no blur


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

    def __init__(self, crops: CropsConfig, *, torch_threads: Optional[int] = 1) -> None:
        """``torch_threads``: intra-op threads for torch's resize while rendering (the process-wide setting is
        restored afterwards, so concurrent renders in threads of one process should pass ``None``). The default 1 is
        right for one augmenting process per core (the Ray actor pool): one crop's resize is far too small to gain
        from threads, and on a busy machine idle-spinning worker threads make it several times slower."""
        c = crops
        self.cfg = c
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
        self.blur_sigma = blur_sigma_for(c.global_crops_size) if c.blur_sigma == AUTO else tuple(c.blur_sigma)
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
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
        s_lo, s_hi = self.blur_sigma
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

    def _scratch(self, size: int, kernel_len: int) -> np.ndarray:
        """float32 scratch for :func:`~ibot_ray.crop_kernels.render_crop`, kept between calls (a fresh array
        would be paged in again every time); one per thread, so concurrent renders never share it."""
        local = self.__dict__.setdefault("_local", threading.local())
        need = crop_kernels.scratch_size(size, kernel_len)
        buf = getattr(local, "scratch", None)
        if buf is None or buf.shape[0] < need:
            buf = local.scratch = np.empty(need, dtype=np.float32)
        return buf

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
        """Crops ``sl`` of every image, all of side ``size``, into ``out`` ((B * n, 3, size, size) uint8): per
        crop, torch's resize of the box, then everything else in one compiled call (:mod:`ibot_ray.crop_kernels`).
        """

        def cat(name: str) -> np.ndarray:
            return np.concatenate([getattr(p, name)[sl] for p in params])

        flip, jitter, gray, blur, solar = cat("flip"), cat("jitter"), cat("gray"), cat("blur"), cat("solarize")
        order, factors = cat("order"), cat("factors")
        # The operations each crop runs, in its drawn order; -1 = skipped (no jitter, or a disabled operation).
        order = np.where(jitter[:, None] & self._op_enabled[order], order, -1).astype(np.int64)
        factors = np.ascontiguousarray(factors, dtype=np.float64)
        kernels = [_NO_BLUR] * len(flip)
        if blur.any():
            idx = np.flatnonzero(blur)
            rows, radii = blur_kernels(cat("sigma")[idx])
            half = (rows.shape[1] - 1) // 2
            for j, k, r in zip(idx.tolist(), rows.astype(np.float32), radii.tolist()):
                kernels[j] = np.ascontiguousarray(k[half - r: half + r + 1])
        scratch = self._scratch(size, max(len(k) for k in kernels))
        threshold = float(self.cfg.solarize_threshold)
        k = 0
        for img, p in zip(images, params):
            src = _as_tensor(img).permute(2, 0, 1).unsqueeze(0)  # (1, 3, H, W) view, channels-last strides
            for x0, y0, x1, y1 in _scale_boxes(p.boxes[sl], p.size, (img.shape[1], img.shape[0])).tolist():
                # A dense copy of the box first: torch's fast uint8 kernel wants a contiguous channels-last input,
                # and takes a path 1.2-2.5x slower on a strided view of the whole image. Its output is
                # channels-last too, i.e. an (S, S, 3) array.
                box = src[:, :, y0:y1, x0:x1].contiguous(memory_format=torch.channels_last)
                resized = _resize_aa(box, size)[0].permute(1, 2, 0).numpy()
                crop_kernels.render_crop(resized, bool(flip[k]), out[k], order[k], factors[k], bool(gray[k]),
                                         kernels[k], bool(solar[k]), threshold, scratch)
                k += 1


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


# Batch versions of the colour operations, for (n, 3, H, W) float32 arrays holding 0..255 with one factor per
# crop, in place (they run the same compiled row kernels as the render path, one crop at a time).


def _jitter_each(x: np.ndarray, op: int, factor: np.ndarray) -> np.ndarray:
    x = _check_float_crops(x)
    f = np.broadcast_to(np.asarray(factor, dtype=np.float64).reshape(-1), (x.shape[0],))
    order = np.array([op, -1, -1, -1], dtype=np.int64)
    factors = np.zeros(4)
    for i in range(x.shape[0]):
        factors[op] = f[i]
        crop_kernels.jitter_(x[i], order, factors, False)
    return x


def _check_float_crops(x: np.ndarray) -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 4 or x.shape[1] != 3 \
            or not x.flags.c_contiguous:
        desc = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise ValueError(f"expected a C-contiguous (n, 3, H, W) float32 array, got {desc}")
    return x


def adjust_brightness(x: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """In place: ``x * factor`` (factor >= 0), clamped to [0, 255]."""
    return _jitter_each(x, BRIGHTNESS, factor)


def adjust_contrast(x: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """In place: blend each crop with its mean luma, ``mean + factor * (x - mean)``, clamped to [0, 255]."""
    return _jitter_each(x, CONTRAST, factor)


def adjust_saturation(x: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """In place: blend each pixel with its luma, ``gray + factor * (x - gray)``, clamped to [0, 255]."""
    return _jitter_each(x, SATURATION, factor)


def adjust_hue(x: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """In place: rotate the HSV hue of every pixel by ``shift`` turns (per crop, in [-0.5, 0.5]); S and V kept."""
    return _jitter_each(x, HUE, shift)


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


def gaussian_blur(x: np.ndarray, kernels: np.ndarray) -> np.ndarray:
    """A blurred copy of (n, 3, H, W) float32 ``x``, crop ``i`` with the odd symmetric 1-D kernel row ``i``,
    horizontally then vertically, edges replicated (as PIL's box blur); unrounded."""
    x = _check_float_crops(np.ascontiguousarray(x, dtype=np.float32))
    k = np.asarray(kernels, dtype=np.float32).reshape(x.shape[0], -1)
    if k.shape[1] % 2 != 1:
        raise ValueError(f"blur kernels must have an odd length, got {k.shape[1]}")
    y = np.empty_like(x)
    tmp = np.empty(x.shape[1:], dtype=np.float32)
    pad = np.empty(x.shape[3] + k.shape[1], dtype=np.float32)
    for i in range(x.shape[0]):
        crop_kernels.blur_rows_(x[i], k[i], tmp, pad)
        crop_kernels.blur_cols_(tmp, k[i], y[i])
    return y

__all__ = [
    "CropParams",
    "MultiCropAugmentation",
    "rrc_boxes",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_saturation",
    "adjust_hue",
    "box_blur_radius",
    "blur_kernel",
    "blur_kernels",
    "gaussian_blur",
    "BRIGHTNESS",
    "CONTRAST",
    "SATURATION",
    "HUE",
]
