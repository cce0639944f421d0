"""One driver per run (pipelines/run_lease.py): the lease in a local run folder and on a real S3-compatible server.

The lease's rules are checked with two ``RunLease`` objects, each what one driver holds (no Ray needed): the second
driver is refused with a message naming the run and the first driver, a stale lease (a crashed driver) is taken over,
``--takeover`` takes a fresh one over and the first driver learns it lost it. The end-to-end check runs a real
pretraining run on the session's local Ray and starts a second driver on the same run while it trains: the second one
stops before it asks for any resource, and the first finishes with all its checkpoints. The same on S3 is part of
``tests/test_s3_storage.py::test_storage_outages_mid_run_are_weather``.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
from conftest import InThread

from pipelines import storage
from pipelines.run_lease import LEASE_FILE, RunInUseError, RunLease


def _lease_rules(run: str) -> None:
    first = RunLease(run, heartbeat_s=0.3, stale_after_s=30, settle_s=0.1).acquire()
    try:
        lease = json.loads(storage.read_text(f"{run}/{LEASE_FILE}"))
        assert lease["owner"] == first.owner and lease["pid"] > 0
        beat = lease["heartbeat"]
        time.sleep(1.0)
        assert json.loads(storage.read_text(f"{run}/{LEASE_FILE}"))["heartbeat"] > beat  # kept fresh
        with pytest.raises(RunInUseError) as info:
            RunLease(run, settle_s=0.1).acquire()
        msg = str(info.value)
        assert run in msg and "is in use by driver" in msg and "--takeover" in msg and "--name" in msg
        assert json.loads(storage.read_text(f"{run}/{LEASE_FILE}"))["owner"] == first.owner  # untouched
    finally:
        first.release()
    assert storage.read_text(f"{run}/{LEASE_FILE}") is None  # released: the next driver starts at once
    again = RunLease(run, settle_s=0.1).acquire()
    again.release()


def test_a_second_driver_is_refused_until_the_first_releases_local(tmp_path):
    _lease_rules(str(tmp_path / "runs" / "r"))


def test_a_second_driver_is_refused_until_the_first_releases_on_s3(faulty_s3):
    _lease_rules("s3://bucket/leases/r")


def test_a_stale_lease_is_taken_over_and_takeover_stops_the_first_driver(faulty_s3):
    run = "s3://bucket/leases/stale"
    # a driver on another machine that crashed: its last heartbeat is older than the staleness limit
    storage.write_text(f"{run}/{LEASE_FILE}", json.dumps({"owner": "gone", "host": "another-host", "pid": 1,
                                                         "started": time.time() - 600,
                                                         "heartbeat": time.time() - 200, "stale_after_s": 120}))
    resumed = RunLease(run, settle_s=0.1).acquire()
    resumed.release()

    lost = threading.Event()
    first = RunLease(run, heartbeat_s=0.3, settle_s=0.1, on_lost=lambda other: lost.set()).acquire()
    try:
        second = RunLease(run, takeover=True, settle_s=0.1).acquire()  # --takeover: not stale, taken anyway
        assert lost.wait(10) and first.lost  # the first driver's next heartbeat finds it gone and stops
        assert json.loads(storage.read_text(f"{run}/{LEASE_FILE}"))["owner"] == second.owner
        second.release()
    finally:
        first.release()


def test_two_drivers_on_one_local_run(ray_cluster, tmp_path, image_writer):
    """A second ``pretrain`` on a run that trains stops with RunInUseError; the first completes, unharmed."""
    from test_pretrain import TINY

    from ibot_ray.config import load_config
    from pipelines.pretrain import pretrain

    storage_dir = tmp_path / "runs"
    image_writer(tmp_path / "images", 96, kinds=("jpeg", "png"), size=(40, 40))  # 6 steps per epoch
    cfg = load_config("demo", TINY + [f"data.source={tmp_path / 'images'}", "optim.epochs=2",
                                      "train.checkpoint_every_steps=3"])
    metrics = storage_dir / "shared" / "logs" / "metrics.jsonl"
    first = InThread(lambda: pretrain(cfg, storage=str(storage_dir), name="shared", knn=False, export=False))
    first.wait(metrics, lambda rows: any(r.get("step", 0) >= 1 for r in rows))
    t0 = time.monotonic()
    with pytest.raises(RunInUseError, match=r"shared is in use by driver .*:\d+ .*--takeover"):
        pretrain(cfg, storage=str(storage_dir), name="shared", knn=False, export=False)
    refused_s = time.monotonic() - t0
    res = first.result(timeout=600)
    assert res.steps == 12
    assert sorted(p.name for p in (storage_dir / "shared").glob("step_*")) == ["step_00000009", "step_00000012"]
    assert not (storage_dir / "shared" / LEASE_FILE).exists()  # released at the end
    print(f"second driver refused after {refused_s:.1f} s")
