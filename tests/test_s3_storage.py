"""A run whose storage is a bucket: a real S3-compatible server (moto's standalone server) on 127.0.0.1.

``ibot-ray pretrain --storage s3://bucket/runs --name r`` runs twice, as a user would resume it (more epochs the
second time), its first invocation killed once during a background checkpoint upload: the checkpoints, the whole
metrics history of every attempt (append-only parts, nothing overwritten) and the final export land in the bucket,
nothing is written to a schemeless local path, and ``ibot-ray export s3://.../step_XXXXXXXX`` reads a checkpoint back
from the bucket. The runs are CLI subprocesses with their own local Ray; the S3 endpoint and dummy credentials reach
Ray's workers through the environment they inherit.
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


def _cli(args: list[str], env: dict, cwd: Path, timeout: float = 420) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "ibot_ray.cli", *args], env=env, cwd=cwd, capture_output=True,
                       text=True, timeout=timeout)
    assert p.returncode == 0, f"{args[0]} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p


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


@pytest.mark.slow
def test_a_run_in_a_bucket_uploads_in_the_background_survives_a_kill_then_resumes_and_exports(
        s3_server, tmp_path, monkeypatch, capsys):
    """One run to ``s3://bucket/runs/r``, invoked twice as a user would (the same command, more epochs the second
    time), from one config file printed by ``ibot-ray config``.

    First invocation (issue #29, item 4): periodic checkpoints upload in the background: over a throttled link (a
    proxy forwarding 1 MB/s toward the server: ~5.5 s per 5.5 MB TINY checkpoint), training goes on past a
    checkpoint's step while it uploads, and the run's snapshot in the bucket still names the checkpoint before (Ray
    Train commits one only once it is uploaded). Rank 0 killed during that upload: the run resumes from the
    checkpoint before, completes, and trains every image exactly once per data epoch in the steps it kept.

    Second invocation: resumes from the bucket's last checkpoint; the closing summary names the bucket's paths with
    their scheme; the checkpoints, the whole metrics history of every attempt (append-only parts, nothing
    overwritten) and the final export land in the bucket, nothing is written to a schemeless local path, and
    ``ibot-ray export s3://.../step_XXXXXXXX`` reads a checkpoint back from the bucket."""

    import pyarrow.fs as pafs
    from tcp_proxy import TCPProxy
    from test_ingest import check_exactly_once, trained_rows

    from ibot_ray.cli import main as cli_main
    from ibot_ray.export import exported_metadata
    from pipelines.ingest import latest_checkpoint_metrics
    from pipelines.metrics import read_metrics, read_metrics_history
    from pipelines.stream_position import STREAM_POSITION_FILE, StreamPosition
    from pipelines.train_worker import STAGING_PREFIX, TRAINED_KEYS_ENV

    for k, v in s3_server.items():  # this process (ibot-ray export) talks to the server directly
        monkeypatch.setenv(k, v)
    moto_port = int(s3_server["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
    proxy = TCPProxy(moto_port, rate=1_000_000).start()
    data = tmp_path / "images"
    images = write_images(data, 48, kinds=("jpeg", "png"), size=(40, 40))  # 48 / 16 = 3 steps per epoch
    home = tmp_path / "home"  # the workers' local copy of the metrics (~/ibot_runs) stays inside the test
    home.mkdir()
    work = tmp_path / "cwd"
    work.mkdir()
    env = {**os.environ, **s3_server, "HOME": str(home)}

    # one resolved config for both invocations, so that the resumed run builds exactly the model it checkpointed
    sets = [a for s in TINY + ["train.num_workers=[1,1]", "train.checkpoint_every_steps=2",
                               "train.keep_checkpoints=10"] for a in ("--set", s)]
    assert cli_main(["config", "--config", "demo", *sets]) == 0
    config = tmp_path / "tiny.yaml"
    config.write_text(capsys.readouterr().out)

    def command(epochs: int) -> list[str]:
        return [sys.executable, "-m", "ibot_ray.cli", "pretrain", "--config", str(config), "--set",
                f"optim.epochs={epochs}", "--data", str(data), "--storage", "s3://bucket/runs", "--name", "r"]

    p = subprocess.Popen(command(4), cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}",
                              TRAINED_KEYS_ENV: str(tmp_path / "keys")})
    metrics = home / "ibot_runs" / "r" / "logs" / "metrics.jsonl"
    fs, _ = pafs.FileSystem.from_uri("s3://bucket/runs")  # past the proxy

    def committed() -> int:  # the step of the latest checkpoint in the run's snapshot (read past the proxy)
        return latest_checkpoint_metrics("s3://bucket/runs/r").get("step", 0)

    try:
        t0, seen = time.time(), None
        while seen is None and time.time() - t0 < 400:
            assert p.poll() is None, p.stdout.read()[-3000:]
            rows = read_metrics(metrics)
            starts = [r for r in rows if r.get("event") == "start"]
            for staged in Path(tempfile.gettempdir()).glob(f"{STAGING_PREFIX}{starts[0]['pid']}_*") if starts else ():
                step = int(staged.name[len(STAGING_PREFIX):].split("_")[1])
                later = [r["step"] for r in rows if "loss" in r and r["step"] > step]
                # training went on while this one uploads, and the checkpoint before it (periodic or an epoch's
                # end) is committed: the controller commits one at its next poll once it is uploaded
                earlier = [r["step"] for r in rows if r.get("event") == "checkpoint_stall" and r["step"] < step]
                if step >= 4 and later and staged.exists() and earlier and committed() == max(earlier):
                    seen = (staged, step, max(later), max(earlier))
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
    with fs.open_input_stream(f"bucket/runs/r/step_00000012/{STREAM_POSITION_FILE}") as f:
        position = StreamPosition.from_json(f.read().decode())
    epochs = check_exactly_once(trained_rows(tmp_path / "keys"), images["good"], position)
    assert len(epochs["done"]) >= 2, epochs  # 12 steps x 16 = 4 data epochs of 48
    stalls = [r for r in rows if r.get("event") == "checkpoint_stall"]
    assert any(r["background"] for r in stalls) and not stalls[-1]["background"]  # the final one in the foreground
    print(f"killed at step {trained_past} while step {step} uploaded: resumed from {before}; {epochs}")

    # the same command with one more epoch: resumes from the bucket's step 12
    second = subprocess.run(command(5), env=env, cwd=work, capture_output=True, text=True, timeout=420)
    assert second.returncode == 0, f"{second.stdout[-3000:]}\n{second.stderr[-5000:]}"
    # the closing summary names the bucket's paths with their scheme, and where the metrics history really is
    assert "checkpoint      s3://bucket/runs/r/step_00000015" in second.stdout, second.stdout[-2000:]
    assert "export          s3://bucket/runs/r/export/teacher_backbone.safetensors" in second.stdout
    assert "metrics         s3://bucket/runs/r/logs/metrics/part-*.jsonl" in second.stdout

    listing = {i.path for i in fs.get_file_info(pafs.FileSelector("bucket/runs/r", recursive=True))}
    assert {f"bucket/runs/r/step_{s:08d}/state.pt" for s in (before, 12, 15)} <= listing
    assert "bucket/runs/r/export/teacher_backbone.safetensors" in listing
    parts = sorted(p for p in listing if p.startswith("bucket/runs/r/logs/metrics/part-"))
    assert len(parts) >= 3, parts

    # the history of all three attempts, in order: the killed one's rows up to (at least) the checkpoint it resumed
    # from, then the restart's and the second invocation's, each step once
    history = read_metrics_history("s3://bucket/runs/r/logs")
    starts = [i for i, r in enumerate(history) if r.get("event") == "start"]
    assert [history[i]["resumed_from"] for i in starts] == [-1, before, 12], [history[i] for i in starts]
    attempts = [[r["step"] for r in history[a:b] if "loss" in r] for a, b in zip(starts, starts[1:] + [None])]
    assert attempts[0] == list(range(1, len(attempts[0]) + 1)) and before <= len(attempts[0]) <= trained_past
    assert attempts[1:] == [list(range(before + 1, 13)), [13, 14, 15]], attempts

    # nothing went to a schemeless local path (Train V2's Result.path is "bucket/runs/r")
    assert not list(work.rglob("*.safetensors"))

    with fs.open_input_stream("bucket/runs/r/export/teacher_backbone.safetensors") as f:
        (tmp_path / "exported.safetensors").write_bytes(f.read())
    assert exported_metadata(tmp_path / "exported.safetensors")["which"] == "teacher"

    out = tmp_path / "from_bucket.safetensors"
    assert cli_main(["export", "s3://bucket/runs/r/step_00000015", str(out)]) == 0
    assert int(exported_metadata(out)["step"]) == 15


def test_storage_outages_mid_run_are_weather(faulty_s3, tmp_path):
    """The S3 endpoint goes down (connections refused) for 8 s and comes back for 20 s, then drops every connection
    (resets) for 8 s and comes back, for as long as a run trains from the bucket into the bucket: the run
    completes with no restart, every image is trained exactly once per data epoch, the whole metrics history is
    there, and no SourceError is raised. Meanwhile a second driver on the same run is refused and leaves the first
    unharmed (one driver per run, on S3).

    (A restart would replay the data epoch it resumes in: only resume-inside-an-epoch makes "exactly once" hold across
    restarts. Outages shorter than the retry deadline cause none: the storage calls wait them out.)"""
    import json
    import threading
    import time

    import pyarrow.fs as pafs

    from pipelines.ingest import key_id
    from pipelines.metrics import read_metrics_history

    data = tmp_path / "images"
    write_images(data, 48, kinds=("jpeg", "png"), size=(40, 40))  # 48 / 16 = 3 steps per epoch
    fs, _ = pafs.FileSystem.from_uri("s3://bucket/weather_data")
    pafs.copy_files(str(data), "bucket/weather_data", destination_filesystem=fs)
    keys = {key_id(i.path) for i in fs.get_file_info(pafs.FileSelector("bucket/weather_data", recursive=True))}
    assert len(keys) == 48
    home = tmp_path / "home"
    home.mkdir()
    trained = tmp_path / "trained_keys"
    env = {**os.environ, **faulty_s3.env, "HOME": str(home), "IBOT_TRAINED_KEYS_DIR": str(trained)}
    work = tmp_path / "cwd"
    work.mkdir()
    sets = [a for s in TINY + ["optim.epochs=3", "train.checkpoint_every_steps=1", "train.num_workers=[1,1]",
                               "data.local_shuffle_buffer_size=0", "data.source=s3://bucket/weather_data"]
            for a in ("--set", s)]
    cmd = [sys.executable, "-m", "ibot_ray.cli", "pretrain", "--config", "demo", *sets, "--storage", "s3://bucket/runs",
           "--name", "weather"]

    stop = threading.Event()
    timeline: list[tuple[float, str]] = []

    def weather() -> None:  # 8 s down, 20 s up, 8 s of resets, 20 s up, ...: each outage outlasts the AWS SDK's
        try:  # own retries (~6 s), so only pipelines/storage.py's retries carry the run through
            while not stop.is_set():
                for mode, seconds in (("refuse", 8.0), ("forward", 20.0), ("reset", 8.0), ("forward", 20.0)):
                    if stop.is_set():
                        break
                    faulty_s3.set(mode)
                    timeline.append((time.monotonic(), mode))
                    stop.wait(seconds)
        except BaseException as e:  # the endpoint broke, not the run: the test must say so
            timeline.append((time.monotonic(), f"weather failed: {e!r}"))
        faulty_s3.set("forward")

    faulty_s3.set("refuse")  # down from the start: the driver's listing waits for it
    with open(tmp_path / "out.txt", "w") as out_f, open(tmp_path / "err.txt", "w") as err_f:
        run = subprocess.Popen(cmd, env=env, cwd=work, stdout=out_f, stderr=err_f, text=True)
    sky = threading.Thread(target=weather, daemon=True)
    sky.start()

    def tails() -> str:
        return f"{(tmp_path / 'out.txt').read_text()[-3000:]}\n{(tmp_path / 'err.txt').read_text()[-6000:]}"

    try:
        local_metrics = home / "ibot_runs" / "weather" / "logs" / "metrics.jsonl"  # rank 0's local copy
        t0 = time.monotonic()
        while not (local_metrics.exists() and '"loss"' in local_metrics.read_text()):
            assert run.poll() is None, f"the run ended early:\n{tails()}"
            assert time.monotonic() - t0 < 900, f"no training step within 900 s:\n{tails()}"
            time.sleep(1)
        second = subprocess.run(cmd, env=env, cwd=work, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, (second.returncode, second.stderr[-3000:])
        assert "run s3://bucket/runs/weather is in use by driver" in second.stderr, second.stderr[-3000:]
        assert run.poll() is None  # the first driver trains on
        run.wait(timeout=900)
    finally:
        stop.set()
        sky.join(30)
        if run.poll() is None:
            run.kill()
    out, err = (tmp_path / "out.txt").read_text(), (tmp_path / "err.txt").read_text()
    assert not [m for _, m in timeline if m.startswith("weather failed")], timeline
    assert run.returncode == 0, tails()
    assert "SourceError" not in out + err and "data source error" not in out + err
    # the weather changes only while the run lasts (stop is set once it ends): it met both kinds of outage; an idle
    # machine may finish within the first cycle (56 s), a busy one sees several
    assert faulty_s3.faults > 0 and {"refuse", "reset"} <= {m for _, m in timeline}, (faulty_s3.faults, timeline)
    retried = [line for line in err.splitlines() if line.startswith("storage: ") and "retrying" in line]
    print(f"{sum(m != 'forward' for _, m in timeline)} outages, {faulty_s3.faults} connections reset, "
          f"{len(retried)} operations of the driver retried, e.g. {retried[:2]}")

    rows = read_metrics_history("s3://bucket/runs/weather/logs")
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 10))  # every step, each once
    assert len([r for r in rows if r.get("event") == "start"]) == 1  # the outages caused no restart
    per_epoch: dict[int, list[int]] = {}
    for log in trained.glob("rank*.jsonl"):
        for line in log.read_text().splitlines():
            row = json.loads(line)
            for epoch, kid in zip(row["epoch"], row["key_id"]):
                per_epoch.setdefault(epoch, []).append(kid)
    assert sorted(per_epoch) == [0, 1, 2]
    for epoch, ids in per_epoch.items():
        assert len(ids) == len(set(ids)) == 48 and set(ids) == keys, epoch  # every image exactly once per epoch
    listing = {i.path for i in fs.get_file_info(pafs.FileSelector("bucket/runs/weather", recursive=True))}
    assert "bucket/runs/weather/step_00000009/state.pt" in listing
    assert "bucket/runs/weather/driver.lease" not in listing  # released at the end
