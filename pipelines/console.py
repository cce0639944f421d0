"""What ``ibot-ray pretrain`` shows on the terminal: one progress bar per run, one line per event, a closing summary.

The numbers are made on rank 0 of the Ray Train worker group, the terminal belongs to the driver. Between them sits
a small named mailbox actor per run, :class:`ConsoleMailbox` (``ibot_console:<run>``, ``num_cpus=0``, pinned to the
driver's node like the ingest monitor, owned by the driver so it dies with it)::

    rank 0 (train_worker.py)                     mailbox actor                      driver (pretrain.py)
    ConsoleClient.progress(metrics) ---post--->  ordered message list  <---poll---  ConsolePoller thread
    ConsoleClient.event("checkpoint", ...)       (consumed ones dropped)             -> ConsoleRenderer -> stdout

Rank 0 posts fire-and-forget (``.remote()`` without ``ray.get``): the training step never waits for the terminal.
Calls from one process reach an actor in order, so progress rows and event lines come out in the order rank 0 made
them; a restarted worker group (failure, resize, preemption) posts a ``start`` event with the step it resumed from,
and the driver, which has seen the previous start, names what happened (resume, restart, resize).

:class:`ConsoleRenderer` turns messages into text. On a terminal (TTY) it draws a tqdm bar (step/total, ETA, and a
postfix with epoch, images/s, loss, the latest k-NN and the health status) and writes event lines above it; when
stdout is a file or a pipe it prints one plain line per log step instead. Nothing of Ray's own logging goes through
here: that stays in Ray's log folder (``/tmp/ray/session_latest/logs`` for a local Ray) unless ``--verbose``.
"""

from __future__ import annotations

import math
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from typing import Any, Optional, TextIO

from ibot_ray.health import verdict as health_verdict

PREFIX = "[ibot-ray]"
#: How often the driver's thread polls the mailbox (seconds).
POLL_INTERVAL_S = 0.5
#: Where a local Ray keeps its logs (the newest session); on a remote cluster the same path on the head node.
RAY_LOG_DIR = "/tmp/ray/session_latest/logs"


def mailbox_name(run_name: str) -> str:
    return f"ibot_console:{run_name}"


# ---- the mailbox actor -------------------------------------------------------------------------


class ConsoleMailbox:
    """An ordered list of messages (dicts with a ``kind``) from rank 0; the driver polls it with a cursor."""

    def __init__(self) -> None:
        self._messages: list[dict] = []
        self._first = 0  # sequence number of self._messages[0]

    def post(self, message: dict) -> None:
        self._messages.append(message)

    def poll(self, cursor: int) -> tuple[list[dict], int]:
        """Messages from sequence number ``cursor`` on, and the next cursor; everything before is dropped."""
        drop = max(0, min(cursor - self._first, len(self._messages)))
        if drop:
            del self._messages[:drop]
            self._first += drop
        start = max(0, cursor - self._first)
        return self._messages[start:], self._first + len(self._messages)


def create_mailbox(run_name: str):
    """Create the run's mailbox on this (the driver's) node; returns the actor handle (keep it: it owns the actor)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    actor = ray.remote(num_cpus=0)(ConsoleMailbox)
    handle = actor.options(name=mailbox_name(run_name), get_if_exists=True, scheduling_strategy=here).remote()
    ray.get(handle.poll.remote(0))  # exists and answers before the workers look it up
    return handle


class ConsoleClient:
    """Rank 0's side: posts progress rows and events to the run's mailbox, never blocking, never failing the step.

    ``ConsoleClient(None)`` (no mailbox: a Tune trial, a test calling the worker loop directly) is disabled and
    :attr:`enabled` is False, so the caller can fall back to printing."""

    def __init__(self, name: Optional[str]) -> None:
        self._handle = None
        if name:
            try:
                import ray

                self._handle = ray.get_actor(name)
            except Exception:  # noqa: BLE001 - no mailbox: no console, training goes on
                self._handle = None

    @property
    def enabled(self) -> bool:
        return self._handle is not None

    def _post(self, message: dict) -> None:
        if self._handle is None:
            return
        try:
            self._handle.post.remote({"time": time.time(), **message})
        except Exception:  # noqa: BLE001 - the driver went away; the run's outputs are in storage anyway
            self._handle = None

    def progress(self, metrics: dict) -> None:
        row = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}
        self._post({"kind": "progress", "metrics": row})

    def event(self, kind: str, **fields: Any) -> None:
        self._post({"kind": kind, **fields})


# ---- formatting --------------------------------------------------------------------------------


def format_duration(seconds: float) -> str:
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def _pct(x: Any) -> str:
    return f"{float(x):.1f}%"


class ConsoleRenderer:
    """Messages -> text on ``out``: a tqdm bar on a TTY, one line per log step otherwise (``tty=None``: detect).

    ``total_steps``/``steps_per_epoch`` size the bar and the epoch display; ``clock`` is for the ETA of the plain
    mode (defaults to the messages' own ``time``)."""

    def __init__(self, *, total_steps: int, steps_per_epoch: int, out: Optional[TextIO] = None,
                 tty: Optional[bool] = None, name: str = "") -> None:
        self.out = out if out is not None else sys.stdout
        self.tty = bool(getattr(self.out, "isatty", lambda: False)()) if tty is None else tty
        self.total = int(total_steps)
        self.steps_per_epoch = max(1, int(steps_per_epoch))
        self.epochs = max(1, math.ceil(self.total / self.steps_per_epoch))
        self.name = name
        self.world: Optional[int] = None
        self.starts = 0
        self.last: dict = {}
        self.knn: Optional[dict] = None
        self.health: Optional[str] = None
        self.checkpoints = 0
        self.restarts = 0
        self.resizes = 0
        self.preemptions = 0
        self._t0: Optional[float] = None  # (time, step) of the first progress row since the latest start
        self._s0 = 0
        self._bar = None

    def epoch_of(self, step: int) -> int:
        """The 1-based epoch a step belongs to (the last step of epoch E is in E), as shown everywhere."""
        return min(max(1, math.ceil(step / self.steps_per_epoch)), self.epochs)

    # -- output helpers
    def line(self, text: str) -> None:
        """An event line (above the bar on a TTY)."""
        if self._bar is not None:
            self._bar.write(text, file=self.out)
        else:
            self.out.write(text + "\n")
        self.out.flush()

    def _ensure_bar(self, initial: int):
        if self._bar is None and self.tty:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, initial=initial, file=self.out, unit="step", dynamic_ncols=True,
                             desc=self.name or "train", smoothing=0.1,
                             bar_format="{desc} {percentage:3.0f}%|{bar}| {n}/{total} [{elapsed}<{remaining}]"
                                        "{postfix}")
        return self._bar

    # -- messages
    def handle(self, msg: dict) -> None:
        kind = msg.get("kind")
        handler: Optional[Callable[[dict], None]] = getattr(self, f"_on_{kind}", None)
        if handler is not None:
            handler(msg)

    def _on_start(self, msg: dict) -> None:
        world, step, resumed = int(msg.get("world", 0)), int(msg.get("step", 0)), msg.get("resumed_from")
        per_rank = msg.get("per_rank_share")
        shape = f"{world} worker{'s' if world != 1 else ''}"
        if msg.get("global_batch"):
            shape += f", global batch {msg['global_batch']}" + (f" ({per_rank} per rank)" if per_rank else "")
        if self.starts == 0:
            if resumed is None:
                self.line(f"{PREFIX} training started: {shape}, {self.total} step{'s' if self.total != 1 else ''}")
            else:
                self.line(f"{PREFIX} resumed from the checkpoint at step {step}/{self.total} "
                          f"(epoch {self.epoch_of(step)}/{self.epochs}): {shape}")
        elif self.world is not None and world != self.world:
            self.resizes += 1
            self.line(f"{PREFIX} resized: {self.world} -> {world} workers, continuing from the checkpoint at step "
                      f"{step} ({shape})")
        else:
            self.restarts += 1
            self.line(f"{PREFIX} worker group restarted: continuing from the checkpoint at step {step} ({shape})")
        self.starts += 1
        self.world = world
        self._t0, self._s0 = None, step
        if self._bar is not None:
            self._bar.n = step  # a restart rewinds to the checkpoint
            self._bar.refresh()
        else:
            self._ensure_bar(step)

    def _eta(self, step: int, now: float) -> Optional[float]:
        if self._t0 is None or step <= self._s0 or now <= self._t0:
            return None
        return (self.total - step) * (now - self._t0) / (step - self._s0)

    def _on_progress(self, msg: dict) -> None:
        m = msg.get("metrics", {})
        step = int(m.get("step", 0))
        now = float(msg.get("time", time.time()))
        if self._t0 is None:
            self._t0, self._s0 = now, step
        self.last = m
        if "knn_top1" in m:
            self.knn = {"knn_top1": m["knn_top1"], "knn_top5": m.get("knn_top5"), "epoch": m.get("epoch")}
        if isinstance(m.get("health"), str):
            self.health = m["health"]
        fields = [f"epoch {self.epoch_of(step)}/{self.epochs}"]
        if "images_per_s" in m:
            fields.append(f"{float(m['images_per_s']):.0f} img/s")
        if "loss" in m:
            fields.append(f"loss {float(m['loss']):.4f}")
        if self.knn is not None:
            fields.append(f"k-NN {_pct(self.knn['knn_top1'])}")
        if self.health is not None:
            fields.append(f"health {self.health}")
        bar = self._ensure_bar(step)
        if bar is not None:
            bar.set_postfix_str(" | ".join(fields), refresh=False)
            bar.update(max(0, step - bar.n))
            return
        eta = self._eta(step, now)
        self.line(f"{PREFIX} step {step}/{self.total} ({100 * step / max(1, self.total):.0f}%) "
                  + " | ".join(fields) + f" | ETA {format_duration(eta) if eta is not None else '?'}")

    def _on_checkpoint(self, msg: dict) -> None:
        self.checkpoints += 1
        step = int(msg.get("step", 0))
        self.line(f"{PREFIX} checkpoint {msg.get('name', '')} saved (step {step}/{self.total}, "
                  f"epoch {self.epoch_of(step)}/{self.epochs})")

    def _on_preempted(self, msg: dict) -> None:
        self.preemptions += 1
        self.line(f"{PREFIX} preemption notice: a node is being drained; checkpoint written at step "
                  f"{msg.get('step')}, the workers will restart without it")

    def _on_knn(self, msg: dict) -> None:
        top5 = msg.get("knn_top5")
        on = f" on the {msg['split']}" if msg.get("split") else ""
        self.line(f"{PREFIX} k-NN{on} after epoch {msg.get('epoch')}/{self.epochs}: top-1 {_pct(msg['knn_top1'])}"
                  + (f" top-5 {_pct(top5)}" if top5 is not None else ""))

    def _on_health(self, msg: dict) -> None:
        self.line(f"{PREFIX} WARNING step {msg.get('step')}: {msg.get('message')}")

    def _on_stopped(self, msg: dict) -> None:
        self.line(f"{PREFIX} stopped early at step {msg.get('step')}: {msg.get('reason')}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class ConsolePoller:
    """The driver's side: owns the run's mailbox and a thread that renders what rank 0 posts while ``fit()`` runs.

    ``with ConsolePoller(name, renderer):`` around ``trainer.fit()``; the last messages are rendered on exit."""

    def __init__(self, run_name: str, renderer: ConsoleRenderer, *, interval_s: float = POLL_INTERVAL_S) -> None:
        self.renderer = renderer
        self.interval_s = interval_s
        self.name = mailbox_name(run_name)
        self._handle = create_mailbox(run_name)
        self._cursor = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ibot-console", daemon=True)
        self._lock = threading.Lock()

    def poll_once(self) -> None:
        import ray

        with self._lock:
            msgs, self._cursor = ray.get(self._handle.poll.remote(self._cursor), timeout=30)
            for m in msgs:
                self.renderer.handle(m)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll_once()
            except Exception:  # noqa: BLE001 - the console must never take the run down
                pass

    def __enter__(self) -> ConsolePoller:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        try:
            time.sleep(0.2)  # the last fire-and-forget posts of rank 0
            self.poll_once()
        except Exception:  # noqa: BLE001
            pass
        self.renderer.close()
        try:
            import ray

            ray.kill(self._handle)
        except Exception:  # noqa: BLE001
            pass


# ---- keeping Ray's own logging off the console -------------------------------------------------


def quiet_train_reports() -> None:
    """Silence Ray Train's ``Reporting training result N: TrainingReport(...)`` (a dump of every metric dict).

    Train V2 logs it at INFO from ``ray/train/v2/_internal/execution/context.py`` on every worker, with a logger named
    by that file's *path* (``logging.getLogger(__file__)``), so neither ``LoggingConfig(log_level=...)`` (which
    filters ``ray.train.*`` names only) nor the ``ray.train`` logger's level reach it; the worker's root logger is
    at INFO. Call on the worker (the train function does, unless ``--verbose``)."""
    import logging

    try:
        from ray.train.v2._internal.execution import context
    except Exception:  # noqa: BLE001 - another Ray layout: nothing to silence
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def quiet_driver_logging() -> None:
    """On the driver: deprecation warnings filtered; Ray Data's console handler at ERROR (its log file keeps all)."""
    import logging
    import warnings

    for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):  # Ray's own subclass them
        warnings.filterwarnings("ignore", category=category)
    for name in ("ray.data", "ray.train", "ray.tune"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.ERROR)


# ---- closing summary and failures --------------------------------------------------------------


def ray_log_dir() -> str:
    """The current Ray session's log folder on this machine (a local Ray), else the usual path."""
    try:
        import ray

        node = ray._private.worker._global_node  # noqa: SLF001 - only to name the folder
        if node is not None:
            return f"{node.get_session_dir_path()}/logs"
    except Exception:  # noqa: BLE001
        pass
    return RAY_LOG_DIR


def format_summary(*, name: str, steps: int, total_steps: int, wall_s: float, train_s: Optional[float],
                   metrics: dict, run_path: str, checkpoint_path: Optional[str], export_path: Optional[str],
                   knn_before: Optional[dict], knn_after: Optional[dict], knn_pixels: Optional[dict] = None,
                   knn_split: Optional[str] = None, knn_missing: Optional[str] = None, bad_images: int = 0,
                   restarts: int = 0, resizes: int = 0, preemptions: int = 0, log_dir: Optional[str] = None,
                   local: bool = True, verbose: bool = False) -> str:
    """The closing block of ``ibot-ray pretrain``. ``knn_split`` names the split the k-NN figures were measured on
    (all of them on that one split); ``knn_missing``: why there are none, and how to get one."""
    lines = [f"{PREFIX} done: run '{name}', {steps}/{total_steps} steps in {format_duration(wall_s)}"
             + (f" (training {format_duration(train_s)})" if train_s is not None else "")]
    if "loss" in metrics:
        s = f"  final loss      {float(metrics['loss']):.4f}"
        if "cls" in metrics and "mim" in metrics:
            s += f" (cls {float(metrics['cls']):.4f}, mim {float(metrics['mim']):.4f})"
        if "images_per_s" in metrics:
            s += f", {float(metrics['images_per_s']):.0f} img/s"
        lines.append(s)
    if knn_split and (knn_after is not None or "knn_top1" in metrics):
        lines.append(f"  k-NN split      {knn_split}")
    if knn_after is not None:
        s = f"  k-NN top-1      trained teacher {_pct(knn_after['knn_top1'])}"
        if knn_after.get("knn_top5") is not None:
            s += f" (top-5 {_pct(knn_after['knn_top5'])})"
        lines.append(s)
        if knn_before is not None:
            lines.append(f"                  random init     {_pct(knn_before['knn_top1'])}  "
                         f"({knn_after['knn_top1'] - knn_before['knn_top1']:+.1f} points)")
        if knn_pixels is not None:
            lines.append(f"                  raw pixels      {_pct(knn_pixels['knn_top1'])}  "
                         f"({knn_after['knn_top1'] - knn_pixels['knn_top1']:+.1f} points; "
                         f"{knn_pixels.get('variant', 'raw')} pixels, same split)")
            verdict = ("the features beat raw pixels" if knn_after["knn_top1"] >= knn_pixels["knn_top1"] else
                       "the features are still worse than raw pixels: train longer, or see docs/recipes.md")
            lines.append(f"                  -> {verdict}")
    elif "knn_top1" in metrics:
        lines.append(f"  k-NN top-1      {_pct(metrics['knn_top1'])} (last online evaluation)")
    elif knn_missing:
        lines.append(textwrap.fill(knn_missing, width=118, initial_indent="  quality         not measured: ",
                                   subsequent_indent=" " * 18))
    if isinstance(metrics.get("health"), str):
        v = health_verdict(metrics)
        lines.append("  health          " + v + (" (see the warnings above)" if v.startswith("collapsed") else ""))
    incidents = [f"{n} {what}" for n, what in ((restarts, "restart(s)"), (resizes, "resize(s)"),
                                                 (preemptions, "preemption(s)")) if n]
    if incidents:
        lines.append(f"  incidents       {', '.join(incidents)}")
    if bad_images:
        lines.append(f"  skipped images  {bad_images} distinct unreadable files (keys in the metrics)")
    if checkpoint_path:
        lines.append(f"  checkpoint      {checkpoint_path}")
    if export_path:
        lines.append(f"  export          {export_path}")
    # on remote storage the history is append-only parts, one per upload (pipelines/metrics.py)
    history = (f"{run_path}/logs/metrics/part-*.jsonl (joined by pipelines.metrics.read_metrics_history)"
               if "://" in run_path else f"{run_path}/logs/metrics.jsonl")
    lines.append(f"  metrics         {history}, TensorBoard: {run_path}/logs/tensorboard")
    where = log_dir or RAY_LOG_DIR
    lines.append(f"  Ray's logs      {where}" + ("" if local else " (on the head node)")
                 + ("" if verbose else "; --verbose shows them here"))
    return "\n".join(lines)


def format_failure(error: BaseException, log_dir: Optional[str] = None) -> str:
    """One block for a failed run: what failed, the worker's own exception message, where Ray's logs are."""
    kind = type(error).__name__
    text = str(error).strip() or repr(error)
    body = "\n".join("  " + ln for ln in text.splitlines())
    return (f"{PREFIX} training failed ({kind}):\n{body}\n"
            f"{PREFIX} Ray's logs: {log_dir or RAY_LOG_DIR} (re-run with --verbose to see them on the console)")
