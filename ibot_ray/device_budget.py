"""What one GPU holds: the largest micro-batch the real training step fits in its memory, measured.

``pipelines/cluster_plan.py`` plans ``optim.micro_batch_size`` from ``train.images_per_device``, which it estimates
from the model and the GPU's memory when unset. :func:`measure_images_per_device` measures it instead, on the card:
it runs the real step (:class:`~ibot_ray.step.IBOTStep`, eager, the config's precision, the recipe's masks) on
growing batches of synthetic crops, doubling until one runs out of memory and then bisecting, each try on a fresh
model with the memory freed in between, and fits the peak memory as ``fixed + per_image * images``.
``benchmarks/gpu_check.sh`` prints it beside the planner's estimate. A CUDA device only: a CPU has no such limit.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Optional

import numpy as np
import torch

from ibot_ray.config import IBOTConfig, replace
from ibot_ray.masking import MaskGenerator


def synthetic_batch(cfg: IBOTConfig, images: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A host batch as the data stream delivers it: random uint8 crops of the config's sizes and the recipe's masks
    (the project's own :class:`MaskGenerator`, so the masked share is what training sees)."""
    c = cfg.crops
    h = c.global_crops_size // cfg.patch_size
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    masks = MaskGenerator(cfg.masking, (h, h))
    return {
        "global_crops": torch.randint(0, 256, (images, c.global_crops_number, 3, c.global_crops_size,
                                               c.global_crops_size), dtype=torch.uint8, generator=g),
        "local_crops": torch.randint(0, 256, (images, c.local_crops_number, 3, c.local_crops_size,
                                              c.local_crops_size), dtype=torch.uint8, generator=g),
        "masks": torch.from_numpy(np.stack([masks(c.global_crops_number, cfg.masking.start_epoch, rng)
                                            for _ in range(images)])),
    }


def largest_fitting(fits: Callable[[int], bool], *, start: int = 16, limit: int = 4096) -> int:
    """The largest ``n`` in [1, ``limit``] with ``fits(n)``, for a ``fits`` that holds up to some size and not above:
    doubling from ``start`` until it fails, then bisecting. 0 when not even one fits."""
    lo, hi = 0, None  # fits(lo) holds (0 trivially); fits(hi) does not
    n = max(1, min(start, limit))
    while hi is None:
        if fits(n):
            lo = n
            if n >= limit:
                return n
            n = min(2 * n, limit)
        else:
            hi = n
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def step_peak_bytes(cfg: IBOTConfig, images: int, device: torch.device) -> Optional[int]:
    """Peak memory allocated on ``device`` over two steps on ``images`` images in one pass (the second step holds
    AdamW's moments too), or None when they do not fit."""
    from ibot_ray.model import build_student_teacher
    from ibot_ray.step import IBOTStep

    cfg = replace(cfg, optim={"micro_batch_size": 0, "batch_size": max(images, cfg.optim.batch_size)},
                  train={"compile": "false"})
    student = teacher = runner = batch = None
    _free(device)
    try:
        student, teacher = build_student_teacher(cfg)
        runner = IBOTStep(cfg, student.to(device), teacher.to(device), steps_per_epoch=1000, device=device)
        batch = synthetic_batch(cfg, images)
        for i in range(2):
            runner(batch, log=i == 1)
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    except torch.OutOfMemoryError:
        return None
    finally:
        del student, teacher, runner, batch
        _free(device)


def _free(device: torch.device) -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)


def measure_images_per_device(cfg: IBOTConfig, device: torch.device | str = "cuda", *,
                              limit: int = 4096) -> dict:
    """The largest per-device micro-batch the step fits on a CUDA ``device``, and its memory model.

    Returns ``{"images_per_device": n, "peak_bytes": peak at n, "bytes_per_image", "fixed_bytes" (weights,
    gradients, AdamW, teacher, workspace: the fit's intercept), "device_bytes": the card's memory}``."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"measure_images_per_device needs a CUDA device, got {device}")
    peaks: dict[int, int] = {}

    def fits(n: int) -> bool:
        peak = step_peak_bytes(cfg, n, device)
        if peak is not None:
            peaks[n] = peak
        return peak is not None

    n = largest_fitting(fits, limit=limit)
    sizes = sorted(peaks)
    per_image = fixed = float("nan")
    if len(sizes) >= 2:  # the line through the smallest and the largest batch that fitted
        a, b = sizes[0], sizes[-1]
        per_image = (peaks[b] - peaks[a]) / (b - a)
        fixed = peaks[a] - per_image * a
    return {"images_per_device": n, "peak_bytes": peaks.get(n), "bytes_per_image": per_image,
            "fixed_bytes": fixed, "device_bytes": torch.cuda.get_device_properties(device).total_memory,
            "tries": {k: peaks[k] for k in sizes}}


__all__ = ["largest_fitting", "measure_images_per_device", "step_peak_bytes", "synthetic_batch"]
