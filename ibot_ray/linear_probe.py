"""Linear probe on frozen features: one fixed, documented recipe (plain PyTorch, no Ray).

The recipe (:data:`RECIPE`) is deliberately fixed so that numbers from different runs are comparable:

* **Standardise** every feature dimension with the *train* mean and standard deviation (computed in float64 over
  chunks; a dimension with std < 1e-6 gets std 1). Val features use the same statistics. The standardised features
  are never materialised: each mini-batch is standardised on the fly.
* **One** ``nn.Linear(D, C)`` (zero-initialised, so the result does not depend on an init draw), cross-entropy loss.
* **AdamW**, lr 1e-3, weight decay 1e-4, betas (0.9, 0.999), batch 256, a cosine schedule from lr to 0 over all steps
  (no warm-up), 30 epochs, but at least 1 000 and at most 100 000 steps whatever the bank size, so that a
  few-thousand-image split is trained to convergence and a million-image bank stays bounded in time
  (100 000 steps of a 384 x 1000 linear layer take about a minute on a GPU).
* Mini-batches are drawn by a seeded permutation per epoch (seed 0, its own ``torch.Generator``), so the result is
  deterministic on a given device.

Memory is bounded: the features stay as they are given (float16 or float32, on CPU or GPU; only a (batch, D) float32
slice exists at a time), and evaluation runs over chunks. 1e6 x 384 float16 features are 768 MB.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: The fixed recipe; :func:`linear_probe` reports it with its results.
RECIPE = {
    "standardise": "train mean/std per dimension",
    "model": "nn.Linear(D, C), zero init",
    "optimizer": "AdamW",
    "lr": 1e-3,
    "weight_decay": 1e-4,
    "batch_size": 256,
    "schedule": "cosine to 0, no warm-up",
    "epochs": 30,
    "min_steps": 1000,
    "max_steps": 100_000,
    "seed": 0,
}


def feature_stats(features: Tensor, chunk_size: int = 65536) -> tuple[Tensor, Tensor]:
    """Per-dimension mean and std (float32, on the features' device) computed in float64 chunks."""
    n, d = features.shape
    s = torch.zeros(d, dtype=torch.float64, device=features.device)
    s2 = torch.zeros(d, dtype=torch.float64, device=features.device)
    for i in range(0, n, chunk_size):
        x = features[i:i + chunk_size].double()
        s += x.sum(0)
        s2 += (x * x).sum(0)
    mean = s / n
    var = (s2 / n - mean * mean).clamp_min(0)
    std = var.sqrt()
    std = torch.where(std < 1e-6, torch.ones_like(std), std)
    return mean.float(), std.float()


def _num_steps(n: int, batch_size: int, epochs: int, min_steps: int, max_steps: int) -> int:
    per_epoch = math.ceil(n / batch_size)
    return int(min(max(per_epoch * epochs, min_steps), max_steps))


@torch.no_grad()
def _accuracy(model: nn.Module, features: Tensor, labels: Tensor, mean: Tensor, std: Tensor,
              chunk_size: int = 8192) -> dict:
    correct1 = correct5 = 0
    k = min(5, model.out_features)
    for i in range(0, features.shape[0], chunk_size):
        x = (features[i:i + chunk_size].float() - mean) / std
        y = labels[i:i + chunk_size].to(x.device)
        logits = model(x)
        top = logits.topk(k, dim=1).indices
        correct1 += int((top[:, 0] == y).sum())
        correct5 += int((top == y[:, None]).any(1).sum())
    n = features.shape[0]
    return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n}


def linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    val_features: Tensor,
    val_labels: Tensor,
    *,
    num_classes: Optional[int] = None,
    device: Optional[torch.device | str] = None,
    epochs: int = RECIPE["epochs"],
    min_steps: int = RECIPE["min_steps"],
    max_steps: int = RECIPE["max_steps"],
    batch_size: int = RECIPE["batch_size"],
    lr: float = RECIPE["lr"],
    weight_decay: float = RECIPE["weight_decay"],
    seed: int = RECIPE["seed"],
) -> dict:
    """Train the fixed-recipe linear classifier on frozen train features, report val top-1/top-5 (percent).

    ``*_features`` are (N, D) float tensors (float16 is fine; they are not copied), labels int64 in
    ``[0, num_classes)``. Runs on ``device`` (default: the train features' device). Returns ``{"top1", "top5",
    "train_top1", "steps", "epochs", "recipe"}``.
    """
    if train_features.ndim != 2 or val_features.ndim != 2 or train_features.shape[1] != val_features.shape[1]:
        raise ValueError(f"features must be (N, D) and (M, D) with equal D, got {tuple(train_features.shape)} and "
                         f"{tuple(val_features.shape)}")
    if train_features.shape[0] != train_labels.shape[0] or val_features.shape[0] != val_labels.shape[0]:
        raise ValueError("labels must match the features in length")
    if train_features.shape[0] == 0 or val_features.shape[0] == 0:
        raise ValueError("linear probe needs at least one train and one val feature")
    if not train_features.is_floating_point() or not val_features.is_floating_point():
        raise ValueError("features must be floating point")
    device = torch.device(device) if device is not None else train_features.device
    train_features = train_features.to(device)
    val_features = val_features.to(device)
    train_labels = train_labels.to(device=device, dtype=torch.long)
    val_labels = val_labels.to(device=device, dtype=torch.long)
    if num_classes is None:
        num_classes = int(max(train_labels.max(), val_labels.max())) + 1
    if int(train_labels.min()) < 0 or int(max(train_labels.max(), val_labels.max())) >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes})")

    n, d = train_features.shape
    mean, std = feature_stats(train_features)
    model = nn.Linear(d, num_classes).to(device)
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999))
    steps = _num_steps(n, batch_size, epochs, min_steps, max_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, steps) / steps)))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    # Small steps on CPU are dominated by thread synchronisation (10x slower with 2 threads on a busy 2-core box).
    threads = torch.get_num_threads()
    if device.type == "cpu" and batch_size * d * num_classes < 2 ** 22:
        torch.set_num_threads(1)
    try:
        _train(model, opt, sched, train_features, train_labels, mean, std, gen, n, batch_size, steps, device)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    val = _accuracy(model, val_features, val_labels, mean, std)
    train = _accuracy(model, train_features, train_labels, mean, std)
    return {"top1": val["top1"], "top5": val["top5"], "train_top1": train["top1"], "steps": steps,
            "epochs": steps * batch_size / n, "recipe": dict(RECIPE)}


def _train(model, opt, sched, train_features, train_labels, mean, std, gen, n, batch_size, steps, device) -> None:
    step = 0
    with torch.enable_grad():
        while step < steps:
            perm = torch.randperm(n, generator=gen).to(device)
            for i in range(0, n, batch_size):
                if step >= steps:
                    break
                idx = perm[i:i + batch_size]
                x = (train_features[idx].float() - mean) / std
                loss = F.cross_entropy(model(x), train_labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1


__all__ = ["RECIPE", "feature_stats", "linear_probe"]
