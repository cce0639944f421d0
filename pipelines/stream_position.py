"""Where the training stream stands inside its data epochs, so that a restart continues each epoch where it stopped.

Every row of the training stream carries its data epoch and its *position*: its index in that epoch's read order
(``pipelines/sources.py``: the folder images or Parquet rows in the order ``(data.seed, epoch)`` gives them, over
what the listing emits). A position names the same image whatever the world size, so a run that resumes on another
number of workers continues the same order.

The rows reach the ranks through Ray Data's streaming split in an order that is not a per-rank prefix, and each rank
holds rows it has read but not trained (prefetched batches, the local shuffle buffer, :class:`RowCarry`); unreadable
files never reach a rank (the ingest drops them and reports them to the run's ledger, with their position). So what
a checkpoint records per data epoch is

* a **watermark**: every position below it was trained or found unreadable, and
* the **consumed positions above it**: trained or unreadable rows past the first one still owed; their number is
  bounded by the rows in flight, not by the epoch (saved as a bitmap from the watermark).

Epochs below :attr:`StreamPosition.start` are done; epochs at or above it that are not in
:attr:`StreamPosition.epochs` were not started. A restarted stream (``pipelines/sources.py`` ``epoch_stream``)
begins every data epoch at its watermark's read unit and leaves out the consumed positions above it before reading
their bytes: every image is trained exactly once per data epoch when no step was lost, at most once otherwise.

Per step, each rank only appends ``epoch * POSITION_STRIDE + position`` of its trained rows (a tensor, on the device)
to :class:`TrainedPositions`; at a checkpoint the ranks all-gather them once and rank 0 folds them, and the
unreadable positions the ledger knows, into the run's :class:`StreamPosition` (``stream_position.json`` in the
checkpoint folder, read back by ``pipelines/ingest.py`` ``TrainStream`` at the next worker-group start).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

#: ``epoch * POSITION_STRIDE + position`` packs a row's (data epoch, position) into one int64 (2**40 positions per
#: epoch, 2**23 epochs).
POSITION_STRIDE = 1 << 40
#: The file in a checkpoint folder that holds the stream position of that checkpoint.
STREAM_POSITION_FILE = "stream_position.json"
_VERSION = 1


@dataclass
class EpochProgress:
    """One data epoch: every position below ``watermark`` is consumed, and so are the sorted ``above`` ones."""

    watermark: int = 0
    above: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def add(self, positions: np.ndarray) -> None:
        """Mark ``positions`` consumed (trained or unreadable; duplicates and ones already consumed are fine)."""
        positions = np.asarray(positions, dtype=np.int64)
        merged = np.union1d(self.above, positions[positions >= self.watermark])
        # the watermark moves over the run of consecutive consumed positions that starts at it
        run = merged == self.watermark + np.arange(len(merged), dtype=np.int64)
        k = len(merged) if run.all() else int(np.argmin(run))
        self.watermark += k
        self.above = merged[k:]

    def needed(self, first: int, last: int) -> np.ndarray:
        """Boolean mask over positions ``first .. last - 1``: True where the position is still to be read."""
        pos = np.arange(first, last, dtype=np.int64)
        return (pos >= self.watermark) & ~np.isin(pos, self.above, assume_unique=False)

    def consumed(self) -> int:
        return self.watermark + len(self.above)

    def to_json(self) -> dict:
        if len(self.above) == 0:
            return {"watermark": int(self.watermark)}
        bits = np.zeros(int(self.above[-1] - self.watermark) + 1, np.uint8)
        bits[self.above - self.watermark] = 1
        return {"watermark": int(self.watermark), "above_bits": len(bits),
                "above": base64.b64encode(np.packbits(bits).tobytes()).decode("ascii")}

    @classmethod
    def from_json(cls, d: dict) -> EpochProgress:
        w = int(d["watermark"])
        if not d.get("above_bits"):
            return cls(w)
        bits = np.unpackbits(np.frombuffer(base64.b64decode(d["above"]), np.uint8), count=int(d["above_bits"]))
        return cls(w, np.flatnonzero(bits).astype(np.int64) + w)


@dataclass
class StreamPosition:
    """The training stream's progress through its data epochs (module doc). ``size``: positions per data epoch."""

    size: int
    start: int = 0  # every data epoch below it is done
    epochs: dict[int, EpochProgress] = field(default_factory=dict)  # started epochs >= start

    def add(self, encoded: np.ndarray) -> None:
        """Mark rows consumed, given as ``epoch * POSITION_STRIDE + position`` (what :class:`TrainedPositions`
        gathers; :func:`encode` packs the ledger's unreadable ones)."""
        encoded = np.asarray(encoded, dtype=np.int64)
        if len(encoded) == 0:
            return
        epochs, positions = np.divmod(encoded, POSITION_STRIDE)
        for e in np.unique(epochs):
            e = int(e)
            if e < self.start:
                continue  # a done epoch: nothing of it is read again
            self.epochs.setdefault(e, EpochProgress()).add(positions[epochs == e])
        while self.start in self.epochs and self.epochs[self.start].watermark >= self.size:
            del self.epochs[self.start]
            self.start += 1

    def open_epochs(self) -> list[int]:
        """The started data epochs that still owe rows (the ones the ledger's unreadable positions matter for)."""
        return sorted(e for e, p in self.epochs.items() if p.watermark < self.size)

    def remaining(self, epoch: int) -> int:
        """Positions of data epoch ``epoch`` still to be read (trained or found unreadable)."""
        if epoch < self.start:
            return 0
        p = self.epochs.get(epoch)
        return self.size if p is None else max(0, self.size - p.consumed())

    def to_json(self) -> str:
        return json.dumps({"version": _VERSION, "size": self.size, "start": self.start,
                           "epochs": {str(e): p.to_json() for e, p in sorted(self.epochs.items())}})

    @classmethod
    def from_json(cls, text: str) -> StreamPosition:
        d = json.loads(text)
        if d.get("version") != _VERSION:
            raise ValueError(f"stream position version {d.get('version')!r}, this code reads {_VERSION}")
        return cls(int(d["size"]), int(d["start"]),
                   {int(e): EpochProgress.from_json(p) for e, p in d.get("epochs", {}).items()})


def encode(epochs, positions) -> np.ndarray:
    """``epoch * POSITION_STRIDE + position`` as int64 (numpy)."""
    return np.asarray(epochs, dtype=np.int64) * POSITION_STRIDE + np.asarray(positions, dtype=np.int64)


def read_stream_position(checkpoint_uri: str) -> Optional[StreamPosition]:
    """The :class:`StreamPosition` saved in a checkpoint folder (local or remote; transient storage errors are
    retried, pipelines/storage.py), None when that checkpoint has none (written before positions were recorded)."""
    from pipelines import storage

    text = storage.read_text(f"{checkpoint_uri.rstrip('/')}/{STREAM_POSITION_FILE}", setting="--storage")
    return None if text is None else StreamPosition.from_json(text)


class TrainedPositions:
    """One rank's trained rows since the last checkpoint, as ``epoch * POSITION_STRIDE + position`` tensors on the
    training device (one ``append`` per step, no host sync); :meth:`gather` all-gathers every rank's at a
    checkpoint."""

    def __init__(self) -> None:
        self._parts: list = []

    def add(self, epochs, positions) -> None:
        self._parts.append(epochs * POSITION_STRIDE + positions)

    def gather(self, world: int, device) -> np.ndarray:
        """Every rank's rows since the last call (a collective: every rank calls it at the same step), as a numpy
        array on every rank; this rank's list is emptied."""
        import torch
        import torch.distributed as dist

        local = torch.cat(self._parts) if self._parts else torch.zeros(0, dtype=torch.int64, device=device)
        self._parts = []
        if world == 1:
            return local.cpu().numpy()
        n = torch.tensor([len(local)], dtype=torch.int64, device=device)
        sizes = [torch.zeros_like(n) for _ in range(world)]
        dist.all_gather(sizes, n)
        longest = int(max(s.item() for s in sizes))
        padded = torch.full((longest,), -1, dtype=torch.int64, device=device)
        padded[:len(local)] = local
        out = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(out, padded)
        rows = torch.cat(out).cpu().numpy()
        return rows[rows >= 0]


__all__ = ["EpochProgress", "POSITION_STRIDE", "STREAM_POSITION_FILE", "StreamPosition", "TrainedPositions", "encode",
           "read_stream_position"]
