"""Training on a simulated multi-node cluster (``ray.cluster_utils.Cluster``), one cluster for the whole module.

Layout (the :func:`multinode` fixture): a head with no CPU and no training resource (the driver, the Train
controller, the Data coordinator and the run's actors live there, as on a real cluster's head), training nodes with
``{"trainer": 2}`` and 2 CPUs (their CPUs go to the Train workers), and a data-only node with 2 CPUs and ``{"data": 1}``
(the augmenting actors and the read tasks can only run there). Tests change the layout while a run trains (kill or add
nodes) and leave a working layout behind; each says which. A killed node is declared dead after ~5 s of missed
health checks (the default takes ~15 s). The module replaces the session's single-node Ray while it runs and starts
a fresh one afterwards.

* Losing the data-only node mid-run (a spot replacement joins): the run completes with exact distinct bad-file counts,
  and every good image is trained exactly once per data epoch in the steps the run kept.
* A resize to an odd world size on a multi-node cluster (one training node with 2 slots, then a 1-slot node joins:
  2 -> 3 workers, global batch 16 = 6 + 5 + 5): the grow restarts from a checkpoint taken for it (no step lost),
  one Data execution per worker-group start, not per epoch; the new group continues every data epoch at the
  checkpoint's stream position, so across both groups every good image is trained exactly once per data epoch.
* A training node drained for preemption (the GCS DrainNode RPC, reason PREEMPTION, with a deadline): exactly one
  just-in-time checkpoint for the notice, then the node goes and the run resumes from it on the node left, every
  image exactly once per data epoch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import InThread, await_layout, start_local_ray, write_images
from data_executions import counting_executions, start_execution_log
from test_ingest import check_exactly_once, per_epoch_keys, trained_rows
from test_pretrain import TINY

from ibot_ray.config import load_config
from pipelines.ingest import RESUME_EPOCH_METRIC
from pipelines.metrics import read_metrics
from pipelines.train_worker import TRAINED_KEYS_ENV

TRAINING_NODE = {"num_cpus": 2, "resources": {"trainer": 2}}
DATA_NODE = {"num_cpus": 2, "resources": {"data": 1}}


@dataclass
class MultiNode:
    """The module's cluster: ``training``/``data`` hold the live nodes of each kind (tests keep them current)."""

    cluster: object
    training: list = field(default_factory=list)
    data: list = field(default_factory=list)
    slots: dict = field(default_factory=dict)  # node id -> trainer slots

    def add_training(self, trainer: int = 2):
        """A training node with ``trainer`` worker slots; returns once the cluster's resources count it, so that a
        run started next plans on it (an elastic run would otherwise start smaller and grow only later)."""
        import ray

        node = self.cluster.add_node(num_cpus=trainer, resources={"trainer": trainer})
        self.training.append(node)
        self.slots[node.node_id] = trainer
        want = sum(self.slots[n.node_id] for n in self.training)
        if ray.is_initialized():  # the fixture adds the first nodes before it connects
            await_layout(lambda: ray.cluster_resources().get("trainer", 0) == want, f"{want} trainer slots counted")
        return node

    def add_data(self):
        node = self.cluster.add_node(**DATA_NODE)
        self.data.append(node)
        return node

    def kill(self, node, graceful: bool = False) -> None:
        """The node disappears, without notice unless ``graceful`` (a spot reclaim); returns once the GCS has marked
        it dead (~5 s with the fixture's health checks), so a run started next does not plan on its resources."""
        import ray

        self.cluster.remove_node(node, allow_graceful=graceful)
        for group in (self.training, self.data):
            if node in group:
                group.remove(node)
        await_layout(lambda: not any(n["NodeID"] == node.node_id and n["Alive"] for n in ray.nodes()),
                     f"node {node.node_id} marked dead")


@pytest.fixture(scope="module")
def multinode():
    import ray
    from ray.cluster_utils import Cluster

    had_ray = ray.is_initialized()
    ray.shutdown()
    # a dead node is declared dead after ~5 s of missed health checks (the default takes ~15 s)
    head = {"num_cpus": 0, "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 5}}
    try:
        cluster = Cluster(initialize_head=True, head_node_args=head)
    except Exception:  # noqa: BLE001 - "node timed out during startup" on an overloaded box: try once more
        cluster = Cluster(initialize_head=True, head_node_args=head)
    nodes = MultiNode(cluster)
    for _ in range(2):
        nodes.add_training()
    nodes.add_data()
    ray.init(address=cluster.address)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    yield nodes
    ray.shutdown()
    cluster.shutdown()
    if had_ray:
        start_local_ray()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode") / "imgs"
    return write_images(root, 60, kinds=("jpeg", "png"), size=(40, 40), bad=["corrupt", "truncated", "empty", "text"])


def _cfg(data: Path, *extra: str):
    # 64 listed / 16 = 4 steps per epoch, 60 good images per data epoch
    return load_config("demo", TINY + [
        f"data.source={data}", "optim.epochs=4", "train.worker_resource=trainer", "train.max_failures=3",
        "train.elastic_resize_interval_s=5", "train.worker_start_timeout_s=30", "train.checkpoint_every_steps=2",
        "train.checkpoint_min_interval_s=0",
        "data.local_shuffle_buffer_size=0",  # epochs of 60 rows: a block-wise local shuffle would span epochs
        *extra,
    ])


class Run(InThread):
    """``pretrain`` in a thread (conftest's :class:`InThread`), with its metrics file, the trained-keys hook and the
    Data execution callback."""

    def __init__(self, cfg, tmp: Path, name: str, monkeypatch) -> None:
        from pipelines.pretrain import pretrain

        self.keys = tmp / "keys"
        monkeypatch.setenv(TRAINED_KEYS_ENV, str(self.keys))
        self.metrics = tmp / "runs" / name / "logs" / "metrics.jsonl"

        def fn():
            with counting_executions():
                return pretrain(cfg, storage=str(tmp / "runs"), name=name, knn=False, export=False)

        super().__init__(fn)

    def wait(self, cond, timeout: float = 240.0) -> list[dict]:
        return super().wait(self.metrics, cond, timeout, poll=0.2)

    def result(self, timeout: float = 300.0):
        return super().result(timeout)


def _trained(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "loss" in r]


def test_losing_the_data_node_keeps_exact_distinct_bad_counts(multinode, images, tmp_path, monkeypatch):
    """Leaves the layout with its 2 training nodes and a new data node."""
    log = start_execution_log()
    run = Run(_cfg(Path(images["good"][0]).parent, "train.num_workers=[2,2]"), tmp_path, "data_loss", monkeypatch)
    run.wait(lambda rows: any(r.get("step", 0) >= 3 for r in _trained(rows)))
    multinode.kill(multinode.data[0])  # the node with every augmenting actor and read task
    time.sleep(2)
    multinode.add_data()  # its spot replacement
    res = run.result()
    import ray

    executions = ray.get(log.get.remote())
    ray.kill(log)
    assert res.steps == 16
    bad = res.bad_images
    # 4 distinct bad files, in every data epoch trained, whatever was re-read after the loss
    assert bad["count"] == 4 and {k for k, _ in bad["examples"]} == set(images["bad"])
    assert all(n == 4 for e, n in bad["per_epoch"].items() if e < res.metrics["data_epoch"]), bad
    assert res.metrics["bad_images"] == 4
    epochs = check_exactly_once(trained_rows(run.keys), images["good"], tmp_path / "runs" / "data_loss")
    assert len(epochs["done"]) >= 2, epochs  # 16 steps x 16 rows: 4 data epochs of 60 good ones, and 16 rows
    print(f"data node lost: {len(executions)} Data execution(s), per epoch {bad['per_epoch']}, exactly once {epochs}")


@pytest.mark.slow
def test_resize_to_odd_world_streams_once_per_group(multinode, images, tmp_path, monkeypatch):
    """2 workers on one training node, then a 1-slot node joins: 3 workers for a global batch of 16 (6+5+5, the
    extra row rotating). Leaves the layout with 2 training nodes (2 and 1 trainer slots) and the data node."""
    multinode.kill(multinode.training[1])  # one training node left: 2 worker slots
    log = start_execution_log()
    # 16 epochs (64 steps): the 2 workers cannot finish before the new node is seen (the controller re-reads the
    # nodes every 20 s), and the 3 workers have steps enough to stream a data epoch whole
    run = Run(_cfg(Path(images["good"][0]).parent, "train.num_workers=[1,3]", "optim.epochs=16"), tmp_path, "odd_world",
              monkeypatch)
    # the step-2 checkpoint is committed; the node joins early enough that the 2 workers cannot finish the run first
    run.wait(lambda rows: any(r.get("step", 0) >= 3 for r in _trained(rows)))
    multinode.add_training(trainer=1)
    res = run.result()
    import ray

    executions = ray.get(log.get.remote())
    ray.kill(log)
    rows = read_metrics(run.metrics)
    starts = [r for r in rows if r.get("event") == "start"]
    assert [s["world_size"] for s in starts] == [2, 3], starts
    assert res.steps == 64 and all(sum(s["per_rank_share"]) == 16 for s in starts)
    # one Data execution per worker-group start: not one per epoch (5 epochs), none inside an epoch
    assert len(executions) == len(starts) == 2, executions
    # the grow restarts from the checkpoint the 2 workers wrote for it: no step is lost
    resumed = starts[1]["resumed_from"]
    assert resumed == max(r["step"] for r in _trained(rows[:rows.index(starts[1])])), (resumed, starts)
    # the 3-worker group streams from the first data epoch the checkpoint had not finished, where it stood
    ckpt = [r for r in _trained(rows) if r["step"] == resumed and RESUME_EPOCH_METRIC in r][-1]
    trained = trained_rows(run.keys)
    even = [r for r in trained if r["world"] == 2]
    odd = [r for r in trained if r["world"] == 3]
    assert len({r["pid"] for r in even}) == 2 and {len(r["key_id"]) for r in even} == {8}
    assert len({r["pid"] for r in odd}) == 3 and {len(r["key_id"]) for r in odd} == {5, 6}
    assert min(per_epoch_keys(odd)) == ckpt[RESUME_EPOCH_METRIC]
    # every good image once per data epoch across both groups (the epoch the resize cut is finished by the 3)
    epochs = check_exactly_once(trained, images["good"], tmp_path / "runs" / "odd_world")
    assert len(epochs["done"]) >= 15, epochs  # 64 steps x 16 rows = 17 data epochs of 60 good images, and 4 rows
    print(f"odd world: starts {[s['world_size'] for s in starts]}, {len(executions)} executions, resumed from step "
          f"{resumed} (data epoch {ckpt[RESUME_EPOCH_METRIC]}), exactly once {epochs}")


DEADLINE_S = 40  # the drain notice's deadline, from the drain


@pytest.mark.slow
def test_drained_node_gets_one_just_in_time_checkpoint_then_the_run_continues(multinode, tmp_path, monkeypatch):
    """A training node drained for preemption through the GCS DrainNode RPC with reason PREEMPTION and a deadline,
    what ``ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION --deadline-remaining-seconds N`` (and the spot watcher
    of ``cluster.yaml``) sends. Ray Train's preemption watcher sees the drain, the workers read it from
    ``ray.train.get_preemption_info()`` at every log step for the rest of the drain window, and they must write
    exactly one just-in-time checkpoint for it. Then the node goes (as the spot reclaim would) and the run restarts on
    the node left, from that checkpoint, and completes. Two 1-slot training nodes (one worker each); leaves the layout
    with one of them and the data node."""
    import ray
    from ray.core.generated import autoscaler_pb2

    # the session turns the preemption watcher off; Train hands these to its controller (env vars it propagates)
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1")
    monkeypatch.setenv("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "1")
    for node in list(multinode.training):
        if multinode.slots[node.node_id] != 1:
            multinode.kill(node)
    while len(multinode.training) < 2:
        multinode.add_training(trainer=1)
    data = tmp_path / "images"
    write_images(data, 192, kinds=("jpeg", "png"), size=(40, 40))
    cfg = load_config("demo", TINY + [
        f"data.source={data}", "optim.epochs=3", "train.num_workers=[1,2]", "train.worker_resource=trainer",
        "train.worker_start_timeout_s=10", "train.checkpoint_every_steps=100", "train.checkpoint_min_interval_s=0",
        "train.keep_checkpoints=10",
        "train.log_every_steps=1",
    ])  # 192 images / 16 = 12 steps per epoch, 36 in all (the run must outlast the drain window); no periodic
    # checkpoint: only epoch ends and the notice write one
    # worker_start_timeout_s: when the drained node goes, the controller may first retry a group of 2 from Ray's
    # AutoscalingCoordinator's view of the nodes (re-read every 20 s); that group can never be placed and each such
    # try costs the whole timeout. Placing a group the cluster can hold takes under a second here.
    log = start_execution_log()  # Run counts the Data executions into it
    run = Run(cfg, tmp_path, "drain", monkeypatch)

    def step_rows(rows):
        return [r for r in rows if "loss" in r]

    run.wait(lambda rows: any(r.get("world_size") == 2 and r["step"] >= 2 for r in step_rows(rows)), timeout=300)
    drained = multinode.training[1]
    gcs = ray._raylet.GcsClient(address=multinode.cluster.address)
    t_drain = time.time()
    accepted, why = gcs.drain_node(drained.node_id, autoscaler_pb2.DrainNodeReason.Value(
        "DRAIN_NODE_REASON_PREEMPTION"), "spot interruption notice (test)", int((t_drain + DEADLINE_S) * 1000))
    assert accepted, why
    rows = run.wait(lambda rows: any(r.get("event") == "preemption_checkpoint" for r in rows), timeout=DEADLINE_S)
    t_jit = time.time()
    jit_step = next(r["step"] for r in rows if r.get("event") == "preemption_checkpoint")
    # the workers keep training and keep seeing the same notice at every log step of the drain window
    rows = run.wait(lambda rows: sum(1 for r in step_rows(rows) if r.get("preempted")) >= 3, timeout=DEADLINE_S)
    t_remove = time.time()
    step_at_remove = max(r["step"] for r in step_rows(rows))
    multinode.kill(drained, graceful=True)  # the spot reclaim
    res = run.result(timeout=400)
    executions = ray.get(log.get.remote())
    ray.kill(log)
    rows = read_metrics(run.metrics)
    starts = [r for r in rows if r.get("event") == "start"]
    jit_events = [r for r in rows if r.get("event") == "preemption_checkpoint"]
    preempted_rows = [r["step"] for r in step_rows(rows) if r.get("preempted")]
    checkpoints = sorted(p.name for p in (tmp_path / "runs" / "drain").glob("step_*"))
    # one notice, one just-in-time checkpoint, although the workers saw the notice at many log steps
    assert len(jit_events) == 1, jit_events
    assert jit_events[0]["nodes"] == [drained.node_id] and jit_events[0]["deadline_ms"] is not None
    assert len(preempted_rows) >= 3 and preempted_rows[0] == jit_step
    assert jit_step % 12 != 0  # not an epoch end: only the notice can have written it
    assert [c for c in checkpoints if int(c[5:]) % 12] == [f"step_{jit_step:08d}"]
    # the node went: the run restarted on the training node left, from the just-in-time checkpoint, and completed
    sizes = [s["world_size"] for s in starts]
    assert sizes[0] == 2 and sizes[1] == 1, sizes
    # from the latest checkpoint committed before the node went: the just-in-time one, or an epoch end trained past
    # after it. A step's metrics row is written before its checkpoint is reported, and Train commits a checkpoint once
    # every rank has reported it, so an epoch end that was the last step of the two-worker group may or may not have
    # been committed when the node went; any earlier one was (both ranks went on past it)
    last = max(r["step"] for r in step_rows(rows) if r.get("world_size") == 2)
    assert last >= step_at_remove
    last_end = last // 12 * 12
    committed = last_end if last > last_end else last_end - 12
    assert starts[1]["resumed_from"] in {max(jit_step, last_end), max(jit_step, committed)}, (jit_step, last)
    assert res.steps == 36 and step_rows(rows)[-1]["step"] == 36
    assert len(executions) == len(starts), executions  # one Data execution per worker-group start
    epochs = check_exactly_once(trained_rows(run.keys), [str(p) for p in data.iterdir()], tmp_path / "runs" / "drain")
    assert len(epochs["done"]) >= 1, epochs  # 36 steps x 16 rows = 3 data epochs of 192
    print(f"drain -> just-in-time checkpoint: {t_jit - t_drain:.1f} s; node gone -> resumed: "
          f"{starts[1]['time'] - t_remove:.1f} s")
