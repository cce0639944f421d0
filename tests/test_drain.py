"""A training node drained for preemption on a simulated 3-node cluster (``ray.cluster_utils.Cluster``: a head for
the driver and the data actors, two training nodes).

While the run trains on both training nodes, one is drained through the GCS DrainNode RPC with reason PREEMPTION and
a deadline, exactly what ``ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION --deadline-remaining-seconds N`` (and
the spot watcher of ``cluster.yaml``) sends. Ray Train's preemption watcher sees the drain, the workers read it from
``ray.train.get_preemption_info()`` at every log step for the rest of the drain window, and they must write exactly
one just-in-time checkpoint for it. Then the node goes (as the spot reclaim would) and the run restarts on the node
left, from that checkpoint, and completes. The scenario runs in a subprocess because it needs its own multi-node Ray
instance (the test session shares a single-node one) and Ray Train's preemption watcher, which the session turns off.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEADLINE_S = 40  # the drain notice's deadline, from the drain


def scenario(out_dir: str) -> dict:
    sys.path.insert(0, str(HERE))
    from conftest import InThread, write_images  # sets the session's Ray environment at import: override it below
    from test_pretrain import TINY

    os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "1"  # the session turns it off
    os.environ["RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S"] = "1"
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "20"
    import ray
    from ray.cluster_utils import Cluster
    from ray.core.generated import autoscaler_pb2

    from ibot_ray.config import load_config
    from pipelines.metrics import read_metrics
    from pipelines.pretrain import pretrain

    data = Path(out_dir) / "images"
    write_images(data, 192, kinds=("jpeg", "png"), size=(40, 40))
    # a dead node is declared dead after ~2 s of missed health checks (the default takes ~15 s)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 3, "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 4}})
    nodes = [cluster.add_node(num_cpus=1, resources={"trainer": 1}) for _ in range(2)]
    ray.init(address=cluster.address)
    cfg = load_config("demo", TINY + [
        f"data.source={data}", "optim.epochs=1", "train.num_workers=[1,2]", "train.worker_resource=trainer",
        "train.worker_start_timeout_s=20", "train.checkpoint_every_steps=100", "train.keep_checkpoints=10",
        "train.log_every_steps=1",
    ])  # 192 images / 16 = 12 steps (one epoch); no periodic checkpoint before the last step
    storage = Path(out_dir) / "runs"
    metrics = storage / "drain" / "logs" / "metrics.jsonl"

    def wait(cond, timeout=300):
        return run.wait(metrics, cond, timeout=timeout, poll=0.2)

    def step_rows(rows):
        return [r for r in rows if "loss" in r]

    run = InThread(lambda: pretrain(cfg, storage=str(storage), name="drain", knn=False, export=False))
    wait(lambda rows: any(r.get("world_size") == 2 and r["step"] >= 2 for r in step_rows(rows)))
    drained = nodes[1]
    gcs = ray._raylet.GcsClient(address=cluster.address)
    t_drain = time.time()
    accepted, why = gcs.drain_node(drained.node_id, autoscaler_pb2.DrainNodeReason.Value(
        "DRAIN_NODE_REASON_PREEMPTION"), "spot interruption notice (test)", int((t_drain + DEADLINE_S) * 1000))
    assert accepted, why
    rows = wait(lambda rows: any(r.get("event") == "preemption_checkpoint" for r in rows), timeout=DEADLINE_S)
    t_jit = time.time()
    jit_step = next(r["step"] for r in rows if r.get("event") == "preemption_checkpoint")
    # the workers keep training and keep seeing the same notice at every log step of the drain window
    rows = wait(lambda rows: sum(1 for r in step_rows(rows) if r.get("preempted")) >= 3, timeout=DEADLINE_S)
    t_remove = time.time()
    step_at_remove = max(r["step"] for r in step_rows(rows))
    cluster.remove_node(drained)  # the spot reclaim
    run.join(timeout=400)
    rows = read_metrics(metrics)
    starts = [r for r in rows if r.get("event") == "start"]
    out = {
        "result_steps": run.box["result"].steps if "result" in run.box else None,
        "error": repr(run.error) if run.error is not None else None,
        "total_steps": 12,
        "step_at_remove": step_at_remove,
        "jit_events": [r for r in rows if r.get("event") == "preemption_checkpoint"],
        "jit_step": jit_step,
        "preempted_rows": [r["step"] for r in step_rows(rows) if r.get("preempted")],
        "starts": starts,
        "steps": [r["step"] for r in step_rows(rows)],
        "checkpoints": sorted(p.name for p in (storage / "drain").glob("step_*")),
        "drained_node": drained.node_id,
        "drain_to_jit_s": t_jit - t_drain,
        "remove_to_resumed_s": None,
    }
    resumed = [s for s in starts if s["resumed_from"] >= 0]
    if resumed:
        out["remove_to_resumed_s"] = resumed[0]["time"] - t_remove
    ray.shutdown()
    cluster.shutdown()
    return out


def test_drained_node_gets_one_just_in_time_checkpoint_then_the_run_continues(tmp_path):
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    p = subprocess.run([sys.executable, __file__, str(tmp_path)], capture_output=True, text=True, timeout=900,
                       env=env, cwd=str(HERE.parent))
    result_file = tmp_path / "drain_result.json"
    assert result_file.exists(), p.stdout[-3000:] + p.stderr[-5000:]
    r = json.loads(result_file.read_text())
    assert r["error"] is None, r["error"]
    # one notice, one just-in-time checkpoint, although the workers saw the notice at many log steps
    assert len(r["jit_events"]) == 1, r["jit_events"]
    jit = r["jit_events"][0]
    assert jit["nodes"] == [r["drained_node"]] and jit["deadline_ms"] is not None
    assert len(r["preempted_rows"]) >= 3 and r["preempted_rows"][0] == r["jit_step"]
    assert r["jit_step"] % 12 != 0  # not an epoch end: only the notice can have written it
    assert [c for c in r["checkpoints"] if int(c[5:]) % 12] == [f"step_{r['jit_step']:08d}"]
    # the node went: the run restarted on the training node left, from the just-in-time checkpoint, and completed
    sizes = [s["world_size"] for s in r["starts"]]
    assert sizes[0] == 2 and sizes[1] == 1, sizes
    # from the latest checkpoint before the node went: the just-in-time one (unless an epoch ended in between)
    assert r["starts"][1]["resumed_from"] == max(r["jit_step"], r["step_at_remove"] // 12 * 12)
    assert r["result_steps"] == r["total_steps"] == 12 and r["steps"][-1] == 12
    print(f"drain -> just-in-time checkpoint: {r['drain_to_jit_s']:.1f} s; node gone -> resumed: "
          f"{r['remove_to_resumed_s']:.1f} s")


if __name__ == "__main__":
    out_dir = sys.argv[1]
    res = scenario(out_dir)
    (Path(out_dir) / "drain_result.json").write_text(json.dumps(res, default=str))
