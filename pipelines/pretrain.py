"""The pretraining driver: Ray Data ingest + Ray Train TorchTrainer + k-NN before/after + export.

``pretrain(cfg, storage=..., name=...)`` is what ``ibot-ray pretrain`` runs. Re-running it with the same storage and
name resumes from the run's latest committed checkpoint (Ray Train finds the run's snapshot in storage and hands the
checkpoint to the workers), never from scratch.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ibot_ray.config import ConfigError, IBOTConfig

log = logging.getLogger(__name__)

#: Where runs and sweeps live when no --storage is given (a sweep is the folder <storage>/<sweep name>).
DEFAULT_STORAGE = "ibot_runs"


@dataclass
class PretrainResult:
    run_path: str
    checkpoint_path: str | None
    metrics: dict
    steps: int
    knn_before: dict | None = None
    knn_after: dict | None = None
    knn_pixels: dict | None = None  # raw-pixel k-NN of the same split (the baseline a run must beat)
    knn_split: str | None = None  # the split every k-NN figure above was measured on (None: no k-NN)
    eval_plan: Any = None  # that split, listed (pipelines/eval_split.py EvalPlan), for further evaluation
    export_path: str | None = None
    wall_s: float = 0.0
    bad_images: dict = field(default_factory=dict)


def _state_api_available() -> bool:
    """Whether this install can run the dashboard head, which serves Ray's State API (``ray[default]``)."""
    try:
        from ray._private.utils import get_dashboard_dependency_error

        return get_dashboard_dependency_error() is None
    except Exception:  # noqa: BLE001 - another Ray layout: let Ray decide
        return False


def init_ray(cfg: IBOTConfig, address: str | None = None, *, num_cpus: float | None = None,
             verbose: bool = False) -> None:
    """Connect to a cluster (``address`` or RAY_ADDRESS) or start a local Ray sized for the run.

    Unless ``verbose``, Ray's own output stays in its log folder (``/tmp/ray/session_latest/logs`` for a local Ray):
    no worker/actor log forwarding to this terminal (``log_to_driver=False``), the driver's Ray loggers at WARNING,
    deprecation warnings filtered; the run's progress reaches the terminal through ``pipelines/console.py``.

    A local Ray runs the dashboard head (no UI is needed, but it serves the State API): Ray Train's
    PlacementGroupCleaner asks the State API every second whether the Train controller is alive, and without it logs
    "Failed to query Ray Train Controller actor state" every time, hundreds of lines per run.

    A local Ray gets enough logical CPUs (``num_cpus``, default: one run's) for the training workers *and* the data
    actors: with only the physical
    core count, Train reserves every CPU first and the Ray Data pipeline never starts (a deadlock on small machines)."""
    import ray

    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # worker prints once, not twice
    if not verbose:
        from pipelines.console import quiet_driver_logging

        quiet_driver_logging()
    if ray.is_initialized():
        return
    init_kwargs = {} if verbose else {"log_to_driver": False, "logging_level": logging.WARNING}
    from pipelines.storage import RETRY_DEADLINE_ENV

    if RETRY_DEADLINE_ENV in os.environ:  # the storage retry deadline set here reaches every task and actor
        init_kwargs["runtime_env"] = {"env_vars": {RETRY_DEADLINE_ENV: os.environ[RETRY_DEADLINE_ENV]}}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **init_kwargs)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local cluster: no token file in ~/.ray
    # A run starts ~10 Python processes at once (Train controller and workers, Data coordinator and actors, the
    # ingest monitor, the console mailbox). The raylet starts at most min(cores, CPUs) at a time and warns on the
    # driver's stdout above 4x that (8 on a 2-core laptop): let a local Ray start them all without the warning.
    os.environ.setdefault("RAY_worker_maximum_startup_concurrency", str(max(8, os.cpu_count() or 1)))
    from pipelines.cluster_plan import apply_plan, local_shape, needs_plan, plan_run

    if needs_plan(cfg):  # size the local Ray for what the run will plan on this machine
        cfg = apply_plan(IBOTConfig.from_dict(cfg.to_dict(), validate=False), plan_run(cfg, local_shape()))
    t, d = cfg.train, cfg.data
    needed = num_cpus or (t.num_workers[1] * max(1.0, t.cpus_per_worker) + d.actors[1] * d.cpus_per_actor + 1)
    # address="local": always a new private instance, even when another Ray runs on this machine
    ray.init(address="local", num_cpus=int(max(os.cpu_count() or 1, needed) + 0.999),
             include_dashboard=_state_api_available(), **init_kwargs)


def resolve_storage(storage: str | None) -> str:
    """Where a run or sweep lives: an absolute local path, or the URI (s3://, gs://) unchanged."""
    storage = storage or DEFAULT_STORAGE
    return storage if "://" in storage else str(Path(storage).expanduser().resolve())


def list_and_plan(cfg: IBOTConfig, listing=None):
    """The run's one listing of its training source and its evaluation plan (pipelines/eval_split.py): what it is
    judged on and what it trains on. A source or split that is missing, empty or unlabelled where labels are needed
    raises a :class:`ConfigError` naming the setting (the CLI prints it and exits 2), before any cluster resource."""
    from pipelines.eval_split import plan_evaluation
    from pipelines.knn_eval import EvalDataError
    from pipelines.sources import SourceError, list_source

    try:
        listing = listing if listing is not None else list_source(cfg)
    except SourceError as e:
        raise ConfigError(str(e)) from None
    try:
        return listing, plan_evaluation(cfg, listing)
    except EvalDataError as e:
        d = cfg.data
        bank = ("data.eval_train_source" if d.eval_train_source
                else "data.source (the training source: data.eval_train_source is not set)")
        raise ConfigError(
            f"online k-NN: {e}. The k-NN memory bank (train split) is {bank}, the queries (val split) are "
            "data.eval_source: point them at labelled data, or turn the k-NN off with data.eval_source=null") from None


def build_trainer(cfg: IBOTConfig, *, storage: str | None, name: str, callbacks: list | None = None,
                  console_name: str | None = None, verbose: bool = False, per_trial: bool = False, listing=None,
                  plan=None, evaluator=None):
    """The TorchTrainer of a run (also used by the Tune trial driver, ``per_trial``). Returns (trainer, info dict).

    The run's ``auto`` cluster fields are sized to the connected cluster first (pipelines/cluster_plan.py); the
    plan's choices and reasons come back in ``info["derived"]`` and ``info["warnings"]``, before any Train or Data
    resource is requested.

    ``listing``: the source's ``pipelines.sources.SourceListing`` when the caller listed it already (a sweep lists
    once for all its trials); else the source is listed here, once for the whole run (restarts included). ``plan``:
    its evaluation plan (:func:`list_and_plan`), made here when not given; the run trains on ``plan.train_listing``
    (a labelled source's held-out images removed). ``evaluator``: the driver's decoded k-NN splits
    (``KNNEvaluator``), shipped to rank 0 through the object store for the online k-NN; decoded here when the run
    needs them and none is given.

    ``console_name``: the run's console mailbox (pipelines/console.py) that rank 0 posts progress and events to;
    without one rank 0 prints its progress lines (worker log forwarding). ``verbose`` keeps Ray Train's INFO logs."""
    import ray
    import ray.data
    import ray.train

    from pipelines.failures import FailureBudget
    from pipelines.ingest import TrainStream, create_monitor, ingest_execution_options
    from pipelines.resize import ResizeAwareTorchTrainer, create_resize_notice
    from pipelines.storage import is_remote, resolve
    from pipelines.train_worker import TRAINED_KEYS_ENV, train_loop_per_worker

    ray.data.DataContext.get_current().enable_progress_bars = False
    if not verbose:
        from pipelines.console import quiet_driver_logging

        ray.data.DataContext.get_current().print_on_execution_start = False
        quiet_driver_logging()
    from ibot_ray.recipe import derive_settings
    from pipelines.cluster_plan import apply_plan, describe_cluster, plan_run

    derived = derive_settings(cfg)  # the `auto` fields the data pipeline needs (crop blur) ...
    cluster = plan_run(cfg, describe_cluster(), per_trial=per_trial)  # ... and what the run asks of the cluster
    apply_plan(cfg, cluster)
    derived += cluster.derived
    # Ray Train's controller reads it from the process that calls fit() (propagated to the controller): set here,
    # it also reaches the controllers of sweep trials, whose actors do not inherit the sweep driver's environment.
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(cfg.train.worker_start_timeout_s)
    monitor_name = create_monitor(name)
    if plan is None:
        listing, plan = list_and_plan(cfg, listing)
    listing = plan.train_listing
    info = listing.info
    knn_splits = None
    if cfg.train.knn_every_epochs and plan.enabled:  # rank 0's online k-NN: the splits decoded once, here
        from pipelines.knn_eval import KNNEvaluator

        knn_splits = ray.put((evaluator or KNNEvaluator(cfg, plan)).splits())
    if per_trial and cfg.train.checkpoint_min_interval_s:
        cfg.train.checkpoint_min_interval_s = 0.0  # Tune sees only the checkpoints' reports: ASHA judges epoch ends
        derived.append("train.checkpoint_min_interval_s = 0: a sweep trial reports at every epoch end (ASHA's rungs)")
    length = epoch_length(cfg, info.num_items)
    steps_per_epoch = length["steps_per_epoch"]
    derived += derive_settings(cfg, steps_per_epoch)  # ... and those that need the run's length
    cfg.validate()
    t = cfg.train
    use_gpu = cfg.train.use_gpu == "true"
    resources = {"CPU": t.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = t.gpus_per_worker
    if t.worker_resource:
        resources[t.worker_resource] = 1
    lo, hi = t.num_workers
    scaling = ray.train.ScalingConfig(
        num_workers=(lo, hi) if lo < hi else lo,
        use_gpu=use_gpu,
        resources_per_worker=resources,
        elastic_resize_monitor_interval_s=t.elastic_resize_interval_s,
    )
    # Remote storage: Ray Train gets the retrying file system of pipelines/storage.py, so its own storage calls
    # (the checkpoint-manager snapshot on the controller, checkpoint downloads, old checkpoints' deletion) wait out
    # outages instead of failing the run; the path is then given without its scheme.
    storage_path, storage_fs = resolve_storage(storage), None
    if is_remote(storage_path):
        storage_fs, storage_path = resolve(storage_path, setting="--storage")
    run_config = ray.train.RunConfig(
        name=name,
        storage_path=storage_path,
        storage_filesystem=storage_fs,
        failure_config=ray.train.FailureConfig(max_failures=t.max_failures,
                                               max_preemption_failures=t.max_preemption_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints),
        callbacks=[*(callbacks or []), FailureBudget(t.max_repeated_errors)],  # pipelines/failures.py
        logging_config=ray.train.LoggingConfig(log_level="INFO" if verbose else "WARNING"),
    )
    # an elastic run resizes only after a checkpoint taken for the resize (pipelines/resize.py)
    notice = create_resize_notice(name) if lo < hi else None
    trainer = ResizeAwareTorchTrainer(
        train_loop_per_worker,
        resize_notice=notice,
        train_loop_config={"cfg": cfg.to_dict(), "epoch_length": length, "monitor_name": monitor_name,
                           "console_name": console_name, "verbose": verbose,
                           "positions_per_epoch": listing.positions_per_epoch, "resize_notice": notice,
                           "trained_keys_dir": os.environ.get(TRAINED_KEYS_ENV), "knn_splits": knn_splits,
                           "knn_label": plan.label},
        scaling_config=scaling,
        run_config=run_config,
        dataset_config=ray.train.DataConfig(execution_options=ingest_execution_options()),
        # a factory: Train calls it at every worker-group start, and it streams from the checkpoint's data epoch
        datasets={"train": TrainStream(cfg, listing, monitor_name, run_uri(storage, name), steps_per_epoch)},
    )
    return trainer, {"derived": derived, "warnings": cluster.warnings, "eval_plan": plan,
                     "steps_per_epoch": steps_per_epoch, "num_items": info.num_items, "monitor_name": monitor_name,
                     "total_steps": steps_per_epoch * cfg.optim.epochs}


def epoch_length(cfg: IBOTConfig, num_items: int) -> dict:
    """A run's epoch: ``steps_per_epoch`` full global batches of its ``num_items`` listed images (``batch_size``)."""
    g = cfg.optim.batch_size
    if num_items < g:
        raise ConfigError(f"optim.batch_size: global batch {g} is larger than the dataset ({num_items} images)")
    return {"steps_per_epoch": num_items // g, "num_items": num_items, "batch_size": g}


def check_resume(cfg: IBOTConfig, num_items: int, run_path: str) -> None:
    """Refuse, before Ray starts, to resume run ``run_path`` with another epoch length than its latest checkpoint's
    (``pipelines.train_worker.check_epoch_length``: a ``FatalTrainingError``); a new run, or a checkpoint that
    reported no length, passes. Without this the refusal would come from the workers, once a cluster had started
    them and they had restored the checkpoint."""
    from pipelines.ingest import CHECKPOINT_DIR_METRIC, latest_checkpoint_metrics

    now = epoch_length(cfg, num_items)  # a global batch larger than the data is a config error, here too
    resumed = latest_checkpoint_metrics(run_path)
    if resumed:
        from pipelines.train_worker import EPOCH_LENGTH_METRIC, check_epoch_length

        check_epoch_length(resumed.get(EPOCH_LENGTH_METRIC) or {}, now,
                           resumed.get(CHECKPOINT_DIR_METRIC) or "the latest checkpoint")


def _teacher_from_checkpoint(cfg: IBOTConfig, checkpoint):
    from ibot_ray.checkpoint import load_checkpoint
    from ibot_ray.model import build_student_teacher
    from pipelines.storage import local_checkpoint
    from pipelines.train_worker import STATE_FILE

    _, teacher = build_student_teacher(cfg)
    with local_checkpoint(checkpoint) as d:  # a download retried through storage outages
        state = load_checkpoint(Path(d) / STATE_FILE)
    teacher.load_state_dict(state["teacher"])
    return teacher, state


def run_uri(storage: str | None, name: str) -> str:
    """The run folder of run ``name``: a local path, or a URI with its scheme (``s3://bucket/runs/name``)."""
    return f"{resolve_storage(storage).rstrip('/')}/{name}"


def pretrain(cfg: IBOTConfig, *, storage: str | None = None, name: str = "run", address: str | None = None,
             knn: bool = True, export: bool = True, verbose: bool = False, listing=None,
             config_name: str | None = None, takeover: bool = False) -> PretrainResult:
    """Run (or resume) a pretraining run; prints progress, the k-NN before/after, and where the outputs are.

    The terminal gets a progress bar (a line per log step when stdout is not a TTY), one line per event and a
    closing summary (pipelines/console.py); Ray's own logs stay in Ray's log folder unless ``verbose``. A run ended
    by an error that every restart would raise again (divergence, a config or source error on a worker, out of memory
    at the minimum world size) raises :class:`~pipelines.failures.FatalTrainingError` without restarting; other
    failures past Ray Train's budgets raise its ``TrainingFailedError`` (the CLI prints either as one block).

    ``knn``: the driver's k-NN before and after training (random init, raw pixels, the trained teacher) on the run's
    evaluation split (pipelines/eval_split.py); ``listing``: the training source's listing when the caller has it;
    ``config_name``: the preset or YAML the config came from, recorded in the run folder (:func:`claim_run`).

    One driver per run: the run's lease (pipelines/run_lease.py) is held from before any cluster resource is requested
    to the end, so a second driver on the same run raises ``RunInUseError`` and leaves the first one unharmed;
    ``takeover=True`` takes over a run whose driver is known to be gone, without waiting for its lease to go stale."""
    from pipelines.metrics import check_trackers
    from pipelines.run_lease import RunLease

    t_start = time.time()
    cfg.validate()  # before any cluster resource is requested
    check_trackers(cfg, resolve_storage(storage))  # train.loggers the storage cannot hold (pipelines/metrics.py)
    # the run's one listing, and what it is judged on: listed and planned here, before Ray starts and before the run
    # folder is touched (a missing source or an unlabelled explicit k-NN split is a config error)
    listing, plan = list_and_plan(cfg, listing)
    with RunLease(run_uri(storage, name), takeover=takeover):
        claim_run(run_uri(storage, name), cfg.data.source, config_name)
        check_resume(cfg, plan.train_listing.info.num_items, run_uri(storage, name))
        return _train(cfg, plan, storage=storage, name=name, address=address, knn=knn, export=export,
                      verbose=verbose, t_start=t_start)


def _train(cfg: IBOTConfig, plan, *, storage: str | None, name: str, address: str | None, knn: bool, export: bool,
           verbose: bool, t_start: float) -> PretrainResult:
    """:func:`pretrain` once the run is listed, planned and its lease held: the k-NN splits decoded, Ray started,
    the k-NN before training, the fit, the k-NN after it, the export and the summary."""
    import torch

    from ibot_ray.model import build_student_teacher

    listing = plan.train_listing
    evaluator = None
    if plan.enabled and (knn or cfg.train.knn_every_epochs):
        from pipelines.knn_eval import KNNEvaluator

        evaluator = KNNEvaluator(cfg, plan)
    init_ray(cfg, address, verbose=verbose)
    knn_before = knn_pixels = None
    if evaluator is not None and knn:
        torch.manual_seed(cfg.train.seed)
        _, teacher0 = build_student_teacher(cfg)
        knn_before = evaluator.evaluate(teacher0.backbone)
        knn_pixels = evaluator.pixel_baseline()
        print(f"[ibot-ray] k-NN on the {plan.split}, before training: initial teacher top-1 "
              f"{knn_before['knn_top1']:.2f}%, raw pixels {knn_pixels['knn_top1']:.2f}%", flush=True)

    from pipelines.console import ConsolePoller, ConsoleRenderer, format_summary, mailbox_name, ray_log_dir

    trainer, info = build_trainer(cfg, storage=storage, name=name, console_name=mailbox_name(name), verbose=verbose,
                                  listing=listing, plan=plan, evaluator=evaluator)
    held = f" ({plan.held_out} more held out for the k-NN)" if plan.held_out else ""
    print(f"[ibot-ray] run '{name}': {info['num_items']} training images{held}, {info['steps_per_epoch']} "
          f"steps/epoch, {info['total_steps']} steps, storage {resolve_storage(storage)}", flush=True)
    for note in plan.notes:
        print(f"[ibot-ray] note: {note}", flush=True)
    for d in info["derived"]:
        print(f"[ibot-ray] derived {d} (set it to override)", flush=True)
    for w in info["warnings"]:
        print(f"[ibot-ray] warning: {w}", flush=True)
    console = ConsoleRenderer(total_steps=info["total_steps"], steps_per_epoch=info["steps_per_epoch"], name=name)
    t_fit = time.time()
    from pipelines.failures import fit_or_raise_fatal

    with ConsolePoller(name, console):  # rank 0 -> mailbox actor -> this thread -> the terminal
        result = fit_or_raise_fatal(trainer)  # a deterministic error raises FatalTrainingError, once
    train_s = time.time() - t_fit
    from pipelines.ingest import get_bad_input_stats

    # distinct bad files, through the last data epoch trained (the stream reads ahead of the training)
    last_epoch = (result.metrics or {}).get("data_epoch")
    bad = get_bad_input_stats(info["monitor_name"], through_epoch=None if last_epoch is None else int(last_epoch))
    if bad["count"]:
        print(f"[ibot-ray] skipped {bad['count']} distinct unreadable images (per data epoch "
              f"{bad['per_epoch']}), e.g. {bad['examples'][:3]}", flush=True)
    # paths with their scheme (s3://...): Train V2's Result.path and Checkpoint.path are paths on its file system
    run_path = run_uri(storage, name)
    ckpt_path = f"{run_path}/{Path(result.checkpoint.path).name}" if result.checkpoint else None
    out = PretrainResult(run_path=run_path, checkpoint_path=ckpt_path,
                         metrics=dict(result.metrics or {}), steps=int((result.metrics or {}).get("step", 0)),
                         knn_before=knn_before, knn_pixels=knn_pixels, bad_images=bad,
                         knn_split=plan.split if plan.enabled else None, eval_plan=plan)
    if result.checkpoint is not None and ((evaluator is not None and knn) or export):
        teacher, state = _teacher_from_checkpoint(cfg, result.checkpoint)
        if evaluator is not None and knn:
            out.knn_after = evaluator.evaluate(teacher.backbone)
        if export:
            # the run folder from storage + name: Train V2's Result.path has no scheme (s3://...), and a
            # schemeless path would be written on the head's disk and lost at `ray down`
            out.export_path = _export(teacher, cfg, run_path)
    out.wall_s = time.time() - t_start
    print(format_summary(name=name, steps=out.steps, total_steps=info["total_steps"], wall_s=out.wall_s,
                         train_s=train_s, metrics=out.metrics, run_path=out.run_path, checkpoint_path=ckpt_path,
                         export_path=out.export_path, knn_before=knn_before, knn_after=out.knn_after,
                         knn_pixels=knn_pixels, knn_split=plan.split if plan.enabled else None,
                         knn_missing=None if plan.enabled else plan.why_none,
                         bad_images=int(bad["count"]), restarts=console.restarts, resizes=console.resizes,
                         preemptions=console.preemptions, log_dir=ray_log_dir(),
                         local=not (address or os.environ.get("RAY_ADDRESS")), verbose=verbose), flush=True)
    return out


def run_name_for(source: str) -> str:
    """A run's default name from its data: the folder's or file's name (``photos/`` -> ``photos``, ``x/train.parquet``
    -> ``train``, ``s3://bucket/imgs/`` -> ``imgs``, ``demo`` -> ``demo``), characters other than letters, digits,
    ``.``, ``_`` and ``-`` replaced by ``_``."""
    tail = source.rstrip("/").rsplit("/", 1)[-1].split("://")[-1] or "run"
    stem = tail[: -len(".parquet")] if tail.lower().endswith(".parquet") else tail
    return re.sub(r"[^A-Za-z0-9._-]", "_", stem) or "run"


def _overridden_keys(overrides: list[str]) -> frozenset:
    return frozenset(o.split("=", 1)[0].strip() for o in overrides if "=" in o)


def choose_config(overrides: list[str], *, address: str | None = None, verbose: bool = False):
    """``ibot-ray pretrain --data X`` without ``--config``: list the source once, read a few image headers, look at
    the device, and pick a preset (``ibot_ray.recipe.choose_preset``). Returns (config, listing, the lines saying
    what was chosen and why). The user's own ``--set`` values win over every derived one."""
    from ibot_ray.config import load_config
    from ibot_ray.recipe import choose_preset
    from pipelines.sources import SourceError, list_source, sample_image_sides

    probe = load_config(None, overrides)  # the data section is the user's; the preset only chooses the rest
    try:
        listing = list_source(probe)
    except SourceError as e:
        raise ConfigError(str(e)) from None
    sides = sample_image_sides(listing, seed=probe.data.seed)
    if not sides:
        raise ConfigError(f"data.source: none of the sampled images of {probe.data.source!r} could be read")
    if address or os.environ.get("RAY_ADDRESS"):
        from pipelines.cluster_plan import describe_cluster

        init_ray(probe, address, verbose=verbose)
        gpu = describe_cluster().capacity("GPU") > 0
    else:
        from pipelines.cluster_plan import local_shape

        gpu = local_shape().capacity("GPU") > 0
    side, user_set = int(sorted(sides)[len(sides) // 2]), _overridden_keys(overrides)
    choice = choose_preset(side, listing.info.num_items, gpu, user_set=user_set)
    cfg = load_config(choice.preset, list(overrides), validate=False)
    if listing.info.has_labels and cfg.data.eval_source == "auto":  # the held-out split (its preset's cap) won't train
        from pipelines.eval_split import holdout_size

        n = listing.info.num_items
        choice = choose_preset(side, n - holdout_size(n, cfg.data.eval_holdout_fraction, cfg.data.eval_max_images),
                               gpu, user_set=user_set)
    cfg = load_config(choice.preset, [f"{k}={v}" for k, v in choice.overrides.items()] + list(overrides))
    return cfg, choice.preset, listing, choice.reasons


def run_pretrain(config: str | None = None, overrides: list[str] | tuple[str, ...] = (), *, data: str | None = None,
                 storage: str | None = None, name: str | None = None, address: str | None = None,
                 verbose: bool = False, takeover: bool = False) -> PretrainResult:
    """What ``ibot-ray pretrain`` runs: resolve the config, validate it before any cluster resource is requested,
    name the run, and :func:`pretrain` it. Raises :class:`ConfigError` for a bad setting.

    ``config``: a preset name or YAML file; without one, ``demo`` when there is no data, else a preset chosen for
    the data (:func:`choose_config`, the choice printed with its reasons). ``overrides``: ``key=value`` strings;
    ``data``: the training source (``data.source``). ``name``: default the data's name (:func:`run_name_for`), else
    the preset's; a name that holds a run of another source or config is refused (:func:`claim_run`).
    ``takeover``: take over a run whose driver is gone (:func:`one_driver_per_run`)."""
    from ibot_ray.config import load_config

    overrides = list(overrides) + ([f"data.source={data}"] if data else [])
    source = load_config(config, overrides, validate=False).data.source
    listing = None
    if config is None and source != "demo":
        cfg, config_name, listing, reasons = choose_config(overrides, address=address, verbose=verbose)
        for line in reasons:
            print(f"[ibot-ray] chose {line}" if line.startswith("--config") else f"[ibot-ray] derived {line} "
                  "(set it to override)", flush=True)
    else:
        config_name = config or "demo"
        cfg = load_config(config_name, overrides)
    if name is None:
        name = run_name_for(cfg.data.source) if cfg.data.source != "demo" or config_name == "demo" else \
            run_name_for(config_name.rsplit(".", 1)[0])
    return pretrain(cfg, storage=storage, name=name, address=address, verbose=verbose, listing=listing,
                    config_name=config_name, takeover=takeover)


#: The run folder's record of what it trains (:func:`claim_run`).
RUN_IDENTITY_FILE = "run.json"


def _source_identity(source: str) -> str:
    return source if source == "demo" or "://" in source else str(Path(source).expanduser().resolve())


def claim_run(run_path: str, source: str, config_name: str | None) -> None:
    """Refuse a run folder that holds a run of another training source or config, else record this one in it.

    A name (``--name``, or the default from the data) that already holds a run resumes it: that is how a run
    continues after an interruption. Resuming it with other data or another preset would silently mix two runs (the
    epoch-length check catches only a changed image count), so the first run's ``run.json`` is compared; overrides
    (``--set``) may change on a resume, as before. Runs started before this record existed are not checked."""
    import json

    from pipelines import storage

    record = f"{run_path.rstrip('/')}/{RUN_IDENTITY_FILE}"
    mine = {"source": _source_identity(source), "config": config_name}
    text = storage.read_text(record, setting="--storage")
    theirs = None if text is None else json.loads(text)
    if theirs is not None:
        clash = [k for k in ("source", "config") if theirs.get(k) and mine[k] and theirs[k] != mine[k]]
        if clash:
            what = ", ".join(f"{k} {theirs[k]!r}" for k in clash)
            now = ", ".join(f"{k} {mine[k]!r}" for k in clash)
            raise ConfigError(f"run {run_path!r} holds a run of {what}; this command has {now}. Give it another "
                              "--name (or resume that run with its own data and --config)")
        return
    storage.write_text(record, json.dumps(mine), setting="--storage")


def _export(teacher, cfg: IBOTConfig, run_path: str) -> str:
    from ibot_ray.export import export_backbone
    from pipelines.storage import copy_to, resolve

    meta = {"which": "teacher"}  # arch and every create_model kwarg are read from the model itself
    fname = "teacher_backbone.safetensors"
    if "://" not in run_path:
        target = Path(run_path) / "export" / fname
        target.parent.mkdir(parents=True, exist_ok=True)
        export_backbone(teacher.backbone, target, metadata=meta)
        return str(target)
    with tempfile.TemporaryDirectory() as d:
        local = export_backbone(teacher.backbone, Path(d) / fname, metadata=meta)
        fs, path = resolve(run_path, setting="--storage")
        copy_to(str(local), fs, f"{path}/export/{fname}")  # retried through storage outages
    return f"{run_path}/export/{fname}"
