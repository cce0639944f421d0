"""One driver per run: a lease in the run folder that the driver holds while it runs.

Two drivers on one run (the same ``--storage`` and ``--name``, a run folder or ``s3://`` prefix) would write into one
run folder and delete each other's checkpoints. The first driver therefore writes a lease, ``<run>/driver.lease``
(JSON: a random owner id, the host, the pid, when it started, the time of its last heartbeat), and refreshes the
heartbeat every :data:`HEARTBEAT_S` seconds from a background thread. A second driver reads the lease first and stops
with :class:`RunInUseError`, which names the run, the driver holding it and what to do, before it requests any
cluster resource, so the first run is unharmed.

The lease works on object storage, which has no ``flock``: it is an ordinary object, written whole and read back.

* A lease whose heartbeat is older than :data:`STALE_AFTER_S` seconds is stale (its driver crashed or lost its
  machine): the next driver takes it over. A user resumes a crashed run at most that long after its driver's last
  heartbeat; on the same machine at once, when the lease's process is gone.
* ``--takeover`` (``pretrain(takeover=True)``) takes a fresh lease over at once: for a driver known to be gone sooner.
  A driver that finds its lease taken over stops (``KeyboardInterrupt`` in its main thread): a takeover never leaves
  two drivers on the run.
* Two drivers starting within a moment of each other: each writes its lease, waits :data:`SETTLE_S` (0.2 s on a
  local or shared file system) and reads it back; the one whose lease was overwritten stops (object stores read
  back the latest write: S3 has been strongly read-after-write consistent since 2020, GCS always).
* Staleness compares the heartbeat with this machine's clock: clocks of the machines involved must agree to well
  under :data:`STALE_AFTER_S` (NTP does).

The lease file has no ``.json`` name on purpose: Tune copies a sweep folder's ``*.json`` files to its staging folder
on restore and uploads them back later, which would put an old lease back.
"""

from __future__ import annotations

import _thread
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Optional

from pipelines import storage

log = logging.getLogger(__name__)

#: The lease's file name in the run folder.
LEASE_FILE = "driver.lease"
#: How often the driver refreshes its lease (seconds).
HEARTBEAT_S = 20.0
#: A lease not refreshed for this long is stale: its driver is gone (seconds).
STALE_AFTER_S = 120.0
#: After writing its lease, a driver waits this long and reads it back (two drivers starting at once: one stops):
#: longer than a write takes to land, on object storage and on a local or shared file system.
SETTLE_S = 2.0
LOCAL_SETTLE_S = 0.2


class RunInUseError(RuntimeError):
    """Another driver holds the run's lease; the message names the run, that driver and how to proceed."""


def _age(lease: dict) -> float:
    return time.time() - float(lease.get("heartbeat", 0.0))


def _process_gone(lease: dict) -> bool:
    """True when the lease's driver ran on this machine and its process no longer exists."""
    if lease.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(lease.get("pid", -1)), 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError):
        return False
    return False


def describe(lease: dict) -> str:
    """``host:pid, started <time>, last heartbeat N s ago`` of a lease."""
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(lease.get("started", 0.0))))
    return (f"{lease.get('host', '?')}:{lease.get('pid', '?')} (started {started}, last heartbeat "
            f"{_age(lease):.0f} s ago)")


class RunLease:
    """The lease of run ``run_uri`` (a local folder or a URI), held between :meth:`acquire` and :meth:`release` (or as
    a context manager). ``takeover``: take a lease that is not stale over. ``on_lost``: what to do when another
    driver took the lease over (default: stop this driver, ``KeyboardInterrupt`` in the main thread)."""

    def __init__(self, run_uri: str, *, what: str = "run", takeover: bool = False,
                 heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S,
                 settle_s: Optional[float] = None, on_lost: Optional[Callable[[dict], None]] = None) -> None:
        self.run_uri = run_uri.rstrip("/")
        self.uri = f"{self.run_uri}/{LEASE_FILE}"
        self.what, self.takeover = what, takeover
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.settle_s = settle_s if settle_s is not None else SETTLE_S if storage.is_remote(run_uri) else LOCAL_SETTLE_S
        self.on_lost = on_lost or self._stop_driver
        self.owner = uuid.uuid4().hex
        self.started = time.time()
        self.lost = False
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None

    def read(self) -> Optional[dict]:
        """The lease in storage (None when there is none, or it is unreadable garbage)."""
        text = storage.read_text(self.uri, setting="--storage")
        if not text:
            return None
        try:
            lease = json.loads(text)
        except json.JSONDecodeError:
            return None
        return lease if isinstance(lease, dict) else None

    def _write(self) -> None:
        lease = {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(), "started": self.started,
                 "heartbeat": time.time(), "stale_after_s": self.stale_after_s}
        storage.write_text(self.uri, json.dumps(lease), setting="--storage")

    def _in_use(self, other: dict, how: str) -> RunInUseError:
        wait = max(0.0, float(other.get("stale_after_s", self.stale_after_s)) - _age(other))
        return RunInUseError(
            f"{self.what} {self.run_uri} {how} driver {describe(other)}. Two drivers on one {self.what} would write "
            f"into one folder and delete each other's checkpoints, so this one stops here and the other is "
            f"unharmed. Wait for that driver to finish, or stop it; if it is gone (its machine crashed), run this "
            f"command again in {wait:.0f} s (a lease is stale {self.stale_after_s:.0f} s after its last heartbeat), "
            f"or now with --takeover; or choose another --name.")

    def acquire(self) -> RunLease:
        """Take the lease, or raise :class:`RunInUseError`; then keep it fresh from a background thread."""
        other = self.read()
        if other and other.get("owner") != self.owner:
            stale = _age(other) >= float(other.get("stale_after_s", self.stale_after_s)) or _process_gone(other)
            if not stale and not self.takeover:
                raise self._in_use(other, "is in use by")
            if not stale:
                log.warning("taking over %s %s from driver %s (--takeover)", self.what, self.run_uri,
                            describe(other))
        self._write()
        if self.settle_s > 0:
            time.sleep(self.settle_s)
            now = self.read()
            if now is None or now.get("owner") != self.owner:
                raise self._in_use(now or {}, "was taken at the same moment by")
        self._thread = threading.Thread(target=self._beat, name="ibot-run-lease", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                with self._lock:
                    if self._stop.is_set():
                        return
                    now = self.read()
                    if now is not None and now.get("owner") != self.owner:
                        self.lost = True
                        self._stop.set()
                        self.on_lost(now)
                        return
                    self._write()
            except Exception as e:  # storage unavailable past its deadline: the next heartbeat tries again
                log.warning("could not refresh the lease of %s %s: %s", self.what, self.run_uri, e)

    def _stop_driver(self, other: dict) -> None:
        print(f"[ibot-ray] {self.what} {self.run_uri} was taken over by driver {describe(other)} (--takeover): "
              "stopping this driver", flush=True)
        _thread.interrupt_main()

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still this driver's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.heartbeat_s + 5)
        with self._lock:
            if self.lost:
                return
            try:
                now = self.read()
                if now is not None and now.get("owner") == self.owner:
                    storage.delete(self.uri, setting="--storage")
            except Exception as e:  # the lease then goes stale by itself
                log.warning("could not release the lease of %s %s: %s", self.what, self.run_uri, e)

    def __enter__(self) -> RunLease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


__all__ = ["HEARTBEAT_S", "LEASE_FILE", "RunInUseError", "RunLease", "SETTLE_S", "STALE_AFTER_S", "describe"]
