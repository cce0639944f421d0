"""Hyper-parameter sweeps of iBOT pretraining with Ray Tune: one full Ray Train run per trial.

``run_sweep(space, config=..., ...)`` is what ``ibot-ray tune`` runs:

* **Trials.** Each trial is a function trainable (:func:`sweep_trial`) that builds the run's ``TorchTrainer`` with
  :func:`pipelines.pretrain.build_trainer` (workers per trial from the config) and calls ``fit()``. Ray Train V2
  hands every rank-0 ``ray.train.report`` to Tune through ``ray.tune.integration.ray_train.TuneReportCallback``, so
  one worker report is one Tune ``training_iteration``. The Train run is named ``<sweep>_<trial id>`` under
  ``<storage>/<sweep>/train_runs``: a restarted trial (a retry, or a resumed sweep) resumes its own Train checkpoint,
  and first replays that checkpoint's report to Tune (``pipelines.ingest.latest_checkpoint_metrics``), which an
  interrupt may have kept from Tune.
* **Trial drivers** need a Ray resource: ``cfg.train.driver_resource`` (``TRAIN_DRIVER``, only the on-demand head of
  ``cluster.yaml`` has it) when set, else a small CPU fraction (``{"CPU": 0}`` is rejected by Ray).
* **Objective.** ``knn_top1`` (online k-NN top-1 on ``data.eval_source``, mode max; measured at epoch ends) or
  ``loss`` (mode min; every report). ASHA counts the run's global optimiser step (``time_attr=step``), not Tune's
  ``training_iteration``, which a restarted trial inflates by replaying reports; its grace period covers
  ``grace_epochs`` epochs and at least the first k-NN evaluation. ASHA's rung records are kept in
  ``<sweep>/asha_state.yaml`` (Tune itself does not save scheduler state) so a resumed sweep still stops bad trials.
* **State and faults.** Tune's experiment state lives in ``<storage>/<sweep>``. Running the same sweep again
  (same storage and name) restores it: finished trials are kept, unfinished and errored ones resume (each from its
  Train run's checkpoint), except those whose error no retry can fix (``FatalTrainingError``: diverged, out of
  memory at the minimum size, a config error; kept in the trial's ``fatal_error.yaml``), which end again at once. A
  failing trial (even after ``max_failures`` retries) never ends the sweep. One driver per sweep: a second one on the
  same sweep stops with ``RunInUseError`` (pipelines/run_lease.py).
* **Stopped trials release their workers.** ASHA ends a trial's driver actor, and the Train controller dies with
  it without shutting its worker group down. A small reaper (:func:`_pg_reaper_callback`) removes that worker
  group's placement group, also one still being placed; Ray Train's own cleaner cannot when the State API is
  unavailable (no dashboard), and never sees a group that was still being placed.
* **Output.** A table (printed and ``results.csv``), ``best_config.yaml`` (the best trial's full config, for
  ``ibot-ray pretrain --config``) and ``objective_vs_params.png``; see :mod:`tune.report`.

PBT is not offered: see :data:`PBT_UNSUPPORTED`.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from ibot_ray.config import ConfigError, IBOTConfig, load_config
from pipelines.pretrain import resolve_storage
from pipelines.storage import read_text, write_text
from tune.report import (
    TrialRow,
    best_row,
    format_table,
    plot_objective,
    trial_row,
    write_best_config,
    write_csv,
)
from tune.space import SearchSpace, SpaceError, load_space, with_values

OBJECTIVES = {"knn_top1": "max", "loss": "min"}
SCHEDULERS = ("asha", "fifo", "pbt")
SPEC_FILE = "sweep_spec.yaml"
# Not *.json / *.pkl: Tune copies those from storage to its driver staging folder on restore and uploads them back
# later, which would overwrite a newer record with the restored copy.
ASHA_STATE_FILE = "asha_state.yaml"
ASHA_TIME_ATTR = "step"  # the run's global step: a restarted trial replays steps, never counts them twice
TRAIN_RUNS_DIR = "train_runs"
#: In a trial's Train run folder: the FatalTrainingError that ended it (YAML), raised again when the sweep resumes.
FATAL_ERROR_FILE = "fatal_error.yaml"
DRIVER_CPU = 0.1  # a trial driver's CPU share when no driver resource is configured
DRIVER_RESOURCE_SHARE = 0.01  # of cfg.train.driver_resource per trial driver (concurrency is capped separately)

PBT_UNSUPPORTED = (
    "--scheduler pbt is not supported: PBT exploits by cloning a Tune checkpoint, but a Ray Train V2 run reports to "
    "Tune through TuneReportCallback, which forwards metrics and the Train checkpoint's path only, never a Tune "
    "checkpoint, so PBT could never exploit. The workaround (train in segments of perturbation_interval epochs and "
    "report a pointer checkpoint after each segment) needs the worker loop to stop a run at an epoch boundary, which "
    "the config cannot express yet. Use --scheduler asha with random or grid search (docs/sweeps.md)."
)


class SweepError(RuntimeError):
    """A sweep cannot start or resume as asked; the message says why."""


def _is_uri(path: str) -> bool:
    return "://" in path


# ---- report arithmetic -----------------------------------------------------------------------------


def report_steps(cfg: IBOTConfig, steps_per_epoch: int) -> list[int]:
    """The optimiser steps at which the worker loop reports to Ray Train, and so to Tune: its checkpoint steps
    (``pipelines.train_worker.is_checkpoint_step``: every ``checkpoint_every_steps``, each epoch end, the last step)."""
    from pipelines.train_worker import is_checkpoint_step

    total = steps_per_epoch * cfg.optim.epochs
    return [s for s in range(1, total + 1)
            if is_checkpoint_step(s, steps_per_epoch=steps_per_epoch, total=total,
                                  every=cfg.train.checkpoint_every_steps)]


def asha_rungs(cfg: IBOTConfig, steps_per_epoch: int, objective: str, grace_epochs: float) -> tuple[int, int]:
    """(grace_period, max_t) in optimiser steps (ASHA's ``time_attr`` is the step): max_t is the run's last step,
    the grace period the last report step within ``grace_epochs`` epochs (fractions allowed), rounded up to the first
    epoch with a k-NN evaluation for the k-NN objective (a rung needs the objective)."""
    if grace_epochs <= 0:
        raise SweepError(f"grace_epochs must be > 0, got {grace_epochs}")
    steps = report_steps(cfg, steps_per_epoch)
    epochs = float(grace_epochs)
    if objective == "knn_top1":
        every = max(1, cfg.train.knn_every_epochs)
        epochs = math.ceil(epochs / every) * every
    epochs = min(epochs, cfg.optim.epochs)
    within = [s for s in steps if s <= epochs * steps_per_epoch]
    return (within[-1] if within else steps[0]), steps[-1]


# ---- the trial driver ------------------------------------------------------------------------------


def _report_callback(extra: dict):
    """A TuneReportCallback that adds the run's static facts (total steps, Train run name) to every report."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class SweepReportCallback(TuneReportCallback):
        def __init__(self, extra: dict) -> None:
            super().__init__()
            self.extra = dict(extra)

        def after_report(self, run_context, metrics, checkpoint):
            metrics = [{**metrics[0], **self.extra}, *metrics[1:]]
            super().after_report(run_context, metrics, checkpoint)

    return SweepReportCallback(extra)


def _pg_reaper_callback():
    """A Train callback that removes the worker group's placement group when the Train controller dies ungracefully.

    Why: ASHA stops a trial by ending its driver actor, and the Train controller it owns dies with it, never
    shutting its worker group down. Ray Train's own PlacementGroupCleaner finds the controller's death through the
    State API, which needs the dashboard (local clusters here start without it) and a single Ray instance per host;
    without it the stopped trial's worker bundle stays reserved and later trials' data pipelines starve. This reaper
    (a detached, zero-CPU actor per Train run) watches the controller through its actor handle instead, and only acts
    when the controller died without shutting down or aborting. It then removes every placement group the controller
    created, read from the GCS's table, which names each group's creator: also a group still being placed when the
    controller died, which no callback has been handed yet (Train hands the group over only once the workers run).
    """
    import ray
    from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback

    class PlacementGroupReaper:
        def __init__(self, controller: Any, controller_id: str, poll_s: float = 1.0) -> None:
            import threading

            self.controller = controller
            self.controller_id = controller_id
            self.pg = None
            self.poll_s = poll_s
            self.done = threading.Event()
            threading.Thread(target=self._watch, daemon=True).start()

        def register(self, pg: Any) -> None:
            self.pg = pg

        def stop(self) -> None:  # the controller shuts its worker group down itself
            self.done.set()
            ray.actor.exit_actor()

        def _created_by_controller(self) -> list:
            """The live placement groups whose creator is the controller, from the GCS's table (Ray's public
            ``placement_group_table`` leaves the creator out)."""
            from ray._private.state import state
            from ray.core.generated import gcs_pb2
            from ray.util.placement_group import PlacementGroup

            found = []
            for raw in state._connect_and_get_accessor().get_placement_group_table():
                row = gcs_pb2.PlacementGroupTableData.FromString(raw)
                if row.creator_actor_id.hex() == self.controller_id \
                        and row.state != gcs_pb2.PlacementGroupTableData.REMOVED:
                    found.append(PlacementGroup(ray.PlacementGroupID(row.placement_group_id)))
            return found

        def _watch(self) -> None:
            from ray.exceptions import GetTimeoutError, RayActorError
            from ray.util import placement_group_table, remove_placement_group

            while not self.done.is_set():
                try:
                    ray.get(self.controller.__ray_ready__.remote(), timeout=30)
                except GetTimeoutError:
                    continue
                except RayActorError:
                    break
                self.done.wait(self.poll_s)
            if not self.done.is_set():
                groups = {self.pg.id.hex(): self.pg} if self.pg is not None else {}
                try:
                    groups.update((g.id.hex(), g) for g in self._created_by_controller())
                except Exception as e:  # a Ray whose table reads differently: the registered group alone
                    print(f"[ibot-ray tune] could not list the controller's placement groups: {e}", flush=True)
                for pg_id, pg in groups.items():
                    try:
                        if placement_group_table(pg).get("state") != "REMOVED":
                            remove_placement_group(pg)
                            print(f"[ibot-ray tune] removed the placement group {pg_id} of a Train controller "
                                  "that ended without shutting down", flush=True)
                    except Exception as e:
                        print(f"[ibot-ray tune] could not remove the placement group {pg_id}: {e}", flush=True)
                ray.kill(ray.get_runtime_context().current_actor, no_restart=True)  # (stop() ends it otherwise)

    class ReaperCallback(ControllerCallback, WorkerGroupCallback):
        def __init__(self) -> None:
            self._reaper = None

        def after_controller_start(self, train_run_context) -> None:
            try:
                context = ray.get_runtime_context()
                # DEFAULT scheduling: outside the Tune trial's placement group, which the controller inherits and
                # Tune removes when it stops the trial (that would end the reaper with it).
                self._reaper = ray.remote(num_cpus=0)(PlacementGroupReaper).options(
                    lifetime="detached", max_concurrency=2, scheduling_strategy="DEFAULT").remote(
                    context.current_actor, context.get_actor_id())
            except Exception as e:  # best effort, as Ray Train's own cleaner
                print(f"[ibot-ray tune] no placement-group reaper: {e}", flush=True)

        def after_worker_group_start(self, worker_group) -> None:
            if self._reaper is not None:
                pg = worker_group.get_worker_group_state().placement_group_handle.placement_group
                self._reaper.register.remote(pg)

        def _stop(self) -> None:
            if self._reaper is not None:
                self._reaper.stop.remote()
                self._reaper = None

        async def before_controller_shutdown(self) -> None:
            self._stop()

        def before_controller_abort(self) -> None:
            self._stop()

    return ReaperCallback()


def train_run_name(sweep_name: str, trial_id: str) -> str:
    return f"{sweep_name}_{trial_id}"


def sweep_trial(config: dict, spec: Optional[dict] = None, listing: Any = None, plan: Any = None) -> None:
    """One Tune trial: the base config with this trial's values, trained to the end by its own TorchTrainer.

    An invalid combination of values (e.g. ``momentum_teacher > momentum_teacher_end``) raises the config's
    :class:`~ibot_ray.config.ConfigError` before any Train resource is requested; the trial errors, the sweep goes on.
    """
    assert spec is not None, "sweep_trial needs the sweep spec (tune.with_parameters)"
    base = IBOTConfig.from_dict(spec["base"], validate=False)
    cfg = with_values(base, {k: v for k, v in config.items() if k in spec["space"]["parameters"]})

    import ray.tune  # after validation: a bad combination fails without loading torch

    from pipelines.failures import FatalTrainingError, fit_or_raise_fatal
    from pipelines.ingest import latest_checkpoint_metrics
    from pipelines.pretrain import build_trainer

    trial_id = ray.tune.get_context().get_trial_id()
    name = train_run_name(spec["name"], trial_id)
    run_path = f"{spec['train_storage']}/{name}"
    # A resumed sweep retries its errored trials (Tuner.restore(resume_errored=True)), but only those a retry could
    # fix: a trial that ended with an error every restart raises again (diverged, out of memory at the minimum size, a
    # config error) raises it again here, before it asks for any Train resource.
    known = read_text(f"{run_path}/{FATAL_ERROR_FILE}")
    if known:
        raise FatalTrainingError(**yaml.safe_load(known))
    callback = _report_callback({"train_run": name})
    d, b = cfg.data, base.data
    same_source = (d.source, d.format, d.image_column, d.label_column) == (b.source, b.format, b.image_column,
                                                                           b.label_column)
    trainer, info = build_trainer(cfg, storage=spec["train_storage"], name=name,
                                  callbacks=[callback, _pg_reaper_callback()], per_trial=True,
                                  listing=listing if same_source else None,  # the sweep's one listing and plan
                                  plan=plan if d == b else None)
    for line in [*info["derived"], *(f"warning: {w}" for w in info["warnings"])]:
        print(f"[ibot-ray tune] trial {trial_id}: {line}", flush=True)
    total = int(info["total_steps"])
    callback.extra.update(total_steps=total, steps_per_epoch=int(info["steps_per_epoch"]))
    print(f"[ibot-ray tune] trial {trial_id}: {', '.join(f'{k}={v}' for k, v in config.items())}; "
          f"Train run {name} ({total} steps)", flush=True)
    # A trial that resumes its Train run (a retry, or a resumed sweep) first hands Tune the metrics of the run's
    # latest checkpoint. The sweep may have been interrupted after Train committed a report and before Tune recorded
    # it: ASHA then judges that report at its rung now, instead of one report interval later (or never, when the next
    # report is the last); a run that had already finished has nothing more to report. Tune records a report it had
    # already seen again, with no effect on ASHA (a recorded rung is not judged twice).
    replay = latest_checkpoint_metrics(run_path)
    if replay:
        ray.tune.report({k: v for k, v in {**replay, **callback.extra}.items() if not isinstance(v, list)})
    try:
        fit_or_raise_fatal(trainer)  # a diverged or misconfigured trial ends as an error at once
    except FatalTrainingError as e:  # ... and stays one when the sweep is resumed
        write_text(f"{run_path}/{FATAL_ERROR_FILE}",
                   yaml.safe_dump({"cause": e.cause, "detail": e.detail, "setting": e.setting}))
        raise


def trial_dirname(trial: Any) -> str:
    """Trial folders are named by trial id (the default name repeats every parameter value)."""
    return str(trial.trial_id)


# ---- ASHA with a persistent record -----------------------------------------------------------------


def _asha_class():
    from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

    class PersistentASHA(AsyncHyperBandScheduler):
        """ASHA whose rung records and early stops are written to ``state_path`` (YAML) whenever they change and
        read back on first use, so a resumed sweep keeps comparing new results with the old ones and the report
        knows which trials ASHA stopped. (Tune pickles the scheduler once, at Tuner creation, and never saves it.)
        """

        def __init__(self, *, state_path: str, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.state_path = state_path
            self.early_stopped: dict[str, int] = {}
            self._restored = False

        def _state(self) -> dict:
            return {"rungs": [[[m, dict(rec)] for m, rec in b._rungs] for b in self._brackets],
                    "early_stopped": self.early_stopped, "num_stopped": self._num_stopped}

        def _restore_once(self) -> None:
            if self._restored:
                return
            self._restored = True
            text = read_text(self.state_path)
            if not text:
                return
            state = yaml.safe_load(text) or {}
            for bracket, rungs in zip(self._brackets, state.get("rungs", [])):
                saved = {float(m): rec for m, rec in rungs}
                for m, rec in bracket._rungs:
                    rec.update(saved.get(float(m), {}))
            self.early_stopped.update({k: int(v) for k, v in state.get("early_stopped", {}).items()})
            self._num_stopped = int(state.get("num_stopped", self._num_stopped))

        def _save_if_changed(self, before: str) -> None:
            now = json.dumps(self._state(), sort_keys=True, default=float)
            if now != before:
                try:
                    write_text(self.state_path, yaml.safe_dump(json.loads(now), sort_keys=True))
                except Exception as e:  # the record is a convenience; a storage hiccup must not end the sweep
                    print(f"[ibot-ray tune] could not save the ASHA state to {self.state_path}: {e}", flush=True)

        def on_trial_add(self, tune_controller, trial) -> None:
            self._restore_once()
            super().on_trial_add(tune_controller, trial)

        def on_trial_result(self, tune_controller, trial, result: dict) -> str:
            self._restore_once()
            before = json.dumps(self._state(), sort_keys=True, default=float)
            action = super().on_trial_result(tune_controller, trial, result)
            if action == TrialScheduler.STOP:
                self.early_stopped[trial.trial_id] = int(result.get(self._time_attr, 0))
            self._save_if_changed(before)
            return action

        def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
            self._restore_once()
            before = json.dumps(self._state(), sort_keys=True, default=float)
            if trial.trial_id in self._trial_info:
                super().on_trial_complete(tune_controller, trial, result)
            self._save_if_changed(before)

        def on_trial_remove(self, tune_controller, trial) -> None:
            if trial.trial_id in self._trial_info:
                super().on_trial_remove(tune_controller, trial)

    return PersistentASHA


def read_trial_statuses(exp_path: str) -> dict[str, str]:
    """Tune's own status of each trial (PENDING, RUNNING, PAUSED, TERMINATED, ERROR) from the newest experiment
    state file of a local sweep folder; empty before Tune first writes it."""
    files = sorted(Path(exp_path).glob("experiment_state-*.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        return {}
    try:
        data = json.loads(files[-1].read_text())
    except (OSError, json.JSONDecodeError):  # being rewritten
        return {}
    out = {}
    for entry in data.get("trial_data", []):
        state = json.loads(entry[0])
        out[str(state["trial_id"])] = str(state["status"])
    return out


def read_asha_state(exp_path: str) -> dict:
    """ASHA's record of a sweep: ``rungs`` ([milestone, {trial id: signed objective}] per bracket),
    ``early_stopped`` ({trial id: iteration of the stop}) and ``num_stopped``; empty when there is none."""
    text = read_text(f"{exp_path}/{ASHA_STATE_FILE}")
    return (yaml.safe_load(text) or {}) if text else {}


# ---- the sweep --------------------------------------------------------------------------------------


@dataclass
class SweepResult:
    """What :func:`run_sweep` returns (and prints)."""

    path: str  # Tune experiment folder (or URI)
    name: str
    objective: str
    mode: str
    params: list[str]
    rows: list[TrialRow]
    best: Optional[TrialRow]
    best_config_path: Optional[str]
    csv_path: Optional[str]
    plot_path: Optional[str]
    table: str
    resumed: bool
    wall_s: float = 0.0
    asha: dict = field(default_factory=dict)  # {"grace_period", "max_t", "reduction_factor"} when ASHA ran

    @property
    def complete(self) -> bool:
        """True when no trial is left unfinished (an interrupted sweep is not complete)."""
        return all(r.status != "unfinished" for r in self.rows)


def _per_trial_resources(cfg: IBOTConfig, use_gpu: bool) -> dict[str, float]:
    t, d = cfg.train, cfg.data
    hi = t.num_workers[1]
    # + 1 CPU for Ray Data's read tasks, as pipelines.pretrain.init_ray counts it: without it the Train workers and
    # the crop actors of concurrent trials can take every CPU and no read task can start.
    res = {"CPU": hi * t.cpus_per_worker + d.actors[1] * d.cpus_per_actor + 1.0 + DRIVER_CPU}
    if use_gpu:
        res["GPU"] = hi * t.gpus_per_worker
    return res


def _trial_plan(cfg: IBOTConfig, shape):
    """(a trial's config with its cluster fields planned, the plan): what every trial will ask for."""
    from pipelines.cluster_plan import apply_plan, plan_run

    plan = plan_run(cfg, shape, per_trial=True)
    return apply_plan(IBOTConfig.from_dict(cfg.to_dict(), validate=False), plan), plan


def default_max_concurrent(cfg: IBOTConfig, shape=None) -> int:
    """Trials that fit the cluster at its maximum size (the node types it has or can launch,
    :func:`pipelines.cluster_plan.describe_cluster`): GPU worker slots // a trial's workers when trials train on
    GPU, else CPUs // the CPUs one trial reserves (Train workers, Data actors, driver). At least 1."""
    from pipelines.cluster_plan import describe_cluster, max_concurrent_trials

    shape = shape or describe_cluster()
    planned, plan = _trial_plan(cfg, shape)
    return max_concurrent_trials(planned, shape, plan, _per_trial_resources(planned, plan.use_gpu)["CPU"])


def _init_ray(cfg: IBOTConfig, address: Optional[str], concurrent: int, verbose: bool = False) -> None:
    from pipelines.cluster_plan import local_shape
    from pipelines.pretrain import init_ray

    planned, _ = _trial_plan(cfg, local_shape())  # sizes a local Ray only (a cluster is planned after connecting)
    init_ray(planned, address, num_cpus=_per_trial_resources(planned, False)["CPU"] * max(1, concurrent),
             verbose=verbose)


def _prepare_base(config: Union[str, IBOTConfig, None], overrides: Optional[list[str]], objective: str
                  ) -> IBOTConfig:
    if isinstance(config, IBOTConfig):
        base = IBOTConfig.from_dict(config.to_dict(), validate=False)
        if overrides:
            from ibot_ray.config import apply_overrides

            apply_overrides(base, overrides)
    else:
        base = load_config(config or "demo", overrides, validate=False)
    if objective == "knn_top1":
        if not base.data.eval_source:
            raise SweepError("objective knn_top1 needs a labelled split: set data.eval_source (auto: a held-out "
                             "split of a labelled source), or use --objective loss")
        if base.train.knn_every_epochs == 0:
            print("[ibot-ray tune] objective knn_top1: train.knn_every_epochs was 0, evaluating every epoch",
                  flush=True)
            base.train.knn_every_epochs = 1
    base.validate()
    return base


def _spec(name: str, base: IBOTConfig, space: SearchSpace, objective: str, scheduler: str, exp_path: str) -> dict:
    return {"name": name, "objective": objective, "mode": OBJECTIVES[objective], "scheduler": scheduler,
            "base": base.to_dict(), "space": space.to_dict(), "train_storage": f"{exp_path}/{TRAIN_RUNS_DIR}"}


def _check_same_sweep(stored: dict, new: dict, exp_path: str) -> None:
    diffs = [k for k in ("objective", "scheduler", "space") if stored.get(k) != new.get(k)]
    old_base, new_base = stored.get("base", {}), new.get("base", {})
    for section in sorted(set(old_base) | set(new_base)):
        for key in sorted(set(old_base.get(section, {})) | set(new_base.get(section, {}))):
            a, b = old_base.get(section, {}).get(key), new_base.get(section, {}).get(key)
            if a != b:
                diffs.append(f"{section}.{key} ({a!r} -> {b!r})")
    if diffs:
        raise SweepError(f"sweep {exp_path} already exists with a different setup ({'; '.join(diffs[:8])}); run the "
                         "same command to resume it, or choose another --name")


def run_sweep(
    space: Union[str, Path, SearchSpace],
    *,
    config: Union[str, IBOTConfig, None] = "demo",
    overrides: Optional[list[str]] = None,
    trials: Optional[int] = None,
    max_concurrent: Optional[int] = None,
    scheduler: str = "asha",
    objective: str = "knn_top1",
    storage: Optional[str] = None,
    name: Optional[str] = None,
    address: Optional[str] = None,
    grace_epochs: float = 1.0,
    reduction_factor: float = 2.0,
    max_failures: int = 1,
    seed: Optional[int] = 0,
    out_dir: Optional[Union[str, Path]] = None,
    verbose: int = 1,
    takeover: bool = False,
) -> SweepResult:
    """Run (or resume) a sweep and write its report; see the module doc.

    Args:
        space: a space YAML path, the name of a shipped space (``tau_momentum``), or a :class:`SearchSpace`.
        config / overrides: the base config (preset name, YAML path or IBOTConfig) and ``section.field=value``s.
        trials: Tune samples (each grid combination is run ``trials`` times); default 1 for an all-grid space, else 8.
        max_concurrent: trials at once; default what the cluster fits (:func:`default_max_concurrent`).
        scheduler: ``asha`` (early stopping), ``fifo`` (none) or ``pbt`` (refused, see :data:`PBT_UNSUPPORTED`).
        objective: ``knn_top1`` (max) or ``loss`` (min).
        storage / name: where the sweep lives (``<storage>/<name>``); the same pair resumes the sweep.
        grace_epochs / reduction_factor: ASHA's grace period (in epochs, converted to reports) and halving rate.
        max_failures: Tune retries of a failed trial (each retry resumes the trial's Train checkpoint).
        seed: seed of the random search (None: unseeded).
        out_dir: local folder for the table, CSV, best config and plot (default: the sweep folder when local,
            else ``./<name>_report``).
        takeover: take the sweep over from a driver known to be gone (one driver per sweep: pipelines/run_lease.py).
    """
    t0 = time.time()
    if scheduler not in SCHEDULERS:
        raise SweepError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {scheduler!r}")
    if scheduler == "pbt":
        raise SweepError(PBT_UNSUPPORTED)
    if objective not in OBJECTIVES:
        raise SweepError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if grace_epochs <= 0:
        raise SweepError(f"grace_epochs must be > 0, got {grace_epochs}")
    if reduction_factor <= 1:
        raise SweepError(f"reduction_factor must be > 1, got {reduction_factor}")
    base = _prepare_base(config, overrides, objective)
    sp = space if isinstance(space, SearchSpace) else load_space(space, base)
    if trials is not None and trials < 1:
        raise SweepError(f"trials must be >= 1, got {trials}")
    num_samples = trials or (1 if sp.grid_only else 8)
    name = name or f"sweep_{Path(str(sp.source)).stem}"
    storage_path = resolve_storage(storage)
    exp_path = f"{storage_path.rstrip('/')}/{name}"
    spec = _spec(name, base, sp, objective, scheduler, exp_path)
    mode = OBJECTIVES[objective]

    from pipelines.pretrain import list_and_plan

    try:  # once for the sweep: every trial reuses the listing and the evaluation plan (tune.with_parameters)
        listing, plan = list_and_plan(base)
        steps_per_epoch = plan.train_listing.info.num_items // base.optim.batch_size
    except Exception as e:
        raise SweepError(f"data.source {base.data.source!r} cannot be listed: {e}") from None
    if objective == "knn_top1" and not plan.enabled:
        raise SweepError(f"objective knn_top1 needs a labelled split: {plan.why_none}; or use --objective loss")
    if steps_per_epoch < 1:
        raise SweepError(f"optim.batch_size {base.optim.batch_size} is larger than the dataset {base.data.source!r}")

    from pipelines.run_lease import RunLease

    strict_env = os.environ.get("TUNE_DISABLE_STRICT_METRIC_CHECKING")
    lease = RunLease(exp_path, what="sweep", takeover=takeover).acquire()  # one driver per sweep, before Ray
    try:
        _init_ray(base, address, max_concurrent or 1, verbose=verbose >= 2)  # 2+: Ray's logs on the console too
        import ray.tune
        from ray.tune import Tuner
        from ray.tune.search.basic_variant import BasicVariantGenerator

        if objective == "knn_top1":
            # k-NN is measured at epoch ends only; the other reports lack it, which Tune's strict check would reject.
            os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
        driver = ({base.train.driver_resource: DRIVER_RESOURCE_SHARE} if base.train.driver_resource
                  else {"CPU": DRIVER_CPU})
        trainable = ray.tune.with_resources(ray.tune.with_parameters(sweep_trial, spec=spec, listing=listing,
                                                                     plan=plan), driver)

        resumed = Tuner.can_restore(exp_path)
        asha_info: dict = {}
        if resumed:
            stored = yaml.safe_load(read_text(f"{exp_path}/{SPEC_FILE}") or "{}") or {}
            _check_same_sweep(stored, spec, exp_path)
            print(f"[ibot-ray tune] resuming sweep {exp_path}", flush=True)
            # errored trials resume (same trial id, so their Train run continues from its checkpoint; Tune's
            # restart_errored would start them over under a new id), and sweep_trial ends at once a trial whose
            # error no retry can fix
            tuner = Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True, resume_errored=True)
            asha_info = stored.get("asha", {})
        else:
            concurrent = max_concurrent or default_max_concurrent(base)
            sched = None
            if scheduler == "asha":
                grace, max_t = asha_rungs(base, steps_per_epoch, objective, grace_epochs)
                grace = min(grace, max_t)
                asha_info = {"grace_period": grace, "max_t": max_t, "reduction_factor": reduction_factor,
                             "time_attr": ASHA_TIME_ATTR}
                sched = _asha_class()(state_path=f"{exp_path}/{ASHA_STATE_FILE}", time_attr=ASHA_TIME_ATTR,
                                      max_t=max_t, grace_period=grace,
                                      reduction_factor=reduction_factor, stop_last_trials=False)
            spec["asha"] = asha_info
            write_text(f"{exp_path}/{SPEC_FILE}", yaml.safe_dump(spec, sort_keys=False))
            print(f"[ibot-ray tune] sweep {exp_path}: {num_samples} sample(s) x grid {sp.grid_size} of "
                  f"{', '.join(sp.names)}; objective {objective} ({mode}); scheduler {scheduler} {asha_info or ''}; "
                  f"{concurrent} trial(s) at once", flush=True)
            tuner = Tuner(
                trainable,
                param_space=sp.param_space(),
                tune_config=ray.tune.TuneConfig(
                    metric=objective, mode=mode, num_samples=num_samples,
                    scheduler=sched, search_alg=BasicVariantGenerator(random_state=seed, max_concurrent=concurrent),
                    trial_dirname_creator=trial_dirname),
                run_config=ray.tune.RunConfig(name=name, storage_path=storage_path,
                                              failure_config=ray.tune.FailureConfig(max_failures=max_failures),
                                              verbose=verbose),
            )
        results = tuner.fit()
    finally:
        lease.release()
        if strict_env is None:
            os.environ.pop("TUNE_DISABLE_STRICT_METRIC_CHECKING", None)
        else:
            os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = strict_env
    out = _report(results, spec=spec, space=sp, base=base, exp_path=exp_path, out_dir=out_dir, resumed=resumed)
    out.asha = asha_info
    out.wall_s = time.time() - t0
    return out


def _report(results: Any, *, spec: dict, space: SearchSpace, base: IBOTConfig, exp_path: str,
            out_dir: Optional[Union[str, Path]], resumed: bool) -> SweepResult:
    objective, mode, names = spec["objective"], spec["mode"], space.names
    early = {k: int(v) for k, v in read_asha_state(exp_path).get("early_stopped", {}).items()}
    tune_status = read_trial_statuses(exp_path) if not _is_uri(exp_path) else {}
    rows = [trial_row(r, names=names, objective=objective, early_stopped=early, tune_status=tune_status)
            for r in results]
    rows.sort(key=lambda r: r.trial_id)
    best = best_row(rows, mode)
    out = Path(out_dir) if out_dir else (Path(exp_path) if not _is_uri(exp_path) else Path(f"{spec['name']}_report"))
    csv_path = write_csv(rows, names, objective, out / "results.csv")
    best_path = None
    if best is not None:
        cfg = with_values(base, {n: best.params[n] for n in names if best.params.get(n) is not None})
        header = (f"best trial {best.trial_id} of sweep {spec['name']} ({exp_path}): {objective}={best.objective:.4g} "
                  f"({mode}) at step {best.objective_step}\nswept: "
                  + ", ".join(f"{n}={best.params.get(n)}" for n in names)
                  + "\nuse: ibot-ray pretrain --config THIS_FILE --name NEW_RUN")
        best_path = str(write_best_config(cfg, out / "best_config.yaml", header=header))
    plot_path = str(plot_objective(rows, names, objective, mode, out / "objective_vs_params.png",
                                   log_scale={n: p.log_scale for n, p in space.params.items()},
                                   title=f"sweep {spec['name']}: {objective} ({mode})"))
    table = format_table(rows, names, objective, best=best)
    counts = {s: sum(r.status == s for r in rows) for s in ("completed", "stopped", "error", "unfinished")}
    summary = ", ".join(f"{v} {k}" for k, v in counts.items() if v)
    print(f"\n[ibot-ray tune] sweep {spec['name']}: {summary}", flush=True)
    print(table, flush=True)
    if counts["unfinished"]:
        print(f"[ibot-ray tune] {counts['unfinished']} trial(s) unfinished: run the same command again to resume",
              flush=True)
    print(f"[ibot-ray tune] results: {csv_path}\n[ibot-ray tune] plot: {plot_path}"
          + (f"\n[ibot-ray tune] best config: {best_path}" if best_path else ""), flush=True)
    return SweepResult(path=exp_path, name=spec["name"], objective=objective, mode=mode, params=names, rows=rows,
                       best=best, best_config_path=best_path, csv_path=str(csv_path), plot_path=plot_path,
                       table=table, resumed=resumed)


__all__ = ["ASHA_TIME_ATTR", "OBJECTIVES", "PBT_UNSUPPORTED", "SCHEDULERS", "SweepError", "SweepResult",
           "asha_rungs", "default_max_concurrent", "read_asha_state", "read_trial_statuses", "report_steps",
           "run_sweep", "sweep_trial", "train_run_name"]

# ConfigError and SpaceError are what callers catch for bad input; re-exported for them.
__all__ += ["ConfigError", "SpaceError"]
