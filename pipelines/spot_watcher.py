"""Spot-termination watcher: turns a cloud's preemption notice into one ``ray drain-node`` call.

Ray does not read the cloud's spot notice itself. Ray Train reacts to preemption only when the node is *drained*
(``PreemptionWatcher`` polls the GCS draining list, the controller enters its preempting state, the train function
sees ``ray.train.get_preemption_info()`` and saves a just-in-time checkpoint). This watcher runs on every spot
worker (started by ``worker_start_ray_commands`` in ``cluster.yaml`` / ``cluster.gcp.yaml``)::

    python -m pipelines.spot_watcher --provider aws|gcp [--interval 5] [--metadata-url URL] [--address ADDR]

It polls the instance metadata service:

* AWS (IMDSv2): ``PUT /latest/api/token`` (header ``X-aws-ec2-metadata-token-ttl-seconds``), then
  ``GET /latest/meta-data/spot/instance-action`` with ``X-aws-ec2-metadata-token``: 404 while there is no notice,
  200 ``{"action": "terminate", "time": "2026-11-22T10:00:00Z"}`` about two minutes before the interruption.
* GCP: ``GET /computeMetadata/v1/instance/preempted`` with ``Metadata-Flavor: Google``: ``FALSE`` or ``TRUE``
  (about 30 s before the VM stops; the notice carries no time).

On the first notice it runs, once::

    ray drain-node --address ADDR --node-id <this node> --reason DRAIN_NODE_REASON_PREEMPTION
        --reason-message "spot termination notice" --deadline-remaining-seconds <seconds until termination>

The logic (parsing, deadline, token refresh, tolerated errors, drain-once) is in small classes whose metadata base
URL, clocks and drain action are injectable; only stdlib ``urllib`` is used for HTTP, with proxies disabled
(the metadata service must be reached directly).
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Protocol

log = logging.getLogger("spot_watcher")

#: The link-local metadata address; both EC2 and GCE answer on it (GCE also as metadata.google.internal).
DEFAULT_METADATA_URL = "http://169.254.169.254"
AWS_TOKEN_PATH = "/latest/api/token"
AWS_ACTION_PATH = "/latest/meta-data/spot/instance-action"
AWS_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
AWS_TOKEN_HEADER = "X-aws-ec2-metadata-token"
GCP_PREEMPTED_PATH = "/computeMetadata/v1/instance/preempted"
GCP_FLAVOR_HEADER = "Metadata-Flavor"
#: EC2 gives a two-minute interruption warning; used when a notice has no parseable time.
AWS_NOTICE_S = 120.0
#: GCE gives about 30 s between the preemption notice and the stop.
GCP_NOTICE_S = 30.0
DRAIN_REASON = "DRAIN_NODE_REASON_PREEMPTION"
DRAIN_MESSAGE = "spot termination notice"

# A build_opener without ProxyHandler would route the link-local address through $http_proxy.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class MetadataError(RuntimeError):
    """The metadata service could not be read this time (network error, timeout, 5xx, unparseable reply).

    Transient by assumption: the watcher logs it and polls again.
    """


@dataclass(frozen=True)
class Notice:
    """A termination notice: what the cloud will do and when (``terminate_at``, epoch seconds, wall clock)."""

    action: str
    terminate_at: float
    raw: str = ""

    def seconds_left(self, now: float) -> int:
        """Whole seconds from ``now`` until termination, rounded down and never negative (the drain deadline)."""
        return max(0, int(math.floor(self.terminate_at - now)))


# ---- parsing -------------------------------------------------------------------------------------


def parse_utc(text: str) -> float:
    """Epoch seconds of an ISO-8601 time such as ``2026-11-22T10:00:00Z`` (no zone means UTC)."""
    stamp = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=timezone.utc)
    return stamp.timestamp()


def parse_aws_instance_action(body: str, now: float, default_notice_s: float = AWS_NOTICE_S) -> Notice:
    """Parse the 200 body of ``spot/instance-action``.

    A reply without a usable ``time`` still is a notice (the instance-action document only exists once an
    interruption is scheduled); its deadline is then ``now + default_notice_s``. A body that is not a JSON
    object raises :class:`MetadataError`.
    """
    try:
        doc = json.loads(body)
    except json.JSONDecodeError as e:
        raise MetadataError(f"spot/instance-action: not JSON: {body[:200]!r} ({e})") from None
    if not isinstance(doc, dict):
        raise MetadataError(f"spot/instance-action: expected a JSON object, got {body[:200]!r}")
    action = str(doc.get("action", "terminate"))
    try:
        terminate_at = parse_utc(str(doc["time"]))
    except (KeyError, ValueError, TypeError):
        log.warning("spot/instance-action without a usable time (%r); assuming %.0f s", body[:200], default_notice_s)
        terminate_at = now + default_notice_s
    return Notice(action=action, terminate_at=terminate_at, raw=body)


def parse_gcp_preempted(body: str, now: float, notice_s: float = GCP_NOTICE_S) -> Optional[Notice]:
    """Parse ``instance/preempted``: ``FALSE`` -> None, ``TRUE`` -> a notice ending ``notice_s`` after ``now``."""
    value = body.strip().upper()
    if value == "FALSE":
        return None
    if value == "TRUE":
        return Notice(action="preempt", terminate_at=now + max(0.0, notice_s), raw=body)
    raise MetadataError(f"instance/preempted: expected TRUE or FALSE, got {body[:200]!r}")


# ---- HTTP ----------------------------------------------------------------------------------------


def _request(url: str, *, method: str = "GET", headers: Optional[dict] = None, timeout: float = 2.0):
    """(status, body) of one request; HTTP error statuses are returned, not raised; network errors raise."""
    req = urllib.request.Request(url, method=method, headers=headers or {}, data=b"" if method == "PUT" else None)
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        try:
            body = e.read().decode("utf-8", "replace")
        except Exception:  # noqa: BLE001 - the status is what matters
            body = ""
        return e.code, body
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        raise MetadataError(f"{method} {url}: {getattr(e, 'reason', e)}") from None


class NoticeSource(Protocol):
    def check(self) -> Optional[Notice]:
        """The current notice, None when there is none; raises :class:`MetadataError` on a failed read."""


class AwsNoticeSource:
    """EC2 IMDSv2 reader: keeps a session token, refreshes it before it expires and whenever IMDS answers 401."""

    def __init__(
        self,
        base_url: str = DEFAULT_METADATA_URL,
        *,
        token_ttl_s: int = 21600,
        refresh_margin_s: float = 60.0,
        timeout_s: float = 2.0,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ):
        if not 1 <= token_ttl_s <= 21600:
            raise ValueError(f"token_ttl_s must be in [1, 21600] (IMDSv2 limit), got {token_ttl_s}")
        self.base_url = base_url.rstrip("/")
        self.token_ttl_s = token_ttl_s
        self.refresh_margin_s = min(refresh_margin_s, token_ttl_s / 2)
        self.timeout_s = timeout_s
        self.clock = clock
        self.monotonic = monotonic
        self._token: Optional[str] = None
        self._token_at = 0.0
        self.token_fetches = 0

    def _fresh_token(self) -> str:
        status, body = _request(self.base_url + AWS_TOKEN_PATH, method="PUT",
                                headers={AWS_TTL_HEADER: str(self.token_ttl_s)}, timeout=self.timeout_s)
        if status != 200 or not body.strip():
            raise MetadataError(f"IMDSv2 token: HTTP {status} {body[:200]!r}")
        self._token, self._token_at = body.strip(), self.monotonic()
        self.token_fetches += 1
        return self._token

    def _token_value(self) -> str:
        expired = self.monotonic() - self._token_at >= self.token_ttl_s - self.refresh_margin_s
        if self._token is None or expired:
            return self._fresh_token()
        return self._token

    def check(self) -> Optional[Notice]:
        url = self.base_url + AWS_ACTION_PATH
        status, body = _request(url, headers={AWS_TOKEN_HEADER: self._token_value()}, timeout=self.timeout_s)
        if status == 401:  # token expired or rejected: one fresh token, one retry
            status, body = _request(url, headers={AWS_TOKEN_HEADER: self._fresh_token()}, timeout=self.timeout_s)
        if status == 404:
            return None
        if status == 200:
            return parse_aws_instance_action(body, self.clock())
        raise MetadataError(f"GET {url}: HTTP {status} {body[:200]!r}")


class GcpNoticeSource:
    """GCE metadata reader for ``instance/preempted``.

    ``detection_lag_s`` (the poll interval) is taken off the 30 s notice: the flag may have turned TRUE up to one
    interval before we saw it, and an early deadline is the safe side for a checkpoint.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_METADATA_URL,
        *,
        notice_s: float = GCP_NOTICE_S,
        detection_lag_s: float = 0.0,
        timeout_s: float = 2.0,
        clock: Callable[[], float] = time.time,
    ):
        self.base_url = base_url.rstrip("/")
        self.notice_s = notice_s
        self.detection_lag_s = detection_lag_s
        self.timeout_s = timeout_s
        self.clock = clock

    def check(self) -> Optional[Notice]:
        url = self.base_url + GCP_PREEMPTED_PATH
        status, body = _request(url, headers={GCP_FLAVOR_HEADER: "Google"}, timeout=self.timeout_s)
        if status != 200:
            raise MetadataError(f"GET {url}: HTTP {status} {body[:200]!r}")
        return parse_gcp_preempted(body, self.clock(), self.notice_s - self.detection_lag_s)


# ---- the watcher ---------------------------------------------------------------------------------

#: A drain action gets the deadline (whole seconds left) and the notice; it returns True when the drain was accepted.
DrainAction = Callable[[int, Notice], bool]


class SpotWatcher:
    """Polls a :class:`NoticeSource` and drains this node once.

    ``poll_once`` returns what happened: ``"clear"`` (no notice), ``"error"`` (metadata read failed, logged and
    tolerated), ``"drained"`` (the drain action succeeded, now or never again), ``"drain_failed"`` (it will be
    retried on the next poll, up to ``max_drain_attempts`` attempts), ``"gave_up"`` (attempts exhausted) or
    ``"done"`` (already drained; no request is made).
    """

    def __init__(self, source: NoticeSource, drain: DrainAction, *, max_drain_attempts: int = 3,
                 clock: Callable[[], float] = time.time):
        if max_drain_attempts < 1:
            raise ValueError(f"max_drain_attempts must be >= 1, got {max_drain_attempts}")
        self.source = source
        self.drain = drain
        self.max_drain_attempts = max_drain_attempts
        self.clock = clock
        self.drained = False
        self.notice: Optional[Notice] = None
        self.drain_attempts = 0
        self.errors = 0
        self.consecutive_errors = 0
        self.polls = 0

    def poll_once(self) -> str:
        if self.drained:
            return "done"
        if self.drain_attempts >= self.max_drain_attempts:
            return "gave_up"
        self.polls += 1
        try:
            notice = self.source.check()
        except MetadataError as e:
            self.errors += 1
            self.consecutive_errors += 1
            n = self.consecutive_errors
            if n & (n - 1) == 0:  # log the 1st, 2nd, 4th, 8th ... failure in a row, not every poll
                log.warning("metadata read failed (%d in a row, %d total): %s", n, self.errors, e)
            return "error"
        if self.consecutive_errors:
            log.info("metadata readable again after %d failed reads", self.consecutive_errors)
            self.consecutive_errors = 0
        if notice is None:
            return "clear"
        if self.notice is None:
            self.notice = notice
            log.warning("termination notice: action=%s at %s (%r)", notice.action,
                        datetime.fromtimestamp(notice.terminate_at, timezone.utc).isoformat(), notice.raw[:200])
        self.drain_attempts += 1
        deadline = self.notice.seconds_left(self.clock())
        try:
            ok = bool(self.drain(deadline, self.notice))
        except Exception as e:  # noqa: BLE001 - a failed drain is retried, never fatal
            log.error("drain attempt %d raised: %r", self.drain_attempts, e)
            ok = False
        if ok:
            self.drained = True
            log.warning("node drained (deadline %d s, attempt %d)", deadline, self.drain_attempts)
            return "drained"
        if self.drain_attempts >= self.max_drain_attempts:
            log.error("drain failed %d times; giving up", self.drain_attempts)
            return "gave_up"
        return "drain_failed"

    def run(self, interval_s: float, *, max_polls: Optional[int] = None,
            sleep: Callable[[float], None] = time.sleep) -> bool:
        """Poll every ``interval_s`` until drained (True), drain attempts run out (False) or ``max_polls`` polls."""
        while max_polls is None or self.polls < max_polls:
            state = self.poll_once()
            if state in ("drained", "done"):
                return True
            if state == "gave_up":
                return False
            sleep(interval_s)
        return self.drained


# ---- the Ray side --------------------------------------------------------------------------------


def drain_command(address: str, node_id: str, deadline_s: int, *, ray_executable: str = "ray",
                  reason_message: str = DRAIN_MESSAGE) -> list[str]:
    """argv of ``ray drain-node`` (a hidden command; flags checked against ray 2.60 ``scripts/scripts.py``)."""
    if deadline_s < 0:
        raise ValueError(f"deadline_s must be >= 0 (ray drain-node rejects negatives), got {deadline_s}")
    return [ray_executable, "drain-node", "--address", address, "--node-id", node_id, "--reason", DRAIN_REASON,
            "--reason-message", reason_message, "--deadline-remaining-seconds", str(int(deadline_s))]


def default_ray_executable() -> str:
    """The ``ray`` script next to this interpreter (same environment), else the one on PATH."""
    sibling = Path(sys.executable).with_name("ray")
    if sibling.exists():
        return str(sibling)
    return shutil.which("ray") or "ray"


def resolve_local_node_id(address: str = "auto") -> str:
    """Hex id of the Ray node on this machine: connect a short-lived driver, ask the runtime context, disconnect.

    On a worker started with ``ray start --address=HEAD:6379`` that driver attaches to the local raylet, so the
    id is the worker's own.
    """
    import ray

    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False, configure_logging=False)
    try:
        return ray.get_runtime_context().get_node_id()
    finally:
        ray.shutdown()


class RayDrain:
    """Drain action that runs ``ray drain-node``; the node id is resolved lazily (and cached) when not given."""

    def __init__(self, address: str, node_id: Optional[str] = None, *, ray_executable: Optional[str] = None,
                 resolve: Callable[[str], str] = resolve_local_node_id, timeout_s: float = 60.0, dry_run: bool = False):
        self.address = address
        self.node_id = node_id
        self.ray_executable = ray_executable or default_ray_executable()
        self.resolve = resolve
        self.timeout_s = timeout_s
        self.dry_run = dry_run
        self.commands: list[list[str]] = []

    def ensure_node_id(self) -> str:
        if not self.node_id:
            self.node_id = self.resolve(self.address)
            log.info("this node's Ray id: %s", self.node_id)
        return self.node_id

    def __call__(self, deadline_s: int, notice: Notice) -> bool:
        cmd = drain_command(self.address, self.ensure_node_id(), deadline_s, ray_executable=self.ray_executable)
        self.commands.append(cmd)
        log.warning("running: %s", " ".join(cmd))
        if self.dry_run:
            print("DRY RUN:", " ".join(cmd), flush=True)
            return True
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            log.error("ray drain-node timed out after %.0f s", self.timeout_s)
            return False
        if proc.returncode != 0:
            log.error("ray drain-node exited %d: %s", proc.returncode, (proc.stderr or proc.stdout)[-2000:])
            return False
        return True


# ---- single instance -----------------------------------------------------------------------------


def _running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (exited, waiting to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def claim_pidfile(path: Path, *, wait_s: float = 5.0) -> None:
    """Make this process the only watcher: stop the one named in ``path`` (if it is a live spot_watcher), then
    write our pid. Re-running the worker start commands (``ray up`` again) must not leave two watchers."""
    try:
        old = int(path.read_text().strip())
    except (OSError, ValueError):
        old = None
    if old and old != os.getpid():
        try:
            cmdline = Path(f"/proc/{old}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            cmdline = b""
        if b"spot_watcher" in cmdline:
            log.info("stopping the previous watcher (pid %d)", old)
            try:
                os.kill(old, signal.SIGTERM)
            except OSError:
                pass
            end = time.monotonic() + wait_s
            while time.monotonic() < end and _running(old):
                time.sleep(0.05)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{os.getpid()}\n")


# ---- CLI -----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipelines.spot_watcher",
        description="Poll the cloud's spot/preemption notice and drain this Ray node once (ray drain-node).")
    p.add_argument("--provider", choices=("aws", "gcp"), required=True)
    p.add_argument("--interval", type=float, default=5.0, help="seconds between polls (default 5)")
    p.add_argument("--metadata-url", default=DEFAULT_METADATA_URL,
                   help=f"metadata service base URL (default {DEFAULT_METADATA_URL})")
    p.add_argument("--address", default="auto",
                   help="Ray GCS address for ray drain-node, e.g. $RAY_HEAD_IP:6379 (default auto)")
    p.add_argument("--node-id", default=None, help="Ray node id to drain (default: this node's, asked from Ray)")
    p.add_argument("--gcp-notice-seconds", type=float, default=GCP_NOTICE_S,
                   help="GCP notice length; the drain deadline is this minus one interval (default 30)")
    p.add_argument("--max-drain-attempts", type=int, default=3)
    p.add_argument("--ray-executable", default=None, help="the ray CLI (default: next to this python, else PATH)")
    p.add_argument("--pidfile", default=None, help="stop the watcher recorded here first, then record this one")
    p.add_argument("--timeout", type=float, default=2.0, help="metadata request timeout in seconds")
    p.add_argument("--max-polls", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--dry-run", action="store_true", help="print the drain command instead of running it")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.interval <= 0:
        raise SystemExit(f"--interval must be positive, got {args.interval}")
    if args.pidfile:
        claim_pidfile(Path(args.pidfile))
    if args.provider == "aws":
        source: NoticeSource = AwsNoticeSource(args.metadata_url, timeout_s=args.timeout)
    else:
        source = GcpNoticeSource(args.metadata_url, notice_s=args.gcp_notice_seconds,
                                 detection_lag_s=args.interval, timeout_s=args.timeout)
    node_id = args.node_id or ("<this-node-id>" if args.dry_run else None)
    drain = RayDrain(args.address, node_id, ray_executable=args.ray_executable, dry_run=args.dry_run)
    if not node_id:
        # Resolve the node id now (Ray was just started on this node): a notice leaves only 30-120 s.
        for attempt in range(12):
            try:
                drain.ensure_node_id()
                break
            except Exception as e:  # noqa: BLE001 - Ray may still be starting; retried again at drain time
                log.warning("cannot get this node's Ray id yet (attempt %d): %r", attempt + 1, e)
                time.sleep(5.0)
    log.info("watching %s %s every %.1f s", args.provider, args.metadata_url, args.interval)
    watcher = SpotWatcher(source, drain, max_drain_attempts=args.max_drain_attempts)
    return 0 if watcher.run(args.interval, max_polls=args.max_polls) else 1


if __name__ == "__main__":
    sys.exit(main())
