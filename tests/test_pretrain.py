"""The Ray Train driver on a real local Ray: resume by name, SIGKILL fault tolerance, config errors before Ray.

The elastic (node loss / node add) scenario needs its own simulated multi-node cluster and lives in
``test_elastic.py``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import InThread

from ibot_ray.config import load_config
from pipelines.metrics import read_metrics
from pipelines.train_worker import rank_batch

TINY = [
    "model.depth=2", "model.patch_size=8", "crops.global_crops_size=32", "crops.local_crops_size=16",
    "crops.local_crops_number=2", "head.out_dim=256", "head.patch_out_dim=256", "head.hidden_dim=128",
    "head.bottleneck_dim=64", "optim.batch_size=16", "optim.warmup_epochs=1", "loss.warmup_teacher_temp_epochs=1",
    "data.eval_source=null", "data.actors=[1,1]", "data.actor_batch_size=16", "train.num_workers=[2,2]",
    "train.checkpoint_every_steps=2", "train.log_every_steps=1", "train.keep_checkpoints=2", "train.knn_every_epochs=0",
    "eval.image_size=32",
]


def test_rank_batch_keeps_the_global_batch_exact():
    for g in (16, 15, 1024, 7):
        for w in range(1, 8):
            if g < w:
                continue
            parts = [rank_batch(g, w, r) for r in range(w)]
            assert sum(share for _, share, _ in parts) == g
            assert all(read >= share for read, share, _ in parts)
            # the loss weights make DDP's average of per-rank means the mean over all g images
            assert sum(weight * share for _, share, weight in parts) / w == pytest.approx(
                sum(share * share for _, share, _ in parts) / g)
            assert sum(weight for _, _, weight in parts) / w == pytest.approx(1.0)


def _steps(rows):
    return [r["step"] for r in rows if "loss" in r]


def _starts(rows):
    return [r for r in rows if r.get("event") == "start"]


@pytest.fixture
def folder_data(tmp_path, image_writer):
    root = tmp_path / "images"
    image_writer(root, 96, kinds=("jpeg", "png", "webp"), size=(40, 40))
    return root


def test_sigkilled_worker_restarts_from_checkpoint_and_completes(ray_cluster, tmp_path, folder_data):
    from pipelines.pretrain import pretrain

    cfg = load_config("demo", TINY + [f"data.source={folder_data}", "optim.epochs=3"])  # 6 steps/epoch, 18 steps
    storage = tmp_path / "runs"
    metrics = storage / "killed" / "logs" / "metrics.jsonl"
    run = InThread(lambda: pretrain(cfg, storage=str(storage), name="killed", knn=False, export=False))
    rows = run.wait(metrics, lambda r: any(s >= 5 for s in _steps(r)))
    pid = _starts(rows)[0]["pid"]
    killed_after = max(_steps(rows))
    os.kill(pid, signal.SIGKILL)  # rank 0's worker process, mid-run
    result = run.result(timeout=400)
    assert result.steps == 18
    rows = read_metrics(metrics)
    starts = _starts(rows)
    assert len(starts) == 2 and starts[0]["resumed_from"] == -1
    resumed = starts[1]["resumed_from"]
    assert resumed % 2 == 0 and 2 <= resumed <= killed_after  # the last committed checkpoint before the kill
    after = [r["step"] for r in rows[rows.index(starts[1]):] if "loss" in r]
    assert after[0] == resumed + 1 and after[-1] == 18 and after == sorted(after)
    ckpts = sorted(p.name for p in (storage / "killed").glob("step_*"))
    assert ckpts[-1] == "step_00000018" and len(ckpts) <= 2  # keep_checkpoints


def test_second_invocation_with_the_same_name_resumes(ray_cluster, tmp_path, folder_data):
    from pipelines.pretrain import pretrain

    storage = tmp_path / "runs"
    metrics = storage / "again" / "logs" / "metrics.jsonl"
    cfg = load_config("demo", TINY + [f"data.source={folder_data}", "optim.epochs=2", "train.max_failures=0"])
    run = InThread(lambda: pretrain(cfg, storage=str(storage), name="again", knn=False, export=False))
    rows = run.wait(metrics, lambda r: any(s >= 5 for s in _steps(r)))
    os.kill(_starts(rows)[0]["pid"], signal.SIGKILL)  # no retries allowed: the first invocation fails
    assert run.join(timeout=300) and run.error is not None, "the run should have failed with max_failures=0"
    first_steps = _steps(read_metrics(metrics))
    assert max(first_steps) < 12

    result = pretrain(cfg, storage=str(storage), name="again", knn=False, export=True)  # same command again
    rows = read_metrics(metrics)
    starts = _starts(rows)
    assert len(starts) == 2 and starts[1]["resumed_from"] >= 2, starts
    assert result.steps == 12
    after = [r["step"] for r in rows[rows.index(starts[1]):] if "loss" in r]
    assert after[0] == starts[1]["resumed_from"] + 1  # continues, never from scratch
    assert result.export_path and Path(result.export_path).exists()
    # the schedules continue too: the lr at a resumed step equals the uninterrupted schedule's value
    from ibot_ray.schedules import Schedules

    sched = Schedules(cfg, steps_per_epoch=6)
    for r in rows:
        if "lr" in r:
            assert r["lr"] == pytest.approx(sched.at(r["step"] - 1)["lr"])


def test_only_checkpoints_reach_ray_train(ray_cluster, tmp_path, folder_data):
    """The loop logs every step but reports to Ray Train only at its checkpoints: the controller takes one report
    per worker per poll (2 s), so a report per log step would block the step until the next poll. The steps Ray
    Train receives are exactly the ones the sweep's ASHA arithmetic expects, each with a checkpoint."""
    import ray.train

    from pipelines.failures import fit_or_raise_fatal
    from pipelines.pretrain import build_trainer
    from tune.sweep import report_steps

    log = tmp_path / "reports.jsonl"

    class ReportLog(ray.train.UserCallback):  # runs in the Train controller: it appends to a file
        def after_report(self, run_context, metrics, checkpoint):
            with open(log, "a") as f:
                f.write(json.dumps({"steps": [m["step"] for m in metrics], "checkpoint": checkpoint is not None,
                                    "rank0": metrics[0]}) + "\n")

    storage = tmp_path / "runs"
    cfg = load_config("demo", TINY + [f"data.source={folder_data}", "optim.epochs=2", "train.checkpoint_every_steps=4",
                                      "train.max_failures=0"])
    trainer, info = build_trainer(cfg, storage=str(storage), name="reports", callbacks=[ReportLog()])
    fit_or_raise_fatal(trainer)
    spe = int(info["steps_per_epoch"])
    assert spe == 6
    reports = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["steps"] for r in reports] == [[s, s] for s in report_steps(cfg, spe)] == [[4, 4], [6, 6], [8, 8],
                                                                                         [12, 12]]
    assert all(r["checkpoint"] for r in reports)
    logged = _steps(read_metrics(storage / "reports" / "logs" / "metrics.jsonl"))
    assert logged == list(range(1, 13))  # every step still reaches the run's own log
    # Ray Train's snapshot keeps the metrics reported with the latest checkpoint: a sweep trial that resumes hands them
    # to Tune again, and a restart streams from its data epoch.
    from pipelines.ingest import latest_checkpoint_metrics

    assert latest_checkpoint_metrics(str(storage / "reports")) == reports[-1]["rank0"]
    assert latest_checkpoint_metrics(str(storage / "no such run")) == {}


def test_bad_config_fails_before_any_cluster_resource():
    env = dict(os.environ, RAY_ADDRESS="")
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "ibot_ray.cli", "pretrain", "--set", "loss.teacher_temp=-0.5"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2
    assert "loss.teacher_temp" in p.stderr and "positive" in p.stderr
    assert "Ray" not in p.stderr and "ray" not in p.stdout.lower()  # no local Ray was started
    p = subprocess.run([sys.executable, "-m", "ibot_ray.cli", "pretrain", "--set", "train.num_workers=[4,2]"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2 and "train.num_workers" in p.stderr
    assert time.time() - t0 < 100


def test_unlabelled_knn_bank_is_a_config_error(tmp_path, image_writer, capsys):
    """``ibot-ray pretrain`` with the online k-NN on and its memory bank defaulting to an unlabelled training source
    (a flat image folder): one error naming the source and the settings, exit 2, before Ray starts."""
    from ibot_ray.cli import main as cli_main

    flat, labelled = tmp_path / "flat", tmp_path / "labelled"
    image_writer(flat, 4, kinds=("jpeg",), size=(40, 40))
    image_writer(labelled, 4, kinds=("jpeg",), size=(40, 40), classes=["a", "b"])
    argv = ["pretrain", "--data", str(flat), "--storage", str(tmp_path / "runs"),
            "--set", f"data.eval_source={labelled}"]
    assert cli_main(argv) == 2
    out = capsys.readouterr()
    lines = [line for line in out.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ibot-ray: config error: online k-NN: train split"), out.err
    assert str(flat) in lines[0] and "unlabelled" in lines[0] and "Traceback" not in out.err
    assert "data.source" in lines[0] and "data.eval_train_source" in lines[0] and "data.eval_source=null" in lines[0]
    assert not (tmp_path / "runs").exists()
