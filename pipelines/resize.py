"""A resize of a running worker group restarts from a checkpoint taken at the resize, not from the last scheduled one.

Ray Train 2.60 gives the workers no notice of a resize. Its elastic policy decides on a running group
(``ray/train/v2/_internal/execution/scaling_policy/elastic.py``, ``make_decision_for_running_worker_group``: the
AutoscalingCoordinator counts room for more workers), the controller moves Running -> Resizing -> Scheduling in two
loop iterations and ``_execute_resize_decision`` (``controller/controller.py``) shuts the group down and starts the
new one from the latest *committed* checkpoint. Nothing between the decision and the shutdown runs on a worker, and
the workers can poll nothing that says a resize is coming (``ray.train.get_preemption_info`` covers node drains
only). A ``ControllerCallback`` cannot help on its own: ``before_controller_execute_resize_decision`` runs inside
that shutdown step, and a checkpoint the workers wrote while it blocked would never be committed, since the same
controller loop polls their reports. So a grow (``num_workers=[2, 8]``, nodes arriving one at a time) lost every
step since the last scheduled checkpoint, up to ``train.checkpoint_every_steps``.

Here the run's controller uses :class:`CheckpointFirstElasticPolicy` (installed by :class:`ResizeAwareTorchTrainer`
in place of Ray's ``ElasticScalingPolicy``). When Ray's policy decides to resize a running group, it holds the
decision back (``NoopDecision``), posts a numbered request on the run's :class:`ResizeNotice` actor, and lets the
decision through once every rank has reported a checkpoint that answers the request (``RESIZE_METRIC``; the
controller has committed it by then: its report handler consumes a poll's reports before the policy decides), or
after :data:`RESIZE_CHECKPOINT_TIMEOUT_S`. The workers read the notice at every log step (rank 0 reads it, an
all-reduce makes every rank agree), write a synchronous checkpoint at once, then wait until the group is torn down
(:meth:`ResizeNoticeClient.wait_until_resized`), so that no step is trained that the restart would throw away. A
grow or a policy shrink therefore loses no step; it costs the group the time to write and upload one checkpoint plus
up to one controller poll (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, 2 s) and a log interval.

Failures (a lost node) are not resize decisions: they restart from the latest committed checkpoint, and a drained
node's notice gets its just-in-time checkpoint (``pipelines/train_worker.py``).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

import ray
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.execution.scaling_policy import ElasticScalingPolicy, NoopDecision, ResizeDecision
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

log = logging.getLogger(__name__)

#: Metric of a checkpoint report that answers resize request N (every rank reports it).
RESIZE_METRIC = "resize_request"
#: How long the policy holds a resize back for its checkpoint; after it the group is resized anyway (as Ray would).
RESIZE_CHECKPOINT_TIMEOUT_S = 300.0
#: How long workers that answered a request wait to be torn down before they train on (the request was lost).
RESIZE_WAIT_S = RESIZE_CHECKPOINT_TIMEOUT_S + 60.0


class ResizeNotice:
    """The run's resize request board (a named actor, ``num_cpus=0``, on the driver's node): the policy posts,
    releases or withdraws request N; the workers read it."""

    def __init__(self) -> None:
        self.request, self.state = 0, "none"  # state of the latest request: requested, released, withdrawn

    def post(self) -> int:
        self.request += 1
        self.state = "requested"
        return self.request

    def settle(self, request: int, state: str) -> None:
        if request == self.request:
            self.state = state

    def read(self) -> tuple[int, str]:
        return self.request, self.state


_NoticeActor = ray.remote(num_cpus=0)(ResizeNotice)
_OWNED: dict[str, Any] = {}  # the driver keeps the actors it created alive


def create_resize_notice(run_name: str) -> str:
    """Create (or reuse) the :class:`ResizeNotice` of a run on this (the driver's) node; returns its actor name."""
    name = f"ibot_resize:{run_name}"
    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    handle = _NoticeActor.options(name=name, get_if_exists=True, scheduling_strategy=here).remote()
    ray.get(handle.read.remote())
    _OWNED.setdefault(name, handle)
    return name


class ResizeNoticeClient:
    """The workers' side: :meth:`poll` at log steps (rank 0), :meth:`wait_until_resized` after the checkpoint."""

    def __init__(self, name: str) -> None:
        self.actor = ray.get_actor(name)
        # A request still open when this group starts is answered too: it may have been posted while the group
        # started (and then the resize waits for it); if it was for a group that failed since, the policy withdraws
        # it at its next decision and the wait ends at once.
        self.answered = 0

    def poll(self) -> int:
        """The number of a request this worker group has not answered yet, else 0."""
        request, state = ray.get(self.actor.read.remote())
        return request if state == "requested" and request > self.answered else 0

    def wait_until_resized(self, request: int, timeout_s: float = RESIZE_WAIT_S, poll_s: float = 0.5) -> float:
        """Block until the controller tears this group down (the call never returns then), or return when the
        request is withdrawn or after ``timeout_s``; returns the seconds waited."""
        self.answered = max(self.answered, request)
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            current, state = ray.get(self.actor.read.remote())
            if current != request or state == "withdrawn":
                break
            time.sleep(poll_s)
        return time.monotonic() - t0


class CheckpointFirstElasticPolicy(ElasticScalingPolicy):
    """Ray's elastic policy, except that a resize of a running group waits for a checkpoint that answers it (module
    doc). Runs in the Train controller."""

    def __init__(self, scaling_config, notice_name: str, timeout_s: float = RESIZE_CHECKPOINT_TIMEOUT_S) -> None:
        super().__init__(scaling_config)
        self.notice_name, self.timeout_s = notice_name, float(timeout_s)
        self._pending: Optional[dict] = None

    def _notice(self):
        return ray.get_actor(self.notice_name)

    def make_decision_for_running_worker_group(self, worker_group_state, worker_group_status):
        pending = self._pending
        if pending is not None and pending["group"] != worker_group_state.start_time:
            # another group runs now (a failure restarted it): the request was for one that is gone
            self._notice().settle.remote(pending["request"], "withdrawn")
            self._pending = pending = None
        if pending is None:
            decision = super().make_decision_for_running_worker_group(worker_group_state, worker_group_status)
            if not isinstance(decision, ResizeDecision):
                return decision
            request = ray.get(self._notice().post.remote())
            self._pending = {"decision": decision, "request": request, "since": time.monotonic(),
                             "group": worker_group_state.start_time, "answered": set()}
            log.info("resize to %d workers: waiting for the checkpoint of request %d", decision.num_workers, request)
            return NoopDecision()
        for rank, status in worker_group_status.worker_statuses.items():
            report = status.training_report
            if report is not None and (report.metrics or {}).get(RESIZE_METRIC) == pending["request"]:
                pending["answered"].add(rank)
        done = len(pending["answered"]) >= worker_group_state.num_workers
        if not done and time.monotonic() - pending["since"] < self.timeout_s:
            return NoopDecision()
        if not done:
            log.warning("resize: no checkpoint answered request %d within %.0f s; resizing without it",
                        pending["request"], self.timeout_s)
        self._notice().settle.remote(pending["request"], "released")
        self._pending = None
        return pending["decision"]


class ResizeAwareTorchTrainer(TorchTrainer):
    """A ``TorchTrainer`` whose elastic runs resize only after a checkpoint (:class:`CheckpointFirstElasticPolicy`).

    Ray 2.60 builds the scaling policy inside ``DataParallelTrainer.fit`` and hands it to the controller through
    ``_initialize_and_run_controller`` (``ray/train/v2/api/data_parallel_trainer.py``): the one place a policy can be
    swapped in. A fixed-size run keeps Ray's ``FixedScalingPolicy``."""

    def __init__(self, *args, resize_notice: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.resize_notice = resize_notice

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        policy = controller_init_kwargs.get("scaling_policy")
        if type(policy) is ElasticScalingPolicy:
            controller_init_kwargs["scaling_policy"] = CheckpointFirstElasticPolicy(policy.scaling_config,
                                                                                   self.resize_notice)
        return super()._initialize_and_run_controller(**controller_init_kwargs)


__all__ = ["CheckpointFirstElasticPolicy", "RESIZE_CHECKPOINT_TIMEOUT_S", "RESIZE_METRIC", "ResizeAwareTorchTrainer",
           "ResizeNotice", "ResizeNoticeClient", "create_resize_notice"]
