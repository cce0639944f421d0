"""Training side of the ingest: Arrow batches -> uint8/bool/int64 torch tensors -> device -> normalised floats.

The crops travel as uint8 all the way to the device (4x less host->device traffic than float32); the collate only
wraps the Arrow buffers as tensors, Ray's ``iter_torch_batches`` moves the dict of tensors to the device (the
training loop asks for host batches, pinned on a GPU, which ``IBOTStep.stage`` copies itself on a side stream after
finding the masked tokens on the host), and :func:`ibot_ray.knn.normalize_images` (the project's one normaliser) makes
float crops there.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Optional, Union

import torch
from ray.data.collate_fn import ArrowBatchCollateFn

from ibot_ray.knn import IMAGENET_MEAN, IMAGENET_STD, normalize_images

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow

    from ibot_ray.config import IBOTConfig

#: Tensor columns handed to the training loop (``key`` strings are dropped: a tensor-only batch is what Ray moves
#: to the device; ``key_id`` names the image as a number, ``epoch`` is the row's data epoch and ``position`` its
#: place in that epoch's read order, pipelines/stream_position.py).
TENSOR_COLUMNS = ("global_crops", "local_crops", "masks", "label", "epoch", "position", "key_id")


class MultiCropCollateFn(ArrowBatchCollateFn):
    """Arrow batch of the ingest -> ``{"global_crops": uint8 (B,G,3,S,S), "local_crops": uint8 (B,L,3,s,s),
    "masks": bool (B,G,h,w), "label", "epoch", "position", "key_id": int64 (B,)}`` CPU tensors (zero-copy where Arrow
    allows)."""

    def __init__(self, columns: Sequence[str] = TENSOR_COLUMNS) -> None:
        super().__init__()
        self.columns = tuple(columns)

    def __call__(self, batch: pyarrow.Table) -> dict[str, torch.Tensor]:
        from ray.data.util.torch_utils import arrow_batch_to_tensors

        missing = [c for c in self.columns if c not in batch.column_names]
        if missing:
            raise KeyError(f"ingest batch lacks column(s) {missing}; it has {batch.column_names}")
        out = arrow_batch_to_tensors(batch.select(list(self.columns)), combine_chunks=True)
        if "masks" in out:
            out["masks"] = out["masks"].to(torch.bool)
        for c in ("label", "epoch", "position", "key_id"):
            if c in out:
                out[c] = out[c].to(torch.int64)
        return out


def iter_train_batches(
    shard,
    cfg: IBOTConfig,
    batch_size: int,
    device: Union[str, torch.device] = "auto",
    *,
    normalize: bool = False,
    pin_memory: bool = False,
    shuffle_rows: Optional[int] = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Fixed-size batches of one pass over a Dataset or DataIterator (e.g. ``ray.train.get_dataset_shard``): for
    the training stream, every data epoch it holds, in one execution.

    Yields ``{"global_crops", "local_crops", "masks", "label", "epoch", "position", "key_id"}`` on ``device`` (uint8
    crops; float32 normalised with ImageNet statistics when ``normalize``). A partial last batch is dropped.
    ``shuffle_rows`` overrides ``data.local_shuffle_buffer_size`` (the trainer caps it to a quarter of a rank's epoch,
    so that the local shuffle mixes only the rows near an epoch boundary, never whole epochs of a small dataset).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    d = cfg.data
    it = shard.iter_torch_batches(
        batch_size=batch_size,
        drop_last=True,
        prefetch_batches=d.prefetch_batches,
        local_shuffle_buffer_size=(d.local_shuffle_buffer_size if shuffle_rows is None else shuffle_rows) or None,
        local_shuffle_seed=None,
        collate_fn=MultiCropCollateFn(),
        device=device,
        pin_memory=pin_memory,
    )
    for batch in it:
        if normalize:
            batch = dict(batch)
            batch["global_crops"] = normalize_images(batch["global_crops"])
            batch["local_crops"] = normalize_images(batch["local_crops"])
        yield batch


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MultiCropCollateFn",
    "TENSOR_COLUMNS",
    "iter_train_batches",
]
