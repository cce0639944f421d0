#!/usr/bin/env python3
"""End-to-end throughput of the Ray Data ingest: images/s delivered to a consumer, and the cost of epoch boundaries.

For each K in ``--actors`` the script builds the training Dataset (``data.actors=[K, K]``) from one listing and reads
``--epochs`` data epochs on the CPU (the consumer only touches each batch) in two ways, in the same run:

* ``per_epoch``: a fresh Ray Data execution per epoch, as the trainer did before issue #12 (a new actor pool per
  epoch, warmed up from ``min_size``),
* ``stream``: ONE execution over all epochs, as the trainer does now (``pipelines/ingest.py``: ``TrainStream``); an
  epoch ends after ``listed // batch`` batches, as in training.

It prints one JSON line per (mode, K, epoch) with:

* ``boundary_s``: from the end of the previous epoch (its last batch; the request for epoch 0) to the first batch of
  this epoch, the time a trainer waits at each epoch start,
* ``images_per_s``: images / wall time of the epoch, boundary included, and ``steady_images_per_s`` after the
  first batch,
* ``object_store_bytes_per_sample`` (uint8 crops, uint8 masks, label), ``float32_bytes_per_sample`` for comparison,
  and ``input_bytes_per_sample`` (mean encoded image size),

and a ``summary`` line per K: the mean boundary after the first epoch in both modes and their ratio.

Not a test: numbers depend on the machine. Example (2-core box):

    .venv/bin/python benchmarks/data_e2e.py --images 400 --actors 1 --epochs 3
    .venv/bin/python benchmarks/data_e2e.py --source demo --config demo --actors 1 2
    .venv/bin/python benchmarks/data_e2e.py --config vit_small_16 --size 480 360 --images 128
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)


def write_jpegs(root: Path, n: int, size: tuple[int, int], seed: int = 0) -> float:
    """``n`` smooth random-colour JPEGs of ``size`` (W, H) under ``root``; returns the mean file size in bytes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    total = 0
    for i in range(n):
        base = rng.integers(0, 256, size=3)
        img = base + 70 * np.sin(xx[..., None] / rng.uniform(5, 40) + rng.uniform(0, 6, size=3)) \
            + 50 * np.cos(yy[..., None] / rng.uniform(5, 40)) + rng.normal(0, 8, size=(h, w, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        (root / f"{i:06d}.jpg").write_bytes(buf.getvalue())
        total += len(buf.getvalue())
    return total / max(1, n)


def row_bytes(batch: dict) -> tuple[int, int]:
    """(uint8 bytes per sample as stored, the same crops as float32) from one delivered batch of CPU tensors."""
    n = batch["global_crops"].shape[0]
    crops = sum(batch[k].numel() for k in ("global_crops", "local_crops")) // n
    masks = batch["masks"].numel() // n  # stored as uint8 in the Dataset
    return crops + masks + 8, 4 * crops + masks + 8


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="demo", help="preset name or YAML file (default: demo)")
    ap.add_argument("--set", nargs="*", default=[], metavar="SECTION.FIELD=VALUE", help="config overrides")
    ap.add_argument("--source", default=None, help="image folder / Parquet / 'demo' (default: synthetic JPEGs)")
    ap.add_argument("--images", type=int, default=256, help="synthetic JPEGs to write (without --source)")
    ap.add_argument("--size", type=int, nargs=2, default=(320, 240), metavar=("W", "H"), help="synthetic size")
    ap.add_argument("--actors", type=int, nargs="+", default=[1, 2], help="actor pool sizes K to measure")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32, help="consumer batch size")
    ap.add_argument("--num-cpus", type=int, default=None, help="logical CPUs for ray.init (default: max(cores, K+1))")
    a = ap.parse_args(argv)

    import ray

    from ibot_ray.config import load_config
    from pipelines.collate import iter_train_batches
    from pipelines.ingest import build_train_dataset, get_bad_input_stats, kill_monitor
    from pipelines.sources import list_source

    tmp = None
    input_bytes = None
    source = a.source
    if source is None:
        tmp = tempfile.TemporaryDirectory(prefix="ibot_bench_")
        input_bytes = write_jpegs(Path(tmp.name) / "imgs", a.images, tuple(a.size))
        source = str(Path(tmp.name) / "imgs")
    baseline = in_process_rate(load_config(a.config, [*a.set, f"data.source={source}"]), source)
    print(json.dumps({"baseline": "MultiCropTransform in the driver process, 1 thread, no Ray",
                      "images_per_s": round(baseline, 1)}), flush=True)
    ray.init(num_cpus=a.num_cpus or max(os.cpu_count() or 1, max(a.actors) + 1), include_dashboard=False,
             object_store_memory=1 << 30)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        for k in a.actors:
            cfg = load_config(a.config, [*a.set, f"data.actors=[{k},{k}]", f"data.source={source}"])
            listing = list_source(cfg)  # one listing for both modes
            if input_bytes is None:
                input_bytes = _mean_input_bytes(cfg, listing.info)
            spe = listing.info.num_items // a.batch_size
            gaps = {}
            for mode in ("per_epoch", "stream"):
                name = f"bench_ingest_{k}_{mode}"
                if mode == "stream":
                    ds, _ = build_train_dataset(cfg, listing=listing, monitor_name=name, num_epochs=a.epochs + 1)
                    batches = iter_train_batches(ds, cfg, a.batch_size, "cpu")
                    epochs = ((e, (next(batches, None) for _ in range(spe))) for e in range(a.epochs))
                else:
                    epochs = ((e, iter_train_batches(build_train_dataset(
                        cfg, listing=listing, monitor_name=name, start_epoch=e)[0], cfg, a.batch_size, "cpu"))
                        for e in range(a.epochs))
                gaps[mode] = []
                for epoch, it in epochs:
                    row = _measure(it, mode, k, epoch, a.batch_size)
                    gaps[mode].append(row["boundary_s"])
                    row.update({"listed": listing.info.num_items,
                                "steady_vs_k_x_baseline": round(row["steady_images_per_s"] / (k * baseline), 2)
                                if row["steady_images_per_s"] else None,
                                "input_bytes_per_sample": round(input_bytes or 0),
                                "bad_images": get_bad_input_stats(name, epoch)["count"],
                                "crops": f"{cfg.crops.global_crops_number}x{cfg.crops.global_crops_size}+"
                                         f"{cfg.crops.local_crops_number}x{cfg.crops.local_crops_size}"})
                    print(json.dumps(row), flush=True)
                kill_monitor(name)
            later = {m: sum(g[1:]) / max(1, len(g) - 1) for m, g in gaps.items()}
            print(json.dumps({"summary": "mean boundary after the first epoch", "actors": k,
                              "per_epoch_boundary_s": round(later["per_epoch"], 3),
                              "stream_boundary_s": round(later["stream"], 3),
                              "ratio": round(later["per_epoch"] / max(1e-9, later["stream"]), 1)}), flush=True)
    finally:
        ray.shutdown()
        if tmp is not None:
            tmp.cleanup()
    return 0


def _measure(batches, mode: str, k: int, epoch: int, batch_size: int) -> dict:
    """Consume one epoch's batches; the clock starts at the end of the previous epoch (now)."""
    t0 = time.perf_counter()
    first = None
    n = n_first = 0
    sizes = None
    for batch in batches:
        if batch is None:  # the stream ended early (should not happen: it holds one spare epoch)
            break
        if first is None:
            first = time.perf_counter() - t0
            sizes = row_bytes(batch)
            n_first = batch["global_crops"].shape[0]
        n += batch["global_crops"].shape[0]
        _ = batch["global_crops"][:, 0, 0, 0, 0].sum()  # touch the data
    dt = time.perf_counter() - t0
    return {"mode": mode, "actors": k, "epoch": epoch, "images": n, "wall_s": round(dt, 2),
            "boundary_s": round(first if first is not None else dt, 3), "images_per_s": round(n / dt, 1),
            "steady_images_per_s": round((n - n_first) / (dt - first), 1) if first and dt > first else None,
            "object_store_bytes_per_sample": sizes[0] if sizes else None,
            "float32_bytes_per_sample": sizes[1] if sizes else None}


def in_process_rate(cfg, source: str, limit: int = 96) -> float:
    """The baseline: images/s of the same decode + multi-crop + masks in this process on one thread, no Ray."""
    import torch

    from ibot_ray.multicrop import MultiCropTransform
    from pipelines.sources import describe_source, resolve_uri

    info = describe_source(cfg)
    if info.format == "folder":
        import pyarrow.fs as pafs

        from pipelines.sources import IMAGE_EXTENSIONS

        fs, root = resolve_uri(info.uri)
        paths = sorted(f.path for f in fs.get_file_info(pafs.FileSelector(root, recursive=True))
                       if f.is_file and f.path.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS)
        blobs = []
        for path in paths[:limit]:
            with fs.open_input_file(path) as f:
                blobs.append(f.read())
    else:
        import pyarrow.parquet as pq

        fs, _ = resolve_uri(info.uri)
        with fs.open_input_file(info.files[0]) as f:
            blobs = pq.read_table(f, columns=[cfg.data.image_column]).column(0).to_pylist()[:limit]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    transform = MultiCropTransform(cfg)
    transform(blobs[:16], list(range(16)), 0)  # warm-up
    t0 = time.process_time()
    for i in range(0, len(blobs), 16):
        chunk = blobs[i:i + 16]
        transform(chunk, list(range(i, i + len(chunk))), 0)
    rate = len(blobs) / max(1e-9, time.process_time() - t0)
    torch.set_num_threads(threads)
    return rate


def _mean_input_bytes(cfg, info) -> float:
    """Mean encoded size: file sizes for a folder, the image column's uncompressed Parquet size (the encoded images)."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    from pipelines.sources import resolve_uri

    if info.format == "folder":
        fs, root = resolve_uri(info.uri)
        sizes = [f.size for f in fs.get_file_info(pafs.FileSelector(root, recursive=True)) if f.is_file]
        return sum(sizes) / max(1, len(sizes))
    fs, _ = resolve_uri(info.uri)
    total = 0
    for path in info.files:
        with fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f).metadata
        for rg in range(meta.num_row_groups):
            for c in range(meta.num_columns):
                col = meta.row_group(rg).column(c)
                if col.path_in_schema == cfg.data.image_column:
                    total += col.total_uncompressed_size
    return total / max(1, info.num_items)


if __name__ == "__main__":
    raise SystemExit(main())
