"""Shared test fixtures: one local Ray cluster per test session, and writers of real image files.

The Ray environment variables are set here, at import, before any test module imports ``ray``:
token auth off (no ``~/.ray/auth_token``), a stalled Data pipeline fails after 120 s instead of 30 min, a Train
worker group that cannot start fails after 30 s, no preemption watcher actor, a Train controller that polls its workers
every 0.5 s, and raylets that start worker processes 8 at a time (as ``init_ray`` sets for a user's local Ray).
"""

from __future__ import annotations

import io
import os
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Optional

# The repository root (and this folder, for test-module functions shipped to Train workers) must be importable here
# and in Ray's worker processes, which inherit this environment; also when the package is not installed.
REPO_ROOT = str(Path(__file__).resolve().parent.parent)
TESTS_DIR = str(Path(__file__).resolve().parent)
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
_pp = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
os.environ["PYTHONPATH"] = os.pathsep.join([REPO_ROOT, TESTS_DIR] + [p for p in _pp if p not in (REPO_ROOT, TESTS_DIR)])

#: The environment of every Ray the session starts, and so of every actor and task in it (a raylet hands its own
#: environment to the worker processes it starts). :func:`start_local_ray` applies it again: an in-process run changes
#: os.environ (pipelines/pretrain.py ``build_trainer`` sets RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S from its config,
#: 10 s in test_multinode.py's last run), and a Ray restarted from that environment gave the tests after it settings
#: that depend on which tests ran before.
RAY_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S": "120",
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "30",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # Ray Train's controller polls its workers every 2 s by default: a run's end, a killed worker and a resize
    # decision each wait for the next poll. The tests' runs are seconds long; a 0.5 s poll (propagated to every
    # controller, also those of CLI subprocesses and sweep trials) saves ~1 s per event at a negligible cost.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    # What pipelines/pretrain.py init_ray gives a user's local Ray: start up to 8 worker processes at once. A raylet
    # otherwise starts min(cores, its CPUs) at a time: 2 here, and 1 on a multi-node test cluster's head without
    # CPUs, which hosts the Train controller, the Data coordinator and the run's actors.
    "RAY_worker_maximum_startup_concurrency": str(max(8, os.cpu_count() or 1)),
}
os.environ.update(RAY_ENV)
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

# ---- image files ---------------------------------------------------------------------------------

#: Decodable kinds written by :func:`image_bytes` (each exercises a decode path).
GOOD_KINDS = ("jpeg", "png", "webp", "gray", "rgba", "cmyk", "png16", "exif", "tiny", "palette")
#: Undecodable kinds: garbage after a JPEG header, a JPEG cut in half, an empty file, text named like an image.
BAD_KINDS = ("corrupt", "truncated", "empty", "text")
_EXT = {"jpeg": "jpg", "png": "png", "webp": "webp", "gray": "png", "rgba": "png", "cmyk": "jpg", "png16": "png",
        "exif": "jpg", "tiny": "png", "palette": "gif", "corrupt": "jpg", "truncated": "jpg", "empty": "png",
        "text": "jpg"}


def _rgb(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth random colour image (compresses like a photo, unlike white noise)."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.integers(0, 256, size=3)
    img = base + 60 * np.sin(xx[..., None] / rng.uniform(3, 9) + rng.uniform(0, 6, size=3)) \
        + 60 * np.cos(yy[..., None] / rng.uniform(3, 9))
    return np.clip(img, 0, 255).astype(np.uint8)


def image_bytes(kind: str, rng: Optional[np.random.Generator] = None, size: tuple[int, int] = (40, 56)) -> bytes:
    """Encoded bytes of one test image of ``kind`` (see :data:`GOOD_KINDS`, :data:`BAD_KINDS`); size is (H, W)."""
    from PIL import Image

    rng = rng if rng is not None else np.random.default_rng(0)
    h, w = size
    arr = _rgb(rng, h, w)
    buf = io.BytesIO()
    if kind in ("jpeg", "corrupt", "truncated"):
        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        data = buf.getvalue()
        if kind == "corrupt":
            return data[:20] + rng.integers(0, 256, size=len(data) - 20, dtype=np.uint8).tobytes()
        if kind == "truncated":
            return data[: len(data) // 2]
        return data
    if kind == "png":
        Image.fromarray(arr).save(buf, format="PNG")
    elif kind == "webp":
        Image.fromarray(arr).save(buf, format="WEBP", quality=90)
    elif kind == "gray":
        Image.fromarray(arr[..., 0]).save(buf, format="PNG")
    elif kind == "rgba":
        alpha = np.full((h, w, 1), 128, np.uint8)
        Image.fromarray(np.concatenate([arr, alpha], axis=-1), mode="RGBA").save(buf, format="PNG")
    elif kind == "cmyk":
        Image.fromarray(arr).convert("CMYK").save(buf, format="JPEG", quality=90)
    elif kind == "png16":
        Image.fromarray(arr[..., 1].astype(np.uint16) * 257).save(buf, format="PNG")
    elif kind == "exif":
        exif = Image.Exif()
        exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise on display
        Image.fromarray(arr).save(buf, format="JPEG", quality=90, exif=exif.tobytes())
    elif kind == "tiny":
        Image.fromarray(arr[:3, :5]).save(buf, format="PNG")
    elif kind == "palette":
        Image.fromarray(arr).convert("P").save(buf, format="GIF")
    elif kind == "empty":
        return b""
    elif kind == "text":
        return b"this is a text file that only pretends to be a JPEG\n" * 4
    else:
        raise ValueError(f"unknown image kind {kind!r}; known: {GOOD_KINDS + BAD_KINDS}")
    return buf.getvalue()


def write_images(
    root: os.PathLike | str,
    n: int,
    *,
    kinds: Sequence[str] = GOOD_KINDS,
    bad: Iterable[str] = (),
    classes: Optional[Sequence[str]] = None,
    seed: int = 0,
    size: tuple[int, int] = (40, 56),
) -> dict[str, list]:
    """Write ``n`` good images (cycling through ``kinds``) plus one file per entry of ``bad`` under ``root``.

    With ``classes`` the files go round-robin into ``root/<class>/`` (ImageFolder layout), else flat into ``root``.
    Returns ``{"good": [path, ...], "bad": [path, ...], "labels": {path: class index}}`` with absolute paths.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    good: list[str] = []
    bad_paths: list[str] = []
    labels: dict[str, int] = {}
    sorted_classes = sorted(classes) if classes else None
    jobs = [(k, True) for k in (kinds[i % len(kinds)] for i in range(n))] + [(k, False) for k in bad]
    for i, (kind, ok) in enumerate(jobs):
        folder = root
        label = -1
        if sorted_classes:
            cls = sorted_classes[i % len(sorted_classes)]
            folder = root / cls
            folder.mkdir(exist_ok=True)
            label = sorted_classes.index(cls)
        path = folder / f"{'img' if ok else 'bad'}_{i:04d}_{kind}.{_EXT[kind]}"
        path.write_bytes(image_bytes(kind, rng, size))
        key = os.path.abspath(path)  # what a folder source lists (symlinks in the root are not resolved)
        (good if ok else bad_paths).append(key)
        labels[key] = label
    return {"good": good, "bad": bad_paths, "labels": labels}


def write_parquet(
    path: os.PathLike | str,
    n: int,
    *,
    kinds: Sequence[str] = GOOD_KINDS,
    bad: Iterable[str] = (),
    with_label: bool = True,
    image_column: str = "image",
    label_column: str = "label",
    row_group_size: Optional[int] = None,
    seed: int = 0,
    size: tuple[int, int] = (40, 56),
) -> dict[str, list]:
    """Write a Parquet file of ``n`` good images then the ``bad`` ones (binary ``image_column``, int64 label).

    Returns ``{"good": [row, ...], "bad": [row, ...], "labels": [label per row]}`` (label = row % 3).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    blobs = [image_bytes(kinds[i % len(kinds)], rng, size) for i in range(n)] + [image_bytes(k, rng, size) for k in bad]
    labels = [i % 3 for i in range(len(blobs))]
    cols = {image_column: pa.array(blobs, pa.binary())}
    if with_label:
        cols[label_column] = pa.array(labels, pa.int64())
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), str(path), row_group_size=row_group_size)
    return {"good": list(range(n)), "bad": list(range(n, len(blobs))), "labels": labels}


@pytest.fixture
def image_writer():
    """:func:`write_images` as a fixture (``image_writer(tmp_path / "imgs", 8, bad=["corrupt"])``)."""
    return write_images


@pytest.fixture
def parquet_writer():
    """:func:`write_parquet` as a fixture."""
    return write_parquet


# ---- Ray -----------------------------------------------------------------------------------------


def start_local_ray() -> None:
    """The session's local Ray (also restarted by tests/test_multinode.py after its multi-node cluster)."""
    import ray
    import ray.data

    os.environ.update(RAY_ENV)  # the session's Ray environment, whatever in-process runs left in os.environ
    kwargs = dict(address="local", num_cpus=4, object_store_memory=512 * 2**20, include_dashboard=False)
    try:
        ray.init(**kwargs)
    except Exception:  # noqa: BLE001 - "node timed out during startup" on an overloaded box: try once more
        ray.shutdown()
        ray.init(**kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole test session: 4 logical CPUs (Train workers and Data actors both fit on
    a 2-core box), a 512 MiB object store, no dashboard, no Data progress bars. Shut down at session end."""
    import ray

    started = False
    if not ray.is_initialized():
        start_local_ray()
        started = True
    yield ray
    if started:
        ray.shutdown()


# ---- multi-node clusters -------------------------------------------------------------------------


def refresh_autoscaling_coordinator() -> None:
    """Have Ray's AutoscalingCoordinator re-read the cluster's nodes now, if a run has created it.

    Ray Train's elastic policy sizes a worker group from the coordinator's reservations, and the coordinator re-reads
    ``ray.nodes()`` only on its 20 s tick: right after a node is killed (or added), a run started next would plan on the
    old layout: a group of the old size whose placement group can never be placed, failing only after
    ``train.worker_start_timeout_s`` (or one that starts smaller and grows later). The tick's own re-read, on demand."""
    import ray

    try:
        coordinator = ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
    except ValueError:  # no run has created it yet: the first one reads the cluster as it is
        return
    ray.get(coordinator.get_reserved_resources.remote("ibot-tests", recompute=True), timeout=60)


def await_layout(cond, what: str, timeout: float = 60) -> None:
    """Poll ``cond()`` until the cluster shows a changed layout (a node marked dead, a new node's resources counted),
    then have the AutoscalingCoordinator re-read it, so that the next worker group a run plans fits the new layout."""
    t0 = time.time()
    while not cond():
        assert time.time() - t0 < timeout, f"{what}: not within {timeout} s"
        time.sleep(0.2)
    refresh_autoscaling_coordinator()


# ---- an S3-compatible server ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_server():
    """moto's standalone S3 server on 127.0.0.1 with a bucket named ``bucket``; yields the environment (endpoint,
    dummy credentials) a client needs. It serves from this process: its state survives a stop and a restart."""
    pytest.importorskip("moto")
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


@pytest.fixture
def faulty_s3(s3_server, monkeypatch):
    """:class:`faulty_endpoint.FaultyEndpoint` in front of the S3 server, and this process's environment pointing
    at it (``faulty_s3.env`` for subprocesses); forwarding, until a test sets another mode."""
    from faulty_endpoint import FaultyEndpoint

    host, port = s3_server["AWS_ENDPOINT_URL"].rsplit("/", 1)[-1].split(":")
    endpoint = FaultyEndpoint((host, int(port)))
    endpoint.env = {**s3_server, "AWS_ENDPOINT_URL": endpoint.url}
    for k, v in endpoint.env.items():
        monkeypatch.setenv(k, v)
    yield endpoint
    endpoint.close()


# ---- runs in a thread ----------------------------------------------------------------------------


def wait_for_a_committed_checkpoint(run_path, timeout: float = 120.0) -> None:
    """Wait until Ray Train has committed a checkpoint of the run at ``run_path`` (its snapshot names one). Periodic
    checkpoints upload in the background and are committed at the controller's next poll once every rank has
    reported, so a tiny run can be several steps past one before it counts: a kill before that rightly resumes from
    nothing, and a test that kills to test a resume must wait for this first."""
    from pipelines.ingest import latest_checkpoint_metrics

    deadline = time.time() + timeout
    while not latest_checkpoint_metrics(str(run_path)):
        assert time.time() < deadline, f"no checkpoint of {run_path} committed in {timeout:.0f} s"
        time.sleep(0.1)


class InThread:
    """``fn()`` in a daemon thread, for tests that act while a run trains (kill a worker, drain or add a node):
    ``wait`` polls a run's metrics file, ``result`` joins with a deadline and re-raises what ``fn`` raised.

        run = InThread(lambda: pretrain(cfg, storage=..., name="r", knn=False, export=False))
        rows = run.wait(metrics_path, lambda rows: any(r.get("step", 0) >= 5 for r in rows))
        ...                                            # act on the running run
        res = run.result(timeout=400)
    """

    def __init__(self, fn) -> None:
        import threading

        self.box: dict = {}  # "result", or "error": the exception fn raised

        def target():
            try:
                self.box["result"] = fn()
            except BaseException as e:  # noqa: BLE001 - handed to the test
                self.box["error"] = e

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    @property
    def error(self) -> Optional[BaseException]:
        return self.box.get("error")

    def wait(self, metrics: os.PathLike | str, cond, timeout: float = 240.0, poll: float = 0.2) -> list[dict]:
        """The rows of the metrics file once ``cond(rows)`` holds; fails when ``fn`` ends first or on timeout."""
        from pipelines.metrics import read_metrics

        t0 = time.time()
        while time.time() - t0 < timeout:
            rows = read_metrics(metrics)
            if cond(rows):
                return rows
            if not self.thread.is_alive():
                raise AssertionError(f"the run ended early: {self.box}")
            time.sleep(poll)
        raise AssertionError(f"timed out waiting on {metrics}: {read_metrics(metrics)[-3:]}")

    def join(self, timeout: float) -> bool:
        """Whether ``fn`` ended within ``timeout`` seconds."""
        self.thread.join(timeout)
        return not self.thread.is_alive()

    def result(self, timeout: float, what: str = "the run did not finish"):
        """``fn()``'s result, or its exception re-raised; fails with ``what`` if it still runs after ``timeout``."""
        assert self.join(timeout), f"{what} (still running after {timeout:.0f} s)"
        if "error" in self.box:
            raise self.box["error"]
        return self.box["result"]
