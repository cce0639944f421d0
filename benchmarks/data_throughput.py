#!/usr/bin/env python3
"""Data-path throughput: iBOT multi-crop + masks, images per second.

``--mode percore`` (implemented here): on one core (torch threads 1), on the same encoded images held in memory,
compare

* **ours**: :class:`ibot_ray.multicrop.MultiCropTransform` on raw bytes (decode with draft when possible, batched
  uint8 crops, masks), in batches of ``--batch`` images;
* **baseline**: the paper's documented recipe written with ``torchvision.transforms`` on PIL images (PIL decode +
  ``convert("RGB")``, RandomResizedCrop, flip, ColorJitter, grayscale, PIL Gaussian blur, solarisation, ToTensor +
  Normalize per crop) plus the per-cell Python-loop block masking a user would write, for every crop as iBOT's
  ``ImageFolderMask`` does (``--baseline-masks global``: only for the global crops, since the local masks are never
  used; a faster baseline, so a more conservative ratio).

The two sides alternate every ``--batch`` images so that load from other processes hits them alike; the figure per
side is the median over rounds of images per CPU second of this process (``time.process_time``; wall-clock rates
are reported too), and the speed-up is the median of the per-round ratios.

``--mode e2e`` is the end-to-end Ray Data mode: :func:`run_e2e` hands over to ``benchmarks/data_e2e.py`` (the
pipeline side's script) with ``--source IMAGE_DIR``; extra arguments are passed through.

Usage: ``python benchmarks/data_throughput.py IMAGE_DIR --mode percore [--n 200] [--rounds 5] [--batch 16]``
(get real photos with ``python /work/shared/data/photos.py /tmp/photos --n 300``).
"""

from __future__ import annotations

import argparse
import io
import math
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def list_images(root: str, n: Optional[int]) -> list[Path]:
    files = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise SystemExit(f"no images under {root!r} (looked for {sorted(IMAGE_SUFFIXES)})")
    return files[:n] if n else files


# ---- the baseline: the paper's recipe as a user would write it ---------------------------------------------------


class PILGaussianBlur:
    """Blur with probability p, radius U(0.1, 2.0) (the recipe's PIL GaussianBlur)."""

    def __init__(self, p: float, radius_min: float = 0.1, radius_max: float = 2.0) -> None:
        self.p, self.lo, self.hi = p, radius_min, radius_max

    def __call__(self, img):
        from PIL import ImageFilter

        if random.random() < self.p:
            return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.lo, self.hi)))
        return img


class PILSolarize:
    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, img):
        from PIL import ImageOps

        return ImageOps.solarize(img) if random.random() < self.p else img


def python_block_mask(height: int, width: int, target: float, aspect_min: float = 0.3) -> np.ndarray:
    """The BEiT/iBOT block mask written with plain Python loops over rounds, attempts and cells."""
    mask = np.zeros((height, width), dtype=bool)
    low = (min(height, width) // 3) ** 2
    log_aspect = (math.log(aspect_min), math.log(1 / aspect_min))
    count = 0
    while count < target:
        remaining = target - count
        delta = 0
        for _ in range(10):
            area = random.uniform(low, remaining)
            aspect = math.exp(random.uniform(*log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if w < width and h < height:
                top = random.randint(0, height - h)
                left = random.randint(0, width - w)
                covered = mask[top:top + h, left:left + w].sum()
                if 0 < h * w - covered <= remaining:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if not mask[i, j]:
                                mask[i, j] = True
                                delta += 1
            if delta > 0:
                break
        if delta == 0:
            break
        count += delta
    return mask


class PaperBaseline:
    """DataAugmentationiBOT (2 global + L local crops) + normalisation + Python block masks.

    ``masks="all"`` masks every crop as iBOT's ``ImageFolderMask`` does (14x14 for global, 6x6 for local crops; the
    local masks are never used by the model); ``masks="global"`` only the global crops (a faster, conservative
    baseline).
    """

    def __init__(self, cfg, masks: str = "all") -> None:
        import torchvision.transforms as T

        c, m = cfg.crops, cfg.masking
        bicubic = T.InterpolationMode.BICUBIC
        flip_jitter = T.Compose([
            T.RandomHorizontalFlip(p=c.flip_p),
            T.RandomApply([T.ColorJitter(c.brightness, c.contrast, c.saturation, c.hue)], p=c.color_jitter_p),
            T.RandomGrayscale(p=c.grayscale_p),
        ])
        normalize = T.Compose([T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
        self.global1 = T.Compose([
            T.RandomResizedCrop(c.global_crops_size, scale=c.global_crops_scale, interpolation=bicubic),
            flip_jitter, PILGaussianBlur(c.global_blur_p[0]), normalize])
        self.global2 = T.Compose([
            T.RandomResizedCrop(c.global_crops_size, scale=c.global_crops_scale, interpolation=bicubic),
            flip_jitter, PILGaussianBlur(c.global_blur_p[-1]), PILSolarize(c.global_solarize_p[-1]), normalize])
        self.local = T.Compose([
            T.RandomResizedCrop(c.local_crops_size, scale=c.local_crops_scale, interpolation=bicubic),
            flip_jitter, PILGaussianBlur(c.local_blur_p), normalize])
        self.n_global, self.n_local = c.global_crops_number, c.local_crops_number
        if masks not in ("all", "global"):
            raise ValueError(f"masks must be 'all' or 'global', got {masks!r}")
        self.grids = [cfg.grid(c.global_crops_size)] * self.n_global
        if masks == "all":
            self.grids += [cfg.grid(c.local_crops_size)] * self.n_local
        self.ratios, self.ratio_vars, self.aspect_min = m.ratio, m.ratio_var, m.aspect_min

    def _ratio(self) -> float:
        r, v = random.choice(list(zip(self.ratios, self.ratio_vars)))
        return random.uniform(r - v, r + v) if v > 0 else r

    def __call__(self, blob: bytes):
        from PIL import Image

        img = Image.open(io.BytesIO(blob)).convert("RGB")
        crops = [self.global1(img)] + [self.global2(img) for _ in range(self.n_global - 1)]
        crops += [self.local(img) for _ in range(self.n_local)]
        masks = [python_block_mask(h, w, self._ratio() * h * w, self.aspect_min) for h, w in self.grids]
        return crops, masks


# ---- per-core measurement ----------------------------------------------------------------------------------------


def run_percore(args: argparse.Namespace) -> dict[str, float]:
    import torch

    from ibot_ray.config import load_config
    from ibot_ray.multicrop import MultiCropTransform

    torch.set_num_threads(1)
    cfg = load_config(args.config, args.set)
    files = list_images(args.image_dir, args.n)
    blobs = [p.read_bytes() for p in files]
    ours_t = MultiCropTransform(cfg)
    base_t = PaperBaseline(cfg, masks=args.baseline_masks)
    random.seed(0)
    torch.manual_seed(0)

    def ours(lo: int, hi: int) -> None:
        _, errors = ours_t(blobs[lo:hi], list(range(lo, hi)), args.epoch)
        if errors:
            raise SystemExit(f"ours: undecodable benchmark images: {errors[:3]}")

    def baseline(lo: int, hi: int) -> None:
        for b in blobs[lo:hi]:
            base_t(b)

    c = cfg.crops
    print(f"{len(blobs)} images from {args.image_dir}; {c.global_crops_number}x{c.global_crops_size} + "
          f"{c.local_crops_number}x{c.local_crops_size} crops + {cfg.grid(c.global_crops_size)} masks; "
          f"torch threads {torch.get_num_threads()}; {args.rounds} rounds, the two sides alternating every "
          f"{args.batch} images", flush=True)
    small = min(len(blobs), 2 * args.batch)  # warm-up (imports, allocator, caches)
    ours(0, small)
    baseline(0, min(4, len(blobs)))
    sides = {"baseline": baseline, "ours": ours}
    rates: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
    for r in range(args.rounds):
        cpu = dict.fromkeys(sides, 0.0)
        wall = dict.fromkeys(sides, 0.0)
        for lo in range(0, len(blobs), args.batch):  # interleaved, so that outside load hits both sides alike
            hi = min(len(blobs), lo + args.batch)
            for name, fn in sides.items():
                w0, c0 = time.perf_counter(), time.process_time()
                fn(lo, hi)
                wall[name] += time.perf_counter() - w0
                cpu[name] += time.process_time() - c0
        for name in sides:
            rates[name].append((len(blobs) / max(cpu[name], 1e-9), len(blobs) / max(wall[name], 1e-9)))
        print(f"  round {r + 1}: baseline {rates['baseline'][-1][0]:6.1f}, ours {rates['ours'][-1][0]:6.1f} "
              f"img/s per CPU second (ratio {rates['ours'][-1][0] / rates['baseline'][-1][0]:.2f}x)", flush=True)
    summary = {}
    for name, vals in rates.items():
        summary[f"{name}_cpu"] = statistics.median(v[0] for v in vals)
        summary[f"{name}_wall"] = statistics.median(v[1] for v in vals)
    ratio = statistics.median(o[0] / b[0] for o, b in zip(rates["ours"], rates["baseline"]))
    print(f"baseline (torchvision on PIL + Python-loop masks on {args.baseline_masks} crops): "
          f"{summary['baseline_cpu']:.1f} img/s/core "
          f"(wall {summary['baseline_wall']:.1f})")
    print(f"ours (MultiCropTransform on bytes, batch {args.batch}): {summary['ours_cpu']:.1f} img/s/core "
          f"(wall {summary['ours_wall']:.1f})")
    print(f"speed-up: {ratio:.2f}x per core (median of the per-round ratios)")
    summary["ratio"] = ratio
    return summary


def run_e2e(args: argparse.Namespace, extra: list[str]) -> dict[str, float]:
    """End-to-end Ray Data throughput: the pipeline side's ``benchmarks/data_e2e.py`` on ``IMAGE_DIR`` with this
    script's ``--config``/``--set`` and any further arguments (e.g. ``--actors 1 2 --epochs 2``)."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    try:
        import data_e2e
    except ImportError as e:
        raise SystemExit(f"--mode e2e needs benchmarks/data_e2e.py ({e})") from None
    argv = ["--source", args.image_dir, "--config", args.config, *(["--set", *args.set] if args.set else []), *extra]
    return {"returncode": float(data_e2e.main(argv) or 0)}


def main(argv: Optional[list[str]] = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("image_dir", help="folder of images (searched recursively)")
    ap.add_argument("--mode", choices=("percore", "e2e"), default="percore")
    ap.add_argument("--config", default="vit_small_16", help="preset or YAML (default: the paper's ViT-S/16 recipe)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="config override")
    ap.add_argument("--n", type=int, default=200, help="images to use (0: all)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating timing rounds per side")
    ap.add_argument("--batch", type=int, default=16, help="images per MultiCropTransform call")
    ap.add_argument("--epoch", type=int, default=0)
    ap.add_argument("--baseline-masks", choices=("all", "global"), default="all",
                    help="baseline masks every crop as iBOT's loader does (all) or only the global crops (global)")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the summary figures as JSON")
    args, extra = ap.parse_known_args(argv)
    if args.mode == "percore" and extra:
        ap.error(f"unrecognized arguments: {' '.join(extra)}")
    summary = run_percore(args) if args.mode == "percore" else run_e2e(args, extra)
    if args.json:
        import json

        Path(args.json).write_text(json.dumps({"mode": args.mode, **summary}, indent=2))
    return summary


if __name__ == "__main__":
    main()
