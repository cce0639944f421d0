"""Just-in-time checkpoints on a preemption notice: exactly one per distinct notice.

``ray.train.get_preemption_info()`` returns the same stored notice at every call until the drained node goes, so
the worker loop must remember which notices it has already checkpointed for (pipelines/train_worker.py
``PreemptionNotices``). The notices here are Ray Train's own ``PreemptionInfo`` objects.
"""

from __future__ import annotations

import json

from ray.train import PreemptionInfo

from pipelines.train_worker import PreemptionNotices


def _notice(nodes: dict, deadline_ms=1_000_000):
    return PreemptionInfo(deadline_ms=deadline_ms, preempted_node_to_ranks=nodes)


def test_one_checkpoint_per_notice_over_a_drain_window():
    a = {"node-a": [1]}
    # what one worker sees at its log steps: nothing, then the same notice for 6 log steps (the drain window)
    seen = [None, None] + [_notice(dict(a)) for _ in range(6)]
    notices = PreemptionNotices()
    decisions = [notices.is_new(info) for info in seen]
    assert decisions == [False, False, True, False, False, False, False, False]


def test_a_new_node_or_a_new_deadline_is_a_new_notice():
    notices = PreemptionNotices()
    steps = [
        _notice({"node-a": [1]}),                          # first notice: checkpoint
        _notice({"node-a": [1]}),                          # the same notice again: no
        _notice({"node-a": [1], "node-b": [2, 3]}),        # a second node drained meanwhile: checkpoint
        _notice({"node-b": [2, 3], "node-a": [1]}),        # same nodes, other dict order: no
        _notice({"node-a": [1]}, deadline_ms=2_000_000),   # a later drain of node-a with a new deadline: checkpoint
        None,                                              # no notice: no
        _notice({"node-a": [1]}),                          # an already handled notice comes back: no
        _notice({"node-c": [0]}, deadline_ms=None),        # a notice without a deadline: checkpoint
        _notice({"node-c": [0]}, deadline_ms=None),
    ]
    assert [notices.is_new(n) for n in steps] == [True, False, True, False, True, False, False, True, False]


def _decide_each_log_step(config: dict) -> None:
    """A Ray Train worker: at each log step, the notices the preemption watcher's ``mark_preempt`` has delivered to
    this rank so far, then the worker loop's decision (``ray.train.get_preemption_info`` into ``PreemptionNotices``),
    and, for contrast, the decision from this rank's own copy of the notice."""
    import json

    import ray
    import ray.train
    from ray.train.v2._internal.execution.context import get_train_context

    rank = ray.train.get_context().get_world_rank()
    me = ray.get_runtime_context().current_actor  # this rank's RayTrainWorker actor
    agreed, own = PreemptionNotices(), PreemptionNotices()
    out = {"agreed": [], "own": []}
    for arrivals in config["arrivals"]:
        if arrivals[rank] is not None:  # what the watcher does on every worker, each call at its own time
            ray.get(me.mark_preempt.remote(_notice(*arrivals[rank])))
        out["agreed"].append(agreed.is_new(ray.train.get_preemption_info()))
        out["own"].append(own.is_new(get_train_context().preemption_context.preemption_info))
    with open(f"{config['out']}/rank{rank}.json", "w") as f:
        json.dump(out, f)


def test_every_rank_decides_the_same(ray_cluster, tmp_path):
    """The watcher's notice reaches the ranks at different log steps (``mark_preempt`` is called on each worker
    actor separately), and a second drained node arrives as a merged notice. A checkpoint is a collective (every rank
    reports), so the ranks must decide alike: the worker loop decides on ``ray.train.get_preemption_info()`` (rank
    0's notice, broadcast), which gives every rank the same decisions, one checkpoint per notice. Deciding on each
    rank's own copy would not: the ranks' decisions then differ at the steps the notice reaches them."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    a, ab = ({"node-a": [1]},), ({"node-a": [1], "node-b": [0]},)  # node b's drain merged into the notice
    arrivals = [  # per log step: the notice delivered to (rank 0, rank 1) just before it, or None
        (None, None), (None, a), (None, None), (a, None), (ab, None), (None, ab), (None, None),
    ]
    DataParallelTrainer(_decide_each_log_step, train_loop_config={"arrivals": arrivals, "out": str(tmp_path)},
                        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                        run_config=RunConfig(name="notices", storage_path=str(tmp_path / "runs"))).fit()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # rank 0's notice decides: a new notice once rank 0 holds it (step 3), and once more for the merged one (4)
    assert ranks[0]["agreed"] == ranks[1]["agreed"] == [False, False, False, True, True, False, False]
    # the contrast: each rank's own copy would checkpoint at other steps on rank 1 (a collective never matched)
    assert ranks[0]["own"] == [False, False, False, True, True, False, False]
    assert ranks[1]["own"] == [False, True, False, False, False, True, False]
