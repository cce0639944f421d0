"""A failure budget that ends: errors every restart would raise again end the run once, with one message naming the
cause and the setting to change, and ``ibot-ray pretrain`` exits with its own status; lost workers and nodes are
still retried (pipelines/failures.py).

The classification and the controller-side budget are checked on Ray Train's own exception types; the end-to-end
checks use the session's local Ray: the ``ibot-ray pretrain`` command line (a run, its resume with another epoch
length, its resume with an absurd learning rate) and a Tune sweep whose one trial diverges. The retry of a lost
worker (a SIGKILLed rank 0) is
``tests/test_pretrain.py::test_a_killed_worker_restarts_and_a_failed_run_resumes_by_name``.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from conftest import InThread
from ray.exceptions import RayActorError
from ray.train.v2._internal.exceptions import UserExceptionWithTraceback, WorkerHealthCheckFailedError

from ibot_ray.checkpoint import CheckpointError
from ibot_ray.cli import main as cli_main
from ibot_ray.config import ConfigError
from ibot_ray.step import NonFiniteLossError
from pipelines.failures import EXIT_FATAL, FailureBudget, FatalTrainingError, fatal_cause, fatal_error
from pipelines.knn_eval import EvalDataError
from pipelines.metrics import read_metrics
from pipelines.storage import StorageUnavailableError

# ---- classification and the controller-side budget ---------------------------------------------------------------


def test_deterministic_errors_are_fatal_with_the_setting_to_change():
    cases = [
        (NonFiniteLossError("10 consecutive non-finite steps (last at step 7); lower optim.lr"), "diverged",
         "optim.lr"),
        (ConfigError("optim.batch_size: global batch 64 is larger than the dataset"), "config", "--set"),
        (EvalDataError("train split '/data/flat' is unlabelled: a flat image folder"), "data source",
         "data.eval_train_source"),
        (CheckpointError("cannot restore student: size mismatch for backbone.pos_embed"), "checkpoint",
         "--name"),
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "out of memory",
         "optim.micro_batch_size"),
    ]
    for error, cause, setting in cases:
        fatal = fatal_error(error, world=2, min_world=2)
        assert fatal is not None, error
        assert cause in fatal.cause and setting in fatal.setting
        text = str(fatal)
        assert text.splitlines()[-1] == str(error) and "Retrying cannot help" in text.splitlines()[0]
        copy = pickle.loads(pickle.dumps(fatal))  # travels worker -> controller -> driver
        assert type(copy) is FatalTrainingError and str(copy) == text
    # out of memory above the minimum world size may pass with another share of the batch: retried
    assert fatal_error(torch.OutOfMemoryError("CUDA out of memory"), world=4, min_world=2) is None
    # anything unclassified (an I/O hiccup, a collective torn down by a lost peer) is retried
    assert fatal_error(OSError("connection reset by peer"), world=2, min_world=2) is None
    assert fatal_error(RuntimeError("Connection closed by peer [127.0.0.1]:1234"), world=2, min_world=2) is None


def test_checkpoint_and_storage_errors_each_get_their_own_verdict(tmp_path):
    """Only a checkpoint that does not fit the config asks for the run's config; a damaged checkpoint file, a full or
    failing disk and storage errors each get their own message, and only errors a restart would repeat are fatal."""
    import errno

    from ibot_ray.checkpoint import CheckpointCorruptError, CheckpointMismatchError, save_checkpoint
    from pipelines.storage import StorageConfigError

    mismatch = fatal_error(CheckpointMismatchError("cannot restore student: size mismatch"), world=2, min_world=1)
    assert "cannot be resumed with this config" in mismatch.cause and "config.yaml" in mismatch.setting
    corrupt = fatal_error(CheckpointCorruptError("checkpoint /r/step_00000004/state.pt is truncated, corrupt or not "
                                                 "a safe torch file (EOFError: )"), world=2, min_world=1)
    assert "cannot be read" in corrupt.cause and "resume with the config" not in corrupt.setting
    # a checkpoint that cannot be written (an unwritable folder here, a full disk on a node) is not the config's
    # fault, and a restart may run on another node: retried (the repeated-error budget ends a run that keeps failing)
    with pytest.raises(CheckpointError, match="could not write checkpoint /proc/") as info:
        save_checkpoint("/proc/ibot_ray_test/state.pt", {"x": torch.zeros(1)})  # not writable, even for root
    assert fatal_error(info.value, world=2, min_world=1) is None
    from ibot_ray.checkpoint import CheckpointWriteError, _write_error

    disk = _write_error(Path("/tmp/x/state.pt"), OSError(errno.ENOSPC, "No space left on device"))
    assert isinstance(disk, CheckpointWriteError) and "no space left on the device of /tmp/x" in str(disk)
    assert fatal_error(disk, world=2, min_world=1) is None
    assert pickle.loads(pickle.dumps(disk)).errno == errno.ENOSPC
    # storage: weather is retried, a refused access ends the run naming the storage settings
    assert fatal_error(_upload_outage(), world=2, min_world=1) is None
    denied = OSError("When getting information for key 'r' in bucket 'b': AWS Error ACCESS_DENIED during HeadObject "
                     "operation: No response body.")
    for e in (denied, StorageConfigError("--storage: cannot open 's3://Bad Bucket/r': access denied")):
        fatal = fatal_error(e, world=2, min_world=1)
        assert fatal is not None and "storage" in fatal.cause and "--storage" in fatal.setting, e


def _lost_worker() -> WorkerHealthCheckFailedError:
    return WorkerHealthCheckFailedError("A worker health check failed.", failure=RayActorError())


def _upload_outage() -> OSError:
    """What pyarrow's S3 file system raises for an upload to an endpoint that is down (its exact text)."""
    return OSError("When initiating multiple part upload for key 'r/step_00000012/state.pt' in bucket 'b': AWS "
                   "Error NETWORK_CONNECTION during CreateMultipartUpload operation: curlCode: 7, Could not connect to "
                   "server")


def test_failure_budget_ends_on_fatal_errors_and_on_a_repeated_error_without_progress():
    """``after_exception`` gets {rank: exception}: a training function's own exception (Ray Train unwraps it from its
    traceback wrapper), or a system error for a lost worker."""
    budget = FailureBudget(max_repeated=3)
    fatal = fatal_error(NonFiniteLossError("2 consecutive non-finite steps"), world=2, min_world=1)
    with pytest.raises(FatalTrainingError, match=r"the loss diverged.*\n.*\(rank 1\)"):
        budget.after_exception(None, {0: RuntimeError("collective aborted"), 1: fatal})

    # an unclassified error is retried; progress (a new highest step) forgives earlier ones
    budget = FailureBudget(max_repeated=3)
    flaky = {0: KeyError("no field 'mask' in row 17 of shard 3")}
    budget.after_exception(None, flaky)
    budget.after_exception(None, flaky)
    budget.after_report(None, [{"step": 12}], None)
    budget.after_exception(None, {0: KeyError("no field 'mask' in row 18 of shard 4")})
    budget.after_report(None, [{"step": 12}], None)  # back to where it failed: not progress
    budget.after_exception(None, flaky)
    # lost workers and nodes are Ray's budget, never counted here, even when a survivor's error rides along
    for _ in range(5):
        budget.after_exception(None, {1: _lost_worker()})
        budget.after_exception(None, {0: KeyError("no field 'mask' in row 17 of shard 3"), 1: _lost_worker()})
    # storage weather that outlasted its retries (an upload to an unreachable bucket) is never counted either
    for _ in range(5):
        budget.after_exception(None, {0: _upload_outage()})
        budget.after_exception(None, {0: StorageUnavailableError("write s3://b/r/step_00000012/state.pt: storage "
                                                                 "still unavailable after 600 s of retries")})
    with pytest.raises(FatalTrainingError, match=r"same error ended 3 attempts with no progress in between") as info:
        budget.after_exception(None, flaky)  # the third since step 12 (numbers ignored)
    assert "KeyError" in str(info.value) and "train.max_repeated_errors" in str(info.value)

    # a training function's exception still in Ray's traceback wrapper counts as the same error
    wrapped = UserExceptionWithTraceback(KeyError("no field 'mask' in row 9 of shard 1"), traceback_str="...")
    budget = FailureBudget(max_repeated=2)
    budget.after_exception(None, flaky)
    with pytest.raises(FatalTrainingError, match="2 attempts"):
        budget.after_exception(None, {0: wrapped})

    off = FailureBudget(max_repeated=0)
    for _ in range(10):
        off.after_exception(None, flaky)


def test_the_error_fit_raises_leads_back_to_the_fatal_error():
    from ray.train import ControllerError, WorkerGroupError

    fatal = FatalTrainingError("the loss diverged", "2 consecutive non-finite steps", "optim.lr")
    assert fatal_cause(ControllerError(fatal)) is fatal
    assert fatal_cause(WorkerGroupError("worker died", {0: _lost_worker()})) is None


# ---- end to end on the session's local Ray --------------------------------------------------------------------

TINY = [
    "model.depth=2", "model.patch_size=8", "crops.global_crops_size=32", "crops.local_crops_size=16",
    "crops.local_crops_number=2", "head.out_dim=64", "head.patch_out_dim=64", "head.hidden_dim=64",
    "head.bottleneck_dim=32", "optim.batch_size=16", "optim.warmup_epochs=0", "loss.warmup_teacher_temp_epochs=0",
    "optim.max_nonfinite_steps=2", "data.eval_source=null", "data.actors=[1,1]", "data.actor_batch_size=16",
    "train.num_workers=[1,1]", "train.log_every_steps=1", "train.checkpoint_every_steps=100",
    "train.checkpoint_min_interval_s=0",
    "train.knn_every_epochs=0", "eval.image_size=32",
]
ABSURD_LR = "optim.lr=1e30"


def _starts(metrics: Path) -> list[dict]:
    return [r for r in read_metrics(metrics) if r.get("event") == "start"]


def _train_controllers() -> set:
    """The Ray Train controller actors the session's Ray has ever had (GCS actor table: no dashboard needed)."""
    from ray._private.state import actors

    return {a for a, info in actors().items() if info["ActorClassName"].endswith("TrainController")}


def _in_thread(fn, timeout: float):
    """fn() with a deadline: a run that restarts forever (the bug) fails the test instead of hanging it."""
    return InThread(fn).result(timeout, "the run is restarting instead of ending")


def test_cli_resume_with_another_epoch_length_or_a_diverging_lr_ends_once(ray_cluster, tmp_path, image_writer,
                                                                          capsys):
    data = tmp_path / "images"
    image_writer(data, 96, kinds=("jpeg", "png"), size=(40, 40))  # 96 / 16 = 6 steps per epoch
    storage = tmp_path / "runs"
    metrics = storage / "r" / "logs" / "metrics.jsonl"

    def pretrain(*sets: str) -> int:
        argv = ["pretrain", "--config", "demo", "--data", str(data), "--storage", str(storage), "--name", "r"]
        for s in [*TINY, *sets]:
            argv += ["--set", s]
        return _in_thread(lambda: cli_main(argv), timeout=400)

    assert pretrain("optim.epochs=1") == 0
    assert len(_starts(metrics)) == 1
    capsys.readouterr()

    # the same run resumed with another batch size: 12 steps per epoch instead of 6 would shift every epoch. The
    # driver refuses it from the run's snapshot, before Ray Train starts a controller or a worker
    controllers = _train_controllers()
    assert pretrain("optim.epochs=2", "optim.batch_size=8") == EXIT_FATAL
    err = capsys.readouterr().err
    assert "epoch length changed" in err and "step_00000006 was written with 6 steps per epoch = 96 images / " \
        "optim.batch_size 16" in err
    assert "12 steps per epoch = 96 images / optim.batch_size 8" in err and "--name" in err
    assert err.count("[ibot-ray] training failed (FatalTrainingError)") == 1  # one block (Ray's own log lines aside)
    assert _train_controllers() == controllers  # no Train run was started for it
    rows = read_metrics(metrics)  # nothing trained, nothing restarted
    assert len(_starts(metrics)) == 1 and max(r["step"] for r in rows if "loss" in r) == 6
    # the workers' own check, for a checkpoint they restore (a sweep trial's): the same verdict from the same numbers
    from pipelines.train_worker import check_epoch_length

    with pytest.raises(FatalTrainingError, match="epoch length changed"):
        check_epoch_length({"steps_per_epoch": 6, "num_items": 96, "batch_size": 16},
                           {"steps_per_epoch": 12, "num_items": 96, "batch_size": 8}, "step_00000006")
    check_epoch_length({"steps_per_epoch": 6}, {"steps_per_epoch": 6, "num_items": 97, "batch_size": 16}, "s")

    # resumed with an absurd learning rate: diverges, ends once with the message and the exit status
    assert pretrain("optim.epochs=2", ABSURD_LR) == EXIT_FATAL
    err = capsys.readouterr().err
    assert "the loss diverged" in err and "optim.lr" in err and "2 consecutive non-finite steps" in err
    assert err.count("[ibot-ray] training failed (FatalTrainingError)") == 1
    starts = _starts(metrics)
    assert len(starts) == 2 and starts[-1]["resumed_from"] == 6  # one attempt, no restart
    skipped = [r for r in read_metrics(metrics) if r.get("step_skipped")]
    assert len(skipped) == 1  # optim.max_nonfinite_steps=2: one skipped step logged, the second ends the run


def test_a_diverging_sweep_trial_ends_as_an_error(ray_cluster, tmp_path):
    import pyarrow.parquet as pq

    import ibot_ray
    from ibot_ray.config import load_config
    from tune.space import parse_space
    from tune.sweep import run_sweep

    source = tmp_path / "small.parquet"
    pq.write_table(pq.read_table(Path(ibot_ray.__file__).parent / "demo_data" / "train.parquet").slice(0, 64), source)
    base = load_config("demo", [*TINY, f"data.source={source}", "optim.epochs=1", "train.cpus_per_worker=0.5",
                                "data.cpus_per_actor=0.5"])
    space = parse_space({"optim.lr": {"type": "grid", "values": [1e30]}}, base=base)
    res = _in_thread(lambda: run_sweep(space, config=base, objective="loss", scheduler="asha", max_failures=0,
                                       storage=str(tmp_path / "sweeps"), name="nan"), timeout=480)
    (row,) = res.rows
    assert row.status == "error" and "FatalTrainingError" in row.error and "non-finite" in row.error, res.table
    runs = list((tmp_path / "sweeps" / "nan" / "train_runs").glob("*/logs/metrics.jsonl"))
    assert len(runs) == 1 and len(_starts(runs[0])) == 1  # the Train run ended at its first failure
    # Resuming the sweep restarts errored trials, but not one whose error no retry can fix: it ends again at once,
    # with the same error, and trains nothing (its Train run starts no worker group)
    again = _in_thread(lambda: run_sweep(space, config=base, objective="loss", scheduler="asha", max_failures=0,
                                         storage=str(tmp_path / "sweeps"), name="nan"), timeout=480)
    (row,) = again.rows
    assert again.resumed and row.status == "error" and "non-finite" in row.error, again.table
    assert len(_starts(runs[0])) == 1
