"""Chaos: a run on a simulated multi-node cluster with S3-compatible storage, under a scripted schedule of node kills,
drains, shrinks, grows, a killed worker and a storage outage; then what the restarts cost.

    python benchmarks/chaos.py [--epochs 6] [--outage-s 45] [--no-baseline] [--baseline-seeds 1] [--seed 0]

The cluster (``ray.cluster_utils.Cluster``): a head with no CPU (the driver, the Train controller, the run's actors),
two training nodes (one worker slot, 2 CPUs each) and a data node (2 CPUs). Storage: ``s3://chaos/runs`` on a moto
server on 127.0.0.1, reached through a TCP proxy (``tests/tcp_proxy.py``) that the outage stops and starts again on the
same port, in front of the same server (so the bucket keeps its state). Data: the first 1,024 rows of the shipped
Fashion-MNIST sample, rewritten in row groups of 128 (eight read units per data epoch); the ``demo`` preset with a
global batch of 32 (32 steps per epoch), 1-2 workers, a checkpoint every 10 steps; the k-NN split is the demo's test
split. The schedule follows the run's progress (steps), not the clock:

1. a training node disappears without notice (shrink 2 -> 1);
2. a node joins (grow 1 -> 2: the run checkpoints for the resize first, pipelines/resize.py);
3. a training node is drained for preemption with a 20 s deadline (a just-in-time checkpoint), then goes (shrink);
4. a node joins again (grow);
5. rank 0's worker process is killed (a restart at the same size);
6. the storage endpoint is unreachable for ``--outage-s`` seconds (0: skipped).

It prints the restarts (cause, world sizes, steps lost: the last step trained before the restart minus the step
resumed from), per data epoch the images trained twice and the images skipped among the steps the run kept (the
trained-keys hook, ``IBOT_TRAINED_KEYS_DIR``), the loop stall per checkpoint (background or foreground upload), and
the final k-NN beside an undisturbed run of the same config on the same cluster. Goals: 0 trained twice, 0 skipped,
steps lost <= the steps since the last checkpoint, the run completes, the k-NN within the seed spread.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for p in (REPO, REPO / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

TRAINING_NODE = {"num_cpus": 2, "resources": {"trainer": 1}}


class Run:
    """``pretrain`` in a thread; its local metrics rows (the workers write them under ``$HOME/ibot_runs``)."""

    def __init__(self, cfg, name: str, home: Path) -> None:
        from pipelines.pretrain import pretrain

        self.name, self.metrics = name, home / "ibot_runs" / name / "logs" / "metrics.jsonl"
        self.box: dict = {}

        def target():
            try:
                self.box["result"] = pretrain(cfg, storage="s3://chaos/runs", name=name, knn=True, export=False)
            except BaseException as e:  # noqa: BLE001 - reported
                self.box["error"] = e

        self.thread = threading.Thread(target=target, daemon=True)
        self.t0 = time.time()
        self.thread.start()

    def rows(self) -> list[dict]:
        from pipelines.metrics import read_metrics

        return read_metrics(self.metrics)

    def steps(self) -> list[int]:
        return [r["step"] for r in self.rows() if "loss" in r]

    def starts(self) -> list[dict]:
        return [r for r in self.rows() if r.get("event") == "start"]

    def wait(self, cond, timeout: float = 600.0) -> bool:
        t0 = time.time()
        while time.time() - t0 < timeout:
            if not self.thread.is_alive():
                return False
            if cond():
                return True
            time.sleep(0.5)
        return False


def _node_dead(ray, node_id: str) -> bool:
    return not any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes())


def _await(cond, timeout: float = 120.0) -> None:
    t0 = time.time()
    while not cond() and time.time() - t0 < timeout:
        time.sleep(0.5)


def chaos_schedule(run: Run, cluster, training: list, proxy, outage_s: float, log: list) -> None:
    """The scripted events (module doc), each once the run has made progress since the previous one."""
    import ray
    from ray.core.generated import autoscaler_pb2

    def event(name: str, **kw) -> None:
        log.append({"event": name, "t": time.time() - run.t0, "step": max(run.steps(), default=0), **kw})
        print(f"[chaos] {log[-1]}", flush=True)

    def trained_since(step: int, n: int = 4, world: int | None = None):
        return lambda: any(r["step"] >= step + n and (world is None or r.get("world_size") == world)
                           for r in run.rows() if "loss" in r)

    def group_of(world: int, after: int):  # a worker group of that size started after ``after`` starts
        return lambda: any(s["world_size"] == world for s in run.starts()[after:])

    def shrunk(node) -> bool:  # the node is gone, a group of 1 started and trained 4 steps
        _await(lambda: _node_dead(ray, node.node_id))
        n = len(run.starts())
        return run.wait(group_of(1, n - 1)) and run.wait(trained_since(max(run.steps()), 4, world=1))

    def grown() -> bool:  # a node joins, a group of 2 started and trained 4 steps
        event("add training node (grow)")
        training.append(cluster.add_node(**TRAINING_NODE))
        n = len(run.starts())
        return run.wait(group_of(2, n)) and run.wait(trained_since(max(run.steps()), 4, world=2))

    if not run.wait(lambda: len(run.starts()) >= 1 and trained_since(0, 14, world=2)()):  # past the first checkpoint
        return
    node = training.pop()
    event("kill training node", node=node.node_id[:8])
    cluster.remove_node(node, allow_graceful=False)
    if not shrunk(node):
        return
    if not grown():
        return
    node = training.pop()
    gcs = ray._raylet.GcsClient(address=cluster.address)
    event("drain training node (preemption, 20 s)", node=node.node_id[:8])
    gcs.drain_node(node.node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
                   "spot interruption notice (chaos)", int((time.time() + 20) * 1000))
    run.wait(lambda: any(r.get("event") == "preemption_checkpoint" for r in run.rows()[-50:]), timeout=20)
    time.sleep(3)
    event("drained node goes")
    cluster.remove_node(node, allow_graceful=True)
    if not shrunk(node):
        return
    if not grown():
        return
    pid = run.starts()[-1]["pid"]
    event("kill rank 0's worker process", pid=pid)
    os.kill(pid, signal.SIGKILL)
    n = len(run.starts())
    if not run.wait(lambda: len(run.starts()) > n) or not run.wait(trained_since(max(run.steps()), 4)):
        return
    if outage_s > 0:
        event(f"storage outage ({outage_s:.0f} s)")
        proxy.stop()
        time.sleep(outage_s)
        proxy.start()
        event("storage back")


def restarts(rows: list[dict]) -> list[dict]:
    """Per worker-group start after the first: world sizes, the step resumed from, and the steps lost."""
    starts = [i for i, r in enumerate(rows) if r.get("event") == "start"]
    out = []
    for a, b in zip(starts, starts[1:]):
        last = max([r["step"] for r in rows[a:b] if "loss" in r], default=rows[a]["step"])
        resumed = max(0, rows[b]["resumed_from"])  # -1: no checkpoint yet, from the start
        out.append({"world": f"{rows[a]['world_size']} -> {rows[b]['world_size']}", "last_step": last,
                    "resumed_from": resumed, "steps_lost": last - resumed})
    return out


def per_epoch(keys_dir: Path, good: list[str], position) -> dict[int, dict]:
    """Per data epoch of the steps the run kept: images trained twice, images skipped (in epochs the final stream
    position counts done), images trained."""
    from test_ingest import kept_rows, per_epoch_keys, trained_rows

    from pipelines.ingest import key_id

    raw = trained_rows(keys_dir)
    keys = per_epoch_keys(kept_rows(raw))
    ids = {key_id(k) for k in good}
    out = {}
    for e in sorted(keys):
        c = Counter(keys[e])
        done = e < position.start
        out[e] = {"trained": len(c), "twice": sum(1 for n in c.values() if n > 1),
                  "skipped": len(ids - set(c)) if done else None, "done": done}
    out["retrained_in_lost_steps"] = sum(len(r["key_id"]) for r in raw) - sum(len(r["key_id"]) for r in kept_rows(raw))
    return out


def final_position(fs, run: str):
    from pipelines.stream_position import STREAM_POSITION_FILE, StreamPosition

    with fs.open_input_stream(f"chaos/runs/{run}/checkpoint_manager_snapshot.json") as f:
        name = json.loads(f.read())["latest_checkpoint_result"]["checkpoint_dir_name"]
    with fs.open_input_stream(f"chaos/runs/{run}/{name}/{STREAM_POSITION_FILE}") as f:
        return StreamPosition.from_json(f.read().decode())


def report(run: Run, name: str, keys_dir: Path, good: list[str], fs) -> dict:
    rows = run.rows()
    res, err = run.box.get("result"), run.box.get("error")
    print(f"\n== {name}: {'completed' if res else 'FAILED: ' + repr(err)[:400]} in {time.time() - run.t0:.0f} s, "
          f"{max(run.steps(), default=0)} steps")
    rs = restarts(rows)
    print(f"restarts: {len(rs)}")
    for r in rs:
        print(f"  world {r['world']}: last step trained {r['last_step']}, resumed from {r['resumed_from']}, "
              f"steps lost {r['steps_lost']}")
    stalls = [r for r in rows if r.get("event") == "checkpoint_stall"]
    if stalls:
        print("loop stall per checkpoint, step: seconds (* foreground upload): " + ", ".join(
            f"{r['step']}{'' if r['background'] else '*'}: {r['checkpoint_stall_s']:.2f}" for r in stalls))
    out = {"completed": res is not None, "restarts": rs, "stalls": stalls, "error": repr(err) if err else None}
    try:
        position = final_position(fs, run.name)
    except (OSError, KeyError, TypeError) as e:
        print(f"no final stream position: {e}")
        return out
    epochs = per_epoch(keys_dir, good, position)
    lost = epochs.pop("retrained_in_lost_steps")
    print("per data epoch (kept steps): " + "; ".join(
        f"{e}: {v['trained']} trained, {v['twice']} twice, "
        + (f"{v['skipped']} skipped" if v["done"] else "open at the end") for e, v in epochs.items()))
    print(f"images retrained because their steps were lost: {lost}")
    out.update(epochs={str(k): v for k, v in epochs.items()}, retrained=lost)
    if res is not None and res.knn_after:
        out["knn_top1"] = res.knn_after["knn_top1"]
        print(f"final k-NN top-1 {res.knn_after['knn_top1']:.2f} % "
              f"(before training {res.knn_before['knn_top1']:.2f} %)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--outage-s", type=float, default=45.0)
    ap.add_argument("--no-baseline", action="store_true", help="skip the undisturbed run")
    ap.add_argument("--baseline-seeds", type=int, default=1,
                    help="undisturbed runs with seeds seed, seed+1, ...: the seed spread of the k-NN")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()

    import boto3
    import pyarrow.parquet as pq
    from moto.server import ThreadedMotoServer
    from tcp_proxy import TCPProxy

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    work = Path(tempfile.mkdtemp(prefix="ibot_chaos_"))
    table = pq.read_table(REPO / "ibot_ray" / "demo_data" / "train.parquet").slice(0, 1024)
    pq.write_table(table, work / "train.parquet", row_group_size=128)
    good = [f"{work / 'train.parquet'}#{i}" for i in range(1024)]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    proxy = TCPProxy(port).start()
    boto3.client("s3", endpoint_url=f"http://{host}:{port}", aws_access_key_id="testing",
                 aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket="chaos")
    (work / "home").mkdir()
    # every node of the cluster (started below, from this process) inherits these
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}", "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true", "HOME": str(work / "home"),
                       "RAY_AUTH_MODE": "disabled", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1",
                       "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1"})
    import pyarrow.fs as pafs
    import ray
    from ray.cluster_utils import Cluster

    from ibot_ray.config import load_config
    from pipelines.train_worker import TRAINED_KEYS_ENV

    direct = pafs.S3FileSystem(endpoint_override=f"http://{host}:{port}", access_key="testing", secret_key="testing",
                               region="us-east-1")
    head = {"num_cpus": 0, "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 5}}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    training = [cluster.add_node(**TRAINING_NODE) for _ in range(2)]
    cluster.add_node(num_cpus=2, resources={"data": 1})
    ray.init(address=cluster.address, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False

    def config(seed: int):
        return load_config("demo", [
            f"data.source={work / 'train.parquet'}", "data.eval_source=demo", "data.eval_max_images=1000",
            f"optim.epochs={args.epochs}", "optim.batch_size=32", "train.num_workers=[1,2]",
            "train.worker_resource=trainer", "train.checkpoint_every_steps=10", "train.log_every_steps=1",
            "train.keep_checkpoints=3", "train.knn_every_epochs=0", "train.elastic_resize_interval_s=5",
            "train.worker_start_timeout_s=30", "data.actors=[1,1]", f"train.seed={seed}", f"data.seed={seed}"])

    figures = {}
    try:
        calm = [] if args.no_baseline else [(f"calm_seed{args.seed + i}", False, args.seed + i)
                                             for i in range(args.baseline_seeds)]
        for name, disturbed, seed in [("chaos", True, args.seed), *calm]:
            keys = work / f"keys_{name}"
            os.environ[TRAINED_KEYS_ENV] = str(keys)
            _await(lambda: ray.cluster_resources().get("trainer", 0) == 2)
            run = Run(config(seed), name, work / "home")
            events: list = []
            if disturbed:
                chaos_schedule(run, cluster, training, proxy, args.outage_s, events)
                if not proxy.running:
                    proxy.start()
            run.thread.join()
            figures[name] = report(run, name, keys, good, direct) | {"events": events}
            while len(training) < 2:  # the baseline starts on the full layout
                training.append(cluster.add_node(**TRAINING_NODE))
    finally:
        ray.shutdown()
        cluster.shutdown()
        proxy.stop()
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    calm_knn = {k: v["knn_top1"] for k, v in figures.items() if k.startswith("calm") and "knn_top1" in v}
    if calm_knn:
        print(f"\nfinal k-NN top-1: chaos {figures.get('chaos', {}).get('knn_top1', float('nan')):.2f} % vs "
              "undisturbed " + ", ".join(f"{k} {v:.2f} %" for k, v in calm_knn.items()))
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=1, default=str))


if __name__ == "__main__":
    main()
