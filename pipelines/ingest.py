"""Training ingest: raw image bytes -> decode + iBOT multi-crop + masks on an autoscaling CPU actor pool -> uint8 rows.

    source rows {bytes, key, label, position, epoch}   (pipelines/sources.py: one stream over many data epochs)
      -> repartition(target_num_rows_per_block=actor_batch_size)   (streaming: one actor batch per block; ``auto``:
                                                                    about 2 MiB of crops, ibot_ray/recipe.py)
      -> map_batches(MultiCropBatcher, ActorPoolStrategy(min, max), num_cpus=cfg.data.cpus_per_actor)
      -> rows {global_crops (G,3,S,S) uint8, local_crops (L,3,s,s) uint8, masks (G,h,w) uint8, label int64,
               epoch int64, position int64, key_id int64, key str}

Crops stay uint8 in the object store (4x smaller than float32); ``pipelines/collate.py`` turns them into tensors
and normalises them on the training device.

One execution, many epochs: the training Dataset is a single stream of data epochs ``start .. start + n - 1``
(:func:`pipelines.sources.epoch_stream`), so the actor pool starts once per worker-group start and stays warm
across epoch boundaries; the trainer ends epochs by step count. Every row carries its data epoch, and every image
gets its own seed ``blake2b(data.seed, row epoch, key)``: a run is reproducible (same seed, same crops) yet every
epoch draws fresh crops, with no clock to read. :class:`TrainStream` is the trainer's dataset factory: Ray Train V2
calls it at every worker-group start (first start, failure, resize, driver resume) and it continues every data
epoch at the stream position of the checkpoint that the workers will resume from (``pipelines/stream_position.py``).

Bad input (unreadable, truncated, zero-byte, non-image) is dropped, never fatal, and recorded in the run's
:class:`IngestMonitor` actor, a ledger of *distinct* bad files per data epoch and in total: a Data task retry, rows
re-read after a restart or a resize report the same (epoch, key) again, which changes nothing. The ledger travels
with each checkpoint (:meth:`IngestMonitor.snapshot` / ``merge``), so a resumed driver continues the counts.
:func:`get_bad_input_stats` reads it.

Usage (driver, then every Train worker)::

    listing = list_source(cfg)                                    # the only listing of the run
    name = create_monitor(run_name)                               # keeps the actor alive as long as the driver
    TorchTrainer(..., datasets={"train": TrainStream(cfg, listing, name, run_path, steps_per_epoch)})
    for batch in iter_train_batches(ray.train.get_dataset_shard("train"), cfg, per_rank_batch, device): ...
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sys
import time
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import ray
from ray.data._internal.execution.execution_callback import ExecutionCallback  # Ray is pinned (pyproject.toml)
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ibot_ray.config import MAX_BAD_FRACTION
from ibot_ray.recipe import actor_batch_for
from pipelines import storage
from pipelines.sources import (
    EPOCH_COLUMN,
    POSITION_COLUMN,
    SourceInfo,
    SourceListing,
    build_source_dataset,
)
from pipelines.stream_position import StreamPosition, read_stream_position

if TYPE_CHECKING:  # pragma: no cover
    import ray.data

    from ibot_ray.config import IBOTConfig

logger = logging.getLogger(__name__)

#: Monitor (bad-input ledger) used when no name is given. Give every concurrent run its own name.
DEFAULT_MONITOR_NAME = "ibot_ingest_monitor"
#: How many (key, reason) examples of bad input the ledger lists (overall and per epoch); the counts are complete.
MAX_BAD_EXAMPLES = 10
#: At most one bad-input warning per this many seconds per process (the counts are always exact).
WARN_INTERVAL_S = 30.0
#: Output columns of the ingest, in order.
OUTPUT_COLUMNS = ("global_crops", "local_crops", "masks", "label", EPOCH_COLUMN, POSITION_COLUMN, "key_id", "key")
#: Metric of a checkpoint report that holds the data epoch a restart from that checkpoint streams first.
RESUME_EPOCH_METRIC = "resume_data_epoch"
#: Metric of a checkpoint report that names its folder in the run (where :class:`TrainStream` finds its stream
#: position, ``pipelines/stream_position.py``).
CHECKPOINT_DIR_METRIC = "checkpoint_dir"
#: Train V2's record of the run's checkpoints (``ray.train.v2._internal.constants``), in the run folder.
CHECKPOINT_MANAGER_SNAPSHOT = "checkpoint_manager_snapshot.json"


def image_seed(seed: int, epoch: int, key: str) -> int:
    """Stable 63-bit per-image seed from ``(seed, epoch, key)`` (blake2b, independent of Python's hash salt)."""
    h = hashlib.blake2b(f"{int(seed)}\x1f{int(epoch)}\x1f{key}".encode("utf-8", "surrogatepass"), digest_size=8)
    return int.from_bytes(h.digest(), "little") & (2**63 - 1)


def key_id(key: str) -> int:
    """Stable 63-bit id of an image key (blake2b): the ``key_id`` column, the key as a tensor-friendly number."""
    h = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8, person=b"ibot-key")
    return int.from_bytes(h.digest(), "little") & (2**63 - 1)


# ---- the monitor actor: the bad-input ledger -----------------------------------------------------


class IngestMonitor:
    """The run's bad-input ledger, shared by the augmenting actors, the Train workers and the driver.

    Runs as a named Ray actor with ``num_cpus=0`` (see :func:`get_or_create_monitor`). It records *distinct* bad
    files: a file is counted once per data epoch it was read in, however often it was read (Data task retries, rows
    re-read after a restart or a resize), and once in the total. Its size does not grow with the run's length:

    * per distinct bad file (by :func:`key_id`), the first and latest data epoch it was reported in and a bitmask of
      the :data:`LEDGER_EPOCH_WINDOW` epochs up to the latest. A report older than that window is a replay (a
      resumed stream re-reads only the epochs its checkpoint had open, which the actors had just read);
    * per data epoch, a count; the first :data:`MAX_BAD_EXAMPLES` ``(key, reason)`` of the run;
    * per data epoch not yet done, the positions of its unreadable rows (``pipelines/stream_position.py``): rank 0
      folds them into the stream position at each checkpoint, so they do not hold the epoch's watermark back, and
      then releases the epochs that are done (:meth:`release_positions`).

    So the counts stay exact, every log step reads them in O(epochs), and a checkpoint holds O(distinct bad files).
    """

    def __init__(self) -> None:
        self._files: dict[int, list[int]] = {}  # key id -> [first epoch, latest epoch, window bitmask]
        self._per_epoch: dict[int, int] = {}  # data epoch -> distinct bad files reported in it
        self._first: dict[int, int] = {}  # data epoch -> distinct bad files first reported in it
        self._examples: list[tuple[int, str, str]] = []  # (key id, key, reason), the first MAX_BAD_EXAMPLES
        self._positions: dict[int, set[int]] = {}  # data epoch -> unreadable positions (epochs not released)
        self._log = logging.getLogger("pipelines.ingest.monitor")
        self._last_warn = float("-inf")
        self._unwarned = 0

    def _mark(self, kid: int, epoch: int) -> bool:
        """Record that file ``kid`` was reported in ``epoch``; True the first time (class doc: the window)."""
        f = self._files.get(kid)
        if f is None:
            self._files[kid] = [epoch, epoch, 1]
            self._first[epoch] = self._first.get(epoch, 0) + 1
            return True
        first, last, mask = f
        if epoch < first:  # before any report of the file: new, wherever it falls
            self._first[first] -= 1
            self._first[epoch] = self._first.get(epoch, 0) + 1
            f[0] = epoch
            if last - epoch < LEDGER_EPOCH_WINDOW:
                f[2] = mask | (1 << (last - epoch))
            return True
        if epoch > last:
            f[1], f[2] = epoch, ((mask << (epoch - last)) | 1) & _WINDOW_MASK
            return True
        j = last - epoch
        if j >= LEDGER_EPOCH_WINDOW or (mask >> j) & 1:
            return False
        f[2] = mask | (1 << j)
        return True

    def _add(self, epoch: int, kid: int) -> bool:
        if not self._mark(kid, epoch):
            return False
        self._per_epoch[epoch] = self._per_epoch.get(epoch, 0) + 1
        return True

    def _reported(self, kid: int, epoch: int) -> bool:
        first, last, mask = self._files[kid]
        j = last - epoch
        if epoch < first or j < 0:
            return False
        return j >= LEDGER_EPOCH_WINDOW or bool((mask >> j) & 1)  # older than the window: as the later epochs

    def report_bad(self, items: list[tuple]) -> int:
        """Record dropped images ``[(data epoch, key, reason[, position]), ...]``; returns the distinct total."""
        new = []
        for epoch, key, reason, *position in items:
            epoch = int(epoch)
            if position:
                self._positions.setdefault(epoch, set()).add(int(position[0]))
            kid = key_id(key)
            if kid not in self._files and len(self._examples) < MAX_BAD_EXAMPLES:
                self._examples.append((kid, key, reason))
            if self._add(epoch, kid):
                new.append((epoch, key, reason))
        self._unwarned += len(new)
        now = time.monotonic()
        if new and now - self._last_warn >= WARN_INTERVAL_S:
            epoch, key, reason = new[0]
            self._log.warning(
                "ingest: %d more unreadable image(s) dropped since the last warning (epoch %d, e.g. %s: %s); "
                "%d distinct in total", self._unwarned, epoch, key, reason, len(self._files),
            )
            self._last_warn, self._unwarned = now, 0
        return len(self._files)

    def stats(self, epoch: Optional[int] = None, through_epoch: Optional[int] = None) -> dict[str, Any]:
        """``{"count", "examples", "per_epoch"}``: distinct bad files (all epochs, or only ``epoch``), the first
        :data:`MAX_BAD_EXAMPLES` ``(key, reason)`` (of ``epoch``, when given), and the distinct count per data epoch.
        ``through_epoch`` leaves out later epochs (a stream reads ahead of the training)."""
        per_epoch = {e: n for e, n in sorted(self._per_epoch.items()) if through_epoch is None or e <= through_epoch}
        if epoch is not None:
            count = per_epoch.get(int(epoch), 0)
            examples = [(k, r) for kid, k, r in self._examples if self._reported(kid, int(epoch))]
        else:
            count = sum(n for e, n in self._first.items() if through_epoch is None or e <= through_epoch)
            examples = [(k, r) for kid, k, r in self._examples
                        if through_epoch is None or self._files[kid][0] <= through_epoch]
        return {"count": count, "examples": examples, "per_epoch": per_epoch}

    def bad_positions(self, epochs: list[int]) -> dict[int, list[int]]:
        """The unreadable positions reported so far in each of ``epochs`` (those not released)."""
        return {int(e): sorted(self._positions[int(e)]) for e in epochs if int(e) in self._positions}

    def release_positions(self, before_epoch: int) -> None:
        """Forget the unreadable positions of the data epochs below ``before_epoch`` (done in a checkpoint's stream
        position). If that checkpoint is never committed, the restart re-reads those rows and reports them again."""
        for e in [e for e in self._positions if e < before_epoch]:
            del self._positions[e]

    def snapshot(self) -> dict[str, Any]:
        """The ledger as JSON-friendly data (saved with each checkpoint; O(distinct bad files), not O(epochs))."""
        return {"version": 2, "files": [[kid, *f] for kid, f in self._files.items()],
                "per_epoch": {str(e): n for e, n in self._per_epoch.items()},
                "examples": [[kid, k, r] for kid, k, r in self._examples]}

    def merge(self, snapshot: Optional[dict[str, Any]]) -> int:
        """Add a :meth:`snapshot` (e.g. of the checkpoint a run resumes from): a union, so merging twice, or merging
        what this ledger already holds, changes nothing. Returns the distinct total."""
        if not snapshot:
            return len(self._files)
        if "keys" in snapshot:  # version 1 (every epoch's set of files): replayed report by report
            keys = snapshot["keys"]
            for e, idx in snapshot.get("per_epoch", {}).items():
                self.report_bad([(int(e), *keys[i]) for i in idx])
            return len(self._files)
        per_epoch = {int(e): int(n) for e, n in snapshot.get("per_epoch", {}).items()}
        lo = max(per_epoch, default=0) - LEDGER_EPOCH_WINDOW + 1  # epochs below: the snapshot's counts stand
        for e, n in per_epoch.items():
            if e < lo:
                self._per_epoch[e] = max(self._per_epoch.get(e, 0), n)
        for kid, k, r in snapshot.get("examples", []):
            if kid not in {x[0] for x in self._examples} and len(self._examples) < MAX_BAD_EXAMPLES:
                self._examples.append((int(kid), k, r))
        for kid, first, last, mask in snapshot.get("files", []):
            kid = int(kid)
            for j in range(LEDGER_EPOCH_WINDOW):  # the latest epoch first: it sets the file's window
                if (int(mask) >> j) & 1:
                    e = int(last) - j
                    self._add(e, kid) if e >= lo else self._mark(kid, e)
            self._mark(kid, int(first))  # the file's first epoch (it may be older than its window)
        return len(self._files)

    def reset(self) -> None:
        self.__init__()


#: Data epochs that the ledger tells apart per bad file (the window of :class:`IngestMonitor`).
LEDGER_EPOCH_WINDOW = 64
_WINDOW_MASK = (1 << LEDGER_EPOCH_WINDOW) - 1


_MonitorActor = ray.remote(num_cpus=0)(IngestMonitor)  # one call at a time: the ledger stays consistent


# Handles of the monitors this process created: a named non-detached actor dies with its owner's last handle.
_OWNED_MONITORS: dict[str, ray.actor.ActorHandle] = {}


def get_or_create_monitor(name: str = DEFAULT_MONITOR_NAME) -> ray.actor.ActorHandle:
    """The named :class:`IngestMonitor` actor, created (``num_cpus=0``) if it does not exist yet.

    It is owned by the calling process and lives as long as it (this module keeps the handle), so create it on the
    driver (``build_train_dataset`` / :func:`create_monitor` do). :func:`kill_monitor` ends it early. It is placed
    on the calling process's node: anywhere else, losing that node (a preempted spot worker) would take the run's
    bad-input counts with it, and every restarted worker group would fail on the dead actor.
    """
    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    handle = _MonitorActor.options(name=name, get_if_exists=True, scheduling_strategy=here).remote()
    _OWNED_MONITORS.setdefault(name, handle)
    return handle


def kill_monitor(name: str) -> None:
    """End the monitor actor ``name`` (its counts are lost); a no-op when there is none."""
    _OWNED_MONITORS.pop(name, None)
    try:
        ray.kill(ray.get_actor(name))
    except ValueError:
        pass


def _get_monitor(name: str) -> ray.actor.ActorHandle:
    try:
        return ray.get_actor(name)
    except ValueError:
        raise ValueError(f"no ingest monitor actor named {name!r}; build_train_dataset creates it") from None


def get_bad_input_stats(name: str = DEFAULT_MONITOR_NAME, epoch: Optional[int] = None,
                        through_epoch: Optional[int] = None) -> dict[str, Any]:
    """``{"count": distinct bad files, "examples": [(key, reason), ...first 10], "per_epoch": {epoch: count}}``.

    ``count``/``examples`` cover all data epochs, or only ``epoch`` when given; ``through_epoch`` leaves out later
    epochs."""
    return ray.get(_get_monitor(name).stats.remote(epoch, through_epoch))


def bad_input_snapshot(name: str) -> dict[str, Any]:
    """The ledger of monitor ``name`` as JSON-friendly data (:meth:`IngestMonitor.snapshot`)."""
    return ray.get(_get_monitor(name).snapshot.remote())


def fold_bad_positions(name: str, position: StreamPosition) -> None:
    """Mark the unreadable rows monitor ``name`` knows of in ``position``'s open data epochs consumed, then release
    the positions of the epochs that are done (:meth:`IngestMonitor.release_positions`)."""
    from pipelines.stream_position import encode

    monitor = _get_monitor(name)
    for epoch, positions in ray.get(monitor.bad_positions.remote(position.open_epochs())).items():
        position.add(encode(np.full(len(positions), epoch), positions))
    monitor.release_positions.remote(position.start)


def merge_bad_input(name: str, snapshot: Optional[dict[str, Any]]) -> int:
    """Merge a saved ledger into monitor ``name`` (idempotent); returns the distinct total."""
    return ray.get(_get_monitor(name).merge.remote(snapshot))


# ---- the augmenting UDF --------------------------------------------------------------------------


class MultiCropBatcher:
    """Ray Data UDF (one instance per actor): decode + multi-crop + masks for a batch of raw rows.

    Input batch (numpy format): ``bytes`` (object array of bytes), ``key`` (str), ``label`` (int64), ``epoch``
    (int64, the row's data epoch; a batch may straddle an epoch boundary), ``position`` (int64, its position in the
    epoch's read order). Output: the :data:`OUTPUT_COLUMNS`, with the bad images dropped and reported to the
    monitor with their epoch and position.
    """

    def __init__(self, cfg: IBOTConfig, *, monitor_name: Optional[str] = None) -> None:
        from ibot_ray import crop_kernels
        from ibot_ray.multicrop import MultiCropTransform

        crop_kernels.warm_up()  # compile at actor start (seconds, once per machine with numba's disk cache)
        self.cfg = cfg
        self.seed = int(cfg.data.seed)
        self.transform = MultiCropTransform(cfg)
        self.monitor = _get_monitor(monitor_name) if monitor_name else None
        self._last_warn = float("-inf")
        if "torch" in sys.modules:  # the augmentation runs torch ops: one thread per reserved CPU, no oversubscription
            sys.modules["torch"].set_num_threads(max(1, int(round(cfg.data.cpus_per_actor))))
        c = cfg.crops
        h, w = cfg.grid(c.global_crops_size)
        self._empty = {
            "global_crops": np.zeros((0, c.global_crops_number, 3, c.global_crops_size, c.global_crops_size), np.uint8),
            "local_crops": np.zeros((0, c.local_crops_number, 3, c.local_crops_size, c.local_crops_size), np.uint8),
            "masks": np.zeros((0, c.global_crops_number, h, w), np.uint8),
        }

    def _transform_each(self, blobs: list[bytes], seeds: list[int], epoch: int):
        """Fallback when the batch transform raised: run image by image so one bad input cannot sink the batch.

        If *every* image of a batch (of 2+) raises, the fault is the code or the config, not the data: the first
        error is re-raised rather than silently dropping the whole dataset.
        """
        parts: list[dict[str, np.ndarray]] = []
        bad: list[tuple[int, str]] = []
        raised: list[Exception] = []
        for i, (blob, s) in enumerate(zip(blobs, seeds)):
            try:
                out, b = self.transform([blob], [s], epoch)
            except Exception as e:  # noqa: BLE001 - any failure on one image makes it a bad input
                raised.append(e)
                bad.append((i, f"{type(e).__name__}: {e}"))
                continue
            if b:
                bad.append((i, b[0][1]))
            if len(out["index"]):
                parts.append({k: v for k, v in out.items() if k != "index"} | {"index": np.array([i])})
        if len(blobs) > 1 and len(raised) == len(blobs):
            raise raised[0]
        if not parts:
            return dict(self._empty, index=np.zeros(0, np.int64)), bad
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, bad

    def _one_epoch(self, blobs: list[bytes], keys: list[str], epoch: int):
        seeds = [image_seed(self.seed, epoch, k) for k in keys]
        try:
            return self.transform(blobs, seeds, epoch)
        except Exception:  # noqa: BLE001
            logger.exception("ingest: multi-crop failed on a batch of %d; retrying image by image", len(keys))
            return self._transform_each(blobs, seeds, epoch)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = [str(k) for k in batch["key"]]
        blobs = [b if isinstance(b, bytes) else bytes(b) for b in batch["bytes"]]
        labels = np.asarray(batch["label"], dtype=np.int64)
        epochs = np.asarray(batch[EPOCH_COLUMN], dtype=np.int64)
        positions = np.asarray(batch[POSITION_COLUMN], dtype=np.int64)
        parts: list[dict[str, np.ndarray]] = []
        items: list[tuple[int, str, str, int]] = []
        for epoch in np.unique(epochs):  # crops and mask ratios follow each row's own data epoch
            rows = np.flatnonzero(epochs == epoch)
            out, bad = self._one_epoch([blobs[i] for i in rows], [keys[i] for i in rows], int(epoch))
            items += [(int(epoch), keys[rows[i]], str(reason), int(positions[rows[i]])) for i, reason in bad]
            parts.append(dict(out, index=rows[np.asarray(out["index"], dtype=np.int64)]))
        if items:
            if time.monotonic() - self._last_warn >= WARN_INTERVAL_S:
                logger.warning("ingest: dropped %d bad image(s) in a batch of %d, e.g. %s (epoch %d): %s",
                               len(items), len(keys), items[0][1], items[0][0], items[0][2])
                self._last_warn = time.monotonic()
            if self.monitor is not None:
                ray.get(self.monitor.report_bad.remote(items))
        out = parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        idx = out["index"]
        return {
            "global_crops": np.ascontiguousarray(out["global_crops"], dtype=np.uint8),
            "local_crops": np.ascontiguousarray(out["local_crops"], dtype=np.uint8),
            "masks": np.ascontiguousarray(out["masks"]).astype(np.uint8, copy=False),
            "label": labels[idx],
            EPOCH_COLUMN: epochs[idx],
            POSITION_COLUMN: positions[idx],
            "key_id": np.array([key_id(keys[i]) for i in idx], dtype=np.int64),
            "key": np.array([keys[i] for i in idx], dtype=object),
        }


# ---- public builder ------------------------------------------------------------------------------


def create_monitor(run_name: str) -> str:
    """Create (or reuse) the :class:`IngestMonitor` of a run and return its actor name (``ibot_ingest:<run_name>``).

    Concurrent runs in one Ray cluster (Tune trials) must use different run names.
    """
    name = f"ibot_ingest:{run_name}"
    ray.get(get_or_create_monitor(name).stats.remote())
    return name


def build_train_dataset(
    cfg: IBOTConfig,
    *,
    listing: Optional[SourceListing] = None,
    source: Optional[str] = None,
    monitor_name: Optional[str] = None,
    start_epoch: int = 0,
    num_epochs: int = 1,
    shuffle_files: bool = True,
    resume: Optional[StreamPosition] = None,
) -> tuple[ray.data.Dataset, SourceInfo]:
    """The lazy training Dataset (rows of fixed-shape uint8 multi-crops, masks, label, epoch, key) and its SourceInfo.

    Args:
        cfg: the run config (``cfg.data`` for the source and actor pool, ``cfg.crops``/``cfg.masking`` for crops).
        listing: the source's :class:`~pipelines.sources.SourceListing` (listed here from ``source`` /
            ``cfg.data.source`` when not given).
        monitor_name: the :class:`IngestMonitor` actor (created here if missing) that records bad inputs, default
            :data:`DEFAULT_MONITOR_NAME`.
        start_epoch, num_epochs: the data epochs the one execution streams, in order.
        shuffle_files: each epoch reads in its own order, seeded by ``(cfg.data.seed, epoch)``.
        resume: a checkpoint's stream position: the epochs it started continue where it stands.

    The SourceInfo's ``num_items`` counts listed files/rows, bad ones included (they are only found when decoded).
    """
    t0 = time.perf_counter()
    name = monitor_name or DEFAULT_MONITOR_NAME
    ray.get(get_or_create_monitor(name).stats.remote())  # exists and answers before any actor needs it
    ds, info = build_source_dataset(cfg, source, shuffle_seed=cfg.data.seed if shuffle_files else None,
                                    start_epoch=start_epoch, num_epochs=num_epochs, listing=listing, resume=resume)
    d = cfg.data
    lo, hi = d.actors
    rows = actor_batch_for(cfg)
    # Blocks of one actor batch: an actor task then emits its crops after every batch (streaming) instead of
    # buffering a whole read block's output (up to 128 MiB) before the consumer sees the first image.
    ds = ds.repartition(target_num_rows_per_block=rows)
    ds = ds.map_batches(
        MultiCropBatcher,
        fn_constructor_args=(cfg,),
        fn_constructor_kwargs={"monitor_name": name},
        batch_size=rows,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi),
        num_cpus=d.cpus_per_actor,
        resources={d.actor_resource: d.cpus_per_actor} if d.actor_resource else None,  # node pinning
    )
    # Read tasks of adjacent epochs run at the same time (small epochs are a single task): rows must still leave in
    # epoch order, else epochs interleave. Ray Train sets its own options: see ingest_execution_options.
    ds.context.execution_options.preserve_order = True
    pace_scheduling_loop(ds, d.executor_min_step_ms)
    logger.info("ingest: %s source %s with %d items, data epochs %d..%d, built in %.1fs", info.format, info.uri,
                info.num_items, start_epoch, start_epoch + num_epochs - 1, time.perf_counter() - t0)
    return ds, info


#: DataContext key of the scheduling loop's minimum step (seconds), read by SchedulingLoopPacer in the executor
MIN_STEP_KEY = "ibot_ray.executor_min_step_s"


class SchedulingLoopPacer(ExecutionCallback):
    """Holds Ray Data's scheduling loop to at most one step per ``data.executor_min_step_ms``.

    Each step of the streaming executor's loop waits in ``ray.wait`` (at most 0.1 s) for its running tasks'
    outputs. When the output is backpressured (the object store budget is full because the trainers consume slower
    than the actors crop, the steady state of any dataset larger than that budget), outputs stay ready and unread,
    ``ray.wait`` returns at once, and the loop spins. Measured on the full Fashion-MNIST on 2 cores: the training
    stream's coordinator (the ``SplitCoordinator`` actor) took 30 % of a core after 15 minutes and 54 % after 25,
    taken from the training workers. The loop's own work per step (resource accounting, dispatch) is unchanged; a
    step only starts no sooner than the minimum after the previous one. Finished blocks reach the output queue at
    most that much later, far inside the blocks the trainers prefetch."""

    def __init__(self) -> None:
        self._last = None

    def on_execution_step(self, executor) -> None:
        period = float(executor._data_context.get_config(MIN_STEP_KEY, 0.0) or 0.0)
        now = time.perf_counter()
        if period > 0 and self._last is not None and now - self._last < period:
            time.sleep(period - (now - self._last))
        self._last = time.perf_counter()


def pace_scheduling_loop(ds, min_step_ms: float) -> None:
    """Have every execution of ``ds`` paced by :class:`SchedulingLoopPacer` (``min_step_ms`` 0: Ray's own loop)."""
    ctx = ds.context
    ctx.set_config(MIN_STEP_KEY, float(min_step_ms) / 1000.0)
    if min_step_ms > 0 and SchedulingLoopPacer not in ctx.custom_execution_callback_classes:
        ctx.custom_execution_callback_classes = [*ctx.custom_execution_callback_classes, SchedulingLoopPacer]


def ingest_execution_options():
    """Ray Train's ingest options (``DataConfig.default_ingest_options``) with ``preserve_order``: the training stream
    must deliver its data epochs in order (pass as ``DataConfig(execution_options=...)``)."""
    import ray.train

    opts = ray.train.DataConfig.default_ingest_options()
    opts.preserve_order = True
    return opts


def latest_checkpoint_metrics(run_path: str) -> dict:
    """The metrics reported with the checkpoint that a (re)start of run ``run_path`` (local folder or URI) resumes
    from: the latest one in Ray Train's checkpoint-manager snapshot; ``{}`` when the run has no snapshot yet.

    The read goes through :mod:`pipelines.storage`: transient errors are retried, and one that outlasts the retry
    deadline raises :class:`~pipelines.storage.StorageUnavailableError`, as does an unreadable snapshot: never ``{}``,
    which would silently restart the data at epoch 0."""
    text = storage.read_text(f"{run_path.rstrip('/')}/{CHECKPOINT_MANAGER_SNAPSHOT}", setting="--storage")
    if text is None:
        return {}
    try:
        snap = json.loads(text)
    except json.JSONDecodeError as e:
        raise storage.StorageUnavailableError(
            f"{run_path}/{CHECKPOINT_MANAGER_SNAPSHOT} is not readable JSON ({e}); a restart reads it again") from e
    return (snap.get("latest_checkpoint_result") or {}).get("metrics") or {}


class TrainStream:
    """The training Dataset factory handed to ``TorchTrainer(datasets={"train": TrainStream(...)})``.

    Ray Train V2 calls it at every worker-group start, on the driver's node (``DatasetsCallback``), and splits the
    Dataset it returns over the new workers. It streams, in ONE execution, every data epoch the rest of the run can
    need, continuing each one at the stream position of the checkpoint the workers resume from (the latest one in
    :func:`latest_checkpoint_metrics`; its folder is :data:`CHECKPOINT_DIR_METRIC`): a restart, a resize or a driver
    resume neither repeats nor skips an image of a data epoch, and no epoch starts a new execution. A checkpoint
    without a stream position (written before positions were recorded) streams from the start of its
    :data:`RESUME_EPOCH_METRIC` epoch. How many data epochs: :func:`stream_epochs`, the remaining ones, what the
    started epochs have consumed already, one spare, and as many more as the unreadable files take away (the fraction
    the run's ledger has measured, or ``data.expected_bad_fraction`` when that is higher). Ray Data cuts crops ahead
    of the workers until its share of the object store is full, so on a small dataset it cuts the whole stream:
    every epoch it holds beyond the run's need is work thrown away. If more files turn out unreadable than the stream
    allowed for, the workers' shards end before the run's last step; the worker loop raises, Ray Train restarts from
    the latest checkpoint, and the new stream is sized for the fraction measured by then.
    """

    def __init__(self, cfg: IBOTConfig, listing: SourceListing, monitor_name: str, run_path: str,
                 steps_per_epoch: int) -> None:
        import copy

        import ray.data

        self.cfg, self.listing, self.monitor_name = cfg, listing, monitor_name
        self.run_path, self.steps_per_epoch = run_path, int(steps_per_epoch)
        # the driver's Data settings: a Dataset keeps the DataContext current where it is built (the controller)
        self.data_context = copy.deepcopy(ray.data.DataContext.get_current())

    def resume_position(self, resumed: dict) -> Optional[StreamPosition]:
        """The stream position of the checkpoint whose metrics are ``resumed`` (None: none saved with it)."""
        name = resumed.get(CHECKPOINT_DIR_METRIC)
        if not name:
            return None
        position = read_stream_position(f"{self.run_path.rstrip('/')}/{name}")
        if position is not None and position.size != self.listing.positions_per_epoch:
            raise ValueError(f"the checkpoint {name} of {self.run_path} counts {position.size} rows per data epoch, "
                             f"the source lists {self.listing.positions_per_epoch}: the source changed since")
        return position

    def __call__(self) -> ray.data.Dataset:
        """The Dataset of this worker-group start. A storage error must not escape as is: Ray Train calls this in
        its controller, where any exception becomes a ``ControllerError`` that its failure policy never retries
        (ray/train/v2: callbacks/datasets.py ``before_init_train_context``, controller/controller.py
        ``_run_control_loop_iteration``, failure_handling/default.py ``_is_retryable_error``). Transient storage
        errors are retried (pipelines/storage.py); one that outlasts the retry deadline is raised as Ray Train's
        ``WorkerGroupStartupFailedError``, which the policy retries (a new worker-group start, unlimited with the
        default ``controller_failure_limit=-1``); a storage setting error ends the run once, naming the setting."""
        import ray.data

        ray.data.DataContext._set_current(self.data_context)
        try:
            return self._dataset()
        except storage.StorageConfigError as e:
            from pipelines.failures import FatalTrainingError

            raise FatalTrainingError("storage setting error", str(e), "the setting named above") from None
        except Exception as e:
            if not storage.is_transient(e):
                raise
            from ray.train.v2._internal.exceptions import WorkerGroupStartupFailedError  # Ray is pinned

            raise WorkerGroupStartupFailedError(
                f"the training stream could not be built, storage unavailable: {e}; retrying the start") from e

    def _dataset(self) -> ray.data.Dataset:
        resumed = latest_checkpoint_metrics(self.run_path)
        position = self.resume_position(resumed)
        start = position.start if position is not None else int(resumed.get(RESUME_EPOCH_METRIC, 0))
        consumed = 0.0
        if position is not None:  # the started epochs' consumed rows, in data epochs
            size = position.size
            consumed = sum(size - position.remaining(e) for e in position.epochs) / size
        remaining = self.cfg.optim.epochs - int(resumed.get("step", 0)) / self.steps_per_epoch  # training epochs
        measured = get_bad_input_stats(self.monitor_name)["count"] / max(1, self.listing.info.num_items)
        bad_fraction = max(measured, self.cfg.data.expected_bad_fraction)
        ds, _ = build_train_dataset(self.cfg, listing=self.listing, monitor_name=self.monitor_name,
                                    start_epoch=start, num_epochs=stream_epochs(remaining, bad_fraction, consumed),
                                    resume=position)
        return ds


def stream_epochs(remaining_epochs: float, bad_fraction: float, consumed_epochs: float = 0.0) -> int:
    """Data epochs a training stream holds for ``remaining_epochs`` training epochs (fractional after a mid-epoch
    checkpoint) when ``bad_fraction`` of the listed files are unreadable and the stream's started epochs have
    consumed ``consumed_epochs`` epochs' worth of rows already. A training epoch is ``steps_per_epoch`` full global
    batches, at most the listed count; a data epoch yields its readable ``1 - bad_fraction``; one spare epoch covers
    an underestimated bad fraction."""
    f = min(max(float(bad_fraction), 0.0), MAX_BAD_FRACTION)
    return math.ceil(max(float(remaining_epochs), 1.0) / (1.0 - f) + float(consumed_epochs) - 1e-9) + 1


__all__ = [
    "CHECKPOINT_DIR_METRIC",
    "CHECKPOINT_MANAGER_SNAPSHOT",
    "LEDGER_EPOCH_WINDOW",
    "DEFAULT_MONITOR_NAME",
    "IngestMonitor",
    "MIN_STEP_KEY",
    "MultiCropBatcher",
    "OUTPUT_COLUMNS",
    "RESUME_EPOCH_METRIC",
    "SchedulingLoopPacer",
    "TrainStream",
    "bad_input_snapshot",
    "build_train_dataset",
    "create_monitor",
    "fold_bad_positions",
    "get_bad_input_stats",
    "get_or_create_monitor",
    "image_seed",
    "ingest_execution_options",
    "key_id",
    "kill_monitor",
    "latest_checkpoint_metrics",
    "merge_bad_input",
    "pace_scheduling_loop",
    "stream_epochs",
]
