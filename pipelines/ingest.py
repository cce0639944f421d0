"""Training ingest: raw image bytes -> decode + iBOT multi-crop + masks on an autoscaling CPU actor pool -> uint8 rows.

    source rows {bytes, key, label}                          (pipelines/sources.py, read by Ray tasks)
      -> repartition(target_num_rows_per_block=actor_batch_size)   (streaming: one actor batch per block)
      -> map_batches(MultiCropBatcher, ActorPoolStrategy(min, max), num_cpus=cfg.data.cpus_per_actor)
      -> rows {global_crops (G,3,S,S) uint8, local_crops (L,3,s,s) uint8, masks (G,h,w) uint8, label int64, key str}

Crops stay uint8 in the object store (4x smaller than float32); ``pipelines/collate.py`` turns them into tensors
and normalises them on the training device.

Randomness: every image gets its own seed ``blake2b(data.seed, epoch, key)``, so a run is reproducible (same seed,
same crops) yet every epoch draws fresh crops. Ray Data re-executes the plan, and re-creates the actor pool, on every
epoch (checked on Ray 2.60), but an actor cannot see the epoch by itself: the trainer sets it on the run's named
:class:`IngestMonitor` actor (``set_epoch``) before iterating, and the UDF reads it for every batch (one cheap actor
call), so the value is right even if an actor outlived an execution; a fixed ``epoch=`` skips the clock.

Bad input (unreadable, truncated, zero-byte, non-image) is dropped, never fatal, and counted exactly on the same
monitor actor (one call per UDF batch that had failures): :func:`get_bad_input_stats`.

Usage (driver, then every Train worker)::

    name = create_monitor(run_name)                       # keeps the actor alive as long as the driver
    ds, info = build_train_dataset(cfg, monitor_name=name)  # TorchTrainer(datasets={"train": ds})
    ...
    set_epoch(name, epoch)                                # before each epoch's iteration (rank 0 + barrier)
    for batch in iter_train_batches(ray.train.get_dataset_shard("train"), cfg, per_rank_batch, device): ...
"""

from __future__ import annotations

import hashlib
import logging
import sys
import time
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipelines.sources import SourceInfo, build_source_dataset

if TYPE_CHECKING:  # pragma: no cover
    import ray.data

    from ibot_ray.config import IBOTConfig

logger = logging.getLogger(__name__)

#: Monitor (epoch clock + bad-input ledger) used when no name is given. Give every concurrent run its own name.
DEFAULT_MONITOR_NAME = "ibot_ingest_monitor"
#: How many (key, reason) examples of bad input the monitor keeps (overall and per epoch).
MAX_BAD_EXAMPLES = 10
#: At most one bad-input warning per this many seconds per process (the counts are always exact).
WARN_INTERVAL_S = 30.0
#: Output columns of the ingest, in order.
OUTPUT_COLUMNS = ("global_crops", "local_crops", "masks", "label", "key")


def image_seed(seed: int, epoch: int, key: str) -> int:
    """Stable 63-bit per-image seed from ``(seed, epoch, key)`` (blake2b, independent of Python's hash salt)."""
    h = hashlib.blake2b(f"{int(seed)}\x1f{int(epoch)}\x1f{key}".encode("utf-8", "surrogatepass"), digest_size=8)
    return int.from_bytes(h.digest(), "little") & (2**63 - 1)


# ---- the monitor actor: epoch clock + bad-input ledger -----------------------------------------


class IngestMonitor:
    """Epoch clock and bad-input ledger shared by the driver, the augmenting actors and the Train workers.

    Runs as a named Ray actor with ``num_cpus=0`` (see :func:`get_or_create_monitor`). The counts are exact: every
    dropped image of every execution is reported once, so a bad file read in 3 epochs counts 3 times in ``count``
    and once in ``unique_count``.
    """

    def __init__(self) -> None:
        self._epoch = 0
        self._count = 0
        self._per_epoch: dict[int, int] = {}
        self._examples: list[tuple[str, str]] = []
        self._epoch_examples: dict[int, list[tuple[str, str]]] = {}
        self._unique: set[str] = set()
        self._log = logging.getLogger("pipelines.ingest.monitor")
        self._last_warn = float("-inf")
        self._unwarned = 0

    # epoch clock
    def set_epoch(self, epoch: int) -> int:
        self._epoch = int(epoch)
        return self._epoch

    def get_epoch(self) -> int:
        return self._epoch

    # ledger
    def report_bad(self, epoch: int, items: list[tuple[str, str]]) -> int:
        """Record dropped images ``[(key, reason), ...]`` of one UDF batch; returns the new total."""
        epoch = int(epoch)
        self._count += len(items)
        self._per_epoch[epoch] = self._per_epoch.get(epoch, 0) + len(items)
        ex = self._epoch_examples.setdefault(epoch, [])
        for key, reason in items:
            self._unique.add(key)
            if len(self._examples) < MAX_BAD_EXAMPLES:
                self._examples.append((key, reason))
            if len(ex) < MAX_BAD_EXAMPLES:
                ex.append((key, reason))
        self._unwarned += len(items)
        now = time.monotonic()
        if items and now - self._last_warn >= WARN_INTERVAL_S:
            key, reason = items[0]
            self._log.warning(
                "ingest: dropped %d unreadable image(s) since the last warning (epoch %d, e.g. %s: %s); %d in total",
                self._unwarned, epoch, key, reason, self._count,
            )
            self._last_warn, self._unwarned = now, 0
        return self._count

    def stats(self, epoch: Optional[int] = None) -> dict[str, Any]:
        """``{"count", "examples", "per_epoch", "unique_count"}``; with ``epoch`` count/examples are that epoch's."""
        if epoch is None:
            count, examples = self._count, list(self._examples)
        else:
            count, examples = self._per_epoch.get(int(epoch), 0), list(self._epoch_examples.get(int(epoch), []))
        return {"count": count, "examples": examples, "per_epoch": dict(self._per_epoch),
                "unique_count": len(self._unique)}

    def reset(self) -> None:
        self.__init__()


#: The epoch clock is the monitor (one actor per run for both jobs).
EpochClock = IngestMonitor
BadInputLedger = IngestMonitor

_MonitorActor = ray.remote(num_cpus=0)(IngestMonitor)  # one call at a time: the counts stay exact


# Handles of the monitors this process created: a named non-detached actor dies with its owner's last handle.
_OWNED_MONITORS: dict[str, ray.actor.ActorHandle] = {}


def get_or_create_monitor(name: str = DEFAULT_MONITOR_NAME) -> ray.actor.ActorHandle:
    """The named :class:`IngestMonitor` actor, created (``num_cpus=0``) if it does not exist yet.

    It is owned by the calling process and lives as long as it (this module keeps the handle), so create it on the
    driver (``build_train_dataset`` / :func:`create_monitor` do). :func:`kill_monitor` ends it early. It is placed
    on the calling process's node: anywhere else, losing that node (a preempted spot worker) would take the run's
    epoch clock and bad-input counts with it, and every restarted worker group would fail on the dead actor.
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


def set_epoch(name: str, epoch: int) -> None:
    """Tell the ingest of monitor ``name`` that the next execution is ``epoch`` (call before iterating it)."""
    ray.get(_get_monitor(name).set_epoch.remote(epoch))


def get_epoch(name: str) -> int:
    return ray.get(_get_monitor(name).get_epoch.remote())


def get_bad_input_stats(name: str = DEFAULT_MONITOR_NAME, epoch: Optional[int] = None) -> dict[str, Any]:
    """``{"count": int, "examples": [(key, reason), ...first 10], "per_epoch": {epoch: count}, "unique_count": int}``.

    ``count``/``examples`` cover all epochs, or only ``epoch`` when given.
    """
    return ray.get(_get_monitor(name).stats.remote(epoch))


def reset_bad_input_stats(name: str = DEFAULT_MONITOR_NAME) -> None:
    ray.get(_get_monitor(name).reset.remote())


# ---- the augmenting UDF --------------------------------------------------------------------------


class MultiCropBatcher:
    """Ray Data UDF (one instance per actor): decode + multi-crop + masks for a batch of raw rows.

    Input batch (numpy format): ``bytes`` (object array of bytes), ``key`` (str), ``label`` (int64). Output: the
    :data:`OUTPUT_COLUMNS`, with the bad images dropped and reported to the monitor.
    """

    def __init__(self, cfg: IBOTConfig, *, monitor_name: Optional[str] = None, epoch: Optional[int] = None) -> None:
        from ibot_ray import crop_kernels
        from ibot_ray.multicrop import MultiCropTransform

        crop_kernels.warm_up()  # compile at actor start (seconds, once per machine with numba's disk cache)
        self.cfg = cfg
        self.seed = int(cfg.data.seed)
        self.transform = MultiCropTransform(cfg)
        self.monitor = _get_monitor(monitor_name) if monitor_name else None
        if epoch is None and self.monitor is None:
            raise ValueError("MultiCropBatcher needs a fixed epoch or a monitor_name to read the epoch from")
        self.fixed_epoch = None if epoch is None else int(epoch)
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

    def current_epoch(self) -> int:
        """The fixed epoch, else the monitor's clock (read per batch: about a millisecond per call)."""
        if self.fixed_epoch is not None:
            return self.fixed_epoch
        return int(ray.get(self.monitor.get_epoch.remote()))

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

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = [str(k) for k in batch["key"]]
        blobs = [b if isinstance(b, bytes) else bytes(b) for b in batch["bytes"]]
        labels = np.asarray(batch["label"], dtype=np.int64)
        epoch = self.current_epoch()
        seeds = [image_seed(self.seed, epoch, k) for k in keys]
        try:
            out, bad = self.transform(blobs, seeds, epoch)
        except Exception:  # noqa: BLE001
            logger.exception("ingest: multi-crop failed on a batch of %d; retrying image by image", len(keys))
            out, bad = self._transform_each(blobs, seeds, epoch)
        if bad:
            items = [(keys[i], str(reason)) for i, reason in bad]
            if time.monotonic() - self._last_warn >= WARN_INTERVAL_S:
                logger.warning("ingest: dropped %d bad image(s) in a batch of %d, e.g. %s: %s", len(items),
                               len(keys), *items[0])
                self._last_warn = time.monotonic()
            if self.monitor is not None:
                ray.get(self.monitor.report_bad.remote(epoch, items))
        idx = np.asarray(out["index"], dtype=np.int64)
        return {
            "global_crops": np.ascontiguousarray(out["global_crops"], dtype=np.uint8),
            "local_crops": np.ascontiguousarray(out["local_crops"], dtype=np.uint8),
            "masks": np.ascontiguousarray(out["masks"]).astype(np.uint8, copy=False),
            "label": labels[idx],
            "key": np.array([keys[i] for i in idx], dtype=object),
        }


# ---- public builder ------------------------------------------------------------------------------


def create_monitor(run_name: str) -> str:
    """Create (or reuse) the :class:`IngestMonitor` of a run and return its actor name (``ibot_ingest:<run_name>``).

    Concurrent runs in one Ray cluster (Tune trials) must use different run names.
    """
    name = f"ibot_ingest:{run_name}"
    ray.get(get_or_create_monitor(name).get_epoch.remote())
    return name


def build_train_dataset(
    cfg: IBOTConfig,
    *,
    epoch_clock_name: Optional[str] = None,
    source: Optional[str] = None,
    epoch: Optional[int] = None,
    monitor_name: Optional[str] = None,
    shuffle_files: bool = True,
) -> tuple[ray.data.Dataset, SourceInfo]:
    """The lazy training Dataset (rows of fixed-shape uint8 multi-crops, masks, label, key) and its SourceInfo.

    Args:
        cfg: the run config (``cfg.data`` for the source and actor pool, ``cfg.crops``/``cfg.masking`` for crops).
        epoch_clock_name / monitor_name: the :class:`IngestMonitor` actor (created here if missing) that is the
            epoch clock and counts bad inputs; the two names are aliases (``monitor_name`` wins), default
            :data:`DEFAULT_MONITOR_NAME`. The trainer calls :func:`set_epoch` before each epoch.
        source: overrides ``cfg.data.source``.
        epoch: a fixed epoch for every execution (no clock reads), e.g. for a benchmark; ``None`` reads the clock.
        shuffle_files: reshuffle file / row-group order on every execution (seeded by ``cfg.data.seed``).

    The SourceInfo's ``num_items`` counts listed files/rows, bad ones included (they are only found when decoded).
    """
    t0 = time.perf_counter()
    name = monitor_name or epoch_clock_name or DEFAULT_MONITOR_NAME
    ray.get(get_or_create_monitor(name).get_epoch.remote())  # exists and answers before any actor needs it
    ds, info = build_source_dataset(cfg, source, shuffle_seed=cfg.data.seed if shuffle_files else None)
    d = cfg.data
    lo, hi = d.actors
    # Blocks of one actor batch: an actor task then emits its crops after every batch (streaming) instead of
    # buffering a whole read block's output (up to 128 MiB) before the consumer sees the first image.
    ds = ds.repartition(target_num_rows_per_block=d.actor_batch_size)
    ds = ds.map_batches(
        MultiCropBatcher,
        fn_constructor_args=(cfg,),
        fn_constructor_kwargs={"monitor_name": name, "epoch": epoch},
        batch_size=d.actor_batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi),
        num_cpus=d.cpus_per_actor,
        resources={d.actor_resource: d.cpus_per_actor} if d.actor_resource else None,  # node pinning
    )
    logger.info("ingest: %s source %s with %d items listed in %.1fs", info.format, info.uri, info.num_items,
                time.perf_counter() - t0)
    return ds, info


__all__ = [
    "BadInputLedger",
    "DEFAULT_MONITOR_NAME",
    "EpochClock",
    "IngestMonitor",
    "MultiCropBatcher",
    "OUTPUT_COLUMNS",
    "build_train_dataset",
    "create_monitor",
    "get_bad_input_stats",
    "get_epoch",
    "get_or_create_monitor",
    "image_seed",
    "kill_monitor",
    "reset_bad_input_stats",
    "set_epoch",
]
