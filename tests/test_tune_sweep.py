"""Ray Tune sweeps on a real local Ray cluster: ASHA early stopping, an interrupted sweep that resumes, a failing
trial that does not end the sweep, the report (table, CSV, best config, plot) and the refusals that need no Ray.

The sweeps train a tiny iBOT (2 blocks, 32/16 px crops, 64-d heads) on 64 demo images, one epoch of 4 steps, so
a trial costs mostly Ray start-up. The ASHA sweep runs in a subprocess through ``ibot-ray tune``; it is interrupted
(SIGINT, as Ctrl+C) once a trial has completed and then resumed in this process with ``run_sweep``.
"""

from __future__ import annotations

import csv
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

import ibot_ray
from ibot_ray.cli import main as cli_main
from ibot_ray.config import load_config

DEMO_TRAIN = Path(ibot_ray.__file__).parent / "demo_data" / "train.parquet"

TINY = [
    "optim.epochs=1", "optim.batch_size=16", "optim.warmup_epochs=0", "loss.warmup_teacher_temp_epochs=0",
    "train.num_workers=[1,1]", "train.cpus_per_worker=0.5", "model.depth=2", "crops.global_crops_size=32",
    "crops.local_crops_size=16", "crops.local_crops_number=2", "head.out_dim=64", "head.patch_out_dim=64",
    "head.hidden_dim=64", "head.bottleneck_dim=32", "train.log_every_steps=2",
    # a report (a checkpoint) every 2 of the run's 4 steps: ASHA's half-epoch grace period needs one mid-epoch
    "train.checkpoint_every_steps=2", "train.checkpoint_min_interval_s=0", "train.knn_every_epochs=0",
    "data.eval_source=null", "data.cpus_per_actor=0.5",
    "data.actors=[1,1]", "eval.image_size=32",
]
# CE(teacher, student) = H(teacher) + KL grows with the teacher's entropy: 0.2 (a nearly uniform teacher over 64
# prototypes) has by far the highest loss, 0.02 and 0.04 are close to each other.
TEMPS = [0.02, 0.04, 0.2]


def _small_source(tmp_path: Path, n: int = 64) -> str:
    path = tmp_path / "small.parquet"
    pq.write_table(pq.read_table(DEMO_TRAIN).slice(0, n), path)
    return str(path)


def _result_rows(trial_dir: Path) -> list[dict]:
    f = trial_dir / "result.json"
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.exists() else []


def _completed_trials(exp: Path) -> set[str]:
    """Trials whose Tune results reached the run's last step and that Tune itself marks TERMINATED."""
    from tune.sweep import read_trial_statuses

    statuses = read_trial_statuses(str(exp))
    done = set()
    for trial_dir in exp.glob("*_0000*"):
        rows = _result_rows(trial_dir)
        if rows and rows[-1].get("step", 0) >= rows[-1].get("total_steps", math.inf) \
                and statuses.get(trial_dir.name) == "TERMINATED":
            done.add(trial_dir.name)
    return done


def _live_placement_groups() -> set[str]:
    from ray.util import placement_group_table

    return {k for k, v in placement_group_table().items() if v["state"] != "REMOVED"}


def _placement_groups_left() -> dict:
    from ray.util import placement_group_table

    return {k: (v["state"], v["bundles"]) for k, v in placement_group_table().items() if v["state"] != "REMOVED"}


@pytest.mark.slow
def test_asha_sweep_is_interrupted_resumes_and_reports(ray_cluster, tmp_path):
    from tune.sweep import run_sweep

    source = _small_source(tmp_path)
    space_file = tmp_path / "temps.yaml"
    space_file.write_text(yaml.safe_dump({"parameters": {"loss.teacher_temp": {"type": "grid", "values": TEMPS}}}))
    storage = tmp_path / "sweeps"
    exp = storage / "asha"
    overrides = [*TINY, f"data.source={source}"]
    args = ["tune", "--space", str(space_file), "--config", "demo", "--objective", "loss", "--grace-epochs", "0.5",
            "--max-concurrent", "2", "--storage", str(storage), "--name", "asha"]
    for o in overrides:
        args += ["--set", o]
    address = ray_cluster.get_runtime_context().gcs_address
    pgs_start = _live_placement_groups()
    t0 = time.time()
    log = tmp_path / "sweep_cli.log"
    with open(log, "w") as logf:  # a file, not a pipe: Tune's progress output would fill a pipe and block
        proc = subprocess.Popen([sys.executable, "-m", "ibot_ray.cli", *args, "--address", address],
                                stdout=logf, stderr=subprocess.STDOUT)
    try:
        done: set[str] = set()
        while not done and proc.poll() is None and time.time() - t0 < 480:  # a trial: its own Train run + Data stream
            time.sleep(1.0)
            done = _completed_trials(exp)
        assert done, f"no trial completed before the interrupt; rc={proc.poll()}"
        snapshot = {t: (exp / t / "result.json").read_bytes() for t in done}
        proc.send_signal(signal.SIGINT)  # Ctrl+C: Tune saves its state and stops the trials
        proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 3, log.read_text()[-3000:]  # 3 = interrupted with unfinished trials
    # The interrupt leaves no placement group behind: Tune's own went with the sweep's driver, the Train
    # controllers' with their reapers, also a group still being placed when Ctrl+C came (a window Ray Train's own
    # PlacementGroupCleaner does not cover; the test after this one forces it).
    deadline = time.time() + 60
    while _live_placement_groups() - pgs_start and time.time() < deadline:
        time.sleep(1.0)
    assert not _live_placement_groups() - pgs_start, _placement_groups_left()
    pgs_before = _live_placement_groups()
    with open(exp / "results.csv") as f:
        first = list(csv.DictReader(f))
    assert any(r["status"] == "unfinished" for r in first) or len(first) < len(TEMPS), first
    # The worst temperature's Train run as the interrupt left it: Ctrl+C stops Tune at once, but a trial's Train run
    # can still reach a checkpoint (even its last) whose report Tune never records.
    worst_log = next((exp / "train_runs" / f"asha_{p.parent.name}" / "logs" / "metrics.jsonl"
                      for p in exp.glob("*/params.json") if json.loads(p.read_text())["loss.teacher_temp"] == 0.2),
                     None)
    worst_before = worst_log.read_bytes() if worst_log is not None and worst_log.exists() else b""

    # Resume in this process: same storage and name, same space and config.
    res = run_sweep(space_file, config="demo", overrides=overrides, objective="loss", grace_epochs=0.5,
                    max_concurrent=2, storage=str(storage), name="asha")
    assert res.resumed and res.complete
    by_temp = {r.params["loss.teacher_temp"]: r for r in res.rows}
    assert sorted(by_temp) == TEMPS and len(res.rows) == len(TEMPS)
    for t, blob in snapshot.items():  # trials completed before the interrupt were not run again
        assert (exp / t / "result.json").read_bytes() == blob
    statuses = {r.trial_id: r.status for r in res.rows}
    assert set(statuses.values()) <= {"completed", "stopped"}, res.table
    stopped = [r for r in res.rows if r.status == "stopped"]
    assert stopped, res.table  # ASHA stopped at least one trial early ...
    for r in stopped:  # ... before its last step, at a rung
        assert r.step < r.total_steps and r.stopped_at_step is not None and r.iterations < 2
    # The worst temperature never arrives first at a rung, so it trains on past none: ASHA stops it at its first
    # report, which a resumed trial replays from its checkpoint before it trains on. Completed only when its Train run
    # had already finished at the interrupt; then the resumed sweep trained none of it.
    if by_temp[0.2].status == "completed":
        trained = max(json.loads(line).get("step", 0) for line in worst_before.splitlines())
        assert trained == by_temp[0.2].total_steps, res.table
        assert worst_log.read_bytes() == worst_before
    else:
        assert by_temp[0.2].status == "stopped", res.table
    # ASHA ended the stopped trials' Train controllers abruptly; their worker bundles were still released.
    deadline = time.time() + 60
    while _live_placement_groups() - pgs_before and time.time() < deadline:
        time.sleep(1.0)
    assert not _live_placement_groups() - pgs_before
    # Every trial's Train run wrote its own metrics under <sweep>/train_runs/<sweep>_<trial id>.
    for r in res.rows:
        assert (exp / "train_runs" / f"asha_{r.trial_id}" / "logs" / "metrics.jsonl").exists()

    # Report: CSV rows match the table; best = lowest loss among completed trials; its config validates.
    with open(res.csv_path) as f:
        rows = list(csv.DictReader(f))
    assert {r["trial_id"] for r in rows} == set(statuses)
    assert {"loss.teacher_temp", "loss", "iterations", "step", "stopped_early"} <= set(rows[0])
    completed = [r for r in res.rows if r.status == "completed"]
    assert res.best is not None and res.best.trial_id == min(completed, key=lambda r: r.objective).trial_id
    best_cfg = load_config(res.best_config_path)
    assert best_cfg.loss.teacher_temp == res.best.params["loss.teacher_temp"]
    assert best_cfg.data.source == source and best_cfg.model.depth == 2  # the full resolved config
    assert Path(res.plot_path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The same name with another setup is refused (and names the difference) instead of mixing two sweeps.
    from tune.sweep import SweepError

    with pytest.raises(SweepError, match=r"different setup .*optim.lr"):
        run_sweep(space_file, config="demo", overrides=[*overrides, "optim.lr=0.0123"], objective="loss",
                  grace_epochs=0.5, storage=str(storage), name="asha")


def _never_runs() -> None:  # the train function of a worker group that is never placed
    raise AssertionError("the worker group was placed")


def _alive_reapers() -> set[str]:
    """The placement-group reapers (tune/sweep.py) the GCS's actor table shows alive."""
    from ray._private.state import actors

    return {a for a, info in actors().items()
            if info["ActorClassName"].endswith("PlacementGroupReaper") and info["State"] == "ALIVE"}


def test_reaper_removes_a_placement_group_still_being_placed_when_its_controller_dies(ray_cluster, tmp_path):
    """The window the interrupted sweep above can leave open: the Train controller dies while its worker group's
    placement group is still pending. No callback has been handed that group yet; the reaper finds it by its creator
    in the GCS's table.

    Deterministic whatever ran before: Ray Train would give up on the pending group after its worker-group start
    timeout and place a new one, racing the test (the timeout comes from the environment of the process that calls
    fit(): the one the session's Ray hands its actors, which was 10 s in the whole suite, where test_multinode.py had
    restarted that Ray from the environment its last run left, and 30 s alone), so the Driver sets it longer than the
    test; the group then stays pending until the reaper removes it. The controller is killed once its reaper is
    alive, so the removal window times only the reaper's own work."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util import placement_group, placement_group_table, remove_placement_group

    from tune.sweep import _pg_reaper_callback

    total = int(ray.cluster_resources()["CPU"])
    blocker = placement_group([{"CPU": 0.5}])  # holds the cluster under the group's size until the end
    ray.get(blocker.ready(), timeout=120)

    @ray.remote(num_cpus=0)
    class Driver:  # a Tune trial's role: the process that calls fit() and owns the controller
        def fit(self, storage: str) -> None:
            import os

            os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "3600"  # Train propagates it to its controller
            TorchTrainer(_never_runs, scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": total}),
                         run_config=RunConfig(name="unplaced", storage_path=storage,
                                              callbacks=[_pg_reaper_callback()])).fit()

    before = set(placement_group_table())
    reapers_before = _alive_reapers()
    driver = Driver.remote()
    driver.fit.remote(str(tmp_path))
    try:
        pending, reapers, deadline = [], set(), time.time() + 120
        while not (pending and reapers) and time.time() < deadline:
            time.sleep(0.5)
            pending = [k for k, v in placement_group_table().items() if k not in before and v["state"] == "PENDING"
                       and list(v["bundles"].values()) == [{"CPU": float(total)}]]
            reapers = _alive_reapers() - reapers_before
        assert len(pending) == 1 and len(reapers) == 1, (placement_group_table(), reapers)
        ray.kill(driver)  # as ASHA ends a trial: the controller dies with its owner, the group still pending
        deadline = time.time() + 60
        while placement_group_table()[pending[0]]["state"] != "REMOVED" and time.time() < deadline:
            time.sleep(0.5)
        assert placement_group_table()[pending[0]]["state"] == "REMOVED"
    finally:
        remove_placement_group(blocker)
        for k, v in placement_group_table().items():  # nothing of this test left behind, even when it failed
            if k not in before and v["state"] != "REMOVED" and k != blocker.id.hex():
                remove_placement_group(ray.util.placement_group.PlacementGroup(ray.PlacementGroupID.from_hex(k)))


def test_failing_trials_do_not_end_the_sweep(ray_cluster, tmp_path):
    """Two combinations that break momentum_teacher <= momentum_teacher_end (each value alone is valid): both
    trials are tried and fail with the config's error; the sweep itself returns its report."""
    from tune.space import parse_space
    from tune.sweep import run_sweep

    base = load_config("demo", [*TINY, f"data.source={_small_source(tmp_path)}", "optim.momentum_teacher=0.99",
                                "optim.momentum_teacher_end=1.0"])
    space = parse_space({"optim.momentum_teacher": {"type": "grid", "values": [0.997, 0.998]},
                         "optim.momentum_teacher_end": {"type": "grid", "values": [0.995]}}, base=base)
    res = run_sweep(space, config=base, objective="loss", scheduler="fifo", max_failures=0, max_concurrent=2,
                    storage=str(tmp_path / "sweeps"), name="bad")
    assert len(res.rows) == 2 and all(r.status == "error" for r in res.rows), res.table
    assert all("optim.momentum_teacher" in r.error for r in res.rows)
    assert res.best is None and res.best_config_path is None and Path(res.csv_path).exists()


def test_refusals_before_any_cluster_work(tmp_path, capsys):
    from tune.sweep import PBT_UNSUPPORTED, SweepError, run_sweep

    with pytest.raises(SweepError, match="PBT exploits by cloning a Tune checkpoint"):
        run_sweep("tau_grid", scheduler="pbt", storage=str(tmp_path))
    assert "TuneReportCallback" in PBT_UNSUPPORTED
    with pytest.raises(SweepError, match="data.eval_source"):
        run_sweep("tau_grid", overrides=["data.eval_source=null"], storage=str(tmp_path))
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss.teacher_temp: {type: uniform, low: 0.07, high: 0.02}\n")
    assert cli_main(["tune", "--space", str(bad), "--storage", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "entry loss.teacher_temp" in err and "empty range" in err
    assert cli_main(["tune", "--space", "tau_grid", "--scheduler", "pbt", "--storage", str(tmp_path)]) == 2
    assert "not supported" in capsys.readouterr().err
    assert not list(tmp_path.glob("*/tuner.pkl"))  # nothing was started


def test_report_arithmetic_matches_the_worker_loop():
    """Reports happen at the checkpoints only (multiples of checkpoint_every_steps, epoch ends, the last step), not
    every log_every_steps; ASHA's rungs are counted in optimiser steps (a restarted trial replays steps; Tune's
    training_iteration would count the replayed reports again) and fall on report steps."""
    from tune.sweep import ASHA_TIME_ATTR, asha_rungs, report_steps

    cfg = load_config("demo", ["optim.epochs=2", "train.log_every_steps=2", "train.checkpoint_every_steps=3",
                               "train.checkpoint_min_interval_s=0",
                               "train.knn_every_epochs=2"])
    spe = 5
    expected = sorted(set(range(3, 11, 3)) | {5, 10})
    assert report_steps(cfg, spe) == expected == [3, 5, 6, 9, 10]
    assert asha_rungs(cfg, spe, "loss", 1) == (5, 10)  # the last report of epoch 1 is step 5; the run ends at 10
    assert asha_rungs(cfg, spe, "loss", 0.5) == (3, 10)  # no report by step 2.5: the first report, step 3
    assert asha_rungs(cfg, spe, "knn_top1", 1) == (10, 10)  # k-NN every 2 epochs: the first rung needs epoch 2
    assert ASHA_TIME_ATTR == "step"


def test_best_trial_table_and_plot(tmp_path):
    from tune.report import TrialRow, best_row, format_table, plot_objective

    rows = [TrialRow("t0", "completed", {"loss.teacher_temp": 0.04}, objective=61.0, step=10, total_steps=10),
            TrialRow("t1", "stopped", {"loss.teacher_temp": 0.07}, objective=70.0, step=5, total_steps=10,
                     stopped_at_step=2),
            TrialRow("t2", "completed", {"loss.teacher_temp": 0.02}, objective=64.5, step=10, total_steps=10),
            TrialRow("t3", "error", {"loss.teacher_temp": 0.03}, error="ConfigError: boom")]
    assert best_row(rows, "max").trial_id == "t2"  # a stopped trial's early value does not compete
    assert best_row(rows, "min").trial_id == "t0"
    assert best_row([rows[1], rows[3]], "max").trial_id == "t1"  # no completed trial: the best with a value
    assert best_row([rows[3]], "max") is None
    table = format_table(rows, ["loss.teacher_temp"], "knn_top1", best=rows[2])
    lines = table.splitlines()
    assert len(lines) == 2 + len(rows) and lines[4].startswith("*") and "t2" in lines[4]
    assert "ASHA stop at step 2" in lines[3] and "ConfigError: boom" in lines[5]
    png = plot_objective(rows, ["loss.teacher_temp"], "knn_top1", "max", tmp_path / "p.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # tuple-valued levers (crop scales) are categories on the plot, numbers stay a real axis
    from tune.report import category_labels

    assert category_labels([(0.7, 1.0), [0.35, 1.0], None, (0.7, 1.0)]) == ["(0.35, 1.0)", "(0.7, 1.0)"]
    assert category_labels([True, False]) == ["False", "True"] and category_labels([0.04, 0.07, None]) is None
    rows[0].params["crops.global_crops_scale"] = (0.5, 1.0)
    assert plot_objective(rows, ["crops.global_crops_scale"], "knn_top1", "max", tmp_path / "c.png").exists()
