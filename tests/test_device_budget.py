"""The per-device micro-batch search (ibot_ray/device_budget.py): the search itself runs anywhere; the memory it
measures needs a CUDA device (benchmarks/gpu_check.sh)."""

import pytest
import torch

from ibot_ray.config import load_config
from ibot_ray.device_budget import largest_fitting, measure_images_per_device, synthetic_batch


@pytest.mark.parametrize("threshold", [0, 1, 5, 16, 17, 100, 511, 4096, 10_000])
def test_the_search_finds_the_largest_size_that_fits(threshold):
    tried = []

    def fits(n):
        tried.append(n)
        return n <= threshold

    assert largest_fitting(fits, limit=4096) == min(threshold, 4096)
    assert len(tried) <= 2 * 13 and len(set(tried)) == len(tried)  # doubling then bisection, no size tried twice


def test_synthetic_batch_has_the_recipes_masks():
    cfg = load_config("vit_small_16")
    b = synthetic_batch(cfg, 64)
    assert b["global_crops"].shape == (64, 2, 3, 224, 224) and b["local_crops"].shape == (64, 10, 3, 96, 96)
    assert b["masks"].shape == (64, 2, 14, 14) and b["masks"].dtype == torch.bool
    per_crop = b["masks"].flatten(2).float().mean(-1)
    assert 0.3 < float((per_crop == 0).float().mean()) < 0.7  # half the crops unmasked ...
    assert float(per_crop.max()) <= 0.5 and 0.1 < float(b["masks"].float().mean()) < 0.2  # ... the rest 10-50 %


def test_measuring_needs_a_cuda_device():
    with pytest.raises(ValueError, match="CUDA"):
        measure_images_per_device(load_config("demo"), "cpu")
