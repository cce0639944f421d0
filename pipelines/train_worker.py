"""The Ray Train worker loop: iBOT steps on the streamed crops, checkpoints, preemption and metrics.

Every (re)start of the worker group, whether first start, failure, resize or driver re-run, enters
:func:`train_loop_per_worker` with Ray Train's latest committed checkpoint, and continues from it:

* The global batch is fixed by the config. With W workers each rank reads ``ceil(G / W)`` rows per step and trains on
  its share ``G // W`` (+1 on the first ``G % W`` ranks); its loss is weighted by ``share * W / G``, so DDP's
  gradient average is exactly the mean over G images whatever W is. Schedules are indexed by the global step, so
  the optimisation does not depend on how many workers survived a resize.
* Steps, not data epochs, drive the run: ``epoch = step // steps_per_epoch``. A worker group iterates its data shard
  ONCE: a single Ray Data execution streams every data epoch (``pipelines/ingest.py``: ``TrainStream``), each row
  tagged with its data epoch, so an epoch boundary is only a step count (no new execution, no actor-pool warm-up).
  The rank that gets the ``G % W`` extra rows rotates with the step, so every rank consumes ``G / W`` rows per step
  on average, and rows a step does not use wait for the next step (:class:`RowCarry`): no row is read and dropped,
  and every image is used once per data epoch. A restart continues every data epoch where the checkpoint left it,
  at any world size: each rank notes the (data epoch, position) of the rows it trained, at a checkpoint the ranks
  gather them and rank 0 saves the stream position (``pipelines/stream_position.py``), which the next stream
  starts from (``pipelines/ingest.py`` ``TrainStream``).
* Checkpoints (rank 0 writes, every rank reports) every ``train.checkpoint_every_steps`` steps, at each epoch end,
  at the last step, just in time when Ray Train reports that a node is being drained for preemption, and before a
  resize of the worker group (``pipelines/resize.py``). The periodic ones upload in the background
  (``CheckpointUploadMode.ASYNC``): the step waits only for rank 0 to write the state to local disk, and Ray Train
  commits the checkpoint once it is uploaded (a run killed during an upload resumes from the one before). The
  just-in-time, resize, final and drain-window ones upload before the loop goes on.
* Only checkpoints are reported to Ray Train (:func:`is_checkpoint_step`); the metrics of every
  ``train.log_every_steps`` go to the run's own log and console. Ray Train's controller takes one report per worker
  per poll (every 2 s, ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``) through a queue of one, so a worker that reports more
  often blocks in ``ray.train.report`` until the next poll: reporting every 10 steps cost the demo 19 % of its
  training thread's time, and would cap a GPU run at 10 steps per 2 s. While a node is drained, each checkpoint is
  followed by one more report, which returns once the controller has taken the checkpoint (not lost with the node).
* The data stream starts first: a rank asks for its shard and for its first batch (in the background,
  :meth:`RowCarry.start`) before it imports the model (timm, ~2 s), builds it and restores the checkpoint, so the
  Data pipeline's coordinator and augmenting actors start while the rank gets ready instead of after it.
* Randomness: every rank builds the same initial weights from ``train.seed``; each step then runs on its own stream,
  seeded from ``(train.seed, rank, step)``, so ranks differ (drop-path masks) and a resumed step draws exactly what it
  would have drawn without the restart. A checkpoint therefore needs no RNG state restored.
* Errors a restart would raise again (divergence, a config or source error, a checkpoint that does not fit the
  config or the epoch length, out of memory at the minimum world size) are raised as
  :class:`~pipelines.failures.FatalTrainingError`, which ends the run once (pipelines/failures.py).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from ibot_ray.checkpoint import load_checkpoint, restore_training_state, save_checkpoint, seed_stream, training_state
from ibot_ray.config import IBOTConfig
from ibot_ray.health import CollapseDetector, grace_steps
from pipelines.collate import iter_train_batches
from pipelines.console import ConsoleClient, quiet_train_reports
from pipelines.failures import FatalTrainingError, fatal_error
from pipelines.ingest import (
    CHECKPOINT_DIR_METRIC,
    RESUME_EPOCH_METRIC,
    bad_input_snapshot,
    fold_bad_positions,
    get_bad_input_stats,
    merge_bad_input,
)
from pipelines.metrics import SYNCED_FOLDERS, MetricsWriter
from pipelines.resize import RESIZE_METRIC, ResizeNoticeClient
from pipelines.storage import copy_to, local_checkpoint, upload_checkpoint
from pipelines.stream_position import STREAM_POSITION_FILE, StreamPosition, TrainedPositions

if TYPE_CHECKING:  # imported by the loop once its data stream is requested (the module doc)
    from ibot_ray.step import IBOTStep

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
#: the metrics reported with a checkpoint, beside it: a Tune trial that resumes hands them to Tune again
#: (:func:`tune.sweep.sweep_trial`), since a report Train committed may never have reached Tune
METRICS_FILE = "metrics.json"
#: The key of the epoch length (``steps_per_epoch``, ``num_items``, ``batch_size``) in a checkpoint's report.
EPOCH_LENGTH_METRIC = "epoch_length"


def rank_batch(global_batch: int, world: int, rank: int) -> tuple[int, int, float]:
    """(rows read per step, rows trained on by this rank, loss weight) for an exact global batch on ``world`` ranks."""
    read = math.ceil(global_batch / world)
    share = global_batch // world + (1 if rank < global_batch % world else 0)
    return read, share, share * world / global_batch


def rotated_rank(rank: int, step: int, world: int) -> int:
    """The rank whose :func:`rank_batch` share ``rank`` takes at ``step``: the ``G % W`` extra rows rotate over the
    ranks, so all ranks consume rows at the same average rate (their shards are split equally)."""
    return (rank - step) % world


class RowCarry:
    """Batches of exactly ``n`` rows (``n`` may change from step to step) cut from a stream of batches: the rows a
    step does not use are kept (on the host, where the stream's batches are) for the next step, so no row that was
    read is dropped."""

    def __init__(self, batches) -> None:
        self._it = iter(batches)
        self._rows: dict | None = None
        self._first: threading.Thread | None = None
        self._first_out: list = []  # the first batch, or the exception that fetching it raised

    def start(self) -> RowCarry:
        """Fetch the first batch in a background thread: the request starts the Data execution (its coordinator and
        augmenting actors), which then proceeds while this rank builds its model and restores its checkpoint. The
        first :meth:`take` waits for that batch, or raises what fetching it raised."""
        def first():
            try:
                self._first_out.append(next(self._it))
            except BaseException as e:  # noqa: BLE001 - re-raised by take(), in the loop's thread
                self._first_out.append(e)

        self._first = threading.Thread(target=first, name="first-batch", daemon=True)
        self._first.start()
        return self

    def _next(self) -> dict:
        if self._first is not None:
            self._first.join()
            self._first = None
            out = self._first_out.pop()
            if isinstance(out, BaseException):
                raise out
            return out
        return next(self._it)

    def take(self, n: int) -> dict | None:
        """The next ``n`` rows, or None when the stream ends first."""
        while self._rows is None or len(self._rows["label"]) < n:
            try:
                b = self._next()
            except StopIteration:
                return None
            self._rows = b if self._rows is None else {k: torch.cat([self._rows[k], b[k]]) for k in b}
        rows = self._rows
        if len(rows["label"]) == n:
            self._rows = None
            return rows
        self._rows = {k: v[n:] for k, v in rows.items()}
        return {k: v[:n] for k, v in rows.items()}


#: Test and debugging hook: when set on the driver, every rank appends the ``(data epoch, key_id)`` of the rows it
#: trained on, one JSON line per step, to ``<dir>/rank<rank>_<pid>.jsonl`` (``pipelines.ingest.key_id`` maps keys to
#: ids); ``build_trainer`` hands the folder to the workers as ``trained_keys_dir``.
TRAINED_KEYS_ENV = "IBOT_TRAINED_KEYS_DIR"


class PreemptionNotices:
    """Which preemption notices still need a just-in-time checkpoint: each distinct notice gets exactly one.

    ``ray.train.get_preemption_info()`` keeps returning the same notice until the node goes (the whole drain window,
    up to minutes), so checking it every log step must not checkpoint every log step. A notice is identified by its
    preempted nodes and deadline: a further node drained, or a new deadline for the same node, is a new notice.
    Every rank sees the same agreed value, so every rank takes the same decision."""

    def __init__(self) -> None:
        self._handled: set[tuple] = set()

    @staticmethod
    def key(info) -> tuple:
        return (getattr(info, "deadline_ms", None), tuple(sorted(map(str, info.preempted_node_to_ranks))))

    def is_new(self, info) -> bool:
        """True the first time a notice is seen (the caller checkpoints now); False for None or a handled one."""
        if info is None:
            return False
        key = self.key(info)
        if key in self._handled:
            return False
        self._handled.add(key)
        return True


def is_checkpoint_step(step: int, *, steps_per_epoch: int, total: int, every: int) -> bool:
    """Whether the loop checkpoints (and reports to Ray Train) after optimiser step ``step``: every ``every``
    (``train.checkpoint_every_steps``) steps, at each epoch end and at the last step. Preemption notices and
    ``train.stop_on_collapse`` add checkpoints that no schedule predicts."""
    return step >= total or step % steps_per_epoch == 0 or step % every == 0


def is_log_step(step: int, *, steps_per_epoch: int, total: int, cfg: IBOTConfig) -> bool:
    """Whether the loop logs the metrics of optimiser step ``step``: every ``train.log_every_steps`` and at every
    checkpoint step. Known before the step runs, so that only these steps wait for their metrics."""
    every = cfg.train.checkpoint_every_steps
    return (is_checkpoint_step(step, steps_per_epoch=steps_per_epoch, total=total, every=every)
            or step % cfg.train.log_every_steps == 0)


def _checkpoint_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_dir_step(name: str) -> int | None:
    """The optimiser step of a checkpoint folder named by :func:`_checkpoint_dir_name`, else None."""
    head, _, digits = name.partition("_")
    return int(digits) if head == "step" and len(digits) == 8 and digits.isdigit() else None


def _all_ranks_max(value: int, world: int, device: torch.device) -> int:
    """``max(value)`` over the ranks (a collective: every rank calls it at the same step)."""
    if world == 1:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _interval_passed(elapsed_s: float, min_interval_s: float, world: int, device: torch.device) -> bool:
    """Whether a scheduled checkpoint is due (``train.checkpoint_min_interval_s`` since the last one). Clocks differ
    between ranks, so the ranks agree on it (a collective at each scheduled step: every rank calls it then)."""
    if min_interval_s <= 0:
        return True
    return bool(_all_ranks_max(int(elapsed_s >= min_interval_s), world, device))


def _trained_keys_log(rank: int, folder: str | None):
    if not folder:
        return None
    Path(folder).mkdir(parents=True, exist_ok=True)
    return open(Path(folder) / f"rank{rank}_{os.getpid()}.jsonl", "a")


#: Rank 0 stages a checkpoint in a local folder named ``<prefix><pid>_<step>`` until it is uploaded.
STAGING_PREFIX = "ibot_ckpt_"
_staged: list[Path] = []  # this process's background uploads not known to be done (Ray deletes each folder after it)


def _wait_for_uploads() -> None:
    """Block until this process's background uploads are done (Ray deletes a staged folder once it is uploaded): at
    most one checkpoint waits for its upload, so slow storage slows the checkpoints, never fills the disk."""
    while _staged:
        if _staged[0].exists():
            time.sleep(0.05)
        else:
            _staged.pop(0)


def _remove_stale_staging() -> None:
    """Remove staged checkpoints that dead processes left behind (their upload failed or was cut short)."""
    for folder in Path(tempfile.gettempdir()).glob(f"{STAGING_PREFIX}*"):
        pid = folder.name[len(STAGING_PREFIX):].split("_", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _report_checkpoint(metrics: dict, *, step_runner: IBOTStep, cfg: IBOTConfig, data_epoch: int | None,
                       rank: int, local_log_dir: Path, epoch_length: dict, monitor_name: str | None = None,
                       position: StreamPosition | None = None, background: bool = False) -> float:
    """Rank 0 writes the checkpoint; every rank reports it with the step's metrics (Ray Train commits it once all
    have, and once it is uploaded). ``background``: upload while training goes on (``CheckpointUploadMode.ASYNC``).
    Returns the seconds the call blocked the loop."""
    from ray.train import CheckpointUploadMode

    from ibot_ray.step import unwrap

    t0 = time.perf_counter()
    checkpoint = None
    if rank == 0:
        _wait_for_uploads()
        d = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}_{step_runner.step}_"))
        state = training_state(
            student=unwrap(step_runner.student), teacher=step_runner.teacher, optimizer=step_runner.optimizer,
            loss=step_runner.loss, scaler=step_runner.scaler, epoch=int(metrics["epoch"]), step=step_runner.step,
            config=cfg.to_dict(),
            extra={"data_epoch": data_epoch, "skipped_steps": step_runner.counters.skipped_steps,
                   **epoch_length,
                   "bad_inputs": bad_input_snapshot(monitor_name) if monitor_name else None},
        )
        save_checkpoint(d / STATE_FILE, state)
        cfg.save(d / "config.yaml")
        (d / METRICS_FILE).write_text(json.dumps(metrics, default=float))
        if position is not None:
            (d / STREAM_POSITION_FILE).write_text(position.to_json())
        checkpoint = ray.train.Checkpoint.from_directory(str(d))
        if background:
            _staged.append(d)
    # the staged folder is deleted by Ray once uploaded (the default of ASYNC; asked for SYNC too); the epoch length
    # goes with the report, into the run's snapshot, where a driver resuming the run checks it before Ray starts
    ray.train.report({**metrics, EPOCH_LENGTH_METRIC: epoch_length}, checkpoint=checkpoint,
                     checkpoint_dir_name=_checkpoint_dir_name(step_runner.step),
                     checkpoint_upload_mode=CheckpointUploadMode.ASYNC if background else CheckpointUploadMode.SYNC,
                     delete_local_checkpoint_after_upload=True,
                     checkpoint_upload_fn=upload_checkpoint)  # retried through storage outages (pipelines/storage.py)
    if rank == 0:
        _sync_logs(local_log_dir)
    return time.perf_counter() - t0


#: metrics.jsonl byte offsets already uploaded by this process (or present before it started), per local file
_uploaded_offsets: dict[str, int] = {}


def _mark_metrics_start(local_log_dir: Path) -> None:
    """Rows already in the local metrics.jsonl when this process starts are not its to upload (an earlier worker
    process on this node uploaded them at its checkpoints; rows after its last checkpoint are replayed anyway)."""
    path = Path(local_log_dir) / "metrics.jsonl"
    _uploaded_offsets[str(path)] = path.stat().st_size if path.exists() else 0


def _sync_logs(local_log_dir: Path) -> None:
    """Upload rank 0's new metrics rows and its TensorBoard files to remote storage (local storage already holds
    them). Metrics are append-only parts: each upload writes only the rows since this process's last upload, as
    ``logs/metrics/part-<first step>-<pid>.jsonl`` (pipelines/metrics.py ``read_metrics_history`` joins them), so
    no upload overwrites history written from another node or an earlier run, and every row is uploaded once."""
    storage = ray.train.get_context().get_storage()
    target = f"{storage.experiment_fs_path}/logs"
    if str(local_log_dir).startswith(str(storage.experiment_fs_path)):
        return
    try:
        from pipelines.metrics import metrics_part_name

        path = Path(local_log_dir) / "metrics.jsonl"
        start = _uploaded_offsets.get(str(path), 0)
        if path.exists() and path.stat().st_size > start:
            with open(path, "rb") as f:
                f.seek(start)
                new = f.read()
            new = new[: new.rfind(b"\n") + 1]  # whole rows only
            if new:
                fs = storage.storage_filesystem
                name = metrics_part_name(new, os.getpid())
                fs.create_dir(f"{target}/metrics", recursive=True)  # (a remote fs retries: pipelines/storage.py)
                with fs.open_output_stream(f"{target}/metrics/{name}") as out:
                    out.write(new)
                _uploaded_offsets[str(path)] = start + len(new)
        for folder in SYNCED_FOLDERS:  # the trackers' files: one file (or folder) per writer process, so each
            local = Path(local_log_dir) / folder  # upload rewrites only this process's own files
            if local.exists():
                copy_to(str(local), storage.storage_filesystem, f"{target}/{folder}")
    except Exception as e:  # metrics upload must never kill training: rows not uploaded go with the next checkpoint
        log.warning("could not upload metrics to %s: %s", target, e)


def _local_log_dir() -> Path:
    storage = ray.train.get_context().get_storage()
    path = Path(storage.experiment_fs_path)
    try:
        import pyarrow.fs as pafs

        if isinstance(storage.storage_filesystem, pafs.LocalFileSystem):
            return path / "logs"
    except Exception:
        pass
    return Path(os.path.expanduser("~/ibot_runs")) / storage.experiment_dir_name / "logs"


def check_epoch_length(saved: dict, now: dict, checkpoint: str) -> None:
    """Refuse to resume when the checkpoint's steps per epoch differ from this invocation's.

    Steps index the epochs and every schedule (lr, teacher temperature and momentum, freeze): resuming step s with
    another epoch length would silently move every epoch boundary and the rest of each schedule. Raised as a
    :class:`FatalTrainingError` (ends the run once); checkpoints written before the length was recorded pass. The
    driver checks the run's latest checkpoint before Ray starts (``pipelines.pretrain.check_resume``); each worker
    checks the checkpoint it restores (a sweep trial's, one written before the length was reported)."""
    if saved.get("steps_per_epoch") is None or int(saved["steps_per_epoch"]) == now["steps_per_epoch"]:
        return
    def what(d):
        parts = [f"{d['steps_per_epoch']} steps per epoch"]
        if d.get("num_items") is not None:
            parts.append(f"{d['num_items']} images / optim.batch_size {d.get('batch_size')}")
        return " = ".join(parts)
    raise FatalTrainingError(
        "the epoch length changed since the run's last checkpoint",
        f"{checkpoint} was written with {what(saved)}; this invocation has {what(now)}. Steps index the epochs and "
        "every schedule, so resuming would silently shift them",
        "resume with the same training source and optim.batch_size, or start a new run (--name)")


def train_loop_per_worker(config: dict) -> dict:
    """The Ray Train loop of one rank (:func:`_train_loop`); an error a restart would raise again is re-raised as a
    :class:`FatalTrainingError` (pipelines/failures.py), which ends the run instead of restarting it."""
    try:
        return _train_loop(config)
    except Exception as e:
        min_world = int((config["cfg"].get("train") or {}).get("num_workers", (1, 1))[0])
        fatal = fatal_error(e, world=ray.train.get_context().get_world_size(), min_world=min_world)
        if fatal is None or fatal is e:
            raise
        raise fatal from e


def _train_loop(config: dict) -> dict:
    cfg = IBOTConfig.from_dict(config["cfg"], validate=False)  # validated below, once the stream is requested
    epoch_length: dict = config["epoch_length"]  # pipelines.pretrain.epoch_length: checked against a checkpoint's
    steps_per_epoch: int = epoch_length["steps_per_epoch"]
    monitor_name: str | None = config.get("monitor_name")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if not config.get("verbose"):
        quiet_train_reports()
    # rank 0 -> the driver's console (pipelines/console.py); without a mailbox (Tune trials) rank 0 prints instead
    console = ConsoleClient(config.get("console_name") if rank == 0 else None)
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank (DDP also broadcasts them)
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    read, share, weight = rank_batch(cfg.optim.batch_size, world, rank)
    # One pass over the shard for the whole life of this worker group: the stream holds every data epoch. Its first
    # batch is requested now, so the Data pipeline's actors start while this rank gets ready (the module doc).
    # the local shuffle mixes rows near epoch boundaries only: at most a quarter of this rank's rows of an epoch
    shuffle_rows = min(cfg.data.local_shuffle_buffer_size, steps_per_epoch * cfg.optim.batch_size // world // 4)
    # host batches (pinned by Ray Data's collate threads on a GPU): the step finds the masked tokens on the host and
    # copies the batch on a side stream (IBOTStep.stage), and nothing here reads a value back from the device
    rows = RowCarry(iter_train_batches(ray.train.get_dataset_shard("train"), cfg, read, "cpu",
                                       shuffle_rows=shuffle_rows, pin_memory=device.type == "cuda")).start()
    cfg.validate()  # the model's checks import timm, as do the model and the step
    from ibot_ray.model import build_student_teacher
    from ibot_ray.step import IBOTStep, unwrap

    student, teacher = build_student_teacher(cfg)
    student.to(device)
    teacher.to(device)
    step_runner_student = student
    if world > 1:
        step_runner_student = ray.train.torch.prepare_model(student, move_to_device=False)
    runner = IBOTStep(cfg, step_runner_student, teacher, steps_per_epoch=steps_per_epoch, device=device)

    data_epoch = 0
    resumed_from = None
    saved_position = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with local_checkpoint(checkpoint) as d:  # a download retried through storage outages
            state = load_checkpoint(Path(d) / STATE_FILE, map_location=device)
            if (Path(d) / STREAM_POSITION_FILE).exists():
                saved_position = StreamPosition.from_json((Path(d) / STREAM_POSITION_FILE).read_text())
        check_epoch_length(state.get("extra") or {}, epoch_length, Path(checkpoint.path).name)
        # restore_rng=False: the saved state is rank 0's, and every step reseeds from (seed, rank, step) anyway
        info = restore_training_state(state, student=student, teacher=teacher, optimizer=runner.optimizer,
                                      loss=runner.loss, scaler=runner.scaler, restore_rng=False)
        runner.counters.step = int(info["step"])
        runner.counters.skipped_steps = int(info["extra"].get("skipped_steps", 0))
        data_epoch = int(info["extra"].get("data_epoch", info["epoch"]))
        resumed_from = runner.step
        if rank == 0 and monitor_name:  # the ledger continues from the checkpoint (a union: exact after a resume)
            merge_bad_input(monitor_name, info["extra"].get("bad_inputs"))
    # rank 0 keeps the run's stream position; a checkpoint without one streamed its data epoch from the start
    position = None
    if rank == 0:
        position = saved_position or StreamPosition(int(config.get("positions_per_epoch") or 0), start=data_epoch)
        _remove_stale_staging()
    trained = TrainedPositions()  # the rows this rank trained since the last checkpoint
    resize_notice = ResizeNoticeClient(config["resize_notice"]) if config.get("resize_notice") else None

    total = runner.total_steps
    writer = MetricsWriter(_local_log_dir(), cfg=cfg, run_name=ctx.get_experiment_name(),
                           run_path=ctx.get_storage().experiment_fs_path) if rank == 0 else None
    if writer is not None:
        _mark_metrics_start(writer.folder)
    if rank == 0:
        console.event("start", world=world, global_batch=cfg.optim.batch_size, per_rank_share=share,
                      step=runner.step, resumed_from=resumed_from)
        if not console.enabled:
            print(f"[ibot-ray] world={world} global_batch={cfg.optim.batch_size} per-rank read={read} "
                  f"share={share} steps={runner.step}/{total} ({steps_per_epoch}/epoch) resumed_from={resumed_from}",
                  flush=True)
        if writer is not None:
            writer.write({"event": "start", "world_size": world, "step": runner.step, "pid": os.getpid(),
                          "per_rank_read": read, "micro_batch_size": cfg.optim.micro_batch_size or share,
                          "per_rank_share": [rank_batch(cfg.optim.batch_size, world, r)[1]
                                                                    for r in range(world)],
                          "resumed_from": resumed_from if resumed_from is not None else -1,
                          "knn_label": config.get("knn_label")}, runner.step)

    evaluator = None
    if rank == 0 and cfg.train.knn_every_epochs and config.get("knn_splits") is not None:
        from pipelines.knn_eval import KNNEvaluator

        # decoded once by the driver (pipelines/pretrain.py build_trainer), not listed or decoded again here
        evaluator = KNNEvaluator.from_splits(cfg, ray.get(config["knn_splits"]))

    # Every rank sees the same all-reduced health metrics, so every rank takes the same decisions.
    health = CollapseDetector(cfg, grace_steps=grace_steps(cfg, steps_per_epoch))
    stop_on_collapse = False
    images_seen, wait_s, busy_s = 0, 0.0, 0.0
    t_window = time.perf_counter()
    notices = PreemptionNotices()
    last: dict = {}
    keys_log = _trained_keys_log(rank, config.get("trained_keys_dir"))
    trained_epoch = data_epoch  # the highest data epoch this rank has trained on
    last_checkpoint_t = time.monotonic()  # a (re)started group counts the interval from its start
    while runner.step < total and not stop_on_collapse:
        _, share, weight = rank_batch(cfg.optim.batch_size, world, rotated_rank(rank, runner.step, world))
        t0 = time.perf_counter()
        batch = rows.take(share)
        if batch is None:
            bad = get_bad_input_stats(monitor_name) if monitor_name else {"count": "?"}
            raise RuntimeError(
                f"the data stream of rank {rank} ended at step {runner.step} of {total} (data epoch {trained_epoch}):"
                f" {bad['count']} of the {epoch_length['num_items']} listed files are unreadable, more than its data "
                "epochs allowed for (data.expected_bad_fraction); the restart from the latest checkpoint streams "
                "enough epochs for the fraction measured so far")
        row_epochs, row_ids, row_positions = batch.pop("epoch"), batch.pop("key_id"), batch.pop("position")
        trained.add(row_epochs, row_positions)
        trained_epoch = max(trained_epoch, int(row_epochs.max()))
        t1 = time.perf_counter()
        wait_s += t1 - t0
        seed_stream(cfg.train.seed, rank, runner.step)  # this rank's stream for this step (module doc)
        # only a logged step reads its metrics back from the device (the others queue their kernels and go on)
        metrics = runner(batch, loss_weight=weight, log=is_log_step(runner.step + 1, steps_per_epoch=steps_per_epoch,
                                                                   total=total, cfg=cfg))
        images_seen += share
        if keys_log is not None:
            keys_log.write(json.dumps({"step": runner.step, "world": world, "t": time.time(),
                                       "epoch": row_epochs.tolist(), "key_id": row_ids.tolist()}) + "\n")
            keys_log.flush()
        t0 = time.perf_counter()
        busy_s += t0 - t1
        step = runner.step
        epoch_end = step % steps_per_epoch == 0
        scheduled = is_checkpoint_step(step, steps_per_epoch=steps_per_epoch, total=total,
                                       every=cfg.train.checkpoint_every_steps)
        do_ckpt = scheduled and (step >= total or _interval_passed(time.monotonic() - last_checkpoint_t,
                                                                   cfg.train.checkpoint_min_interval_s, world,
                                                                   device))
        do_log = is_log_step(step, steps_per_epoch=steps_per_epoch, total=total, cfg=cfg)  # as the step was told
        preempted = new_notice = False
        if do_log and cfg.train.check_preemption:
            info = ray.train.get_preemption_info()  # a barrier: every rank calls it
            preempted = info is not None
            new_notice = notices.is_new(info)  # one just-in-time checkpoint per notice, not per log step
            do_ckpt = do_ckpt or new_notice
        resize = 0
        if do_log and resize_notice is not None:  # rank 0 reads the notice, every rank takes its decision
            resize = _all_ranks_max(resize_notice.poll() if rank == 0 else 0, world, device)
            do_ckpt = do_ckpt or resize > 0
        if do_log:
            elapsed = max(1e-9, time.perf_counter() - t_window)
            metrics.update({
                "images_per_s": images_seen * world / elapsed,
                "data_wait_fraction": wait_s / max(1e-9, wait_s + busy_s),
                "data_epoch": trained_epoch,
                "preempted": preempted,
            })
            for alarm in health.update(metrics):
                if rank == 0:
                    console.event("health", step=alarm.step, message=alarm.message)
                    if not console.enabled:
                        print(f"[ibot-ray] WARNING step {alarm.step}: {alarm.message}", flush=True)
                    if writer is not None:
                        writer.write({"event": "collapse", "condition": alarm.condition, "message": alarm.message},
                                     step)
                if cfg.train.stop_on_collapse:
                    stop_on_collapse = True
            metrics["health"] = health.status
            metrics["health_alarms"] = ",".join(health.raised)
            if stop_on_collapse:
                metrics["stopped_on_collapse"] = True
                do_ckpt = True
            if monitor_name:  # distinct bad files: in total, and in the data epoch being trained
                bad = get_bad_input_stats(monitor_name, through_epoch=trained_epoch)
                metrics["bad_images"] = int(bad["count"])
                metrics["bad_images_epoch"] = int(bad["per_epoch"].get(trained_epoch, 0))
                if bad["count"] and rank == 0 and writer is not None:
                    metrics["bad_image_examples"] = [list(map(str, e)) for e in bad["examples"][:5]]
            if evaluator is not None and epoch_end and (step // steps_per_epoch) % cfg.train.knn_every_epochs == 0:
                metrics.update(evaluator.evaluate(unwrap(teacher).backbone, device=device))
                console.event("knn", epoch=step // steps_per_epoch, step=step, knn_top1=metrics["knn_top1"],
                              knn_top5=metrics.get("knn_top5"), split=config.get("knn_label"))
            images_seen, wait_s, busy_s = 0, 0.0, 0.0
            t_window = time.perf_counter()
            if do_ckpt:  # a restart streams from here: every rank's trained rows join rank 0's stream position
                consumed = trained.gather(world, device)
                if position is not None:
                    position.add(consumed)
                    if monitor_name:  # the unreadable rows do not hold the watermark back
                        fold_bad_positions(monitor_name, position)
                    metrics[RESUME_EPOCH_METRIC] = position.start
                    metrics[CHECKPOINT_DIR_METRIC] = _checkpoint_dir_name(step)
                if resize:
                    metrics[RESIZE_METRIC] = resize
            if rank == 0:
                if writer is not None:
                    writer.write(metrics, step)
                console.progress(metrics)
            if rank == 0 and not console.enabled:
                print(f"[ibot-ray] step {step}/{total} epoch {metrics['epoch']} loss {metrics['loss']:.4f} "
                      f"(cls {metrics['cls']:.4f} mim {metrics['mim']:.4f}) lr {metrics['lr']:.2e} "
                      f"{metrics['images_per_s']:.1f} img/s wait {metrics['data_wait_fraction']:.0%}"
                      + (f" knn {metrics['knn_top1']:.1f}%" if "knn_top1" in metrics else ""), flush=True)
            report = {k: v for k, v in metrics.items() if not isinstance(v, list)}
            if do_ckpt:  # only checkpoints go to Ray Train (module doc): a report between polls blocks the step
                # periodic ones upload in the background; one the run may stop or be torn down after, in the foreground
                background = not (step >= total or preempted or resize or stop_on_collapse)
                stall = _report_checkpoint(report, step_runner=runner, cfg=cfg, rank=rank,
                                           data_epoch=metrics.get(RESUME_EPOCH_METRIC),
                                           local_log_dir=writer.folder if writer else Path("."),
                                           epoch_length=epoch_length, monitor_name=monitor_name, position=position,
                                           background=background)
                last_checkpoint_t = time.monotonic()
                if preempted:  # a draining node may go any moment: a report returns once the controller has taken
                    ray.train.report(report)  # the previous one from this worker's queue (its next poll, <= 2 s)
                console.event("checkpoint", name=_checkpoint_dir_name(step), step=step,
                              epoch=step // steps_per_epoch)
                if writer is not None:
                    writer.write({"event": "checkpoint_stall", "step": step, "checkpoint_stall_s": stall,
                                  "background": background}, step)
                if resize:  # the controller resizes the group once every rank has reported this checkpoint
                    waited = resize_notice.wait_until_resized(resize)
                    log.warning("resize request %d was withdrawn after %.0f s; training on", resize, waited)
            if new_notice:
                console.event("preempted", step=step)
                if writer is not None:  # the run's history records which checkpoint answered which notice
                    writer.write({"event": "preemption_checkpoint", "step": step,
                                  "checkpoint": _checkpoint_dir_name(step), "deadline_ms": info.deadline_ms,
                                  "nodes": sorted(map(str, info.preempted_node_to_ranks))}, step)
            if stop_on_collapse:
                console.event("stopped", step=step, reason=f"collapse ({health.status}), train.stop_on_collapse")
            last = report
    if keys_log is not None:
        keys_log.close()
    if writer is not None:
        writer.close()
    return {"step": runner.step, "last": last, "world_size": world, "health": health.verdict}
