"""Which training failures end a run at once and which are retried.

Ray Train restarts a failed worker group from the latest checkpoint, up to ``train.max_failures`` times (-1, the
default, retries forever: right for spot nodes and lost workers, which come back). An error that fires again on every
restart must instead end the run, once, with a message naming its cause and the setting to change:

* a diverged run (``optim.max_nonfinite_steps`` consecutive non-finite losses: the restart resumes the same weights
  and diverges again);
* a config or data-source error found on a worker (e.g. a k-NN memory bank that defaults to an unlabelled training
  source, raised on rank 0 at every start; a checkpoint that does not fit the config it is resumed with);
* out of memory at the minimum world size (no smaller share of the global batch is left to try);
* storage that refuses the run (access denied, missing credentials, a bucket that does not exist), and a checkpoint
  that does not fit the config or whose file is damaged.

Transient storage errors (pipelines/storage.py: throttling, 5xx, resets, an unreachable endpoint) are never fatal and
never count toward the repeated-error budget below: they are retried where they happen, and one that outlasts its
retry deadline restarts the worker group within Ray's ``train.max_failures``. A checkpoint that cannot be written
(a full local disk) is not fatal either, since a restart may run elsewhere; its repeats end the run through the
budget, with its own message.

How, with Ray Train V2's own mechanisms:

1. The worker loop classifies its exception (:func:`fatal_error`) and raises :class:`FatalTrainingError` for these.
2. :class:`FailureBudget`, a ``ray.train.UserCallback``, runs on the Train controller. Its ``after_exception`` sees
   each rank's exception before the controller's failure policy decides to retry; on a ``FatalTrainingError`` it
   raises it. The controller wraps an exception from its own loop in ``ControllerError``, which its failure policy
   never retries, so ``fit()`` raises at once (``train/v2/_internal/execution/controller/controller.py``
   ``_run_control_loop_iteration``; ``failure_handling/default.py``).
3. Fallback for deterministic errors nobody classified (a bug in user code, a new exception type): the same worker
   exception (type and message, numbers ignored) ending ``train.max_repeated_errors`` attempts with no new
   highest step reported in between, ends the run the same way.
4. :func:`fit_or_raise_fatal` turns such a ``ControllerError`` back into the ``FatalTrainingError`` for the driver:
   ``ibot-ray pretrain`` prints it as one block and exits with :data:`EXIT_FATAL`; a Tune trial ends as an error.

Lost workers and nodes (a dead actor, a failed health check) and preemptions are never classified here: they keep
Ray's budgets (``train.max_failures``, ``train.max_preemption_failures``).
"""

from __future__ import annotations

import re
from typing import Any, Optional

from ray.train import UserCallback

#: ``ibot-ray pretrain``'s exit status when a deterministic error ended the run (retrying would fail the same way).
EXIT_FATAL = 5


class FatalTrainingError(RuntimeError):
    """An error that would fire again on every restart; ends the run once.

    ``cause``: a few words (``"non-finite loss"``); ``setting``: what to change (config keys or a command-line flag);
    ``detail``: the original error's message. ``str()`` is the whole message: the cause and the setting on the
    first line, the detail on the last (the line a Tune trial's error row shows)."""

    def __init__(self, cause: str, detail: str, setting: str) -> None:
        self.cause, self.detail, self.setting = cause, detail, setting
        super().__init__(f"{cause}. Retrying cannot help, so the run was not restarted; change {setting}.\n{detail}")

    def __reduce__(self):  # rebuilt from the three fields on the controller and the driver
        return (self.__class__, (self.cause, self.detail, self.setting))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _is_oom(e: BaseException) -> bool:
    """A CUDA out-of-memory error (``torch.OutOfMemoryError``, or the plain RuntimeError some kernels raise)."""
    import torch

    return isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError)
                                                     and "CUDA out of memory" in str(e))


def fatal_error(e: BaseException, *, world: int, min_world: int) -> Optional[FatalTrainingError]:
    """The :class:`FatalTrainingError` for a worker-side exception that a restart would raise again, else None.

    ``world``: this attempt's world size; ``min_world``: ``train.num_workers[0]`` (an out-of-memory error above it may
    pass on a restart with another share of the global batch; at it, nothing smaller is left)."""
    from ibot_ray.checkpoint import CheckpointCorruptError, CheckpointError, CheckpointWriteError
    from ibot_ray.config import ConfigError
    from ibot_ray.step import NonFiniteLossError
    from pipelines.sources import SourceError
    from pipelines.storage import StorageConfigError, config_problem, is_transient

    if isinstance(e, FatalTrainingError):
        return e
    if is_transient(e):  # storage weather, retried (pipelines/storage.py): never fatal
        return None
    if isinstance(e, NonFiniteLossError):
        return FatalTrainingError(
            "the loss diverged", _first_line(e),
            "optim.lr (lower it), or optim.precision, loss.teacher_temp, optim.clip_grad; "
            "optim.max_nonfinite_steps sets how many consecutive non-finite steps are tolerated")
    if isinstance(e, ConfigError):
        return FatalTrainingError("config error on a training worker", _first_line(e),
                                  "the config key named above (--set KEY=VALUE)")
    if isinstance(e, SourceError):
        return FatalTrainingError(
            "data source error on a training worker", _first_line(e),
            "the source named above: data.source, data.eval_source or data.eval_train_source (the k-NN memory "
            "bank; it defaults to the training source, which must then be labelled)")
    if isinstance(e, StorageConfigError) or (isinstance(e, OSError) and config_problem(e)):
        return FatalTrainingError(
            "storage refused the run", f"{_first_line(e)} ({config_problem(e) or 'a storage setting'})",
            "the storage setting named above (--storage, data.source, data.eval_source, data.eval_train_source) "
            "or the credentials the nodes use for it")
    if isinstance(e, CheckpointWriteError):
        return None  # a full or failing local disk: its own message; a restart may land elsewhere (budget below)
    if isinstance(e, CheckpointCorruptError):
        return FatalTrainingError(
            "the run's latest checkpoint cannot be read", _first_line(e),
            "nothing in the config: the checkpoint file is damaged; start a new run (--name), or delete that "
            "checkpoint folder and its entry in checkpoint_manager_snapshot.json to resume from an older one")
    if isinstance(e, CheckpointError):
        return FatalTrainingError(
            "the run's checkpoint cannot be resumed with this config", _first_line(e),
            "resume with the config the run started with (config.yaml in each checkpoint folder), "
            "or start a new run (--name)")
    if _is_oom(e) and world <= min_world:
        return FatalTrainingError(
            f"out of memory at the minimum world size ({world} worker{'s' if world != 1 else ''})", _first_line(e),
            "optim.micro_batch_size (smaller micro-batches), optim.batch_size, or more memory per worker; "
            "train.num_workers=[min,max] with a larger min")
    return None


# ---- the controller side ---------------------------------------------------------------------------------------


def _user_exception(error: BaseException) -> Optional[BaseException]:
    """The exception a training function raised, if ``error`` is one; None for a system error: a dead worker actor,
    a failed or hung health check. (``after_exception`` gets the training function's own exception, which Ray
    Train unwraps from its ``UserExceptionWithTraceback``; a still-wrapped one is unwrapped here.)"""
    from ray.exceptions import RayError
    from ray.train.v2._internal.exceptions import RayTrainError, UserExceptionWithTraceback

    if isinstance(error, UserExceptionWithTraceback):
        return getattr(error, "_base_exc", error)
    if isinstance(error, (RayTrainError, RayError)):
        return None
    return error


def fingerprint(e: BaseException) -> str:
    """Type and first message line, numbers ignored: the same error at another step or size is the same error."""
    return f"{type(e).__module__}.{type(e).__qualname__}: {re.sub(r'[0-9]+', '#', _first_line(e))}"


class FailureBudget(UserCallback):
    """A ``ray.train`` callback on the Train controller that ends the run on deterministic errors (module doc).

    ``max_repeated``: the same unclassified worker exception ending this many attempts without progress (a new
    highest reported step; the loop reports its checkpoints, so: a new checkpoint to restart from) ends the run; 0
    turns that fallback off. A typed :class:`FatalTrainingError` always ends it. Attempts that lost a worker (system
    errors) are not counted: Ray's failure budgets handle them."""

    def __init__(self, max_repeated: int = 3) -> None:
        self.max_repeated = int(max_repeated)
        self.best_step = -1
        self.repeats: dict[str, int] = {}

    def after_report(self, run_context: Any, metrics: list, checkpoint: Any) -> None:
        step = (metrics[0] or {}).get("step") if metrics else None
        if isinstance(step, (int, float)) and step > self.best_step:
            self.best_step = int(step)
            self.repeats.clear()  # progress: earlier errors were not blocking

    def after_exception(self, run_context: Any, worker_exceptions: dict) -> None:
        from pipelines.storage import is_transient

        user = {rank: _user_exception(err) for rank, err in worker_exceptions.items()}
        for rank in sorted(user):
            if isinstance(user[rank], FatalTrainingError):
                raise FatalTrainingError(user[rank].cause, f"{user[rank].detail} (rank {rank})", user[rank].setting)
        if self.max_repeated <= 0 or not user or any(e is None for e in user.values()):
            return  # a lost worker or node: Ray's budgets (train.max_failures / max_preemption_failures)
        if any(is_transient(e) for e in user.values()):
            return  # storage weather that outlasted its retries (pipelines/storage.py): Ray's budgets only
        for key in {fingerprint(e) for e in user.values()}:
            self.repeats[key] = self.repeats.get(key, 0) + 1
            if self.repeats[key] >= self.max_repeated:
                e = next(e for e in user.values() if fingerprint(e) == key)
                raise FatalTrainingError(
                    f"the same error ended {self.repeats[key]} attempts with no progress in between",
                    f"{type(e).__name__}: {_first_line(e)}",
                    "fix the error above; train.max_repeated_errors sets how many identical failures without "
                    "progress end a run (0: retry within train.max_failures only)")


def fatal_cause(error: BaseException) -> Optional[FatalTrainingError]:
    """The :class:`FatalTrainingError` that ended a ``fit()`` (the ``ControllerError`` Ray raised), else None."""
    seen = 0
    while error is not None and seen < 5:
        if isinstance(error, FatalTrainingError):
            return error
        error = getattr(error, "controller_failure", None) or error.__cause__
        seen += 1
    return None


def fit_or_raise_fatal(trainer: Any) -> Any:
    """``trainer.fit()``; a run ended by a deterministic error raises its :class:`FatalTrainingError` instead of
    Ray Train's ``ControllerError``."""
    from ray.train import TrainingFailedError

    try:
        return trainer.fit()
    except TrainingFailedError as e:
        fatal = fatal_cause(e)
        if fatal is None:
            raise
        raise FatalTrainingError(fatal.cause, fatal.detail, fatal.setting) from None


__all__ = ["EXIT_FATAL", "FailureBudget", "FatalTrainingError", "fatal_cause", "fatal_error", "fingerprint",
           "fit_or_raise_fatal"]
