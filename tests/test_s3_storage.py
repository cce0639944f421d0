"""A run whose storage is a bucket: a real S3-compatible server (moto's standalone server) on 127.0.0.1.

``ibot-ray pretrain --storage s3://bucket/runs --name r`` runs twice, as a user would resume it (more epochs the
second time): the checkpoints, the whole metrics history of both runs (append-only parts, nothing overwritten) and
the final export land in the bucket, nothing is written to a schemeless local path, and ``ibot-ray export
s3://.../step_XXXXXXXX`` reads a checkpoint back from the bucket. The runs are CLI subprocesses with their own local
Ray; the S3 endpoint and dummy credentials reach Ray's workers through the environment they inherit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
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


def test_background_upload_is_committed_once_uploaded_and_a_kill_during_it_resumes_from_the_one_before(
        s3_server, tmp_path):
    """Issue #29, item 4. Periodic checkpoints upload in the background: over a throttled link (a proxy forwarding
    400 kB/s toward the server: ~14 s per 5.5 MB TINY checkpoint), training goes on past a checkpoint's step while
    it uploads, and the run's snapshot in the bucket still names the checkpoint before (Ray Train commits one only
    once it is uploaded). Rank 0 killed during that upload: the run resumes from the checkpoint before, completes,
    and trains every image exactly once per data epoch in the steps it kept."""
    import json

    import pyarrow.fs as pafs
    from tcp_proxy import TCPProxy
    from test_ingest import check_exactly_once, trained_rows

    from pipelines.metrics import read_metrics
    from pipelines.stream_position import STREAM_POSITION_FILE, StreamPosition
    from pipelines.train_worker import STAGING_PREFIX, TRAINED_KEYS_ENV

    moto_port = int(s3_server["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
    proxy = TCPProxy(moto_port, rate=400_000).start()
    data = tmp_path / "images"
    images = write_images(data, 48, kinds=("jpeg", "png"), size=(40, 40))  # 3 steps per epoch
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, **s3_server, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}", "HOME": str(home),
           TRAINED_KEYS_ENV: str(tmp_path / "keys")}
    sets = [a for s in TINY + ["train.num_workers=[1,1]", "optim.epochs=4", "train.checkpoint_every_steps=2",
                               "train.keep_checkpoints=10"] for a in ("--set", s)]
    p = subprocess.Popen([sys.executable, "-m", "ibot_ray.cli", "pretrain", "--config", "demo", *sets, "--data",
                          str(data), "--storage", "s3://bucket/runs", "--name", "bg"], env=env, cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = home / "ibot_runs" / "bg" / "logs" / "metrics.jsonl"
    direct = pafs.S3FileSystem(endpoint_override=s3_server["AWS_ENDPOINT_URL"], access_key="testing",
                               secret_key="testing", region="us-east-1")

    def committed() -> int:  # the step of the latest checkpoint in the run's snapshot (read past the proxy)
        try:
            with direct.open_input_stream("bucket/runs/bg/checkpoint_manager_snapshot.json") as f:
                return json.loads(f.read())["latest_checkpoint_result"]["metrics"]["step"]
        except (FileNotFoundError, OSError, TypeError):
            return 0

    try:
        t0, seen = time.time(), None
        while seen is None and time.time() - t0 < 400:
            assert p.poll() is None, p.stdout.read()[-3000:]
            rows = read_metrics(metrics)
            starts = [r for r in rows if r.get("event") == "start"]
            for staged in Path(tempfile.gettempdir()).glob(f"{STAGING_PREFIX}{starts[0]['pid']}_*") if starts else ():
                step = int(staged.name[len(STAGING_PREFIX):].split("_")[1])
                later = [r["step"] for r in rows if "loss" in r and r["step"] > step]
                if step >= 4 and later and staged.exists():  # training went on while this one uploads
                    seen = (staged, step, max(later), committed())
            time.sleep(0.2)
        assert seen is not None, "no checkpoint was seen uploading while training went on"
        staged, step, trained_past, before = seen
        assert 2 <= before < step  # the one uploading is not committed; the one before it is
        os.kill(starts[0]["pid"], signal.SIGKILL)  # rank 0, during the upload
        proxy.rate = None  # the rest of the run at full speed
        out, _ = p.communicate(timeout=600)
    finally:
        if p.poll() is None:
            p.kill()
        proxy.stop()
    assert p.returncode == 0, out[-4000:]
    rows = read_metrics(metrics)
    starts = [r for r in rows if r.get("event") == "start"]
    assert len(starts) == 2 and starts[1]["resumed_from"] == before, (starts, seen)
    assert max(r["step"] for r in rows if "loss" in r) == 12
    with direct.open_input_stream(f"bucket/runs/bg/step_00000012/{STREAM_POSITION_FILE}") as f:
        position = StreamPosition.from_json(f.read().decode())
    epochs = check_exactly_once(trained_rows(tmp_path / "keys"), images["good"], position)
    assert len(epochs["done"]) >= 2, epochs  # 12 steps x 16 = 4 data epochs of 48
    stalls = [r for r in rows if r.get("event") == "checkpoint_stall"]
    assert any(r["background"] for r in stalls) and not stalls[-1]["background"]  # the final one in the foreground
    print(f"killed at step {trained_past} while step {step} uploaded: resumed from {before}; {epochs}")
