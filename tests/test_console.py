"""The console of ``ibot-ray pretrain``: the renderer fed with real metric dicts, and the CLI on a real local Ray.

The CLI test runs two tiny pretraining jobs as subprocesses (quiet and ``--verbose``, side by side) and checks that
the quiet one shows the run's own lines only, none of Ray's internals, and that ``--verbose`` brings Ray's back. The
quiet job starts its own local Ray, as a user's first run does; the verbose one joins the test session's Ray
(``--address``), which spares the 2-core machine a second Ray instance's start-up. The quiet job's data is a flat
(unlabelled) folder with ``data.eval_source=auto``: no k-NN line about any data, and the summary says how to get a
quality figure."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.console import ConsoleMailbox, ConsoleRenderer, format_failure, format_summary

# Two rows of metrics.jsonl of a real demo run (`ibot-ray pretrain --set optim.epochs=2`, 62 steps/epoch), as rank 0
# hands them to the console ("time" is the JSONL writer's).
ROW_5 = {"step": 5, "epoch": 0, "loss": 10.551541805267334, "cls": 6.367830276489258, "mim": 4.183711409568787,
         "lr": 1.639344262295082e-05, "wd": 0.04092352178945885, "momentum": 0.9960102613532162,
         "teacher_temp": 0.04, "teacher_patch_temp": 0.04, "grad_norm": 7.252603054046631, "skipped_steps": 0,
         "step_skipped": False, "world_size": 2, "teacher_entropy": 5.046736001968384,
         "teacher_entropy_frac": 0.7280901002715581, "teacher_patch_entropy": 4.846252093627582,
         "teacher_patch_entropy_frac": 0.6991663862374269, "teacher_batch_entropy": 6.058213502428655,
         "teacher_batch_entropy_frac": 0.874015457660038, "prototypes_used": 427.61082837067676, "target_rows": 128,
         "cls_kl": 1.321094274520874, "feature_std": 0.75315170783778, "images_per_s": 14.178040525378279,
         "data_wait_fraction": 0.6310938548512016, "data_epoch": 0, "preempted": False, "health": "warm-up",
         "bad_images": 0}
ROW_124 = {"step": 124, "epoch": 1, "loss": 9.494589805603027, "cls": 6.179880142211914, "mim": 3.314709424972534,
           "lr": 1.1597948572039314e-06, "wd": 0.3999422335533575, "momentum": 0.9999993581505928,
           "teacher_temp": 0.04, "teacher_patch_temp": 0.04, "grad_norm": 1.257073163986206, "skipped_steps": 0,
           "step_skipped": False, "world_size": 2, "teacher_entropy": 5.494113922119141,
           "teacher_entropy_frac": 0.7926330909520297, "teacher_patch_entropy": 5.192020632186026,
           "teacher_patch_entropy_frac": 0.749050241824796, "teacher_batch_entropy": 6.244363462619423,
           "teacher_batch_entropy_frac": 0.9008712201029277, "prototypes_used": 515.1012393567555, "target_rows": 128,
           "cls_kl": 0.6857662200927734, "feature_std": 0.6767006784033917, "images_per_s": 52.70355926685544,
           "data_wait_fraction": 0.008274439087210423, "data_epoch": 1, "preempted": False, "health": "ok",
           "bad_images": 0, "knn_top1": 56.0, "knn_top5": 92.0}


def _progress(row: dict, t: float) -> dict:
    return {"kind": "progress", "time": t, "metrics": row}


def test_renderer_plain_mode_prints_a_line_per_log_step_and_one_per_event():
    out = io.StringIO()
    r = ConsoleRenderer(total_steps=124, steps_per_epoch=62, out=out, tty=False, name="demo")
    r.handle({"kind": "start", "world": 2, "global_batch": 64, "per_rank_share": 32, "step": 0, "resumed_from": None})
    r.handle(_progress(ROW_5, 1000.0))
    r.handle(_progress({**ROW_5, "step": 65, "epoch": 1, "health": "ok"}, 1060.0))  # 60 steps in 60 s
    r.handle({"kind": "checkpoint", "name": "step_00000062", "step": 62})
    r.handle({"kind": "health", "step": 70, "message": "teacher targets near uniform"})
    r.handle({"kind": "start", "world": 1, "global_batch": 64, "per_rank_share": 64, "step": 62, "resumed_from": 62})
    r.handle({"kind": "preempted", "step": 100})
    r.handle({"kind": "start", "world": 1, "global_batch": 64, "per_rank_share": 64, "step": 100,
              "resumed_from": 100})
    r.handle({"kind": "knn", "epoch": 2, "step": 124, "knn_top1": 56.0, "knn_top5": 92.0})
    r.handle(_progress(ROW_124, 1100.0))
    r.handle({"kind": "unknown-kind"})  # ignored
    r.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "[ibot-ray] training started: 2 workers, global batch 64 (32 per rank), 124 steps"
    assert lines[1] == ("[ibot-ray] step 5/124 (4%) epoch 1/2 | 14 img/s | loss 10.5515 | health warm-up | ETA ?")
    assert lines[2] == "[ibot-ray] step 65/124 (52%) epoch 2/2 | 14 img/s | loss 10.5515 | health ok | ETA 59s"
    assert lines[3] == "[ibot-ray] checkpoint step_00000062 saved (step 62/124, epoch 1/2)"
    assert lines[4] == "[ibot-ray] WARNING step 70: teacher targets near uniform"
    assert lines[5].startswith("[ibot-ray] resized: 2 -> 1 workers, continuing from the checkpoint at step 62")
    assert lines[6].startswith("[ibot-ray] preemption notice") and "step 100" in lines[6]
    assert lines[7].startswith("[ibot-ray] worker group restarted: continuing from the checkpoint at step 100")
    assert lines[8] == "[ibot-ray] k-NN after epoch 2/2: top-1 56.0% top-5 92.0%"
    assert lines[9].startswith("[ibot-ray] step 124/124 (100%) epoch 2/2 | 53 img/s | loss 9.4946 | k-NN 56.0% | "
                               "health ok")
    assert len(lines) == 10
    assert (r.resizes, r.restarts, r.preemptions, r.checkpoints) == (1, 1, 1, 1)


def test_renderer_first_start_of_a_resumed_run():
    out = io.StringIO()
    r = ConsoleRenderer(total_steps=124, steps_per_epoch=62, out=out, tty=False)
    r.handle({"kind": "start", "world": 2, "global_batch": 64, "per_rank_share": 32, "step": 62, "resumed_from": 62})
    assert out.getvalue().startswith("[ibot-ray] resumed from the checkpoint at step 62/124 (epoch 1/2)")
    assert r.restarts == 0


def test_renderer_tty_mode_draws_one_bar_with_the_latest_numbers():
    out = io.StringIO()
    r = ConsoleRenderer(total_steps=124, steps_per_epoch=62, out=out, tty=True, name="demo")
    r.handle({"kind": "start", "world": 2, "global_batch": 64, "per_rank_share": 32, "step": 0, "resumed_from": None})
    r.handle(_progress(ROW_5, 1000.0))
    r.handle({"kind": "checkpoint", "name": "step_00000062", "step": 62})
    r.handle(_progress(ROW_124, 1100.0))
    r.close()
    text = out.getvalue()
    assert "[ibot-ray] training started" in text and "[ibot-ray] checkpoint step_00000062 saved" in text
    final = text.split("\r")[-1]
    assert "124/124" in final and "loss 9.4946" in final and "k-NN 56.0%" in final and "health ok" in final
    assert "53 img/s" in final and "epoch 2/2" in final
    assert "[ibot-ray] step " not in text  # no per-step lines on a terminal


def test_mailbox_keeps_order_and_drops_what_was_read():
    box = ConsoleMailbox()
    for i in range(3):
        box.post({"kind": "progress", "i": i})
    msgs, cursor = box.poll(0)
    assert [m["i"] for m in msgs] == [0, 1, 2] and cursor == 3
    box.post({"kind": "checkpoint", "i": 3})
    msgs, cursor = box.poll(cursor)
    assert [m["i"] for m in msgs] == [3] and cursor == 4
    assert box._messages == [{"kind": "checkpoint", "i": 3}]  # the first three were dropped
    assert box.poll(cursor) == ([], 4)


def test_summary_and_failure_blocks():
    text = format_summary(name="demo", steps=124, total_steps=124, wall_s=270.0, train_s=200.0, metrics=ROW_124,
                          run_path="/r/demo", checkpoint_path="/r/demo/step_00000124",
                          export_path="/r/demo/export/teacher_backbone.safetensors",
                          knn_before={"knn_top1": 57.6, "knn_top5": 91.8},
                          knn_after={"knn_top1": 56.0, "knn_top5": 92.0},
                          knn_pixels={"knn_top1": 80.1, "knn_top5": 98.0, "variant": "centred"},
                          log_dir="/tmp/ray/session_x/logs")
    lines = text.splitlines()
    assert lines[0] == "[ibot-ray] done: run 'demo', 124/124 steps in 4m30s (training 3m20s)"
    assert "k-NN top-1      trained teacher 56.0% (top-5 92.0%)" in text
    assert "random init     57.6%  (-1.6 points)" in text
    assert "raw pixels      80.1%  (-24.1 points; centred pixels, same split)" in text
    assert "still worse than raw pixels" in text
    assert "health          healthy: no collapse detected (last status: ok)" in text
    assert "/r/demo/logs/metrics.jsonl" in text
    collapsed = format_summary(name="demo", steps=60, total_steps=124, wall_s=1.0, train_s=1.0, run_path="/r",
                               metrics={**ROW_124, "health": "uniform-collapse", "health_alarms": "uniform-collapse"},
                               checkpoint_path=None, export_path=None, knn_before=None, knn_after=None)
    assert "health          collapsed: uniform-collapse" in collapsed
    assert "/tmp/ray/session_x/logs" in text and "--verbose" in text

    from ray.train import WorkerGroupError

    err = WorkerGroupError("[Rank 0]: RuntimeError: the data shard of rank 0 produced no full batch",
                           {0: RuntimeError("x")})
    block = format_failure(err, "/tmp/ray/session_x/logs")
    assert block.startswith("[ibot-ray] training failed (WorkerGroupError):\n")
    assert "  [Rank 0]: RuntimeError: the data shard of rank 0 produced no full batch" in block
    assert "/tmp/ray/session_x/logs" in block


# ---- the CLI on a real local Ray ---------------------------------------------------------------

TINY = [
    "model.depth=2", "model.patch_size=8", "crops.global_crops_size=32", "crops.local_crops_size=16",
    "crops.local_crops_number=2", "head.out_dim=256", "head.patch_out_dim=256", "head.hidden_dim=128",
    "head.bottleneck_dim=64", "optim.batch_size=16", "optim.epochs=1", "optim.warmup_epochs=1",
    "loss.warmup_teacher_temp_epochs=1", "data.eval_source=null", "data.actors=[1,1]", "data.actor_batch_size=16",
    "train.num_workers=[2,2]", "train.checkpoint_every_steps=4", "train.checkpoint_min_interval_s=0",
    "train.log_every_steps=2", "train.keep_checkpoints=2",
    "train.knn_every_epochs=0", "eval.image_size=32",
]
RAY_INTERNALS = ("PlacementGroupCleaner", "TrainingReport(", "Reporting training result", "core_worker",
                 "(RayTrainWorker pid=", "(TrainController pid=", "DeprecationWarning", "Started a local Ray")


def _cli(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ)
    for k in ("RAY_ADDRESS", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "RAY_DATA_DISABLE_PROGRESS_BARS"):
        env.pop(k, None)  # as a user runs it (conftest quiets some of Ray for the other tests)
    return subprocess.Popen([sys.executable, "-m", "ibot_ray.cli", "pretrain", "--config", "demo", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.slow
def test_cli_console_shows_the_run_and_no_ray_internals(ray_cluster, tmp_path, image_writer):
    data = tmp_path / "images"
    image_writer(data, 96, kinds=("jpeg", "png"), size=(40, 40))  # 6 steps of 16
    common = ["--data", str(data), "--storage", str(tmp_path / "runs")] + [a for s in TINY for a in ("--set", s)]
    quiet = _cli(common + ["--name", "quiet", "--set", "data.eval_source=auto"])  # a flat folder: no k-NN
    address = ray_cluster.get_runtime_context().gcs_address
    verbose = _cli(common + ["--name", "loud", "--verbose", "--address", address])  # side by side: one wait for both
    out, err = quiet.communicate(timeout=480)
    vout, verr = verbose.communicate(timeout=480)
    assert quiet.returncode == 0, err[-3000:]
    assert verbose.returncode == 0, verr[-3000:]

    for needle in RAY_INTERNALS:
        assert needle not in out and needle not in err, (needle, out, err)
    assert err == "", err
    lines = out.splitlines()
    assert lines[0].startswith("[ibot-ray] run 'quiet': 96 training images, 6 steps/epoch, 6 steps")
    derived = [ln for ln in lines if ln.startswith("[ibot-ray] derived ")]  # the preset's `auto` fields, one each
    assert lines[1:1 + len(derived)] == derived and all("(set it to override)" in ln for ln in derived)
    assert lines[1 + len(derived)] == "[ibot-ray] training started: 2 workers, global batch 16 (8 per rank), 6 steps"
    progress = [ln for ln in lines if ln.startswith("[ibot-ray] step ")]
    assert [ln.split()[2] for ln in progress] == ["2/6", "4/6", "6/6"]  # one line per log step (not a TTY)
    assert all(" img/s | loss " in ln and " | ETA " in ln for ln in progress)
    assert "[ibot-ray] checkpoint step_00000006 saved (step 6/6, epoch 1/1)" in lines
    done = [i for i, ln in enumerate(lines) if ln.startswith("[ibot-ray] done: run 'quiet', 6/6 steps")]
    assert done and any(ln.strip().startswith("export ") for ln in lines[done[0]:])
    assert (tmp_path / "runs" / "quiet" / "export" / "teacher_backbone.safetensors").exists()
    # the data is unlabelled (a flat folder): no k-NN line about any data, and the summary says how to get a figure
    figures = ("top-1", "k-NN on", "k-NN split", "raw pixels", "random init", "demo's test split")
    assert not [f for f in figures if f in out], out
    assert "  quality         not measured: " in out
    words = " ".join(out.split())  # the summary wraps its long lines
    assert f"{data} is unlabelled (a flat image folder), so no k-NN was measured" in words
    assert "class subfolders" in words and "'ibot-ray eval MODEL --train LABELLED --val LABELLED'" in words
    logs = re.search(r"Ray's logs\s+(\S+);", out)
    assert logs, out
    # the cause is gone, not only its display: Ray Train's PlacementGroupCleaner could query the State API
    cleaner_logs = [p for p in Path(logs.group(1)).glob("worker-*.err") if "PlacementGroupCleaner" in p.read_text()]
    assert cleaner_logs, "no PlacementGroupCleaner log found"
    for p in cleaner_logs:
        assert "Failed to query Ray Train Controller actor state" not in p.read_text()

    # --verbose: Ray's own output comes back (worker log forwarding, Train's per-report log)
    both = vout + verr
    assert "(RayTrainWorker pid=" in both and "Reporting training result" in both
    assert "[ibot-ray] done: run 'loud', 6/6 steps" in vout
