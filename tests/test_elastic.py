"""Elastic training on a simulated 2-node cluster (``ray.cluster_utils.Cluster``).

Removing a training node shrinks the run to 1 worker and training continues; adding one grows it back to 2; the global
batch is unchanged throughout and the final step count is exact. The grow restarts from a checkpoint taken for the
resize (no step lost, pipelines/resize.py), and across both restarts every image is trained exactly once per data
epoch in the steps the run kept (pipelines/stream_position.py). The scenario runs in a subprocess because it needs
its own multi-node Ray instance (the test session shares a single-node one).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def scenario(out_dir: str) -> dict:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "10"
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    import ray
    from ray._private.state import actors as actor_table
    from ray.cluster_utils import Cluster

    sys.path.insert(0, str(HERE))
    from conftest import InThread, await_layout, wait_for_a_committed_checkpoint, write_images
    from test_pretrain import TINY

    from ibot_ray.config import load_config
    from pipelines.metrics import read_metrics
    from pipelines.pretrain import pretrain
    from pipelines.train_worker import TRAINED_KEYS_ENV

    data = Path(out_dir) / "images"
    images = write_images(data, 96, kinds=("jpeg", "png"), size=(40, 40))
    os.environ[TRAINED_KEYS_ENV] = str(Path(out_dir) / "keys")
    # a dead node is declared dead after ~5 s of missed health checks (the default takes ~15 s), as in test_multinode.py
    head = {"num_cpus": 3, "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 5}}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    nodes = [cluster.add_node(num_cpus=1, resources={"trainer": 1}) for _ in range(2)]
    ray.init(address=cluster.address)
    ray.data.DataContext.get_current().enable_progress_bars = False
    cfg = load_config("demo", TINY + [
        f"data.source={data}", "optim.epochs=8", "train.num_workers=[1,2]", "train.worker_resource=trainer",
        "train.elastic_resize_interval_s=5", "train.worker_start_timeout_s=10", "train.checkpoint_every_steps=2",
        "train.checkpoint_min_interval_s=0",
    ])  # 96 images / 16 = 6 steps per epoch, 48 steps: time to grow back after the node add
    # worker_start_timeout_s: how long a worker group's placement group may wait. Until Ray's AutoscalingCoordinator
    # re-reads the nodes (every 20 s; the test has it re-read them once the GCS marks the node dead), it still counts
    # the lost node, and a group of 2 that the controller tries then can never be placed: each such try costs the
    # whole timeout. Placing a group the cluster can hold takes under a second here.
    storage = Path(out_dir) / "runs"
    metrics = storage / "elastic" / "logs" / "metrics.jsonl"

    def wait(cond, timeout=300):
        return run.wait(metrics, cond, timeout=timeout, poll=0.5)

    def starts(rows):
        return [r for r in rows if r.get("event") == "start"]

    events = []
    t_start = time.time()
    run = InThread(lambda: pretrain(cfg, storage=str(storage), name="elastic", knn=False, export=False))
    wait(lambda rows: any(r.get("world_size") == 2 and r.get("step", 0) >= 4 and "loss" in r for r in rows))
    # where the run's ingest monitor lives (GCS actor table: ray.util.state needs a dashboard this cluster lacks)
    monitor_node = actor_table(ray.get_actor("ibot_ingest:elastic")._actor_id.hex())["Address"]["NodeID"]
    wait_for_a_committed_checkpoint(storage / "elastic")  # the loss must find one to resume from
    t_remove = time.time()
    cluster.remove_node(nodes[1])  # a training node disappears without notice
    events.append(("removed", t_remove - t_start))
    await_layout(lambda: not any(n["NodeID"] == nodes[1].node_id and n["Alive"] for n in ray.nodes()), "node dead")
    rows = wait(lambda rows: any(s["world_size"] == 1 for s in starts(rows)))
    t_shrunk = time.time()
    shrunk_at = [s for s in starts(rows) if s["world_size"] == 1][0]["step"]
    rows = wait(lambda rows: any(r.get("world_size") == 1 and "loss" in r and r["step"] >= shrunk_at + 1
                                 for r in rows))
    cluster.add_node(num_cpus=1, resources={"trainer": 1})  # a replacement node joins
    events.append(("added", time.time() - t_start))
    # the run must see the node before its last steps: the elastic policy reads the AutoscalingCoordinator, which
    # re-reads the nodes only every 20 s, longer than the 1-worker run has left (CI once finished before growing)
    await_layout(lambda: ray.cluster_resources().get("trainer", 0) == 2, "replacement node counted")
    wait(lambda rows: sum(1 for s in starts(rows) if s["world_size"] == 2) >= 2)
    run.join(timeout=400)
    rows = read_metrics(metrics)
    out = {
        "result_steps": run.box["result"].steps if "result" in run.box else None,
        "error": repr(run.error) if run.error is not None else None,
        "starts": starts(rows),
        "steps": [r["step"] for r in rows if "loss" in r],
        "world_sizes": [r["world_size"] for r in rows if "loss" in r],
        "total_steps": 48,
        "node_loss_to_resumed_s": t_shrunk - t_remove,
        "events": events,
        "monitor_node": monitor_node,
        "driver_node": ray.get_runtime_context().get_node_id(),
        "good": images["good"],
        # the last step each worker group trained (its metrics rows come before the next group's start)
        "group_last": [max([x["step"] for x in rows[rows.index(a):rows.index(b) if b else None] if "loss" in x],
                           default=-1) for a, b in zip(starts(rows), [*starts(rows)[1:], None])],
        "run_path": str(storage / "elastic"),
    }
    ray.shutdown()
    cluster.shutdown()
    return out


@pytest.mark.slow
def test_node_loss_shrinks_and_node_add_grows_the_run(tmp_path):
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    p = subprocess.run([sys.executable, __file__, str(tmp_path)], capture_output=True, text=True, timeout=1100,
                       env=env, cwd=str(HERE.parent))
    result_file = tmp_path / "elastic_result.json"
    assert result_file.exists(), p.stdout[-3000:] + p.stderr[-5000:]
    r = json.loads(result_file.read_text())
    assert r["error"] is None, r["error"]
    # the run's ingest monitor (epoch clock, bad-input counts) lives on the driver's node, never on a worker node
    assert r["monitor_node"] == r["driver_node"], r
    assert r["result_steps"] == r["total_steps"] == 48
    sizes = [s["world_size"] for s in r["starts"]]
    assert sizes[0] == 2 and 1 in sizes and sizes[-1] == 2, sizes
    for s in r["starts"]:  # the global batch stays 16 whatever the world size
        assert sum(s["per_rank_share"]) == 16
        assert s["per_rank_read"] == 16 // s["world_size"]
    assert 1 in r["world_sizes"] and r["world_sizes"][-1] == 2
    # every restart resumes from a checkpoint, never from scratch, and the run ends exactly at the planned step
    assert all(s["resumed_from"] > 0 for s in r["starts"][1:])
    assert r["steps"][-1] == 48
    # the grow (1 -> 2 workers) restarts from the checkpoint the 1-worker group wrote for it: no step is lost
    grow = next(i for i, s in enumerate(r["starts"]) if i > 0 and s["world_size"] == 2)
    assert r["starts"][grow - 1]["world_size"] == 1
    assert r["starts"][grow]["resumed_from"] == r["group_last"][grow - 1], (r["starts"], r["group_last"])
    # the node loss lost at most the steps since the last checkpoint (every 2 steps, uploaded in the background)
    shrink_lost = r["group_last"][0] - r["starts"][1]["resumed_from"]
    assert 0 <= shrink_lost <= 4, (shrink_lost, r["starts"], r["group_last"])
    # every image once per data epoch in the steps the run kept, whatever the restarts and world sizes
    from test_ingest import check_exactly_once, trained_rows

    epochs = check_exactly_once(trained_rows(tmp_path / "keys"), r["good"], Path(r["run_path"]))
    assert len(epochs["done"]) >= 6, epochs  # 48 steps x 16 = 8 epochs of 96
    print(f"node loss -> training resumed with 1 worker: {r['node_loss_to_resumed_s']:.1f} s; steps lost: shrink "
          f"{shrink_lost}, grow 0; data epochs exactly once: {epochs}")


if __name__ == "__main__":
    out_dir = sys.argv[1]
    res = scenario(out_dir)
    (Path(out_dir) / "elastic_result.json").write_text(json.dumps(res, default=str))
