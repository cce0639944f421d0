"""Raw image bytes -> iBOT training sample: G global + L local uint8 crops and G patch masks per image.

This is what a Ray Data actor calls on each batch (:class:`MultiCropTransform`). Per image ``i`` everything random
comes from ``np.random.default_rng(seeds[i])``, in a fixed order (crop parameters, mask ratios, mask shapes), so a
sample depends only on its bytes, seed and epoch, not on how images are batched. Bad input (zero bytes, not an
image, truncated, too many pixels) is returned in an error list and never raises.

JPEGs are decoded at reduced scale (libjpeg DCT scaling, 1/2, 1/4 or 1/8) when the crop boxes, drawn from the header
size before decoding, all stay at least as large as their output crop at that scale, so no crop loses detail it
would have had at full scale.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ibot_ray.augmentation import CropParams, MultiCropAugmentation
from ibot_ray.config import IBOTConfig
from ibot_ray.decode import (
    ImageDecodeError,
    apply_draft,
    decode_jpeg_fast,
    exif_orientation,
    open_image,
    oriented_size,
    to_rgb_array,
)
from ibot_ray.masking import MaskGenerator

_DRAFT_SCALES = (8, 4, 2)


def crop_draft_scale(params: CropParams, out_sizes: np.ndarray) -> int:
    """Largest JPEG scale divisor s in (8, 4, 2, 1) with every crop box / s at least its output size on both sides."""
    bw = params.boxes[:, 2] - params.boxes[:, 0]
    bh = params.boxes[:, 3] - params.boxes[:, 1]
    smallest = float(np.min(np.minimum(bw, bh) / out_sizes)) if len(bw) else 0.0
    for s in _DRAFT_SCALES:
        if smallest >= s:
            return s
    return 1


class MultiCropTransform:
    """Decode + multi-crop + masks for a batch of encoded images (see the module docstring)."""

    def __init__(self, cfg: IBOTConfig) -> None:
        c = cfg.crops
        self.cfg = cfg
        self.augment = MultiCropAugmentation(c)
        self.grid = tuple(cfg.grid(c.global_crops_size))
        self.mask_generator = MaskGenerator(cfg.masking, self.grid)
        self.max_pixels = int(cfg.data.max_image_pixels)
        self.n_global = self.augment.n_global
        self._out_sizes = self.augment.sizes.astype(np.float64)

    def _prepare(self, blob: bytes, rng: np.random.Generator) -> tuple[np.ndarray, CropParams, int]:
        """Decode one image (at reduced scale when the crops allow) and draw its crop parameters."""
        img = open_image(blob, max_pixels=self.max_pixels)
        if img.format == "JPEG":
            width, height = oriented_size(img, exif_orientation(img))
            params = self.augment.sample_params(width, height, rng)
            scale = apply_draft(img, crop_draft_scale(params, self._out_sizes))
            arr = decode_jpeg_fast(blob, img) if scale == 1 else None
            return (to_rgb_array(img) if arr is None else arr), params, scale
        arr = to_rgb_array(img)  # other formats may only reveal their EXIF orientation once decoded
        return arr, self.augment.sample_params(arr.shape[1], arr.shape[0], rng), 1

    def __call__(
        self, blobs: Sequence[bytes], seeds: Sequence[int], epoch: int
    ) -> tuple[dict[str, np.ndarray], list[tuple[int, str]]]:
        """Crops and masks of the good images, and ``(i, reason)`` for every image that failed.

        Returns ``({"global_crops": (b, G, 3, S, S) uint8, "local_crops": (b, L, 3, s, s) uint8,
        "masks": (b, G, h, w) bool, "index": (b,) int64}, errors)`` where ``index`` gives the input position of
        each output row.
        """
        if len(blobs) != len(seeds):
            raise ValueError(f"{len(blobs)} images but {len(seeds)} seeds")
        images: list[np.ndarray] = []
        params: list[CropParams] = []
        rngs: list[np.random.Generator] = []
        ratios: list[np.ndarray] = []
        index: list[int] = []
        errors: list[tuple[int, str]] = []
        g = self.n_global
        for i, (blob, seed) in enumerate(zip(blobs, seeds)):
            rng = np.random.default_rng(int(seed))
            try:
                arr, p, _ = self._prepare(blob, rng)
            except ImageDecodeError as e:
                errors.append((i, str(e)))
                continue
            except Exception as e:  # noqa: BLE001 - whatever a codec throws, the image is bad, not the batch
                errors.append((i, f"decode failed ({type(e).__name__}: {e})"))
                continue
            images.append(arr)
            params.append(p)
            rngs.append(rng)
            ratios.append(self.mask_generator.sample_ratios(g, epoch, rng))
            index.append(i)
        out = self.augment.render(images, params)
        h, w = self.grid
        if images:
            masks = self.mask_generator.masks_for(np.concatenate(ratios), [r for r in rngs for _ in range(g)])
            out["masks"] = masks.reshape(len(images), g, h, w)
        else:
            out["masks"] = np.zeros((0, g, h, w), dtype=bool)
        out["index"] = np.asarray(index, dtype=np.int64)
        return out, errors


__all__ = ["MultiCropTransform", "crop_draft_scale"]
