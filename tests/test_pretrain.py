"""The Ray Train driver on a real local Ray: resume by name, SIGKILL fault tolerance, config errors before Ray.

The elastic (node loss / node add) scenario needs its own simulated multi-node cluster and lives in
``test_elastic.py``."""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import InThread, wait_for_a_committed_checkpoint

from ibot_ray.config import load_config
from pipelines.metrics import read_metrics
from pipelines.train_worker import rank_batch

TINY = [
    "model.depth=2", "model.patch_size=8", "crops.global_crops_size=32", "crops.local_crops_size=16",
    "crops.local_crops_number=2", "head.out_dim=256", "head.patch_out_dim=256", "head.hidden_dim=128",
    "head.bottleneck_dim=64", "optim.batch_size=16", "optim.warmup_epochs=1", "loss.warmup_teacher_temp_epochs=1",
    "data.eval_source=null", "data.actors=[1,1]", "data.actor_batch_size=16", "train.num_workers=[2,2]",
    "train.checkpoint_every_steps=2", "train.checkpoint_min_interval_s=0", "train.log_every_steps=1",
    "train.keep_checkpoints=2", "train.knn_every_epochs=0",
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


def test_the_rows_stream_asks_for_its_first_batch_before_the_loop_takes_it():
    """``RowCarry.start()`` requests the first batch in a background thread (it starts the Data execution while the
    rank builds its model); ``take`` then cuts exact row counts from the batches, none lost or repeated, and raises
    what fetching the first batch raised, in the caller's thread."""
    import threading

    import torch

    from pipelines.train_worker import RowCarry

    asked, release, fetched_by = threading.Event(), threading.Event(), []

    def batches():
        fetched_by.append(threading.current_thread())
        asked.set()
        assert release.wait(30)
        for lo in (0, 4):
            yield {"label": torch.arange(lo, lo + 4)}

    rows = RowCarry(batches()).start()
    assert asked.wait(30), "start() did not ask the stream for its first batch"
    assert fetched_by[0] is not threading.main_thread()
    release.set()
    taken = [rows.take(3), rows.take(3), rows.take(2)]
    assert [t["label"].tolist() for t in taken] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert rows.take(1) is None

    def broken():
        raise OSError("the stream could not start")
        yield  # a generator

    failing = RowCarry(broken()).start()
    with pytest.raises(OSError, match="could not start"):
        failing.take(1)
    assert RowCarry(iter(())).start().take(1) is None


def test_the_worker_module_leaves_timm_to_the_loop():
    """Importing the loop's module (what a Train worker does before the loop runs) does not import timm or the step:
    the loop imports them after it has asked for its data, so the Data pipeline starts while they load."""
    probe = "import sys, pipelines.train_worker; print(sorted({'timm', 'ibot_ray.step'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout


def _steps(rows):
    return [r["step"] for r in rows if "loss" in r]


def _starts(rows):
    return [r for r in rows if r.get("event") == "start"]


@pytest.fixture
def folder_data(tmp_path, image_writer):
    root = tmp_path / "images"
    image_writer(root, 96, kinds=("jpeg", "png", "webp"), size=(40, 40))
    return root


#: The killed runs: 6 steps per epoch of 96 images. Long enough that a kill made once a checkpoint is committed (a
#: controller poll, <= 2 s, after the report; periodic uploads run in the background) still lands mid-run on an idle
#: machine, where a tiny step takes ~0.1-0.2 s.
KILL_EPOCHS = 6
KILL_STEPS = 6 * KILL_EPOCHS


def test_a_killed_worker_restarts_and_a_failed_run_resumes_by_name(ray_cluster, tmp_path, folder_data, monkeypatch):
    """Rank 0's worker SIGKILLed twice mid-run with ``train.max_failures=1``, then the same command again.

    The first kill: Ray Train restarts the group from the last committed checkpoint, which continues that data epoch
    where the checkpoint left it (not at its start). The second kill, once the restarted group has committed a
    checkpoint of its own, exceeds the budget: the invocation fails. The same command again (a driver re-run)
    continues the run: its steps, its schedules, each data epoch at the checkpoint's stream position. Across the three
    worker groups every image is trained exactly once per data epoch in the steps the run kept."""
    from test_ingest import check_exactly_once, trained_rows

    from ibot_ray.schedules import Schedules
    from pipelines.ingest import latest_checkpoint_metrics
    from pipelines.pretrain import pretrain
    from pipelines.train_worker import TRAINED_KEYS_ENV

    monkeypatch.setenv(TRAINED_KEYS_ENV, str(tmp_path / "keys"))
    cfg = load_config("demo", TINY + [f"data.source={folder_data}", f"optim.epochs={KILL_EPOCHS}",  # 6 steps/epoch
                                      "train.max_failures=1"])
    storage = tmp_path / "runs"
    run_path = storage / "killed"
    metrics = run_path / "logs" / "metrics.jsonl"
    run = InThread(lambda: pretrain(cfg, storage=str(storage), name="killed", knn=False, export=False))
    rows = run.wait(metrics, lambda r: any(s >= 3 for s in _steps(r)))
    wait_for_a_committed_checkpoint(run_path)
    killed_after = max(_steps(read_metrics(metrics)))
    os.kill(_starts(rows)[0]["pid"], signal.SIGKILL)  # rank 0's worker process, mid-run: restarted (max_failures=1)

    def restarted_and_committed(rows: list[dict]) -> bool:  # the new group committed a checkpoint after its resume
        starts = _starts(rows)
        return len(starts) == 2 and latest_checkpoint_metrics(str(run_path)).get("step", 0) > starts[1]["resumed_from"]

    rows = run.wait(metrics, restarted_and_committed)
    second = _starts(rows)[1]
    os.kill(second["pid"], signal.SIGKILL)  # the second failure: past train.max_failures, the invocation fails
    assert run.join(timeout=300) and run.error is not None, "the run should have failed past train.max_failures=1"
    assert max(_steps(read_metrics(metrics))) < KILL_STEPS
    resumed = second["resumed_from"]
    assert resumed % 2 == 0 and 2 <= resumed <= killed_after  # the last committed checkpoint before the first kill

    result = pretrain(cfg, storage=str(storage), name="killed", knn=False, export=True)  # the same command again
    assert result.steps == KILL_STEPS
    rows = read_metrics(metrics)
    starts = _starts(rows)
    assert len(starts) == 3 and starts[0]["resumed_from"] == -1 and starts[1]["resumed_from"] == resumed
    assert starts[2]["resumed_from"] > resumed, starts  # the restarted group's own checkpoint, never from scratch
    for start, end in zip(starts, [*starts[1:], None]):  # each group continues where its checkpoint left off
        steps = [r["step"] for r in rows[rows.index(start):rows.index(end) if end else None] if "loss" in r]
        assert steps == list(range(max(start["resumed_from"], 0) + 1, steps[-1] + 1)), (start, steps[:3], steps[-3:])
    assert _steps(rows)[-1] == KILL_STEPS
    ckpts = sorted(p.name for p in run_path.glob("step_*"))
    assert ckpts[-1] == f"step_{KILL_STEPS:08d}" and len(ckpts) <= 2  # keep_checkpoints
    assert result.export_path and Path(result.export_path).exists()
    epochs = check_exactly_once(trained_rows(tmp_path / "keys"), sorted(str(p) for p in folder_data.iterdir()),
                                run_path)
    # KILL_STEPS x 16 = KILL_EPOCHS data epochs of 96; the local shuffle mixes the rows near an epoch's end with the
    # next's, so a few rows of the last epochs may still wait in a buffer when the run ends
    assert len(epochs["done"]) >= 1 and len(epochs["done"]) * 96 + sum(epochs["partial"].values()) == KILL_STEPS * 16, \
        epochs
    # the schedules continue too: the lr at a resumed step equals the uninterrupted schedule's value
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
    """``ibot-ray pretrain`` with a bad setting exits 2 naming it, and starts no Ray: a local Ray (what the CLI starts
    without RAY_ADDRESS) creates its session folder, sockets and logs under RAY_TMPDIR, which stays empty."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="ibr", dir="/tmp"))  # short: a Ray session's socket paths live under it
    env = dict(os.environ, RAY_ADDRESS="", RAY_TMPDIR=str(ray_tmp))
    try:
        for setting, message in (("loss.teacher_temp=-0.5", "positive"), ("train.num_workers=[4,2]", "num_workers")):
            p = subprocess.run([sys.executable, "-m", "ibot_ray.cli", "pretrain", "--set", setting],
                               capture_output=True, text=True, env=env, timeout=300)
            assert p.returncode == 2, (setting, p.stderr[-2000:])
            assert setting.split("=")[0] in p.stderr and message in p.stderr and "Traceback" not in p.stderr
            assert list(ray_tmp.iterdir()) == [], (setting, sorted(map(str, ray_tmp.rglob("*")))[:10])
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


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


# ---- what a run is judged on (pipelines/eval_split.py), end to end: `ibot-ray pretrain --data FOLDER` -------------
# A labelled folder here; an unlabelled one in test_console.py's CLI run (no k-NN line, the summary says why); an
# explicit data.eval_source in test_api.py's run. test_eval_split.py has each case's plan, without Ray.

def _trained_keys_per_epoch(folder: Path) -> dict[int, list[int]]:
    """Data epoch -> key ids trained in it (the ``IBOT_TRAINED_KEYS_DIR`` hook of the worker loop)."""
    out: dict[int, list[int]] = collections.defaultdict(list)
    for f in sorted(folder.glob("rank*.jsonl")):
        for row in map(json.loads, f.read_text().splitlines()):
            for epoch, key in zip(row["epoch"], row["key_id"]):
                out[epoch].append(key)
    return out


def test_a_labelled_folder_is_judged_on_its_own_held_out_split(ray_cluster, tmp_path, image_writer, capsys,
                                                                 monkeypatch):
    """Class subfolders, no --config, no --name: a preset is chosen for the images, the run is named after the
    folder, the k-NN before, during and after training and both baselines are measured on a stratified held-out split
    of the folder that never trains, every k-NN line names that split, and the scheduled checkpoints keep
    ``train.checkpoint_min_interval_s`` apart (here: none but the last). The same name with other data is refused."""
    from pipelines.ingest import key_id
    from pipelines.pretrain import run_pretrain
    from pipelines.train_worker import TRAINED_KEYS_ENV

    written = image_writer(tmp_path / "pets", 60, kinds=("jpeg", "png"), classes=["cat", "dog", "eel"], size=(40, 40))
    monkeypatch.setenv(TRAINED_KEYS_ENV, str(tmp_path / "keys"))
    sets = TINY + ["data.eval_source=auto", "optim.epochs=2", "train.knn_every_epochs=1",
                   "train.checkpoint_every_steps=1", "train.checkpoint_min_interval_s=3600"]
    result = run_pretrain(None, sets, data=str(tmp_path / "pets"), storage=str(tmp_path / "runs"))
    out = capsys.readouterr().out
    run = tmp_path / "runs" / "pets"
    assert Path(result.run_path) == run  # named after the folder
    assert "[ibot-ray] chose --config demo: 48 small images (median shorter side 40 px" in out
    split = f"held-out split of {tmp_path / 'pets'} (12 images of 3 classes, kept out of training)"
    assert result.knn_split == split
    assert f"[ibot-ray] k-NN on the {split}, before training: initial teacher top-1" in out
    assert "48 training images (12 more held out for the k-NN)" in out
    assert f"k-NN split      {split}" in out and "same split" in out
    online = [line for line in out.splitlines() if "after epoch" in line]
    assert len(online) == 2 and all("k-NN on the held-out split after epoch" in line for line in online)
    assert None not in (result.knn_before, result.knn_after, result.knn_pixels)
    # the held-out images never trained; the others at most once per data epoch (the run's plan, made again)
    from pipelines.pretrain import list_and_plan

    _, plan = list_and_plan(load_config("demo", sets + [f"data.source={tmp_path / 'pets'}"]))
    assert plan.split == split and set(written["good"]) == set(plan.train_listing.paths) | set(plan.queries.paths)
    per_epoch = _trained_keys_per_epoch(tmp_path / "keys")
    assert sum(len(keys) for keys in per_epoch.values()) == 2 * 48
    assert all(len(keys) == len(set(keys)) for keys in per_epoch.values())
    assert set().union(*per_epoch.values()) == {key_id(p) for p in plan.train_listing.paths}
    # scheduled checkpoints (every step, two epoch ends) are within the minimum interval of the run's start: only
    # the last one is written; the online k-NN still ran at both epoch ends
    assert sorted(p.name for p in run.glob("step_*")) == ["step_00000006"]
    rows = read_metrics(run / "logs" / "metrics.jsonl")
    assert [r["step"] for r in rows if "knn_top1" in r] == [3, 6]
    assert json.loads((run / "run.json").read_text()) == {"source": str(tmp_path / "pets"), "config": "demo"}
    from ibot_ray.config import ConfigError

    image_writer(tmp_path / "other", 8, kinds=("jpeg",), size=(40, 40))
    with pytest.raises(ConfigError, match="holds a run of source"):
        run_pretrain(None, sets, data=str(tmp_path / "other"), storage=str(tmp_path / "runs"), name="pets")
