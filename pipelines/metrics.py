"""Rank 0's metrics sink: one JSON line per report in ``metrics.jsonl`` and the same scalars in TensorBoard.

Files are written to a local run folder; when the run's storage is remote (s3://, gs://) the folder is copied to
``<storage>/<name>/logs`` at every checkpoint, so the metrics survive the node."""

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
