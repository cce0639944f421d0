"""Just-in-time checkpoints on a preemption notice: exactly one per distinct notice.

``ray.train.get_preemption_info()`` returns the same stored notice at every call until the drained node goes, so
the worker loop must remember which notices it has already checkpointed for (pipelines/train_worker.py
``PreemptionNotices``). The notices here are Ray Train's own ``PreemptionInfo`` objects.
"""

from __future__ import annotations

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


def test_every_rank_decides_the_same():
    """Ranks get the same agreed notice at the same log steps, so their checkpoint decisions agree."""
    seq = [None, _notice({"n": [0, 1]}), _notice({"n": [0, 1]}), _notice({"n": [0, 1], "m": [2]})]
    ranks = [PreemptionNotices() for _ in range(3)]
    per_rank = [[r.is_new(n) for n in seq] for r in ranks]
    assert per_rank[0] == per_rank[1] == per_rank[2] == [False, True, False, True]
