"""Tests of pipelines/spot_watcher.py against a fake instance-metadata HTTP server on 127.0.0.1.

The fake server enforces what the real services require (an IMDSv2 token from PUT /latest/api/token with a TTL
header, revocable; the ``Metadata-Flavor: Google`` header on GCP) and can be scripted to fail (5xx, a reply slower
than any client timeout, a dropped connection). Drain actions are plain recording functions. One test drains a
real node of a local two-node Ray cluster with the real ``ray drain-node`` CLI (in a subprocess, ~10 s).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pipelines import spot_watcher as sw

REPO = Path(__file__).resolve().parents[1]
T0 = datetime(2026, 11, 22, 9, 58, 0, tzinfo=timezone.utc)  # a fixed "now" for the parsing tests


def iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


class FakeClock:
    """A settable clock (callable), for token ages and deadlines."""

    def __init__(self, t: float = 0.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class FakeMetadata:
    """A minimal EC2 IMDSv2 + GCE metadata server. ``script`` holds responses for the notice paths, consumed in
    order; when empty, ``default_aws`` / ``default_gcp`` answer. At most ``max_requests`` are served (then 503)."""

    def __init__(self, max_requests: int = 200):
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str, dict]] = []
        self.tokens: list[str] = []  # every token issued, in order
        self.valid: set[str] = set()
        self.script: list = []
        self.release = threading.Event()  # ends every ("hang",) reply: set by close()
        self.default_aws = (404, "")
        self.default_gcp = (200, "FALSE")
        self.max_requests = max_requests
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def _reply(self, status: int, body: str) -> None:
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _scripted(self, default):
                with outer.lock:
                    item = outer.script.pop(0) if outer.script else default
                if callable(item):  # computed at request time, e.g. a notice relative to "now"
                    item = item()
                if item[0] == "hang":  # no reply until the server closes: slower than any client timeout
                    outer.release.wait(120)
                    self.close_connection = True
                    return None
                if item[0] == "drop":
                    self.close_connection = True
                    return None
                return item

            def _handle(self, method: str) -> None:
                with outer.lock:
                    outer.requests.append((method, self.path, {k.lower(): v for k, v in self.headers.items()}))
                    over = len(outer.requests) > outer.max_requests
                if over:
                    return self._reply(503, "request budget exhausted")
                if method == "PUT" and self.path == sw.AWS_TOKEN_PATH:
                    ttl = self.headers.get(sw.AWS_TTL_HEADER, "")
                    if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
                        return self._reply(400, "bad ttl")
                    with outer.lock:
                        token = f"token-{len(outer.tokens)}"
                        outer.tokens.append(token)
                        outer.valid.add(token)
                    return self._reply(200, token)
                if method == "GET" and self.path == sw.AWS_ACTION_PATH:
                    if self.headers.get(sw.AWS_TOKEN_HEADER) not in outer.valid:
                        return self._reply(401, "")
                    item = self._scripted(outer.default_aws)
                    return None if item is None else self._reply(*item)
                if method == "GET" and self.path == sw.GCP_PREEMPTED_PATH:
                    if self.headers.get(sw.GCP_FLAVOR_HEADER) != "Google":
                        return self._reply(403, "missing Metadata-Flavor")
                    item = self._scripted(outer.default_gcp)
                    return None if item is None else self._reply(*item)
                return self._reply(404, "no such path")

            def do_GET(self):
                self._handle("GET")

            def do_PUT(self):
                self._handle("PUT")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def count(self, method: str, path: str) -> int:
        with self.lock:
            return sum(1 for m, p, _ in self.requests if m == method and p == path)

    def last(self, method: str, path: str) -> dict:
        """Headers (lower-case names: HTTP header names are case-insensitive) of the latest such request."""
        with self.lock:
            return [h for m, p, h in self.requests if m == method and p == path][-1]

    def revoke_tokens(self) -> None:
        with self.lock:
            self.valid.clear()


@pytest.fixture
def meta():
    server = FakeMetadata()
    yield server
    server.close()


class Recorder:
    """A drain action that records its calls and answers from a list of outcomes (True, False or an exception)."""

    def __init__(self, outcomes=(True,)):
        self.outcomes = list(outcomes)
        self.calls: list[tuple[int, sw.Notice]] = []

    def __call__(self, deadline_s: int, notice: sw.Notice) -> bool:
        self.calls.append((deadline_s, notice))
        out = self.outcomes[min(len(self.calls), len(self.outcomes)) - 1]
        if isinstance(out, Exception):
            raise out
        return out


# ---- parsing -------------------------------------------------------------------------------------


def test_aws_notice_deadline_is_whole_seconds_until_the_notice_time():
    now = T0.timestamp()
    body = json.dumps({"action": "terminate", "time": iso(T0 + timedelta(seconds=97))})
    notice = sw.parse_aws_instance_action(body, now)
    assert notice.action == "terminate"
    assert notice.terminate_at == (T0 + timedelta(seconds=97)).timestamp()
    assert notice.seconds_left(now) == 97
    assert notice.seconds_left(now + 10.4) == 86  # floor(86.6): never promise more time than there is
    assert notice.seconds_left(now + 97) == 0
    assert notice.seconds_left(now + 500) == 0  # past the deadline: 0, not negative (ray drain-node rejects < 0)


def test_aws_notice_time_formats_and_fallbacks():
    now = T0.timestamp()
    stop = json.dumps({"action": "stop", "time": "2026-11-22T09:58:30.500+00:00"})
    n = sw.parse_aws_instance_action(stop, now)
    assert (n.action, n.seconds_left(now)) == ("stop", 30)
    naive = json.dumps({"action": "hibernate", "time": "2026-11-22T10:00:00"})  # no zone: UTC
    assert sw.parse_aws_instance_action(naive, now).seconds_left(now) == 120
    no_time = sw.parse_aws_instance_action('{"action": "terminate"}', now)
    assert no_time.terminate_at == now + sw.AWS_NOTICE_S
    bad_time = sw.parse_aws_instance_action('{"action": "terminate", "time": "soon"}', now, default_notice_s=42)
    assert bad_time.seconds_left(now) == 42
    for junk in ("<html>oops</html>", "[1, 2]", ""):
        with pytest.raises(sw.MetadataError):
            sw.parse_aws_instance_action(junk, now)


def test_gcp_preempted_values():
    assert sw.parse_gcp_preempted("FALSE", 1000.0) is None
    assert sw.parse_gcp_preempted("false\n", 1000.0) is None
    n = sw.parse_gcp_preempted("TRUE\n", 1000.0, notice_s=25.0)
    assert (n.action, n.terminate_at, n.seconds_left(1000.0)) == ("preempt", 1025.0, 25)
    assert sw.parse_gcp_preempted("TRUE", 1000.0, notice_s=-3).seconds_left(1000.0) == 0
    with pytest.raises(sw.MetadataError):
        sw.parse_gcp_preempted("maybe", 1000.0)


# ---- AWS IMDSv2 against the fake server -----------------------------------------------------------


def test_aws_token_is_fetched_once_and_sent_with_every_read(meta):
    src = sw.AwsNoticeSource(meta.url, timeout_s=2.0)
    assert [src.check() for _ in range(3)] == [None, None, None]
    assert meta.count("PUT", sw.AWS_TOKEN_PATH) == 1
    assert meta.last("PUT", sw.AWS_TOKEN_PATH)[sw.AWS_TTL_HEADER.lower()] == "21600"
    assert meta.count("GET", sw.AWS_ACTION_PATH) == 3
    assert meta.last("GET", sw.AWS_ACTION_PATH)[sw.AWS_TOKEN_HEADER.lower()] == meta.tokens[0]
    # the server really refuses a read without a token (so the header above is what made the reads pass)
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.build_opener(urllib.request.ProxyHandler({})).open(meta.url + sw.AWS_ACTION_PATH, timeout=2)
    assert e.value.code == 401


def test_aws_token_refreshed_before_it_expires(meta):
    mono = FakeClock(0.0)
    src = sw.AwsNoticeSource(meta.url, token_ttl_s=100, refresh_margin_s=10, monotonic=mono)
    src.check()
    mono.t = 89.9  # still inside ttl - margin
    src.check()
    assert meta.count("PUT", sw.AWS_TOKEN_PATH) == 1
    mono.t = 90.0  # ttl - margin reached: new token before the old one can expire mid-request
    src.check()
    assert meta.count("PUT", sw.AWS_TOKEN_PATH) == 2
    assert meta.last("PUT", sw.AWS_TOKEN_PATH)[sw.AWS_TTL_HEADER.lower()] == "100"
    assert meta.last("GET", sw.AWS_ACTION_PATH)[sw.AWS_TOKEN_HEADER.lower()] == meta.tokens[1]


def test_aws_token_refreshed_when_rejected(meta):
    src = sw.AwsNoticeSource(meta.url)
    assert src.check() is None
    meta.revoke_tokens()  # e.g. IMDS restarted: the cached token now gets 401
    assert src.check() is None
    assert meta.count("PUT", sw.AWS_TOKEN_PATH) == 2
    assert meta.count("GET", sw.AWS_ACTION_PATH) == 3  # ok, 401, retry with the new token
    assert meta.last("GET", sw.AWS_ACTION_PATH)[sw.AWS_TOKEN_HEADER.lower()] == meta.tokens[1]


def test_aws_notice_read_from_server(meta):
    clock = FakeClock(T0.timestamp())
    meta.default_aws = (200, json.dumps({"action": "terminate", "time": iso(T0 + timedelta(seconds=118))}))
    notice = sw.AwsNoticeSource(meta.url, clock=clock).check()
    assert notice is not None and notice.seconds_left(clock()) == 118


def test_unreachable_metadata_is_a_metadata_error():
    import socket

    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(sw.MetadataError):
        sw.AwsNoticeSource(f"http://127.0.0.1:{port}", timeout_s=1.0).check()


# ---- the watcher ---------------------------------------------------------------------------------


def test_transient_errors_are_tolerated_and_logged(meta, caplog):
    clock = FakeClock(T0.timestamp())
    notice_body = json.dumps({"action": "terminate", "time": iso(T0 + timedelta(seconds=100))})
    meta.script = [(500, "boom"), (503, "busy"), ("hang",), ("drop",), (404, ""), (200, notice_body)]
    drain = Recorder()
    # the default request timeout (2 s): a reply that never comes is an error after it, the others come at once
    watcher = sw.SpotWatcher(sw.AwsNoticeSource(meta.url, clock=clock), drain, clock=clock)
    with caplog.at_level(logging.INFO, logger="spot_watcher"):
        states = [watcher.poll_once() for _ in range(7)]
    assert states == ["error", "error", "error", "error", "clear", "drained", "done"]
    assert watcher.errors == 4
    failed = [r for r in caplog.records if "metadata read failed" in r.getMessage()]
    assert [r.levelno for r in failed] == [logging.WARNING] * 3  # 1st, 2nd and 4th in a row; the 3rd is quiet
    assert any("readable again after 4" in r.getMessage() for r in caplog.records)
    assert [d for d, _ in drain.calls] == [100]
    assert meta.count("GET", sw.AWS_ACTION_PATH) == 6  # "done" makes no request


def test_drains_once_and_stops_polling(meta):
    clock = FakeClock(T0.timestamp())
    meta.default_aws = (200, json.dumps({"action": "terminate", "time": iso(T0 + timedelta(seconds=120))}))
    drain = Recorder()
    watcher = sw.SpotWatcher(sw.AwsNoticeSource(meta.url, clock=clock), drain, clock=clock)
    sleeps: list[float] = []
    assert watcher.run(5.0, max_polls=10, sleep=sleeps.append) is True
    assert len(drain.calls) == 1 and drain.calls[0][0] == 120
    assert watcher.polls == 1 and sleeps == []
    before = len(meta.requests)
    assert [watcher.poll_once() for _ in range(5)] == ["done"] * 5
    assert len(meta.requests) == before and len(drain.calls) == 1


def test_polls_at_the_interval_until_a_notice(meta):
    clock = FakeClock(T0.timestamp())
    body = json.dumps({"action": "terminate", "time": iso(T0 + timedelta(seconds=120))})
    meta.script = [(404, "")] * 3 + [(200, body)]
    drain = Recorder()
    sleeps: list[float] = []

    def sleep(s: float) -> None:  # advance the fake clock like a real sleep would
        sleeps.append(s)
        clock.t += s

    watcher = sw.SpotWatcher(sw.AwsNoticeSource(meta.url, clock=clock), drain, clock=clock)
    assert watcher.run(5.0, max_polls=50, sleep=sleep) is True
    assert sleeps == [5.0, 5.0, 5.0] and watcher.polls == 4
    assert drain.calls[0][0] == 120 - 15  # the deadline is measured when the drain runs


def test_failed_drain_is_retried_with_a_fresh_deadline(meta):
    clock = FakeClock(T0.timestamp())
    meta.default_aws = (200, json.dumps({"action": "terminate", "time": iso(T0 + timedelta(seconds=120))}))
    drain = Recorder([False, RuntimeError("gcs unreachable"), True])
    watcher = sw.SpotWatcher(sw.AwsNoticeSource(meta.url, clock=clock), drain, max_drain_attempts=3, clock=clock)
    states = []
    for _ in range(4):
        states.append(watcher.poll_once())
        clock.t += 5
    assert states == ["drain_failed", "drain_failed", "drained", "done"]
    assert [d for d, _ in drain.calls] == [120, 115, 110]


def test_gives_up_after_max_drain_attempts(meta):
    meta.default_aws = (200, json.dumps({"action": "terminate", "time": iso(T0 + timedelta(seconds=120))}))
    drain = Recorder([False])
    watcher = sw.SpotWatcher(sw.AwsNoticeSource(meta.url), drain, max_drain_attempts=2)
    assert watcher.run(0.0, max_polls=20, sleep=lambda s: None) is False
    assert len(drain.calls) == 2 and watcher.polls == 2
    assert watcher.poll_once() == "gave_up" and len(drain.calls) == 2


def test_gcp_watcher_drains_with_notice_minus_interval(meta):
    clock = FakeClock(1_000_000.0)
    drain = Recorder()
    src = sw.GcpNoticeSource(meta.url, notice_s=30.0, detection_lag_s=5.0, clock=clock)
    watcher = sw.SpotWatcher(src, drain, clock=clock)
    assert watcher.poll_once() == "clear"
    meta.default_gcp = (200, "TRUE")
    assert watcher.poll_once() == "drained"
    assert [d for d, _ in drain.calls] == [25]
    assert meta.last("GET", sw.GCP_PREEMPTED_PATH)[sw.GCP_FLAVOR_HEADER.lower()] == "Google"
    meta.script = [(200, "garbage")]
    assert sw.SpotWatcher(src, Recorder()).poll_once() == "error"
    with pytest.raises(urllib.error.HTTPError) as e:  # the fake insists on the header, like GCE
        urllib.request.build_opener(urllib.request.ProxyHandler({})).open(meta.url + sw.GCP_PREEMPTED_PATH)
    assert e.value.code == 403


# ---- the ray drain-node command -------------------------------------------------------------------


def test_drain_command_parses_with_rays_own_cli():
    import click
    from ray.scripts.scripts import cli, drain_node

    node_id = "ab" * 28
    argv = sw.drain_command("10.0.0.1:6379", node_id, 97, ray_executable="/x/ray")
    assert argv[:2] == ["/x/ray", "drain-node"]
    assert cli.get_command(click.Context(cli), "drain-node") is drain_node  # the hidden command exists by that name
    ctx = drain_node.make_context("drain-node", argv[2:])
    assert ctx.params == {"address": "10.0.0.1:6379", "node_id": node_id, "reason": "DRAIN_NODE_REASON_PREEMPTION",
                          "reason_message": "spot termination notice", "deadline_remaining_seconds": 97}
    bad = [a if a != "DRAIN_NODE_REASON_PREEMPTION" else "PREEMPTED" for a in argv[2:]]
    with pytest.raises(click.BadParameter):  # the parse above is a real check: a wrong reason is rejected
        drain_node.make_context("drain-node", bad)
    with pytest.raises(ValueError):
        sw.drain_command("a:1", node_id, -1)


def test_cli_dry_run_end_to_end(meta):
    notice_at = datetime.now(timezone.utc) + timedelta(seconds=100)
    meta.script = [(404, ""), (404, ""), (200, json.dumps({"action": "terminate", "time": iso(notice_at)}))]
    cmd = [sys.executable, "-m", "pipelines.spot_watcher", "--provider", "aws", "--metadata-url", meta.url,
           "--interval", "0.05", "--address", "10.1.2.3:6379", "--node-id", "cd" * 28, "--dry-run", "--max-polls", "40"]
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("DRY RUN:"))
    argv = line.split()[2:]
    assert argv[argv.index("--node-id") + 1] == "cd" * 28
    assert argv[argv.index("--address") + 1] == "10.1.2.3:6379"
    assert 90 <= int(argv[argv.index("--deadline-remaining-seconds") + 1]) <= 100
    assert meta.count("GET", sw.AWS_ACTION_PATH) == 3


def test_cli_rejects_unknown_provider():
    with pytest.raises(SystemExit):
        sw.build_parser().parse_args(["--provider", "azure"])


def test_pidfile_replaces_only_a_previous_watcher(tmp_path):
    pidfile = tmp_path / "spot_watcher.pid"
    old = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "spot_watcher"])
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        pidfile.write_text(f"{old.pid}\n")
        sw.claim_pidfile(pidfile)
        assert old.wait(timeout=10) == -signal.SIGTERM
        assert pidfile.read_text().strip() == str(os.getpid())
        pidfile.write_text(f"{other.pid}\n")  # a recycled pid that is not a watcher is left alone
        sw.claim_pidfile(pidfile, wait_s=0.2)
        assert other.poll() is None
    finally:
        for p in (old, other):
            if p.poll() is None:
                p.kill()
                p.wait()


# ---- real Ray ------------------------------------------------------------------------------------

_RAY_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray
    from ray.cluster_utils import Cluster
    from pipelines import spot_watcher as sw

    url = sys.argv[1]
    t_start = time.time()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    worker = c.add_node(num_cpus=1, resources={"spot": 1})
    c.wait_for_nodes()
    out = {"worker": worker.node_id}
    try:
        local_id = sw.resolve_local_node_id(c.address)
        ray.init(address=c.address, logging_level="warning")

        @ray.remote(num_cpus=0, resources={"spot": 1})
        class Busy:  # keeps the worker node busy, so a drain leaves it DRAINING instead of removing it at once
            def node(self):
                return ray.get_runtime_context().get_node_id()

        busy = Busy.remote()
        out["actor_on_worker"] = ray.get(busy.node.remote()) == worker.node_id
        out["alive"] = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        out["local_id"] = local_id
        drain = sw.RayDrain(c.address, worker.node_id)
        watcher = sw.SpotWatcher(sw.AwsNoticeSource(url), drain)
        t = time.time()
        out["setup_s"] = t - t_start
        out["ok"] = watcher.run(0.05, max_polls=40)
        out["window"] = [t, time.time()]  # the notice was served, and the drain ran, inside this window
        out["drain_calls"] = len(drain.commands)
        out["deadline_arg"] = int(drain.commands[0][-1]) if drain.commands else None
        out["draining"] = {k: v / 1000.0 for k, v in ray._private.state.state.get_draining_nodes().items()}
        out["drain_s"] = time.time() - t
    finally:
        ray.shutdown()
        c.shutdown()
    out["total_s"] = time.time() - t_start
    print("RESULT " + json.dumps(out))
    """
)


def test_real_ray_drain_node_marks_the_worker_draining(meta, tmp_path):

    def notice():  # 90 s after the request, whenever the slow cluster start lets the watcher ask
        return 200, json.dumps({"action": "terminate", "time": iso(datetime.now(timezone.utc) + timedelta(seconds=90))})

    meta.script = [(404, ""), notice]
    meta.default_aws = notice
    script = tmp_path / "drain_probe.py"
    script.write_text(_RAY_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, str(script), meta.url], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[7:])
    assert out["ok"] is True and out["drain_calls"] == 1 and out["actor_on_worker"]
    assert out["local_id"] in out["alive"]  # resolve_local_node_id returns a live node of this cluster
    assert list(out["draining"]) == [out["worker"]]  # the worker, and only the worker, is draining
    print({k: out[k] for k in ("setup_s", "drain_s", "total_s")})
    # The notice says "terminate at request time + 90 s" in whole seconds, and the watcher passes the whole seconds
    # left when it drains: at most 90, and less by the time the window took.
    start, end = out["window"]
    assert math.floor(89 - (end - start)) <= out["deadline_arg"] <= 90
    # `ray drain-node` stores its own clock (in ms) + the deadline it was given, and it ran inside the window
    assert start - 0.001 <= out["draining"][out["worker"]] - out["deadline_arg"] <= end
