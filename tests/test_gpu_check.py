"""benchmarks/gpu_check.sh, the one-call GPU measurement, in its CPU smoke mode: every eager section runs and the
summary lists its figures (the GPU figures themselves need a lent GPU; the benchmarks guide says how)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_smoke_runs_every_section_on_a_cpu(tmp_path):
    env = {**os.environ, "DEVICE": "cpu", "PYTHON": sys.executable, "DEADLINE_S": "1500"}
    env.pop("PYTHONPATH", None)  # the script must find the package from the checkout alone
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "-", str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=1600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [(r["config"], r["batch"], r["compile"]) for r in rows] == [("demo", 2, False)] * 2
    assert all(r["img_per_s"] > 0 and r["gflop_per_img"] > 0 for r in rows) and "profile" in rows[0]
    log = (tmp_path / "log.txt").read_text()
    assert "=== summary" in log and "a CUDA device only" in log and "skipped" not in log
