"""Decoding bytes to upright RGB uint8: every common mode, EXIF orientation, bad input, bombs, draft scale."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image

from ibot_ray.decode import (
    ImageDecodeError,
    apply_draft,
    decode_image,
    decode_jpeg_fast,
    draft_scale,
    open_image,
    to_rgb_array,
)

H, W = 40, 56


def smooth_rgb(h: int = H, w: int = W, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = 128 + 70 * np.sin(xx[..., None] / 7 + rng.uniform(0, 6, 3)) + 50 * np.cos(yy[..., None] / 5)
    return np.clip(img, 0, 255).astype(np.uint8)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_rgb_formats_roundtrip():
    src = smooth_rgb()
    png = decode_image(encode(Image.fromarray(src), "PNG"))
    assert png.shape == (H, W, 3) and png.dtype == np.uint8
    assert np.array_equal(png, src)  # lossless
    for fmt, tol in (("JPEG", 4.0), ("WEBP", 4.0)):
        out = decode_image(encode(Image.fromarray(src), fmt, quality=95))
        assert out.shape == (H, W, 3) and out.dtype == np.uint8
        assert np.abs(out.astype(int) - src).mean() < tol, fmt


def test_gray_modes_replicate_the_gray_channel():
    g = smooth_rgb()[..., 0]
    out = decode_image(encode(Image.fromarray(g, mode="L"), "PNG"))
    assert np.array_equal(out, np.repeat(g[..., None], 3, axis=2))
    la = Image.fromarray(np.stack([g, 255 - g], axis=-1), mode="LA")
    out = decode_image(encode(la, "PNG"))
    assert np.array_equal(out, np.repeat(g[..., None], 3, axis=2))  # alpha dropped


def test_palette_and_rgba():
    src = smooth_rgb()
    p_img = Image.fromarray(src).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    expected = np.array(p_img.getpalette(), dtype=np.uint8).reshape(-1, 3)[np.asarray(p_img)]
    assert np.array_equal(decode_image(encode(p_img, "PNG")), expected)
    rgba = np.concatenate([src, np.full((H, W, 1), 77, np.uint8)], axis=-1)
    assert np.array_equal(decode_image(encode(Image.fromarray(rgba, mode="RGBA"), "PNG")), src)


def test_cmyk_jpeg_converts_back_to_rgb():
    src = smooth_rgb()
    data = encode(Image.fromarray(src).convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = decode_image(data)
    assert out.shape == (H, W, 3)
    assert np.abs(out.astype(int) - src).mean() < 6


def test_16bit_png_is_scaled_not_clipped():
    v16 = (np.arange(H * W).reshape(H, W) * 29) % 65536
    data = encode(Image.fromarray(v16.astype(np.uint16)), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = decode_image(data)
    expected = np.floor(v16 / 257 + 0.5).astype(np.uint8)  # 0..65535 -> 0..255
    assert np.array_equal(out[..., 0], expected) and np.array_equal(out[..., 2], expected)
    assert out.max() > 200  # PIL's plain convert("RGB") would clip everything above 255 to white


def test_wide_modes_in_memory():
    i32 = Image.fromarray((np.arange(H * W).reshape(H, W) * 40 % 65536).astype(np.int32), mode="I")
    out = to_rgb_array(i32)
    assert np.array_equal(out[..., 1], np.round(np.asarray(i32) / 257).astype(np.uint8))
    i8 = Image.fromarray(np.arange(H * W).reshape(H, W).astype(np.int32) % 200, mode="I")  # 8-bit data in I
    assert np.array_equal(to_rgb_array(i8)[..., 0], np.asarray(i8).astype(np.uint8))
    f01 = Image.fromarray((np.arange(H * W).reshape(H, W) / (H * W)).astype(np.float32), mode="F")
    expected = np.round(np.asarray(f01).astype(np.float64) * 255).astype(np.uint8)
    assert np.array_equal(to_rgb_array(f01)[..., 0], expected)


def test_exif_orientation_6_rotates_clockwise():
    src = np.zeros((H, W, 3), np.uint8)
    src[:, : W // 2] = (220, 30, 30)  # left half red, right half blue
    src[:, W // 2:] = (30, 30, 220)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(Image.fromarray(src), "JPEG", quality=95, exif=exif.tobytes())
    out = decode_image(data)
    assert out.shape == (W, H, 3)  # displayed upright: rotated by 90 degrees
    expected = np.rot90(src, k=-1)  # clockwise: the left half ends up on top
    assert np.abs(out.astype(int) - expected).mean() < 4
    assert out[: W // 2 - 4, :, 0].mean() > 150 and out[W // 2 + 4:, :, 2].mean() > 150


def test_tiny_image():
    src = smooth_rgb(4, 4)
    out = decode_image(encode(Image.fromarray(src), "PNG"))
    assert out.shape == (4, 4, 3) and np.array_equal(out, src)


@pytest.mark.parametrize("data, why", [
    (b"", "empty"),
    (b"this is a text file, not a JPEG\n" * 4, "not an image"),
])
def test_bad_bytes_raise_with_reason(data, why):
    with pytest.raises(ImageDecodeError, match=why):
        decode_image(data)


def test_truncated_and_corrupt_jpeg():
    data = encode(Image.fromarray(smooth_rgb(120, 160)), "JPEG", quality=90)
    img = open_image(data[: len(data) // 2], max_pixels=10**6)  # the header is intact: opening is lazy and fine
    assert img.size == (160, 120)
    with pytest.raises(ImageDecodeError, match="truncated"):
        to_rgb_array(img)
    with pytest.raises(ImageDecodeError):
        decode_image(data[:30])
    garbage = data[:20] + np.random.default_rng(0).integers(0, 256, len(data) - 20, dtype=np.uint8).tobytes()
    with pytest.raises(ImageDecodeError):
        decode_image(garbage)
    assert isinstance(ImageDecodeError("x"), ValueError)


def test_decompression_bomb_guard():
    data = encode(Image.fromarray(smooth_rgb(100, 120)), "PNG")
    with pytest.raises(ImageDecodeError, match="too many pixels"):
        decode_image(data, max_pixels=100 * 120 - 1)
    assert decode_image(data, max_pixels=100 * 120).shape == (100, 120, 3)


@pytest.mark.parametrize("min_side", [1, 50, 100, 101, 150, 300, 400, 401, 5000])
def test_draft_keeps_min_side(min_side):
    h, w = 400, 520
    src = smooth_rgb(h, w, seed=3)
    data = encode(Image.fromarray(src), "JPEG", quality=95)
    out = decode_image(data, min_side=min_side)
    # Expected: the largest libjpeg scale 1/s (s in 8, 4, 2, 1) whose ceil(400 / s) is still >= min_side.
    s = next(s for s in (8, 4, 2, 1) if math.ceil(h / s) >= min_side or s == 1)
    assert out.shape == (math.ceil(h / s), math.ceil(w / s), 3)
    assert min(out.shape[:2]) >= min(min_side, h)
    assert draft_scale((w, h), min_side) == s
    # Content: the reduced decode matches the full image averaged over s x s blocks.
    full = decode_image(data).astype(np.float64)
    hh, ww = (h // s) * s, (w // s) * s
    pooled = full[:hh, :ww].reshape(h // s, s, w // s, s, 3).mean(axis=(1, 3))
    assert np.abs(out[: h // s, : w // s] - pooled).mean() < 3


def test_draft_ignores_non_jpeg_and_loaded_images():
    data = encode(Image.fromarray(smooth_rgb(200, 240)), "PNG")
    assert decode_image(data, min_side=20).shape == (200, 240, 3)
    img = open_image(encode(Image.fromarray(smooth_rgb(200, 240)), "JPEG"), max_pixels=10**6)
    img.load()
    assert apply_draft(img, 4) == 1 and img.size == (240, 200)


@pytest.mark.parametrize("progressive", [False, True])
def test_fast_jpeg_path_gives_the_same_pixels(progressive):
    src = smooth_rgb(90, 130, seed=4) // 2 + np.random.default_rng(4).integers(0, 128, (90, 130, 3), dtype=np.uint8)
    data = encode(Image.fromarray(src), "JPEG", quality=90, progressive=progressive)
    fast = decode_jpeg_fast(data, open_image(data, max_pixels=10**6))
    assert fast is not None and fast.shape == (90, 130, 3) and fast.dtype == np.uint8
    assert np.array_equal(fast, decode_image(data))
    with pytest.raises(ImageDecodeError, match="truncated"):
        half = data[: len(data) // 2]
        decode_jpeg_fast(half, open_image(half, max_pixels=10**6))


def test_fast_jpeg_path_declines_what_it_does_not_handle():
    src = smooth_rgb()
    exif = Image.Exif()
    exif[0x0112] = 6
    cases = [
        encode(Image.fromarray(src), "PNG"),
        encode(Image.fromarray(src[..., 0]), "JPEG"),  # greyscale JPEG
        encode(Image.fromarray(src).convert("CMYK"), "JPEG"),
        encode(Image.fromarray(src), "JPEG", exif=exif.tobytes()),  # needs a rotation
    ]
    for data in cases:
        assert decode_jpeg_fast(data, open_image(data, max_pixels=10**6)) is None
    data = encode(Image.fromarray(smooth_rgb(200, 240)), "JPEG")
    img = open_image(data, max_pixels=10**6)
    assert apply_draft(img, 2) == 2
    assert decode_jpeg_fast(data, img) is None  # a reduced decode was asked for: PIL does it
