"""Rank 0's metrics sink: one JSON line per report in ``metrics.jsonl``, and the same rows in each experiment tracker
of ``train.loggers``: TensorBoard (the default), MLflow, Weights & Biases.

Files are written to a local run folder; when the run's storage is remote (s3://, gs://), rank 0 uploads at every
checkpoint the rows written since its last upload as a new object ``<storage>/<name>/logs/metrics/part-<first
step>-<pid>.jsonl`` (append-only: nothing is overwritten, every row is uploaded once) and the trackers' own files
(:data:`SYNCED_FOLDERS`) to ``logs/``. :func:`read_metrics_history` joins the parts back into the run's whole history,
across restarts on other nodes and across resumed runs.

The JSONL is the run's record. Every tracker gets each row's finite numbers (loss, schedules, health metrics, k-NN,
throughput) at the row's step; MLflow and W&B also get the resolved config as parameters, the health status and any
collapse alarm as tags (MLflow) or summary values (W&B). A worker restart or a resumed run continues the same
tracker run: MLflow finds it by the ``ibot_ray.run_path`` tag, W&B by an id derived from the run path. A tracker
that fails while logging (a tracking server or network down) is dropped for the rest of the worker process with a
warning and an ``{"event": "tracker_error"}`` row; the JSONL goes on, and the next restart opens it again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any

from ibot_ray.config import ConfigError

log = logging.getLogger(__name__)

#: Tracker folders under a run's ``logs/`` that rank 0 uploads with its metrics when the storage is remote.
SYNCED_FOLDERS = ("tensorboard", "wandb")
#: The tag (MLflow) that names the ibot-ray run a tracker run belongs to: its run path (storage + name).
RUN_PATH_TAG = "ibot_ray.run_path"
#: Row keys whose string values trackers record as tags / summary values (the run's health).
STATUS_KEYS = ("health", "health_alarms")


def scalars(row: dict) -> dict[str, float]:
    """The finite numbers of a metrics row (what every tracker plots); booleans and strings are left out."""
    return {k: float(v) for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


def flat_config(cfg) -> dict[str, str]:
    """The resolved config as ``section.field`` -> string, the form trackers take parameters in."""
    return {f"{section}.{k}": (json.dumps(v) if isinstance(v, (list, dict)) else str(v))
            for section, fields in cfg.to_dict().items() for k, v in fields.items()}


def default_mlflow_uri(folder: str | Path) -> str:
    """The MLflow store of a run that names no ``train.mlflow_tracking_uri``: SQLite in its logs folder."""
    return f"sqlite:///{Path(folder).resolve() / 'mlflow.db'}"


def wandb_run_id(name: str, run_path: str) -> str:
    """A W&B run id that is the same for every restart and resume of one run, and differs between runs of the same
    name in other storages."""
    digest = hashlib.sha1(run_path.encode()).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9_-]', '-', name)[:48]}-{digest}"


def _mlflow_store_error(storage: str) -> ConfigError:
    return ConfigError(
        f"train.loggers: mlflow keeps its default store (a SQLite file) in the run's logs folder, and the run's "
        f"storage {storage} is not a local or shared file system: set train.mlflow_tracking_uri to your MLflow "
        "server (http://...)")


def check_trackers(cfg, storage: str) -> None:
    """Refuse, before Ray starts, a tracker setting the run's storage cannot honour: MLflow's default store is a
    SQLite file in the run's logs folder, which a bucket (s3://, gs://) cannot hold."""
    if "mlflow" in cfg.train.loggers and not cfg.train.mlflow_tracking_uri and "://" in str(storage):
        raise _mlflow_store_error(storage)


class Tracker:
    """One experiment tracker: the rows of ``metrics.jsonl`` go to :meth:`log`, :meth:`close` ends its run."""

    name = ""

    def log(self, row: dict, step: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class TensorBoardTracker(Tracker):
    """TensorBoard event files under ``logs/tensorboard/`` (one file per writer process)."""

    name = "tensorboard"

    def __init__(self, folder: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(str(folder / "tensorboard"))

    def log(self, row: dict, step: int) -> None:
        for k, v in scalars(row).items():
            self._tb.add_scalar(k, v, step)
        self._tb.flush()

    def close(self) -> None:
        self._tb.close()


class MLflowTracker(Tracker):
    """An MLflow run in ``train.mlflow_experiment``, at ``train.mlflow_tracking_uri`` (default: SQLite in the run's
    logs folder, ``logs/mlflow.db``; browse it with ``mlflow ui --backend-store-uri sqlite:///.../logs/mlflow.db``)."""

    name = "mlflow"
    _BATCH = 100  # MLflow's limit of parameters per log_batch call (metrics: 1,000)

    def __init__(self, folder: Path, cfg, run_name: str, run_path: str) -> None:
        t = cfg.train
        if not t.mlflow_tracking_uri and not folder.resolve().is_relative_to(Path(run_path).resolve()):
            raise _mlflow_store_error(run_path)  # remote storage: the logs folder is on this node's disk only
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient

        uri = t.mlflow_tracking_uri or default_mlflow_uri(folder)
        self.client = client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(t.mlflow_experiment)
        if exp is None:
            location = None if t.mlflow_tracking_uri else (folder / "mlflow-artifacts").resolve().as_uri()
            experiment_id = client.create_experiment(t.mlflow_experiment, artifact_location=location)
        else:
            experiment_id = exp.experiment_id
        quoted = run_path.replace("'", "\\'")
        found = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_PATH_TAG}` = '{quoted}'",
                                   max_results=1)
        params = flat_config(cfg)
        if found:  # a restart or a resumed run: the same MLflow run
            run = found[0]
            self.run_id = run.info.run_id
            client.update_run(self.run_id, status="RUNNING")
            old = run.data.params
            changed = {k: v for k, v in params.items() if k in old and old[k] != v}
            params = {k: v for k, v in params.items() if k not in old}  # MLflow parameters cannot change
            if changed:
                client.set_tag(self.run_id, "ibot_ray.resumed_with_changes",
                               ", ".join(f"{k}: {old[k]} -> {v}" for k, v in sorted(changed.items())))
        else:
            self.run_id = client.create_run(experiment_id, run_name=run_name,
                                            tags={RUN_PATH_TAG: run_path}).info.run_id
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), self._BATCH):
            client.log_batch(self.run_id, params=items[i:i + self._BATCH])
        self._RunTag = RunTag

    def log(self, row: dict, step: int) -> None:
        from mlflow.entities import Metric

        ms = int(row.get("time", time.time()) * 1000)
        metrics = [Metric(k, v, ms, step) for k, v in scalars(row).items() if k != "time"]
        tags = [self._RunTag(k, str(row[k])) for k in STATUS_KEYS if isinstance(row.get(k), str)]
        if row.get("event") == "collapse":
            tags.append(self._RunTag(f"collapse.{row.get('condition')}", str(row.get("message"))[:5000]))
        for i in range(0, max(len(metrics), 1), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000], tags=tags if i == 0 else [])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class WandbTracker(Tracker):
    """A Weights & Biases run in ``train.wandb_project``: online, or offline (``train.wandb_mode=offline`` or
    ``WANDB_MODE=offline``: no network; the run's files go to ``logs/wandb/``, ``wandb sync`` uploads them later).
    Rows are logged against their training step (the ``step`` key), so rows a restart replays stay in order."""

    name = "wandb"

    def __init__(self, folder: Path, cfg, run_name: str, run_path: str) -> None:
        import wandb

        t = cfg.train
        mode = t.wandb_mode if t.wandb_mode != "auto" else (os.environ.get("WANDB_MODE") or "online")
        self.run = wandb.init(project=t.wandb_project, entity=t.wandb_entity, name=run_name,
                              id=wandb_run_id(run_name, run_path), resume="allow", mode=mode, dir=str(folder),
                              settings=wandb.Settings(console="off"))
        self.run.config.update(cfg.to_dict(), allow_val_change=True)
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log(self, row: dict, step: int) -> None:
        data: dict[str, Any] = {k: v for k, v in scalars(row).items() if k != "time"}
        data["step"] = step
        self.run.log(data)
        for k in STATUS_KEYS:
            if isinstance(row.get(k), str):
                self.run.summary[k] = row[k]
        if row.get("event") == "collapse":
            self.run.summary[f"collapse/{row.get('condition')}"] = str(row.get("message"))

    def close(self) -> None:
        self.run.finish()


def open_tracker(name: str, folder: Path, cfg, run_name: str, run_path: str) -> Tracker:
    """The tracker ``name`` of ``train.loggers`` (ibot_ray/config.py ``LOGGERS``)."""
    if name == "tensorboard":
        return TensorBoardTracker(folder)
    if name == "mlflow":
        return MLflowTracker(folder, cfg, run_name, run_path)
    if name == "wandb":
        return WandbTracker(folder, cfg, run_name, run_path)
    raise ConfigError(f"train.loggers: unknown logger {name!r}")


class MetricsWriter:
    """``metrics.jsonl`` in ``folder`` and the trackers of ``cfg.train.loggers`` (TensorBoard only without a
    config). ``run_name`` and ``run_path`` (storage + name) identify the run to MLflow and W&B."""

    def __init__(self, folder: str | Path, *, cfg=None, run_name: str = "run", run_path: str | None = None) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / "metrics.jsonl"
        names = tuple(cfg.train.loggers) if cfg is not None else ("tensorboard",)
        self.trackers: list[Tracker] = []
        for name in names:
            try:
                self.trackers.append(open_tracker(name, self.folder, cfg, run_name,
                                                  run_path or str(self.folder.parent)))
            except ConfigError:
                raise
            except ImportError as e:
                if name == "tensorboard":  # a core dependency: missing or broken, the JSONL still works
                    self._dropped(name, e)
                    continue  # an extra missing on this node, though the driver's config check passed
                raise ConfigError(f"train.loggers: {name} cannot be imported on this node ({e})") from None
            except Exception as e:  # noqa: BLE001 - a tracker's server or network: the JSONL still works
                self._dropped(name, e)

    def _dropped(self, name: str, error: Exception) -> None:
        log.warning("experiment tracker %s disabled in this worker process: %s: %s", name, type(error).__name__,
                    error)
        self._append({"time": time.time(), "event": "tracker_error", "tracker": name,
                      "message": f"{type(error).__name__}: {error}"[:2000]})

    def _append(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row, default=float) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def write(self, metrics: dict, step: int) -> None:
        row = {"time": time.time(), **metrics}
        self._append(row)
        for tracker in list(self.trackers):
            try:
                tracker.log(row, step)
            except Exception as e:  # noqa: BLE001 - metrics must never kill training
                self.trackers.remove(tracker)
                self._dropped(tracker.name, e)

    def close(self) -> None:
        for tracker in self.trackers:
            try:
                tracker.close()
            except Exception as e:  # noqa: BLE001
                log.warning("closing experiment tracker %s: %s", tracker.name, e)


def read_metrics(path: str | Path) -> list[dict]:
    """All rows of a metrics.jsonl file (for tests, the driver's summary and the Tune objective)."""
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


#: Folder (under a run's ``logs/``) of the append-only metrics parts of a run on remote storage.
METRICS_PARTS_DIR = "metrics"


def metrics_part_name(rows: bytes, pid: int) -> str:
    """``part-<first step, 8 digits>-<pid>.jsonl`` for a chunk of JSONL rows (step 0 when the first row has none)."""
    first = rows.split(b"\n", 1)[0]
    try:
        step = int(json.loads(first).get("step", 0))
    except (ValueError, AttributeError):
        step = 0
    return f"part-{step:08d}-{pid}.jsonl"


def read_metrics_history(logs: str | Path) -> list[dict]:
    """The whole metrics history of a run from its ``logs`` folder, local path or URI (``s3://``, ``gs://``).

    With append-only parts (``logs/metrics/part-*.jsonl``, remote storage) the parts are joined in order: by the
    first row's step, then its time (a restarted worker's first part starts at the step it resumed from). Without
    parts (local storage), ``logs/metrics.jsonl`` is read."""
    import pyarrow.fs as pafs

    from pipelines.storage import resolve

    fs, base = resolve(str(logs), setting="the run's logs folder")  # a remote file system retries every call
    base = base.rstrip("/")
    infos = fs.get_file_info(pafs.FileSelector(f"{base}/{METRICS_PARTS_DIR}", allow_not_found=True))
    parts = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.base_name.startswith("part-")
                   and i.base_name.endswith(".jsonl"))
    if not parts:
        info = fs.get_file_info(f"{base}/metrics.jsonl")
        parts = [info.path] if info.type == pafs.FileType.File else []
    chunks = []
    for path in parts:
        with fs.open_input_stream(path) as f:
            rows = [json.loads(line) for line in f.read().decode().splitlines() if line.strip()]
        if rows:
            chunks.append(rows)
    chunks.sort(key=lambda rows: (int(rows[0].get("step", 0)), float(rows[0].get("time", 0.0))))
    return [row for rows in chunks for row in rows]
