"""How the driver grows with the data: time from ``ibot-ray pretrain`` to the first training step, and the driver
process's peak memory, on labelled Parquet sources of growing size, with the k-NN on the same source (its held-out
split and memory bank drawn from the run's one listing, pipelines/eval_split.py).

    python benchmarks/driver_start.py OUT [--rows 10000 100000 1000000] [--timeout 900]

The sources are the shipped demo's 4,000 labelled Fashion-MNIST PNGs written again and again (``OUT/rows_<N>/``,
files of 100,000 rows in row groups of 1,024: what a real Parquet export of a large collection looks like), so the
images are real and each size costs the same per row. Each size runs the command a user types (``python -m
ibot_ray.cli pretrain --data OUT/rows_<N> --storage OUT/runs``, the preset chosen for the data) in its own
process, reads that process's peak resident memory (``VmHWM`` in ``/proc/<pid>/status``, Linux), and stops it at
the first training step (the first row of the run's ``metrics.jsonl``). It prints, per size, the seconds to the
first step and the peak memory, each as a ratio to the smallest size measured in the same run, and the growth per
million rows that the two largest sizes imply.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
DEMO_TRAIN = REPO / "ibot_ray" / "demo_data" / "train.parquet"
ROWS_PER_FILE = 100_000
ROW_GROUP = 1024


def write_source(folder: Path, rows: int) -> Path:
    """``rows`` labelled images (the demo's, repeated) as Parquet files of ``ROWS_PER_FILE`` rows; kept if present."""
    done = folder / ".complete"
    if done.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    demo = pq.read_table(DEMO_TRAIN, columns=["image", "label"])
    for part, start in enumerate(range(0, rows, ROWS_PER_FILE)):
        n = min(ROWS_PER_FILE, rows - start)
        reps = math.ceil(n / demo.num_rows)
        table = pa.concat_tables([demo] * reps).slice(0, n)
        pq.write_table(table, folder / f"part-{part:05d}.parquet", row_group_size=ROW_GROUP)
    done.touch()
    return folder


def peak_rss(pid: int) -> int:
    """The peak resident memory of process ``pid`` so far, in bytes (0 once it has gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def first_step(source: Path, runs: Path, name: str, timeout: float) -> dict:
    """Run ``ibot-ray pretrain`` on ``source`` until its first training step; seconds and peak driver memory."""
    metrics = runs / name / "logs" / "metrics.jsonl"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "ibot_ray.cli", "pretrain", "--data", str(source), "--storage", str(runs),
           "--name", name]
    t0 = time.time()
    log = runs / f"{name}.out"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    peak, seconds = 0, None
    try:
        while time.time() - t0 < timeout:
            peak = max(peak, peak_rss(proc.pid))
            if metrics.exists() and any("loss" in json.loads(line) for line in metrics.read_text().splitlines()
                                        if line.strip()):
                seconds = time.time() - t0
                break
            if proc.poll() is not None:
                break
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl+C: the driver stops its run and its local Ray
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    if seconds is None:
        raise SystemExit(f"driver_start.py: no training step within {timeout} s on {source}:\n{text[-3000:]}")
    lines = [ln for ln in text.splitlines() if ln.startswith("[ibot-ray]") and "k-NN" in ln or " run '" in ln]
    return {"seconds": seconds, "peak_rss_mb": peak / 2**20, "lines": lines}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--timeout", type=float, default=900.0)
    a = ap.parse_args(argv)
    out = Path(a.out)
    results = []
    for rows in sorted(a.rows):
        source = write_source(out / f"rows_{rows}", rows)
        r = first_step(source, out / "runs", f"start_{rows}_{int(time.time())}", a.timeout)
        results.append({"rows": rows, **r})
        base = results[0]
        print(f"{rows:>10,} rows: first step after {r['seconds']:6.1f} s ({r['seconds'] / base['seconds']:.2f}x), "
              f"driver peak {r['peak_rss_mb']:7.0f} MB ({r['peak_rss_mb'] / base['peak_rss_mb']:.2f}x the "
              f"{base['rows']:,}-row source)", flush=True)
        for line in r["lines"]:
            print(f"    {line}", flush=True)
    if len(results) >= 2:
        lo, hi = results[-2], results[-1]
        per_m = 1e6 / (hi["rows"] - lo["rows"])
        ds, dm = (hi["seconds"] - lo["seconds"]) * per_m, (hi["peak_rss_mb"] - lo["peak_rss_mb"]) * per_m
        print(f"growth between {lo['rows']:,} and {hi['rows']:,} rows: {ds:+.1f} s and {dm:+.0f} MB per million "
              f"rows; at 100M rows: ~{hi['seconds'] + ds * (100e6 - hi['rows']) / 1e6:.0f} s, "
              f"~{hi['peak_rss_mb'] + dm * (100e6 - hi['rows']) / 1e6:.0f} MB (linear)")
    return results


if __name__ == "__main__":
    main()
