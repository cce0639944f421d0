"""Storage faults are weather (pipelines/storage.py), on a real S3-compatible server behind a real faulty endpoint.

moto's S3 server runs on 127.0.0.1 and :class:`faulty_endpoint.FaultyEndpoint` sits in front of it: it refuses
connections (a server that is down), resets them (a crash, a load balancer dropping connections), answers 503 Slow
Down (throttling) or 403 Access Denied (a setting no retry can fix). The clients under test are pyarrow's S3 file
system, as the run uses it, through pipelines/storage.py. No Ray cluster is needed: these tests take seconds.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import threading
import time

import pyarrow.fs as pafs
import pytest

from pipelines import storage
from pipelines.storage import RetryingFileSystem, RetryPolicy, StorageConfigError, StorageUnavailableError

pytest.importorskip("moto")

#: An outage that nothing ends (the retry layer never took over) ends after this long, so that the test fails on its
#: assertions instead of hanging; the retry deadline (600 s) is far above it.
OUTAGE_CAP_S = 60.0


@contextlib.contextmanager
def outage_until_retried(endpoint, mode: str):
    """The endpoint in ``mode`` (refuse, reset, 503) until pipelines/storage.py logs that it retries an operation:
    then the operation has failed through the AWS SDK's own retries (3 attempts, 6.2-6.6 s against such an endpoint,
    measured), and only the retry layer can still carry it through. The outage then ends, so each test waits as long
    as the SDK's retries last, not a fixed time chosen to outlast them. Yields the time it ended (None while on)."""
    ended: list = []

    def end() -> None:
        if not ended:
            ended.append(time.monotonic())
            endpoint.set("forward")

    class EndWhenRetried(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "retrying with backoff" in record.getMessage():
                end()

    logger = logging.getLogger("pipelines.storage")
    handler, level = EndWhenRetried(logging.WARNING), logger.level
    logger.setLevel(logging.WARNING)
    logger.addHandler(handler)
    cap = threading.Timer(OUTAGE_CAP_S, end)
    endpoint.set(mode)
    cap.start()
    try:
        yield ended
    finally:
        cap.cancel()
        logger.removeHandler(handler)
        logger.setLevel(level)
        end()


def _retried(caplog) -> list[str]:
    """What pipelines/storage.py logged: the retry taking over, then the operation that succeeded after it."""
    messages = [r.getMessage() for r in caplog.records if r.name == "pipelines.storage"]
    assert any("retrying with backoff" in m for m in messages), caplog.text
    assert any(" succeeded after " in m for m in messages), caplog.text
    return messages


def test_backoff_doubles_to_its_cap_with_jitter():
    policy = RetryPolicy(deadline_s=60, first_backoff_s=0.5, max_backoff_s=8)
    for attempt, full in enumerate([0.5, 1, 2, 4, 8, 8, 8]):
        waits = [policy.backoff(attempt) for _ in range(200)]
        assert all(0.5 * full <= w <= full for w in waits), (attempt, min(waits), max(waits))
        assert max(waits) - min(waits) > 0.2 * full  # jittered: many workers do not retry in step


def test_errors_are_classified_transient_or_not():
    transient = [
        ConnectionResetError(104, "Connection reset by peer"), TimeoutError("read timed out"),
        OSError("When listing objects under key 'a/' in bucket 'b': AWS Error NETWORK_CONNECTION during "
                "ListObjectsV2 operation: curlCode: 7, Could not connect to server"),
        OSError("When initiating multiple part upload for key 'k' in bucket 'b': AWS Error SLOW_DOWN during "
                "CreateMultipartUpload operation: Please reduce your request rate."),
        OSError("When getting information for key 'k' in bucket 'b': AWS Error UNKNOWN (HTTP status 503) during "
                "HeadObject operation: No response body."),
        OSError("google::cloud::Status(UNAVAILABLE: connection closed)"),
        StorageUnavailableError("read s3://b/k: storage still unavailable after 600 s of retries"),
    ]
    wrapped = RuntimeError("a Ray Data task failed")
    wrapped.__cause__ = transient[2]
    transient.append(wrapped)
    for e in transient:
        assert storage.is_transient(e), e
    settings = [
        OSError("When getting information for key 'k' in bucket 'b': AWS Error ACCESS_DENIED during HeadObject "
                "operation: No response body."),
        OSError("When listing objects under key 'a/' in bucket 'nobucket': AWS Error NO_SUCH_BUCKET during "
                "ListObjectsV2 operation: The specified bucket does not exist"),
        FileNotFoundError(2, "Path does not exist 'bucket/zzz'"), PermissionError(13, "Permission denied"),
        StorageConfigError("--storage: cannot open 's3://x': access denied"),
        OSError(28, "No space left on device"), ValueError("not storage at all"),
    ]
    for e in settings:
        assert not storage.is_transient(e), e
    assert "access denied" in storage.config_problem(settings[0])
    assert "does not exist" in storage.config_problem(settings[1])


@pytest.mark.parametrize("mode, op", [("refuse", "write"), ("reset", "read"), ("503", "list")])
def test_reads_writes_and_listings_wait_out_an_outage(faulty_s3, mode, op, caplog):
    """Each kind of weather, lasting through the AWS SDK's own retries: an operation started during it completes once
    it passes (an endpoint that is down, one that resets every connection, throttling), retried by
    pipelines/storage.py (its warnings)."""
    caplog.set_level(logging.WARNING, logger="pipelines.storage")
    storage.write_text(f"s3://bucket/weather/{mode}/a.txt", "before")
    with outage_until_retried(faulty_s3, mode) as ended:
        if op == "read":
            assert storage.read_text(f"s3://bucket/weather/{mode}/a.txt") == "before"
        elif op == "write":  # what Ray Train's snapshot write and the metrics uploads do
            fs, path = storage.resolve(f"s3://bucket/weather/{mode}/b.txt", setting="test")
            with fs.open_output_stream(path) as f:
                f.write(b"during")
        else:
            fs, path = storage.resolve(f"s3://bucket/weather/{mode}", setting="test")
            assert {i.base_name for i in fs.get_file_info(pafs.FileSelector(path))} == {"a.txt"}
        done = time.monotonic()
        assert ended and ended[0] < done, f"{op} completed during the outage, before any retry of pipelines/storage.py"
    _retried(caplog)
    if op == "write":
        assert storage.read_text(f"s3://bucket/weather/{mode}/b.txt") == "during"
    if mode != "refuse":  # a refused connection never reaches the endpoint: nothing to count
        assert faulty_s3.faults > 0


def test_a_read_resumes_at_the_byte_where_the_connection_broke(faulty_s3, caplog):
    caplog.set_level(logging.WARNING, logger="pipelines.storage")
    blob = bytes(range(256)) * 4096  # 1 MiB
    storage.write_bytes("s3://bucket/resume/blob.bin", blob)
    fs, path = storage.resolve("s3://bucket/resume/blob.bin", setting="test")
    with fs.open_input_file(path) as f:
        head = f.read(1000)
        with outage_until_retried(faulty_s3, "reset"):  # every open connection is cut, new ones are reset
            rest = f.read()
    assert head + rest == blob
    assert faulty_s3.faults > 0
    assert any("blob.bin at byte 1000 failed" in m for m in _retried(caplog)), caplog.text


def test_a_setting_error_fails_at_once_and_names_the_setting(faulty_s3):
    faulty_s3.set("403")
    before = faulty_s3.faults
    with pytest.raises(StorageConfigError, match=r"^data\.source: .*s3://bucket/weather/any\.txt.* access denied: "
                                                 r"check the credentials.*ACCESS_DENIED") as info:
        storage.read_text("s3://bucket/weather/any.txt", setting="data.source")
    assert not storage.is_transient(info.value)
    assert faulty_s3.faults - before <= 2  # not retried: one request (the SDK may repeat it once)
    faulty_s3.set("forward")
    with pytest.raises(StorageConfigError, match=r"^data\.source: cannot open 's3://bucket/x\?nonsense=1'"):
        storage.resolve("s3://bucket/x?nonsense=1", setting="data.source")


def test_an_outage_past_the_deadline_raises_storage_unavailable(faulty_s3, monkeypatch):
    monkeypatch.setenv(storage.RETRY_DEADLINE_ENV, "2")
    faulty_s3.set("refuse")
    with pytest.raises(StorageUnavailableError, match=r"s3://bucket/weather/gone\.txt.*IBOT_STORAGE_RETRY_S=2") as e:
        storage.read_text("s3://bucket/weather/gone.txt")
    assert storage.is_transient(e.value)  # still weather: a restart from the checkpoint tries again


def test_the_retrying_file_system_travels_and_compares_equal(faulty_s3):
    """It is pickled to Ray Data read tasks and Ray Train's workers; Ray Train compares a checkpoint's file system
    with the run's (``is_managed_checkpoint``)."""
    fs, _ = storage.resolve("s3://bucket/x", setting="test")
    assert isinstance(fs, RetryingFileSystem)
    copy = pickle.loads(pickle.dumps(fs))
    assert copy == fs and copy.equals(fs) and copy is not fs
    assert not fs.equals(pafs.LocalFileSystem())
    local, path = storage.resolve("relative/dir", setting="test")
    assert isinstance(local, pafs.LocalFileSystem) and path.startswith("/")


def test_the_stream_factory_waits_out_storage_and_never_fails_the_run_for_it(faulty_s3, monkeypatch, caplog):
    """``TrainStream`` runs in Ray Train's controller at every worker-group start, where any exception becomes a
    ``ControllerError`` that the failure policy never retries (Ray 2.60: callbacks/datasets.py
    ``before_init_train_context`` -> controller.py ``_run_control_loop_iteration`` -> failure_handling/default.py
    ``_is_retryable_error``). It used to swallow a failed read of the run's snapshot and restart the data at epoch 0;
    now a hiccup is waited out, an outage past the deadline is a start failure the policy retries, and a setting
    error ends the run naming it. Checked with Ray Train's own failure policy."""
    import json

    from ray.train.v2._internal.exceptions import WorkerGroupStartupFailedError
    from ray.train.v2._internal.execution.failure_handling.default import DefaultFailurePolicy
    from ray.train.v2._internal.execution.failure_handling.failure_policy import FailureDecision
    from ray.train.v2.api.config import FailureConfig
    from ray.train.v2.api.exceptions import ControllerError

    from ibot_ray.config import load_config
    from pipelines.failures import FatalTrainingError
    from pipelines.ingest import RESUME_EPOCH_METRIC, TrainStream, latest_checkpoint_metrics
    from pipelines.sources import SourceError, list_source

    run = "s3://bucket/runs/snapshot_reader"
    snapshot = {"latest_checkpoint_result": {"checkpoint_dir_name": "step_00000006",
                                             "metrics": {"step": 6, RESUME_EPOCH_METRIC: 2}}}
    storage.write_text(f"{run}/checkpoint_manager_snapshot.json", json.dumps(snapshot))
    assert latest_checkpoint_metrics("s3://bucket/runs/no_such_run") == {}  # a new run: no snapshot, epoch 0
    caplog.set_level(logging.WARNING, logger="pipelines.storage")
    with outage_until_retried(faulty_s3, "refuse"):
        assert latest_checkpoint_metrics(run)[RESUME_EPOCH_METRIC] == 2  # waited out, not {} (data epoch 0)
    _retried(caplog)

    cfg = load_config("demo")
    stream = TrainStream(cfg, list_source(cfg), "no_monitor_needed", run, steps_per_epoch=3)
    policy = DefaultFailurePolicy(FailureConfig(max_failures=-1))
    monkeypatch.setenv(storage.RETRY_DEADLINE_ENV, "1")
    faulty_s3.set("refuse")
    with pytest.raises(WorkerGroupStartupFailedError, match="storage unavailable") as info:
        stream()
    assert policy.make_decision(ControllerError(info.value)) == FailureDecision.RETRY  # a new worker-group start
    # what used to escape the factory for the same hiccup ends the run, whatever train.max_failures says
    assert policy.make_decision(ControllerError(SourceError("data.source: cannot open"))) == FailureDecision.RAISE
    faulty_s3.set("403")
    with pytest.raises(FatalTrainingError, match=r"storage setting error.*\n.*--storage: .*access denied"):
        stream()
