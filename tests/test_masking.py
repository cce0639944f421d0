"""Block and random patch masks: budgets, shapes, the ratio recipe, epochs, reproducibility.

The block algorithm is checked against a direct, cell-by-cell restatement of iBOT's loop written here (with
Python's ``random``): the two must agree in distribution (mean and spread of the masked count).
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import replace

import numpy as np
import pytest

from ibot_ray.config import MaskingConfig
from ibot_ray.masking import MaskGenerator, block_mask, block_masks, random_mask, random_masks

H = W = 14


def reference_block_mask(h: int, w: int, target: float, rnd: random.Random, aspect_min: float = 0.3) -> np.ndarray:
    """iBOT's ImageFolderMask block loop, cell by cell."""
    mask = np.zeros((h, w), dtype=bool)
    low = (min(h, w) // 3) ** 2
    la = (math.log(aspect_min), math.log(1 / aspect_min))
    count = 0
    while count < target:
        remaining = target - count
        delta = 0
        for _ in range(10):
            area = rnd.uniform(low, remaining)
            aspect = math.exp(rnd.uniform(*la))
            bh, bw = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if bw < w and bh < h:
                top, left = rnd.randint(0, h - bh), rnd.randint(0, w - bw)
                if 0 < bh * bw - mask[top:top + bh, left:left + bw].sum() <= remaining:
                    for i in range(top, top + bh):
                        for j in range(left, left + bw):
                            if not mask[i, j]:
                                mask[i, j] = True
                                delta += 1
            if delta > 0:
                break
        if delta == 0:
            break
        count += delta
    return mask


def components(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """4-connected components of a bool mask."""
    seen = np.zeros_like(mask)
    comps = []
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        comp, queue = [], deque([(y, x)])
        seen[y, x] = True
        while queue:
            cy, cx = queue.popleft()
            comp.append((cy, cx))
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        comps.append(comp)
    return comps


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5])
def test_block_mask_budget_and_distribution_match_reference(ratio):
    target = ratio * H * W
    rng = np.random.default_rng(1)
    ours = block_masks(H, W, np.full(3000, target), [rng] * 3000)
    counts = ours.reshape(len(ours), -1).sum(axis=1)
    assert ours.dtype == bool and ours.shape == (3000, H, W)
    assert counts.max() <= target  # never exceeds the budget
    rnd = random.Random(2)
    ref = np.array([reference_block_mask(H, W, target, rnd).sum() for _ in range(1500)])
    # Same distribution as the reference loop: means within ~5 standard errors, spreads alike.
    se = math.sqrt(counts.var() / len(counts) + ref.var() / len(ref))
    assert abs(counts.mean() - ref.mean()) < 5 * se + 0.05
    assert abs(counts.std() - ref.std()) < 0.25 * ref.std() + 0.1
    # And close to the request: the algorithm only undershoots by the last partial block.
    assert counts.mean() / target > (0.85 if ratio >= 0.3 else 0.8)


def test_block_mask_is_one_block_when_the_budget_is_one_minimum_block():
    # Budget 16 = the minimum block area on 14x14: the first block takes almost all of it (12..16 cells after
    # rounding its sides); later rounds can only add the few cells left (area U(16, remaining) -> small boxes).
    rng = np.random.default_rng(3)
    low = (min(H, W) // 3) ** 2
    assert low == 16
    rect = 0
    for _ in range(400):
        m = block_mask(H, W, float(low), rng)
        comps = sorted(components(m), key=len)
        assert 12 <= len(comps[-1]) <= m.sum() <= 16
        ys, xs = np.array(comps[-1]).T
        bh, bw = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        if bh * bw == len(comps[-1]):  # the main piece is a filled rectangle
            rect += 1
    assert rect > 300


def test_blocks_are_rectangles_of_at_least_min_area_when_they_fit():
    # Targets between 16 and 2 * 16: the first block (area >= ~16 up to rounding) is placed on an empty grid; the
    # mask's largest filled rectangle must therefore have >= 12 cells.
    rng = np.random.default_rng(4)
    for t in np.linspace(16, 31, 200):
        m = block_mask(H, W, float(t), rng)
        assert m.sum() <= t
        best = 0
        ys, xs = np.nonzero(m)
        for y0 in range(ys.min(), ys.max() + 1):  # largest all-True axis-aligned rectangle (small grid: brute force)
            for y1 in range(y0, ys.max() + 1):
                rows = m[y0:y1 + 1].all(axis=0)
                run = 0
                for v in rows:
                    run = run + 1 if v else 0
                    best = max(best, run * (y1 - y0 + 1))
        assert best >= 12


def test_block_mask_zero_budget_small_grids_and_errors():
    rng = np.random.default_rng(0)
    assert not block_mask(H, W, 0.0, rng).any()
    m = block_mask(6, 6, 0.4 * 36, rng)  # local-crop grid: min block 4
    assert m.shape == (6, 6) and m.sum() <= 14.4
    assert block_mask(1, 1, 1.0, rng).sum() == 0  # no block fits strictly inside a 1x1 grid
    with pytest.raises(ValueError, match="generator"):
        block_masks(H, W, [1.0, 2.0], [rng])
    with pytest.raises(ValueError, match="num_masked"):
        block_mask(H, W, -1.0, rng)


def test_block_masks_reproducible_and_batch_independent():
    a = block_masks(H, W, [40.0, 70.0], [np.random.default_rng(7), np.random.default_rng(8)])
    b0 = block_mask(H, W, 40.0, np.random.default_rng(7))
    b1 = block_mask(H, W, 70.0, np.random.default_rng(8))
    assert np.array_equal(a[0], b0) and np.array_equal(a[1], b1)
    c = block_mask(H, W, 40.0, np.random.default_rng(9))
    assert not np.array_equal(b0, c)


@pytest.mark.parametrize("k", [0, 1, 17.9, 58.8, 196])
def test_random_mask_exact_count_and_uniform(k):
    rng = np.random.default_rng(5)
    ms = random_masks(H, W, np.full(600, k), [rng] * 600)
    assert (ms.reshape(600, -1).sum(axis=1) == int(k)).all()
    if 0 < int(k) < H * W:
        freq = ms.mean(axis=0)  # each cell masked with probability k / 196
        p = int(k) / (H * W)
        assert np.abs(freq - p).max() < 6 * math.sqrt(p * (1 - p) / 600)
    assert random_mask(H, W, k, rng).sum() == int(k)


def test_ratio_recipe_half_unmasked_rest_uniform():
    cfg = MaskingConfig()  # ratio (0, 0.3), var (0, 0.2): 0 or U(0.1, 0.5)
    gen = MaskGenerator(cfg, (H, W))
    rng = np.random.default_rng(6)
    r = gen.sample_ratios(20000, 0, rng)
    zero = r == 0
    assert abs(zero.mean() - 0.5) < 0.02
    nz = r[~zero]
    assert nz.min() >= 0.1 and nz.max() <= 0.5
    assert abs(nz.mean() - 0.3) < 0.005 and abs(nz.var() - 0.4 ** 2 / 12) < 0.002  # U(0.1, 0.5)
    masks = gen(4000, 0, rng)
    counts = masks.reshape(len(masks), -1).sum(axis=1)
    assert masks.shape == (4000, H, W) and masks.dtype == bool
    assert abs((counts == 0).mean() - 0.5) < 0.03
    assert counts.max() <= 0.5 * H * W


def test_ratio_without_variance_is_exact_and_choice_is_uniform():
    gen = MaskGenerator(MaskingConfig(ratio=(0.2, 0.4), ratio_var=(0.0, 0.0)), (H, W))
    r = gen.sample_ratios(10000, 0, np.random.default_rng(0))
    assert set(np.unique(r).tolist()) == {0.2, 0.4}
    assert abs((r == 0.2).mean() - 0.5) < 0.02


def test_start_epoch_and_disabled():
    cfg = MaskingConfig(start_epoch=3)
    gen = MaskGenerator(cfg, (H, W))
    rng = np.random.default_rng(0)
    for epoch in (0, 2):
        assert not gen(50, epoch, rng).any()
        assert (gen.sample_ratios(50, epoch, rng) == 0).all()
    assert gen(50, 3, rng).any()
    off = MaskGenerator(replace(cfg, enabled=False, start_epoch=0), (H, W))
    assert not off(50, 5, rng).any()


def test_rand_shape_generator_counts():
    gen = MaskGenerator(MaskingConfig(shape="rand", ratio=(0.4,), ratio_var=(0.0,)), (H, W))
    m = gen(20, 0, np.random.default_rng(0))
    assert (m.reshape(20, -1).sum(axis=1) == int(0.4 * H * W)).all()


def test_generator_rejects_bad_config():
    with pytest.raises(ValueError, match="shape"):
        MaskGenerator(MaskingConfig(shape="grid"), (H, W))
    with pytest.raises(ValueError, match="ratio_var"):
        MaskGenerator(MaskingConfig(ratio=(0.1, 0.2), ratio_var=(0.0,)), (H, W))
    with pytest.raises(ValueError, match="grid"):
        MaskGenerator(MaskingConfig(), (0, 14))
