"""Training side of the ingest: Arrow batches -> uint8/bool/int64 torch tensors -> device -> normalised floats.

The crops travel as uint8 all the way to the device (4x less host->device traffic than float32); the collate only
wraps the Arrow buffers as tensors, Ray's ``iter_torch_batches`` moves the dict of tensors to the device, and
:func:`normalize_crops` makes float crops there.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Optional, Union

import torch
from ray.data.collate_fn import ArrowBatchCollateFn

from ibot_ray.knn import IMAGENET_MEAN, IMAGENET_STD

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow

    from ibot_ray.config import IBOTConfig

#: Tensor columns handed to the training loop (``key`` strings are dropped: a tensor-only batch is what Ray moves
#: to the device).
TENSOR_COLUMNS = ("global_crops", "local_crops", "masks", "label")


class MultiCropCollateFn(ArrowBatchCollateFn):
    """Arrow batch of the ingest -> ``{"global_crops": uint8 (B,G,3,S,S), "local_crops": uint8 (B,L,3,s,s),
    "masks": bool (B,G,h,w), "label": int64 (B,)}`` CPU tensors (zero-copy where Arrow allows)."""

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
        if "label" in out:
            out["label"] = out["label"].to(torch.int64)
        return out


def normalize_crops(
    crops: torch.Tensor,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """uint8 crops ``(..., 3, H, W)`` -> ``(x / 255 - mean) / std`` as ``dtype``, computed on ``crops.device``."""
    if crops.dtype != torch.uint8:
        raise TypeError(f"normalize_crops expects uint8 crops, got {crops.dtype}")
    if crops.dim() < 3 or crops.shape[-3] != len(mean) or len(mean) != len(std):
        raise ValueError(f"normalize_crops: crops of shape {tuple(crops.shape)} do not have {len(mean)} channels at "
                         f"dim -3 (mean {tuple(mean)}, std {tuple(std)})")
    m = torch.tensor(mean, dtype=dtype, device=crops.device).view(-1, 1, 1) * 255.0
    s = torch.tensor(std, dtype=dtype, device=crops.device).view(-1, 1, 1) * 255.0
    return (crops.to(dtype) - m) / s


def iter_train_batches(
    shard,
    cfg: IBOTConfig,
    batch_size: int,
    device: Union[str, torch.device] = "auto",
    *,
    epoch: Optional[int] = None,
    epoch_clock_name: Optional[str] = None,
    normalize: bool = False,
    pin_memory: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """One epoch of fixed-size batches from a Dataset or DataIterator (e.g. ``ray.train.get_dataset_shard``).

    Yields ``{"global_crops", "local_crops", "masks", "label"}`` on ``device`` (uint8 crops; float32 normalised with
    ImageNet statistics when ``normalize``). With ``epoch`` and ``epoch_clock_name``, the ingest's epoch clock is set
    first, so the crops of this epoch are seeded by it; every rank may do so (the value is the same).
    Partial last batches are dropped so every step has ``batch_size`` images.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if epoch is not None and epoch_clock_name:
        from pipelines.ingest import set_epoch

        set_epoch(epoch_clock_name, epoch)
    d = cfg.data
    it = shard.iter_torch_batches(
        batch_size=batch_size,
        drop_last=True,
        prefetch_batches=d.prefetch_batches,
        local_shuffle_buffer_size=d.local_shuffle_buffer_size or None,
        local_shuffle_seed=None,
        collate_fn=MultiCropCollateFn(),
        device=device,
        pin_memory=pin_memory,
    )
    for batch in it:
        if normalize:
            batch = dict(batch)
            batch["global_crops"] = normalize_crops(batch["global_crops"])
            batch["local_crops"] = normalize_crops(batch["local_crops"])
        yield batch


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MultiCropCollateFn",
    "TENSOR_COLUMNS",
    "iter_train_batches",
    "normalize_crops",
]
