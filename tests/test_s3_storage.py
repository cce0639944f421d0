"""A run whose storage is a bucket: a real S3-compatible server (moto's standalone server) on 127.0.0.1.

``ibot-ray pretrain --storage s3://bucket/runs --name r`` runs twice, as a user would resume it (more epochs the
second time): the checkpoints, the whole metrics history of both runs (append-only parts, nothing overwritten) and
the final export land in the bucket, nothing is written to a schemeless local path, and ``ibot-ray export
s3://.../step_XXXXXXXX`` reads a checkpoint back from the bucket. The runs are CLI subprocesses with their own local
Ray; the S3 endpoint and dummy credentials reach Ray's workers through the environment they inherit.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_images
from test_pretrain import TINY

pytest.importorskip("moto")


@pytest.fixture(scope="module")
def s3_server():
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                 aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket="bucket")
    yield env
    server.stop()


def _cli(args: list[str], env: dict, cwd: Path, timeout: float = 420) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "ibot_ray.cli", *args], env=env, cwd=cwd, capture_output=True,
                       text=True, timeout=timeout)
    assert p.returncode == 0, f"{args[0]} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p


@pytest.mark.slow
def test_pretrain_to_a_bucket_resume_history_and_export(s3_server, tmp_path, monkeypatch):
    import pyarrow.fs as pafs

    from ibot_ray.export import exported_metadata
    from pipelines.metrics import read_metrics_history

    for k, v in s3_server.items():
        monkeypatch.setenv(k, v)
    data = tmp_path / "images"
    write_images(data, 48, kinds=("jpeg", "png"), size=(40, 40))  # 48 / 16 = 3 steps per epoch
    home = tmp_path / "home"  # the workers' local copy of the metrics (~/ibot_runs) stays inside the test
    home.mkdir()
    env = {**os.environ, **s3_server, "HOME": str(home)}
    work = tmp_path / "cwd"
    work.mkdir()

    # one resolved config for both runs, so that the resumed run builds exactly the model it checkpointed
    sets = [a for s in TINY + ["train.checkpoint_every_steps=3"] for a in ("--set", s)]
    config = tmp_path / "tiny.yaml"
    config.write_text(_cli(["config", "--config", "demo", *sets], env, work).stdout)

    def pretrain(epochs: int) -> None:
        _cli(["pretrain", "--config", str(config), "--set", f"optim.epochs={epochs}", "--data", str(data),
              "--storage", "s3://bucket/runs", "--name", "r"], env, work)

    pretrain(1)
    fs, _ = pafs.FileSystem.from_uri("s3://bucket/runs")
    first = read_metrics_history("s3://bucket/runs/r/logs")
    assert [r["step"] for r in first if "loss" in r] == [1, 2, 3]
    pretrain(2)  # the same command with more epochs: resumes from the bucket's step 3

    listing = {i.path for i in fs.get_file_info(pafs.FileSelector("bucket/runs/r", recursive=True))}
    assert {"bucket/runs/r/step_00000003/state.pt", "bucket/runs/r/step_00000006/state.pt"} <= listing
    assert "bucket/runs/r/export/teacher_backbone.safetensors" in listing
    parts = sorted(p for p in listing if p.startswith("bucket/runs/r/logs/metrics/part-"))
    assert len(parts) >= 2, parts

    rows = read_metrics_history("s3://bucket/runs/r/logs")
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6], steps  # both runs' rows, each once, in order
    starts = [r for r in rows if r.get("event") == "start"]
    assert [s["resumed_from"] for s in starts] == [-1, 3]

    # nothing went to a schemeless local path (Train V2's Result.path is "bucket/runs/r")
    assert not list(work.rglob("*.safetensors"))

    with fs.open_input_stream("bucket/runs/r/export/teacher_backbone.safetensors") as f:
        (tmp_path / "exported.safetensors").write_bytes(f.read())
    assert exported_metadata(tmp_path / "exported.safetensors")["which"] == "teacher"

    out = tmp_path / "from_bucket.safetensors"
    _cli(["export", "s3://bucket/runs/r/step_00000006", str(out)], env, work, timeout=120)
    meta = exported_metadata(out)
    assert int(meta["step"]) == 6


def test_sweep_keeps_its_state_in_the_bucket_and_resumes(s3_server, tmp_path, monkeypatch):
    """``ibot-ray tune --storage s3://...``: Tune's experiment state, the sweep spec (ASHA counting steps) and the
    trial's Train run land in the bucket; the same command resumes the sweep from there (the finished trial is kept)."""
    import pyarrow.fs as pafs
    import yaml
    from ray.tune import Tuner
    from test_tune_sweep import TINY as SWEEP_TINY
    from test_tune_sweep import _small_source

    for k, v in s3_server.items():
        monkeypatch.setenv(k, v)
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, **s3_server, "HOME": str(home)}
    work = tmp_path / "cwd"
    work.mkdir()
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"parameters": {"loss.teacher_temp": {"type": "grid", "values": [0.04]}}}))
    args = ["tune", "--space", str(space), "--config", "demo", "--objective", "loss", "--storage", "s3://bucket/sw",
            "--name", "s"]
    for o in [*SWEEP_TINY, f"data.source={_small_source(tmp_path)}"]:
        args += ["--set", o]
    first = _cli(args, env, work)
    assert "1 completed" in first.stdout, first.stdout[-3000:]

    fs, _ = pafs.FileSystem.from_uri("s3://bucket/sw")
    listing = {i.path for i in fs.get_file_info(pafs.FileSelector("bucket/sw/s", recursive=True))}
    assert "bucket/sw/s/sweep_spec.yaml" in listing and "bucket/sw/s/tuner.pkl" in listing
    assert any(p.startswith("bucket/sw/s/experiment_state-") for p in listing), sorted(listing)
    assert any(p.startswith("bucket/sw/s/train_runs/s_") and p.endswith("/state.pt") for p in listing)
    with fs.open_input_stream("bucket/sw/s/sweep_spec.yaml") as f:
        assert yaml.safe_load(f.read())["asha"]["time_attr"] == "step"
    assert not (work / "ibot_runs").exists()  # nothing of the sweep went to a local default folder
    assert Tuner.can_restore("s3://bucket/sw/s")

    again = _cli(args, env, work)  # the same command: restored from the bucket, nothing left to run
    assert "resuming sweep s3://bucket/sw/s" in again.stdout and "1 completed" in again.stdout, again.stdout[-3000:]
