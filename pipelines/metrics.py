"""Rank 0's metrics sink: one JSON line per report in ``metrics.jsonl`` and the same scalars in TensorBoard.

Files are written to a local run folder; when the run's storage is remote (s3://, gs://), rank 0 uploads at every
checkpoint the rows written since its last upload as a new object ``<storage>/<name>/logs/metrics/part-<first
step>-<pid>.jsonl`` (append-only: nothing is overwritten, every row is uploaded once) and its TensorBoard event files
to ``logs/tensorboard/``. :func:`read_metrics_history` joins the parts back into the run's whole history, across
restarts on other nodes and across resumed runs."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)


class MetricsWriter:
    def __init__(self, folder: str | Path, *, tensorboard: bool = True) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / "metrics.jsonl"
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.folder / "tensorboard"))
            except Exception as e:  # tensorboard missing or broken: JSONL still works
                log.warning("TensorBoard disabled: %s", e)

    def write(self, metrics: dict, step: int) -> None:
        row = {"time": time.time(), **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(row, default=float) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
                    self._tb.add_scalar(k, float(v), step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


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
