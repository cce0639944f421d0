"""Test helper: count the Ray Data executions of the training ingest wherever they run (for a Train run: in the
SplitCoordinator actor on the driver's node), through Ray Data's execution callbacks.

    log = start_execution_log()                        # a named actor (num_cpus=0)
    with counting_executions():                        # DataContext.custom_execution_callback_classes on the driver
        trainer = build_trainer(...)                   # Train copies the DataContext to its Data executors
    ...
    ray.get(log.get.remote())                          # one dict per execution of a Dataset that runs MultiCropBatcher
"""

from __future__ import annotations

import contextlib
import time

import ray
from ray.data._internal.execution.execution_callback import ExecutionCallback

LOG_NAME = "test_ingest_executions"


@ray.remote(num_cpus=0)
class ExecutionLog:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def add(self, row: dict) -> None:
        self.rows.append(row)

    def get(self) -> list[dict]:
        return list(self.rows)


class CountIngestExecutions(ExecutionCallback):
    """Records every execution whose plan holds the multi-crop actor pool (the training ingest)."""

    def before_execution_starts(self, executor) -> None:
        ops = [op.name for op in executor._topology]
        if any("MultiCropBatcher" in name for name in ops):
            ray.get_actor(LOG_NAME).add.remote({"dataset": executor._dataset_id, "t": time.time()})


def start_execution_log():
    """The log actor, on this process's node (a multi-node test may kill any other node)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    return ExecutionLog.options(name=LOG_NAME, get_if_exists=True, scheduling_strategy=here).remote()


@contextlib.contextmanager
def counting_executions():
    ctx = ray.data.DataContext.get_current()
    ctx.custom_execution_callback_classes.append(CountIngestExecutions)
    try:
        yield
    finally:
        ctx.custom_execution_callback_classes.remove(CountIngestExecutions)
