"""Weighted k-NN evaluation of frozen features (the DINO / iBOT protocol).

Features are the final-norm [CLS] tokens of the (teacher) backbone on centre-cropped images. Each test feature votes
with its ``k`` nearest train features by cosine similarity; neighbour ``j`` adds ``exp(s_j / T)`` to the score of its
class. Papers report ``k = 20, T = 0.07``.

Memory stays bounded: test features are processed ``chunk_size`` at a time, so at most ``chunk_size x N_train``
similarities exist at once, and the train features are never copied (their norms are folded into the similarities
instead of normalising a second N_train x D tensor).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_FRACTION = 0.875  # 224 / 256: resize to size / 0.875, then centre crop `size`


def normalize_images(images: Tensor, mean: Sequence[float] | Tensor = IMAGENET_MEAN,
                     std: Sequence[float] | Tensor = IMAGENET_STD) -> Tensor:
    """uint8 images ``(..., C, H, W)`` -> float32 ``(x / 255 - mean) / std`` per channel, on the images' device.

    The one normaliser of the project: the training step, the k-NN features and the ingest's collate use it."""
    if images.dtype != torch.uint8:
        raise TypeError(f"normalize_images expects uint8 images, got {images.dtype}")
    m = torch.as_tensor(mean, dtype=torch.float32, device=images.device).reshape(-1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=images.device).reshape(-1, 1, 1)
    if images.dim() < 3 or images.shape[-3] != m.shape[0] or m.shape != s.shape:
        raise ValueError(f"normalize_images: images of shape {tuple(images.shape)} do not have {m.shape[0]} channels "
                         f"at dim -3 (mean {tuple(m.flatten().tolist())}, std {tuple(s.flatten().tolist())})")
    return images.float().div_(255.0).sub_(m).div_(s)


def _as_tensor(x, name: str) -> Tensor:
    try:
        return torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"{name}: expected a tensor or array, got {type(x).__name__}") from e


@torch.no_grad()
def knn_classify(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: Optional[int] = None,
    chunk_size: int = 256,
) -> dict:
    """Top-1 / top-5 accuracy (percent) of the temperature-weighted k-NN classifier.

    ``train_features`` (N, D) and ``test_features`` (M, D) need not be normalised; the computation runs on the train
    features' device and dtype. ``k`` is clamped to N. A test sample is top-5 correct when its class is among the
    ``min(5, num_classes)`` best-scoring classes *and* has at least one neighbour (classes without neighbours are
    never predicted); equal scores are ranked by class index, so results do not depend on the chunking.
    """
    train = _as_tensor(train_features, "train_features")
    test = _as_tensor(test_features, "test_features")
    train_y = _as_tensor(train_labels, "train_labels")
    test_y = _as_tensor(test_labels, "test_labels")
    if train.ndim != 2 or test.ndim != 2 or train.shape[1] != test.shape[1]:
        raise ValueError(f"features must be (N, D) and (M, D) with equal D, got {tuple(train.shape)} and "
                         f"{tuple(test.shape)}")
    if not train.is_floating_point():
        raise ValueError(f"train_features must be floating point, got {train.dtype}")
    if train_y.shape != (train.shape[0],) or test_y.shape != (test.shape[0],):
        raise ValueError(f"labels must be 1-D and match the features: train {tuple(train_y.shape)} vs "
                         f"{train.shape[0]} features, test {tuple(test_y.shape)} vs {test.shape[0]} features")
    if train.shape[0] == 0 or test.shape[0] == 0:
        raise ValueError(f"need at least one train and one test feature, got {train.shape[0]} and {test.shape[0]}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    device = train.device
    train_y = train_y.to(device=device, dtype=torch.long)
    test_y = test_y.to(dtype=torch.long)
    label_max = max(int(train_y.max()), int(test_y.max()))
    label_min = min(int(train_y.min()), int(test_y.min()))
    if num_classes is None:
        num_classes = label_max + 1
    if label_min < 0 or label_max >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{label_min}, {label_max}]")

    k = min(k, train.shape[0])
    n_top5 = min(5, num_classes)
    # 1 / ||x_j|| for every train feature, computed in chunks so no normalised N x D copy is ever made.
    inv_norm = torch.empty(train.shape[0], dtype=torch.float32, device=device)
    for start in range(0, train.shape[0], 65536):
        block = train[start:start + 65536].float()
        inv_norm[start:start + 65536] = block.norm(dim=1).clamp_min(1e-12).reciprocal()
    train_t = train.t()
    classes = torch.arange(num_classes, device=device)

    correct1 = correct5 = 0
    for start in range(0, test.shape[0], chunk_size):
        query = F.normalize(test[start:start + chunk_size].to(device=device, dtype=torch.float32), dim=1)
        y = test_y[start:start + chunk_size].to(device)
        sims = (query.to(train.dtype) @ train_t).float().mul_(inv_norm)  # (b, N) cosine similarities
        top_sims, top_idx = sims.topk(k, dim=1)
        del sims
        neighbour_y = train_y[top_idx]  # (b, k)
        # exp(s / T) up to a per-row factor exp(-max / T): same ranking, no overflow for small T.
        weights = ((top_sims - top_sims[:, :1]) / temperature).exp()
        scores = torch.zeros(query.shape[0], num_classes, device=device)
        scores.scatter_add_(1, neighbour_y, weights)
        present = torch.zeros(query.shape[0], num_classes, dtype=torch.bool, device=device)
        present.scatter_(1, neighbour_y, True)
        scores.masked_fill_(~present, float("-inf"))
        true_score = scores.gather(1, y[:, None])
        rank = (scores > true_score).sum(1) + ((scores == true_score) & (classes[None, :] < y[:, None])).sum(1)
        hit = present.gather(1, y[:, None]).squeeze(1)
        correct1 += int((hit & (rank == 0)).sum())
        correct5 += int((hit & (rank < n_top5)).sum())
    n = test.shape[0]
    return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n}


def eval_transform(image: np.ndarray, size: int) -> np.ndarray:
    """Evaluation view: (H, W, 3) uint8 -> (3, size, size) uint8.

    The shorter side is resized (bicubic) to ``round(size / 0.875)`` (256 for 224), the longer side keeping the aspect
    ratio, then the centre ``size x size`` is cropped, as torchvision ``Resize`` + ``CenterCrop``. Greyscale (H, W)
    or (H, W, 1) images are replicated to 3 channels and an alpha channel is dropped.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"image must be (H, W, 3) (or (H, W), (H, W, 1), (H, W, 4)), got shape {arr.shape}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] == 4:
        arr = arr[:, :, :3]
    h, w = arr.shape[:2]
    short = int(round(size / CROP_FRACTION))
    if h <= w:
        new_h, new_w = short, int(short * w / h)
    else:
        new_h, new_w = int(short * h / w), short
    img = Image.fromarray(np.ascontiguousarray(arr))
    if (new_h, new_w) != (h, w):
        img = img.resize((new_w, new_h), Image.BICUBIC)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    out = np.asarray(img)[top:top + size, left:left + size]
    return np.ascontiguousarray(out.transpose(2, 0, 1))


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    images: Iterable[Tensor],
    *,
    device="cpu",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Tensor:
    """[CLS] features of uint8 image batches: float32 (N, D) on CPU, not normalised.

    Each batch (B, 3, S, S) uint8 is moved to ``device``, scaled to [0, 1] and normalised there, and run through
    ``backbone(x)``; the token at index 0 of the (B, 1+N, D) output is kept (a (B, D) output is taken as is). The
    backbone runs in eval mode (no drop path) and its previous mode is restored afterwards.
    """
    device = torch.device(device)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device)
    std_t = torch.tensor(std, dtype=torch.float32, device=device)
    was_training = backbone.training
    backbone.eval()
    feats: list[Tensor] = []
    try:
        for i, batch in enumerate(images):
            x = _as_tensor(batch, f"images[{i}]")
            if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != mean_t.shape[0]:
                raise ValueError(f"images[{i}]: expected a uint8 (B, {mean_t.shape[0]}, H, W) batch, "
                                 f"got {x.dtype} {tuple(x.shape)}")
            x = normalize_images(x.to(device, non_blocking=True), mean_t, std_t)
            out = backbone(x)
            cls = out[:, 0] if out.ndim == 3 else out
            feats.append(cls.float().cpu())
    finally:
        backbone.train(was_training)
    if not feats:
        raise ValueError("extract_features: images yielded no batches")
    return torch.cat(feats)
