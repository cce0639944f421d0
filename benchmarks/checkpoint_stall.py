"""Checkpoint stall: how long the training loop is blocked per periodic checkpoint, background upload
(``CheckpointUploadMode.ASYNC``, what periodic checkpoints use) against the synchronous upload (what every checkpoint
used before), at ViT-S/16 size, to a local S3-compatible server (moto) on 127.0.0.1.

    python benchmarks/checkpoint_stall.py [--config vit_small_16] [--checkpoints 3] [--rate BYTES_PER_S]

One Ray Train run (one CPU worker) writes checkpoints through the worker loop's own ``_report_checkpoint``
(pipelines/train_worker.py: training state -> local folder -> ``ray.train.report``), alternating synchronous and
background ones, so both modes are measured in the same run against the same storage. The state is the real one of
the config: student + teacher + heads, AdamW moments for every student parameter (~0.47 GB for ``vit_small_16``).
"Stall" is the time ``_report_checkpoint`` blocks the loop; for a background checkpoint the upload then goes on while
the loop trains, and the benchmark waits for it before the next checkpoint (at ``train.checkpoint_every_steps=500``
a checkpoint is minutes of training apart, far longer than an upload). ``--rate`` puts a TCP proxy that forwards at
most that many bytes per second toward the server in front of it (a slower link than loopback).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for p in (REPO, REPO / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


def _loop(config: dict) -> None:
    """The Train worker: build the config's training state once, then checkpoint it ``2 * n + 1`` times."""
    import torch

    from ibot_ray.config import IBOTConfig
    from ibot_ray.model import build_student_teacher
    from ibot_ray.step import IBOTStep
    from pipelines.train_worker import _report_checkpoint, _wait_for_uploads

    cfg = IBOTConfig.from_dict(config["cfg"])
    student, teacher = build_student_teacher(cfg)
    runner = IBOTStep(cfg, student, teacher, steps_per_epoch=10_000, device=torch.device("cpu"))
    for group in runner.optimizer.param_groups:  # AdamW's moments, as after the first step
        for p in group["params"]:
            runner.optimizer.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(p),
                                         "exp_avg_sq": torch.zeros_like(p)}
    size = sum(t.numel() * t.element_size() for m in (student, teacher) for t in m.state_dict().values())
    size += sum(v.numel() * v.element_size() for s in runner.optimizer.state.values() for v in s.values())
    rows = []
    with tempfile.TemporaryDirectory() as logs:
        for k in range(2 * config["n"] + 1):
            background = k % 2 == 0 and k > 0  # the first one (sync) warms the storage connection up
            runner.counters.step = (k + 1) * 500
            stall = _report_checkpoint({"epoch": 0, "step": runner.step, "loss": 0.0}, step_runner=runner, cfg=cfg,
                                       data_epoch=0, rank=0, local_log_dir=Path(logs), epoch_length={},
                                       background=background)
            t0 = time.perf_counter()
            _wait_for_uploads()
            rows.append({"checkpoint": k, "background": background, "stall_s": stall,
                         "upload_after_s": time.perf_counter() - t0, "bytes": size})
    Path(config["out"]).write_text(json.dumps(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="vit_small_16")
    ap.add_argument("--checkpoints", type=int, default=3, help="checkpoints per mode (plus one warm-up)")
    ap.add_argument("--rate", type=float, default=None, help="bytes/s toward the server (a throttling proxy)")
    args = ap.parse_args()

    import logging

    import boto3
    from moto.server import ThreadedMotoServer
    from tcp_proxy import TCPProxy

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request lines

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    proxy = TCPProxy(port, rate=args.rate).start() if args.rate else None
    endpoint = f"http://127.0.0.1:{proxy.port if proxy else port}"
    aws = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    os.environ.update(aws)  # the local Ray's workers inherit it
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1").create_bucket(Bucket="bench")

    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from ibot_ray.config import load_config

    cfg = load_config(args.config)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    out = Path(tempfile.mkdtemp()) / "stall.json"
    try:
        TorchTrainer(
            _loop, train_loop_config={"cfg": cfg.to_dict(), "n": args.checkpoints, "out": str(out)},
            scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
            run_config=ray.train.RunConfig(name="stall", storage_path="s3://bench/runs",
                                           checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
        ).fit()
    finally:
        ray.shutdown()
        if proxy:
            proxy.stop()
        server.stop()
    rows = json.loads(out.read_text())
    shutil.rmtree(out.parent, ignore_errors=True)
    print(f"checkpoint of {args.config}: {rows[0]['bytes'] / 1e9:.2f} GB, storage s3 (moto) at {endpoint}"
          + (f" through a {args.rate / 1e6:.1f} MB/s proxy" if args.rate else ""))
    print(f"{'#':>3} {'mode':<11} {'loop blocked':>13} {'upload after':>13}")
    for r in rows:
        mode = "warm-up" if r["checkpoint"] == 0 else ("background" if r["background"] else "sync")
        print(f"{r['checkpoint']:>3} {mode:<11} {r['stall_s']:>12.2f}s {r['upload_after_s']:>12.2f}s")
    sync = [r["stall_s"] for r in rows[1:] if not r["background"]]
    bg = [r["stall_s"] for r in rows[1:] if r["background"]]
    print(f"median loop blocked per checkpoint: sync {statistics.median(sync):.2f} s, background "
          f"{statistics.median(bg):.2f} s (ratio {statistics.median(bg) / statistics.median(sync):.3f})")


if __name__ == "__main__":
    main()
