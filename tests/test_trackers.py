"""Experiment trackers (``train.loggers``, pipelines/metrics.py): what rank 0's MetricsWriter gives MLflow and Weights &
Biases, read back with each tracker's own client: MLflow's tracking client on the run's SQLite store, and W&B's
offline run file (its LevelDB-framed log of ``wandb_internal_pb2.Record`` protobufs, the file ``wandb sync``
uploads). The writer runs here in-process; tests/test_api.py runs the same trackers on a real Ray run."""

from __future__ import annotations

import glob
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ibot_ray.config import ConfigError, load_config
from pipelines.metrics import MetricsWriter, check_trackers, default_mlflow_uri, read_metrics, wandb_run_id

REPO = Path(__file__).resolve().parents[1]


# ---- reading a run back with each tracker's own client ---------------------------------------------------------


def mlflow_runs(logs: Path, experiment: str = "ibot-ray") -> list:
    """Every MLflow run of ``experiment`` in a run's default store (``logs/mlflow.db``)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=default_mlflow_uri(logs))
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r} in {logs}"
    return client, client.search_runs([exp.experiment_id])


def mlflow_history(client, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def wandb_records(run_file: Path):
    """The records of a W&B offline run file (``run-<id>.wandb``): a ':W&B' header, then LevelDB log blocks of 32 KiB
    whose records (4-byte checksum, 2-byte length, 1-byte type: full, first, middle, last) carry one protobuf each."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    pos, pending, block = 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending + chunk if kind == 4 else chunk)
            pending = b""
            yield record
        elif kind in (2, 3):
            pending += chunk


def wandb_offline_run(logs: Path) -> dict:
    """What the W&B offline runs under ``logs/wandb`` recorded: run ids, config, history rows, summary values."""
    files = sorted(glob.glob(str(logs / "wandb" / "offline-run-*" / "run-*.wandb")))
    assert files, f"no W&B offline run under {logs}"
    out = {"ids": set(), "config": {}, "history": [], "summary": {}}
    for f in files:
        for r in wandb_records(Path(f)):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                out["ids"].add(r.run.run_id)
                out["config"].update({u.key: json.loads(u.value_json) for u in r.run.config.update})
            elif kind == "config":
                out["config"].update({u.key: json.loads(u.value_json) for u in r.config.update})
            elif kind == "history":
                out["history"].append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                                       for i in r.history.item})
            elif kind == "summary":
                for u in r.summary.update:
                    out["summary"][u.key or "/".join(u.nested_key)] = json.loads(u.value_json)
    return out


# ---- the writer, in-process -------------------------------------------------------------------------------------

ROWS = [  # what rank 0 writes: a start event, step metrics (health, k-NN), a collapse alarm
    ({"event": "start", "world_size": 2, "step": 0}, 0),
    ({"step": 10, "epoch": 0.5, "loss": 7.25, "cls": 5.5, "mim": 1.75, "lr": 1e-4, "teacher_entropy_frac": 0.9,
      "prototypes_used": 40.0, "health": "warm-up", "health_alarms": "", "preempted": False}, 10),
    ({"step": 20, "epoch": 1.0, "loss": 6.5, "cls": 5.0, "mim": 1.5, "lr": 2e-4, "teacher_entropy_frac": 0.97,
      "prototypes_used": 3.0, "knn_top1": 41.5, "knn_top5": 80.0, "health": "uniform", "health_alarms": "uniform",
      "bad_image_examples": [["a.jpg", "truncated"]]}, 20),
    ({"event": "collapse", "condition": "uniform", "message": "uniform collapse: lower loss.teacher_temp"}, 20),
]


@pytest.fixture
def tracked_cfg(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # train.wandb_mode: auto reads it
    monkeypatch.setenv("WANDB_SILENT", "true")
    return load_config("demo", ["train.loggers=[tensorboard,mlflow,wandb]", "optim.epochs=7"])


def test_each_tracker_gets_the_jsonl_rows_the_config_and_the_health(tmp_path, tracked_cfg):
    logs = tmp_path / "runs" / "r1" / "logs"
    writer = MetricsWriter(logs, cfg=tracked_cfg, run_name="r1", run_path=str(logs.parent))
    for row, step in ROWS:
        writer.write(row, step)
    writer.close()
    jsonl = read_metrics(logs / "metrics.jsonl")
    assert [r.get("step") for r in jsonl if "loss" in r] == [10, 20]
    assert not [r for r in jsonl if r.get("event") == "tracker_error"]

    client, runs = mlflow_runs(logs)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_name == "r1" and run.info.status == "FINISHED"
    assert run.data.tags["ibot_ray.run_path"] == str(logs.parent)
    for key in ("loss", "cls", "mim", "lr", "teacher_entropy_frac", "prototypes_used"):
        assert mlflow_history(client, run.info.run_id, key) == {r["step"]: r[key] for r in jsonl if key in r}
    assert mlflow_history(client, run.info.run_id, "knn_top1") == {20: 41.5}
    assert mlflow_history(client, run.info.run_id, "world_size") == {0: 2.0}
    assert "preempted" not in run.data.metrics and "bad_image_examples" not in run.data.metrics
    assert run.data.params["optim.epochs"] == "7" and run.data.params["model.stem"] == "conv"
    assert run.data.params["train.loggers"] == '["tensorboard", "mlflow", "wandb"]'
    assert run.data.tags["health"] == "uniform" and run.data.tags["health_alarms"] == "uniform"
    assert run.data.tags["collapse.uniform"].startswith("uniform collapse")

    wb = wandb_offline_run(logs)
    assert wb["ids"] == {wandb_run_id("r1", str(logs.parent))}
    steps = [h for h in wb["history"] if "loss" in h]
    assert [(h["step"], h["loss"], h["teacher_entropy_frac"]) for h in steps] == \
        [(r["step"], r["loss"], r["teacher_entropy_frac"]) for r in jsonl if "loss" in r]
    assert [h["knn_top1"] for h in wb["history"] if "knn_top1" in h] == [41.5]
    assert wb["config"]["optim"]["epochs"] == 7 and wb["config"]["train"]["loggers"] == ["tensorboard", "mlflow",
                                                                                         "wandb"]
    assert wb["summary"]["health"] == "uniform"
    assert wb["summary"]["collapse/uniform"].startswith("uniform collapse")
    assert list((logs / "tensorboard").glob("events.out.tfevents.*"))


def test_a_restarted_writer_continues_the_same_tracker_runs(tmp_path, tracked_cfg):
    """A worker restart (or a resumed run, here with more epochs) logs into the same MLflow run and W&B id."""
    logs = tmp_path / "runs" / "r2" / "logs"
    first = MetricsWriter(logs, cfg=tracked_cfg, run_name="r2", run_path=str(logs.parent))
    first.write(ROWS[1][0], 10)
    first.close()
    time.sleep(1.1)  # W&B names an offline run's folder by the second it started and the run id: a restart takes longer
    resumed_cfg = load_config("demo", ["train.loggers=[mlflow,wandb]", "optim.epochs=9"])
    second = MetricsWriter(logs, cfg=resumed_cfg, run_name="r2", run_path=str(logs.parent))
    second.write(ROWS[2][0], 20)
    second.close()
    client, runs = mlflow_runs(logs)
    assert len(runs) == 1
    assert mlflow_history(client, runs[0].info.run_id, "loss") == {10: 7.25, 20: 6.5}
    assert runs[0].data.params["optim.epochs"] == "7"  # MLflow parameters cannot change: the change is a tag
    assert "optim.epochs: 7 -> 9" in runs[0].data.tags["ibot_ray.resumed_with_changes"]
    wb = wandb_offline_run(logs)
    assert wb["ids"] == {wandb_run_id("r2", str(logs.parent))}
    assert [h["step"] for h in wb["history"] if "loss" in h] == [10, 20]
    assert wb["config"]["optim"]["epochs"] == 9
    other = wandb_run_id("r2", str(tmp_path / "elsewhere" / "r2"))
    assert other != wandb_run_id("r2", str(logs.parent)) and other.startswith("r2-")


def test_a_failing_tracker_is_dropped_and_recorded_the_jsonl_goes_on(tmp_path, tracked_cfg, monkeypatch):
    """A tracking server that is down at the start, and a tracker whose run fails mid-run: each is dropped with one
    ``tracker_error`` row, and the JSONL (and the other trackers) go on."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    cfg = load_config("demo", ["train.loggers=[tensorboard,mlflow,wandb]",
                               "train.mlflow_tracking_uri=http://127.0.0.1:9"])  # nothing listens on port 9
    logs = tmp_path / "runs" / "r3" / "logs"
    writer = MetricsWriter(logs, cfg=cfg, run_name="r3", run_path=str(logs.parent))
    assert [t.name for t in writer.trackers] == ["tensorboard", "wandb"]
    writer.write(ROWS[1][0], 10)
    next(t for t in writer.trackers if t.name == "wandb").run.finish()  # the W&B run ends under the writer
    writer.write(ROWS[2][0], 20)
    writer.write({**ROWS[1][0], "step": 30}, 30)
    writer.close()
    rows = read_metrics(logs / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [10, 20, 30]
    errors = [r for r in rows if r.get("event") == "tracker_error"]
    assert [e["tracker"] for e in errors] == ["mlflow", "wandb"]  # each once: then it is dropped
    assert "127.0.0.1:9" in errors[0]["message"]
    assert [t.name for t in writer.trackers] == ["tensorboard"]
    assert [h["step"] for h in wandb_offline_run(logs)["history"] if "loss" in h] == [10]


# ---- errors before Ray starts -----------------------------------------------------------------------------------


def test_an_unknown_or_missing_logger_is_a_config_error(monkeypatch):
    with pytest.raises(ConfigError, match=r"train.loggers: unknown logger 'comet' \(known: tensorboard, mlflow"):
        load_config("demo", ["train.loggers=[tensorboard,comet]"])
    with pytest.raises(ConfigError, match="train.wandb_mode: must be auto, online or offline"):
        load_config("demo", ["train.wandb_mode=sometimes"])
    import ibot_ray.config as config

    real = config.importlib.util.find_spec
    monkeypatch.setattr(config.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    with pytest.raises(ConfigError, match=r'train.loggers: wandb needs wandb.*pip install "ibot-ray\[wandb\]"'):
        load_config("demo", ["train.loggers=[wandb]"])
    load_config("demo", ["train.loggers=[mlflow]"])  # mlflow's modules are still found


def test_mlflow_default_store_on_a_bucket_is_refused(tmp_path):
    cfg = load_config("demo", ["train.loggers=[mlflow]"])
    with pytest.raises(ConfigError, match="set train.mlflow_tracking_uri"):
        check_trackers(cfg, "s3://bucket/runs")
    check_trackers(cfg, "/local/runs")
    check_trackers(load_config("demo", ["train.loggers=[mlflow]", "train.mlflow_tracking_uri=http://mlflow:5000"]),
                   "s3://bucket/runs")
    # on a training worker of a run in a bucket, the logs folder is the node's own disk: refused there too
    with pytest.raises(ConfigError, match="set train.mlflow_tracking_uri"):
        MetricsWriter(tmp_path / "ibot_runs" / "r" / "logs", cfg=cfg, run_name="r", run_path="bucket/runs/r")


def test_the_command_refuses_a_bad_logger_before_ray_starts(tmp_path):
    """``ibot-ray pretrain`` exits 2 with the error, in seconds, with no Ray session and no run folder."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ""}
    for args, message in (
        (["--set", "train.loggers=[tensorboard,comet]"], "unknown logger 'comet'"),
        (["--set", "train.loggers=[mlflow]", "--storage", "s3://bucket/runs"], "set train.mlflow_tracking_uri"),
    ):
        t0 = time.time()
        p = subprocess.run([sys.executable, "-m", "ibot_ray.cli", "pretrain", "--storage", str(tmp_path), *args],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
        assert p.returncode == 2, p.stderr
        assert "config error: train.loggers" in p.stderr and message in p.stderr
        assert "Started a local Ray instance" not in p.stdout + p.stderr and time.time() - t0 < 90
    assert not list(tmp_path.iterdir())
