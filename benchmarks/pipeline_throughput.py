"""Training images per second of the whole pipeline (``ibot-ray pretrain``: Ray Data actors -> Ray Train workers),
a candidate setting against a baseline measured in the same run.

    python benchmarks/pipeline_throughput.py [--config demo] [--epochs 4] [--rounds 1] [--set key=value ...]
        --baseline data.actor_batch_size=32 [--baseline key=value ...]

Each round runs ``ibot-ray pretrain`` twice, the baseline (``--set`` plus ``--baseline``) then the candidate (``--set``
only), with no online k-NN, and reads the rate from the run's own metrics: images trained between step 20 (after the
actor pool and the workers have started) and the last step, over the seconds between those two log lines. It prints
one JSON line per run and the candidate / baseline ratio of the medians. Give the machine to it alone: another job
on the same cores changes both rates.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

WARM_STEP = 20  # the rate is measured from this step on


def training_rate(metrics: Path, batch_size: int) -> tuple[float, int, float]:
    """(images per second, steps, seconds) between step :data:`WARM_STEP` and the last logged step."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "images_per_s" in r and r.get("step", 0) >= WARM_STEP]
    if len(rows) < 2:
        raise RuntimeError(f"{metrics}: fewer than two log lines after step {WARM_STEP}; run more epochs")
    a, b = rows[0], rows[-1]
    steps, seconds = b["step"] - a["step"], b["time"] - a["time"]
    return steps * batch_size / seconds, steps, seconds


def run(name: str, sets: list[str], storage: Path, config: str) -> dict:
    from ibot_ray.config import load_config

    cfg = load_config(config, sets)
    cmd = [sys.executable, "-m", "ibot_ray.cli", "pretrain", "--config", config, "--storage", str(storage),
           "--name", name] + [a for s in sets for a in ("--set", s)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{name}: ibot-ray pretrain exited {done.returncode}:\n{done.stderr[-3000:]}")
    rate, steps, seconds = training_rate(storage / name / "logs" / "metrics.jsonl", cfg.optim.batch_size)
    return {"run": name, "images_per_s": round(rate, 1), "steps": steps, "seconds": round(seconds, 1)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="demo")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="both runs")
    ap.add_argument("--baseline", action="append", required=True, help="the baseline's overrides (key=value)")
    a = ap.parse_args(argv)
    common = [f"optim.epochs={a.epochs}", "train.knn_every_epochs=0", *a.overrides]
    rates: dict[str, list[float]] = {"baseline": [], "candidate": []}
    with tempfile.TemporaryDirectory(prefix="ibot_throughput_") as tmp:
        for r in range(a.rounds):
            for kind, sets in (("baseline", common + a.baseline), ("candidate", common)):
                out = run(f"{kind}_{r}", sets, Path(tmp), a.config)
                rates[kind].append(out["images_per_s"])
                print(json.dumps(out), flush=True)
    base, cand = statistics.median(rates["baseline"]), statistics.median(rates["candidate"])
    summary = {"baseline": " ".join(a.baseline), "baseline_images_per_s": base, "candidate_images_per_s": cand,
               "ratio": round(cand / base, 2)}
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
