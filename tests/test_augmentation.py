"""Multi-crop augmentation: the statistics of the crops match the configuration, and each operation matches an
independent implementation (torchvision's functional ops, PIL's blur and resize).

Most statistical tests use small crops (32 / 16 px) so that thousands of crops take little time; the operations
do not depend on the size.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter
from torchvision.transforms import RandomResizedCrop

from ibot_ray.augmentation import (
    BRIGHTNESS,
    CONTRAST,
    HUE,
    SATURATION,
    MultiCropAugmentation,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    blur_kernel,
    gaussian_blur,
    rrc_boxes,
)
from ibot_ray.config import CropsConfig
from ibot_ray.crop_kernels import jitter_, render_crop, scratch_size

SMALL = CropsConfig(global_crops_size=32, local_crops_size=16, local_crops_number=4)
PLAIN = replace(SMALL, color_jitter_p=0.0, grayscale_p=0.0, global_blur_p=(0.0,), local_blur_p=0.0,
                global_solarize_p=(0.0,))


def noise_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def colour_image(h: int = 64, w: int = 80) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([40 + 180 * xx / w, 40 + 180 * yy / h, 200 - 150 * xx / w], axis=-1)
    return img.astype(np.uint8)


def per_crop(out: dict[str, np.ndarray], fn) -> np.ndarray:
    """``fn`` applied to the global then the local crops (different sizes), joined as (B, G + L, ...)."""
    return np.concatenate([fn(out["global_crops"]), fn(out["local_crops"])], axis=1)


def crops_of(aug: MultiCropAugmentation, images: list[np.ndarray], seed: int) -> tuple[np.ndarray, list]:
    """All crops as (B, G + L, 3, S, S) per size group, plus the params used (drawn like ``__call__`` does)."""
    rng = np.random.default_rng(seed)
    params = [aug.sample_params(im.shape[1], im.shape[0], rng) for im in images]
    return aug.render(images, params), params


# ---- shapes, reproducibility ------------------------------------------------------------------------------------


def test_shapes_dtypes_and_seed_reproducibility():
    aug = MultiCropAugmentation(CropsConfig())
    images = [noise_image(300, 400, 0), colour_image(250, 190)]
    out = aug(images, np.random.default_rng(0))
    assert out["global_crops"].shape == (2, 2, 3, 224, 224) and out["global_crops"].dtype == np.uint8
    assert out["local_crops"].shape == (2, 10, 3, 96, 96) and out["local_crops"].dtype == np.uint8
    again = aug(images, np.random.default_rng(0))
    assert all(np.array_equal(out[k], again[k]) for k in out)
    other = aug(images, np.random.default_rng(1))
    assert not np.array_equal(out["global_crops"], other["global_crops"])
    assert not np.array_equal(out["local_crops"], other["local_crops"])


def test_empty_batch_no_locals_and_bad_input():
    aug = MultiCropAugmentation(replace(SMALL, local_crops_number=0))
    out = aug([], np.random.default_rng(0))
    assert out["global_crops"].shape == (0, 2, 3, 32, 32) and out["local_crops"].shape == (0, 0, 3, 16, 16)
    out = aug([colour_image()], np.random.default_rng(0))
    assert out["local_crops"].shape == (1, 0, 3, 16, 16)
    with pytest.raises(ValueError, match="uint8"):
        aug([np.zeros((10, 10), np.uint8)], np.random.default_rng(0))


def test_tiny_image_is_upscaled():
    aug = MultiCropAugmentation(SMALL)
    out = aug([colour_image(4, 4)], np.random.default_rng(0))
    assert out["global_crops"].shape == (1, 2, 3, 32, 32)


# ---- RandomResizedCrop boxes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("size, scale", [((500, 500), (0.25, 1.0)), ((640, 360), (0.05, 0.25)),
                                         ((300, 500), (0.25, 1.0))])
def test_rrc_boxes_in_range_and_match_torchvision(size, scale):
    w, h = size
    ratio = (3 / 4, 4 / 3)
    rng = np.random.default_rng(0)
    boxes = rrc_boxes(w, h, np.tile(scale, (4000, 1)), ratio, rng)
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
    frac = bw * bh / (w * h)
    # Area fraction within the scale range and aspect within the ratio range, up to rounding of the sides.
    tol = 2.5 / math.sqrt(scale[0] * w * h)
    assert frac.min() >= scale[0] * (1 - tol) - 1e-9 and frac.max() <= scale[1] * (1 + tol) + 1e-9
    assert (bw / bh).min() >= ratio[0] * (1 - tol) and (bw / bh).max() <= ratio[1] * (1 + tol)
    # Same distribution as torchvision's own RandomResizedCrop.get_params (torch RNG).
    torch.manual_seed(0)
    img = torch.zeros(1, h, w)
    ref = np.array([RandomResizedCrop.get_params(img, list(scale), list(ratio)) for _ in range(4000)])
    ref_frac = ref[:, 2] * ref[:, 3] / (w * h)
    assert abs(frac.mean() - ref_frac.mean()) < 0.015 * scale[1]
    assert abs(np.log(bw / bh).mean() - np.log(ref[:, 3] / ref[:, 2]).mean()) < 0.02
    # Positions uniform: the box centres spread over the free range (mean near the image centre).
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    assert abs(cx.mean() - w / 2) < 0.03 * w


def test_rrc_fallback_is_centre_crop_clamped_to_ratio():
    rng = np.random.default_rng(0)
    # A 1000x10 strip: no try can fit (h <= 10 forces w <= 13 but the area asks for more): centre crop, ratio 4/3.
    boxes = rrc_boxes(1000, 10, np.tile((0.5, 1.0), (5, 1)), (3 / 4, 4 / 3), rng)
    assert (boxes == [493, 0, 493 + 13, 10]).all()


def test_sample_params_rates_and_ranges():
    c = CropsConfig()
    aug = MultiCropAugmentation(c)
    rng = np.random.default_rng(0)
    ps = [aug.sample_params(400, 300, rng) for _ in range(1500)]
    flip = np.array([p.flip for p in ps])
    jit = np.array([p.jitter for p in ps])
    gray = np.array([p.gray for p in ps])
    blur = np.array([p.blur for p in ps])
    sol = np.array([p.solarize for p in ps])
    f = np.array([p.factors for p in ps])
    order = np.concatenate([p.order for p in ps])
    assert abs(flip.mean() - 0.5) < 0.02 and abs(jit.mean() - 0.8) < 0.02 and abs(gray.mean() - 0.2) < 0.02
    assert blur[:, 0].all() and abs(blur[:, 1].mean() - 0.1) < 0.025 and abs(blur[:, 2:].mean() - 0.5) < 0.02
    assert not sol[:, 0].any() and abs(sol[:, 1].mean() - 0.2) < 0.03 and not sol[:, 2:].any()
    for col, lo, hi in ((BRIGHTNESS, 0.6, 1.4), (CONTRAST, 0.6, 1.4), (SATURATION, 0.8, 1.2), (HUE, -0.1, 0.1)):
        v = f[..., col].ravel()
        assert v.min() >= lo and v.max() <= hi and abs(v.mean() - (lo + hi) / 2) < 0.01 * (hi - lo) * 2
    sig = np.array([p.sigma for p in ps]).ravel()
    assert sig.min() >= 0.1 and sig.max() <= 2.0
    # Every one of the 24 orders of the four jitter operations is equally likely.
    codes = (order * np.array([64, 16, 4, 1])).sum(axis=1)
    counts = np.unique(codes, return_counts=True)[1]
    assert len(counts) == 24 and counts.min() > len(order) / 24 * 0.85


# ---- rates detected from the pixels ---------------------------------------------------------------------------


def test_flip_rate_on_an_asymmetric_image():
    aug = MultiCropAugmentation(PLAIN)
    img = colour_image(60, 60)  # red grows from left to right
    out, params = crops_of(aug, [img] * 150, seed=1)

    def left_brighter(c: np.ndarray) -> np.ndarray:
        red = c[:, :, 0].astype(int)
        half = red.shape[-1] // 2
        return red[..., :half].mean(axis=(-1, -2)) > red[..., half:].mean(axis=(-1, -2))

    flipped = per_crop(out, left_brighter)
    assert abs(flipped.mean() - 0.5) < 0.04
    assert np.array_equal(flipped, np.array([p.flip for p in params]))


def test_grayscale_rate_and_exact_gray():
    aug = MultiCropAugmentation(replace(PLAIN, grayscale_p=0.2))
    out, params = crops_of(aug, [colour_image()] * 150, seed=2)
    is_gray = per_crop(out, lambda c: ((c[:, :, 0] == c[:, :, 1]) & (c[:, :, 1] == c[:, :, 2])).all(axis=(-1, -2)))
    assert abs(is_gray.mean() - 0.2) < 0.03
    assert np.array_equal(is_gray, np.array([p.gray for p in params]))


def test_solarize_rate_only_on_second_global_crop():
    aug = MultiCropAugmentation(replace(PLAIN, global_solarize_p=(0.0, 0.2)))
    bright = np.full((50, 50, 3), 230, np.uint8)
    out, _ = crops_of(aug, [bright] * 400, seed=3)
    g = out["global_crops"].astype(int)
    assert (g[:, 0] == 230).all() and (out["local_crops"] == 230).all()
    solar = (g[:, 1] == 25).all(axis=(-1, -2, -3))  # 255 - 230
    assert ((g[:, 1] == 25) | (g[:, 1] == 230)).all()
    assert abs(solar.mean() - 0.2) < 0.05


def test_jitter_rate_on_a_flat_image():
    aug = MultiCropAugmentation(replace(PLAIN, color_jitter_p=0.8, contrast=0.0, saturation=0.0, hue=0.0))
    flat = np.full((40, 40, 3), 100, np.uint8)
    out, params = crops_of(aug, [flat] * 200, seed=4)
    # A flat crop stays flat: its level is the brightness factor.
    level = per_crop(out, lambda c: c.mean(axis=(-1, -2, -3)) / 100)
    changed = np.abs(level - 1) > 0.006
    jitter = np.array([p.jitter for p in params])
    assert abs(jitter.mean() - 0.8) < 0.03
    assert not changed[~jitter].any()
    factor = np.array([p.factors[:, BRIGHTNESS] for p in params])
    assert np.abs(level[jitter] - factor[jitter]).max() < 0.006
    assert level.min() >= 0.6 - 0.006 and level.max() <= 1.4 + 0.006


def test_blur_rates_and_blur_is_applied_exactly_where_drawn():
    aug = MultiCropAugmentation(replace(PLAIN, global_blur_p=(1.0, 0.1), local_blur_p=0.5))
    img = noise_image(64, 64, 5)
    rng = np.random.default_rng(6)
    params = [aug.sample_params(64, 64, rng) for _ in range(200)]
    sharp = [replace(p, blur=np.zeros_like(p.blur)) for p in params]
    a, b = aug.render([img] * 200, params), aug.render([img] * 200, sharp)
    diff = np.concatenate([(a[k] != b[k]).any(axis=(-1, -2, -3)) for k in ("global_crops", "local_crops")], axis=1)
    drawn = np.array([p.blur for p in params])
    assert np.array_equal(diff, drawn)
    assert drawn[:, 0].all() and abs(drawn[:, 1].mean() - 0.1) < 0.05 and abs(drawn[:, 2:].mean() - 0.5) < 0.05
    # Blurring removes high frequencies: neighbour differences shrink.
    ga, gb = a["global_crops"][:, 0].astype(float), b["global_crops"][:, 0].astype(float)
    assert np.abs(np.diff(ga, axis=-1)).mean() < 0.9 * np.abs(np.diff(gb, axis=-1)).mean()


def test_crops_cover_the_sampled_boxes():
    # A horizontal ramp: a crop's mean column value is the mean x of its box (no colour ops).
    h, w = 50, 200
    ramp = np.repeat(np.repeat(np.linspace(0, 255, w)[None, :, None], h, axis=0), 3, axis=2).astype(np.uint8)
    aug = MultiCropAugmentation(replace(PLAIN, flip_p=0.0))
    out, params = crops_of(aug, [ramp] * 30, seed=7)
    means = per_crop(out, lambda c: c[:, :, 0].mean(axis=(-1, -2)))
    boxes = np.array([p.boxes for p in params]).astype(float)
    expected = ((boxes[..., 0] + boxes[..., 2]) / 2 - 0.5) * 255 / (w - 1)
    assert np.abs(means - expected).max() < 4


# ---- each operation against an independent implementation ------------------------------------------------------


@pytest.mark.parametrize("op, ref, values", [
    (adjust_brightness, TF.adjust_brightness, [0.6, 0.95, 1.4]),
    (adjust_contrast, TF.adjust_contrast, [0.6, 1.1, 1.4]),
    (adjust_saturation, TF.adjust_saturation, [0.8, 1.0, 1.2]),
    (adjust_hue, TF.adjust_hue, [-0.1, 0.03, 0.1]),
    (adjust_hue, TF.adjust_hue, [-0.45, 0.25, 0.5]),  # beyond a sextant: the general wrap
])
def test_colour_ops_match_torchvision(op, ref, values):
    x = noise_image(24, 20, 8).transpose(2, 0, 1)[None].repeat(3, axis=0).astype(np.float32)
    x[1] = np.round(x[1] * 0.5 + 60)  # a less saturated crop too
    out = op(x.copy(), np.array(values))
    for i, v in enumerate(values):
        expected = ref(torch.from_numpy(x[i]) / 255, v).numpy() * 255
        assert np.abs(out[i] - expected).max() < 0.05, (op.__name__, v)


def test_blur_matches_pil_gaussian_blur():
    img = noise_image(48, 48, 9)
    for sigma in (0.1, 0.5, 1.0, 2.0):
        k = blur_kernel(sigma)
        t = np.arange(len(k)) - len(k) // 2
        assert abs(k.sum() - 1) < 1e-9 and abs(math.sqrt((k * t * t).sum()) - sigma) < 0.01  # variance sigma^2
        ours = gaussian_blur(img.transpose(2, 0, 1)[None].astype(np.float32), k[None])[0]
        pil = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(sigma))).transpose(2, 0, 1)
        inner = (slice(None), slice(8, -8), slice(8, -8))
        # PIL rounds to uint8 after each of its six box passes: on white noise (the worst case) that adds ~1 level.
        assert np.abs(np.rint(ours[inner]) - pil[inner]).mean() < 1.5, sigma
        assert np.abs(np.rint(ours[inner]) - pil[inner]).max() <= 4, sigma


def test_render_matches_a_torchvision_pipeline_in_the_drawn_order():
    """Full crops vs PIL resize + torchvision functional ops applied in each crop's drawn order."""
    c = replace(SMALL, global_blur_p=(0.0,), local_blur_p=0.0, global_solarize_p=(0.0, 1.0))
    aug = MultiCropAugmentation(c)
    img = colour_image(90, 120) // 2 + noise_image(90, 120, 10) // 2
    out, params = crops_of(aug, [img] * 6, seed=11)
    ops = {BRIGHTNESS: TF.adjust_brightness, CONTRAST: TF.adjust_contrast, SATURATION: TF.adjust_saturation,
           HUE: TF.adjust_hue}
    diffs = []
    for i, p in enumerate(params):
        for j in range(aug.n_crops):
            size = int(aug.sizes[j])
            crop = Image.fromarray(img).resize((size, size), Image.BICUBIC, box=tuple(p.boxes[j].tolist()))
            if p.flip[j]:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            t = torch.from_numpy(np.asarray(crop).copy()).permute(2, 0, 1).float() / 255
            if p.jitter[j]:
                for op in p.order[j]:
                    t = ops[int(op)](t, float(p.factors[j, op]))
            if p.gray[j]:
                t = TF.rgb_to_grayscale(t, num_output_channels=3)
            t = (t * 255).round()
            if p.solarize[j]:
                t = torch.where(t >= 128, 255 - t, t)
            got = out["global_crops"][i, j] if j < aug.n_global else out["local_crops"][i, j - aug.n_global]
            diffs.append(np.abs(got.astype(float) - t.numpy()))
    d = np.stack([x.mean() for x in diffs])
    # The resize differs from PIL's by at most a few levels and the jitter can amplify that; the order matters
    # far more (swapping two operations moves pixels by tens of levels).
    assert d.mean() < 1.0 and d.max() < 3.0


def test_batched_render_equals_rendering_each_image_alone():
    # Every crop is rendered on its own (resize, then one compiled call): the result must not depend on the batch.
    images = [noise_image(50 + 7 * i, 60, i) // 2 + colour_image(50 + 7 * i, 60) // 2 for i in range(24)]
    rng = np.random.default_rng(12)
    aug = MultiCropAugmentation(replace(SMALL, local_crops_number=6))
    params = [aug.sample_params(im.shape[1], im.shape[0], rng) for im in images]
    batch = aug.render(images, params)
    for i, (im, p) in enumerate(zip(images, params)):
        alone = aug.render([im], [p])
        for k in batch:
            assert_same_crops(batch[k][i], alone[k][0], (i, k))


def assert_same_crops(a: np.ndarray, b: np.ndarray, what) -> None:
    """Identical crops (each crop's arithmetic is the same whatever else is in the batch)."""
    d = np.abs(a.astype(int) - b.astype(int))
    assert d.max() == 0, (what, d.max(), (d > 0).mean())


def test_resize_kernel_is_torchs_antialiased_bicubic_and_close_to_pil():
    from ibot_ray.augmentation import _resize_aa

    img = colour_image(77, 91) // 2 + noise_image(77, 91, 13) // 2
    box = torch.from_numpy(img).permute(2, 0, 1)[None].contiguous(memory_format=torch.channels_last)
    for size in (32, 96, 160):  # down- and up-sampling
        ours = _resize_aa(box, size)
        ref = torch.nn.functional.interpolate(box, size=(size, size), mode="bicubic", antialias=True)
        assert torch.equal(ours, ref)
        pil = np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC)).transpose(2, 0, 1)
        d = np.abs(ours[0].numpy().astype(int) - pil)
        assert d.max() <= 3 and d.mean() < 0.1


@pytest.mark.parametrize("order", list(itertools.permutations(range(4))))
def test_fused_jitter_equals_the_operations_one_by_one(order):
    """The compiled jitter runs the operations row by row in one or two passes (split where contrast needs the
    image mean): in every order it must equal applying the four operations to the whole crop one after another,
    each checked against torchvision above."""
    rng = np.random.default_rng(sum(o * 4 ** i for i, o in enumerate(order)))
    x = (rng.random((1, 3, 23, 17)) * 255).astype(np.float32)
    factors = np.array([1.3, 0.6, 1.4, -0.2])
    one_by_one = x.copy()
    single = {BRIGHTNESS: adjust_brightness, CONTRAST: adjust_contrast, SATURATION: adjust_saturation,
              HUE: adjust_hue}
    for op in order:
        single[op](one_by_one, factors[op:op + 1])
    for gray in (False, True):
        fused = x[0].copy()
        jitter_(fused, np.array(order, dtype=np.int64), factors, gray)
        expected = one_by_one[0]
        if gray:
            y = 0.299 * expected[0] + 0.587 * expected[1] + 0.114 * expected[2]
            expected = np.stack([y, y, y])
        np.testing.assert_allclose(fused, expected, atol=2e-3, err_msg=f"order {order} gray {gray}")


def test_render_crop_equals_its_steps_composed():
    """One compiled call (flip, jitter, grey, blur, rounding, solarisation) against the steps done separately with
    numpy and the batch functions, on a crop that draws all of them."""
    rng = np.random.default_rng(3)
    src = (rng.random((40, 40, 3)) * 255).astype(np.uint8)
    order = np.array([HUE, SATURATION, CONTRAST, BRIGHTNESS], dtype=np.int64)
    factors = np.array([0.8, 1.3, 0.7, 0.15])
    kernel = blur_kernel(1.3).astype(np.float32)
    scratch = np.zeros(scratch_size(40, len(kernel)), dtype=np.float32)
    for flip, gray, blur, solar in itertools.product((False, True), repeat=4):
        k = kernel if blur else np.ones(1, dtype=np.float32)
        got = np.zeros((3, 40, 40), dtype=np.uint8)
        render_crop(src, flip, got, order, factors, gray, k, solar, 128.0, scratch)
        x = (src[:, ::-1] if flip else src).transpose(2, 0, 1)[None].astype(np.float32).copy()
        for op, fn in ((HUE, adjust_hue), (SATURATION, adjust_saturation), (CONTRAST, adjust_contrast),
                       (BRIGHTNESS, adjust_brightness)):
            fn(x, factors[op:op + 1])
        if gray:
            x[:] = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]
        if blur:
            x = gaussian_blur(x, k[None])
        ref = np.clip(np.rint(x[0]), 0, 255)
        if solar:
            ref = np.where(ref >= 128, 255 - ref, ref)
        d = np.abs(got.astype(int) - ref.astype(int))
        assert d.max() <= 1 and (d > 0).mean() < 1e-3, (flip, gray, blur, solar, d.max())
    plain = np.zeros((3, 40, 40), dtype=np.uint8)  # nothing drawn: exactly the (flipped) input
    render_crop(src, True, plain, np.full(4, -1, dtype=np.int64), factors, False, np.ones(1, dtype=np.float32),
                False, 128.0, scratch)
    np.testing.assert_array_equal(plain, src[:, ::-1].transpose(2, 0, 1))
    edge = np.zeros((3, 4, 4), dtype=np.uint8)  # solarisation inverts values >= the threshold, not just above
    render_crop(np.full((4, 4, 3), 128, dtype=np.uint8), False, edge, np.full(4, -1, dtype=np.int64), factors,
                False, np.ones(1, dtype=np.float32), True, 128.0, scratch)
    assert (edge == 127).all()
