"""Per-step hyper-parameter schedules of an iBOT run (learning rate, weight decay, teacher momentum and temperatures).

Everything is precomputed as numpy arrays from the config and the number of optimiser steps per epoch; the
global batch (``cfg.optim.batch_size``) does not depend on the number of workers, so neither do the schedules.
"""

from __future__ import annotations

import math

import numpy as np

from ibot_ray.config import IBOTConfig
from ibot_ray.recipe import resolved


def cosine_schedule(base: float, final: float, total_steps: int, warmup_steps: int = 0,
                    warmup_start: float = 0.0) -> np.ndarray:
    """Per-step values: linear ``warmup_start -> base`` over ``warmup_steps`` steps (``linspace``, so the last warm-up
    step is exactly ``base``), then ``final + (base - final) * (1 + cos(pi * i / n)) / 2`` for ``i`` in ``[0, n)``
    with ``n = total_steps - warmup_steps`` (so the last value is just above ``final``)."""
    if total_steps < 0:
        raise ValueError(f"total_steps must be >= 0, got {total_steps}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    warmup_steps = min(warmup_steps, total_steps)
    warmup = np.linspace(warmup_start, base, warmup_steps)
    n = total_steps - warmup_steps
    i = np.arange(n)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(math.pi * i / max(n, 1)))
    out = np.concatenate([warmup, cosine]).astype(np.float64)
    assert len(out) == total_steps
    return out


def _epoch_temperature(warmup: float, final: float, warmup_epochs: int, epochs: int, hold_epochs: int = 0
                       ) -> np.ndarray:
    """Per-epoch values: ``warmup`` held for ``hold_epochs``, then ``linspace(warmup, final, warmup_epochs)``,
    then ``final``; truncated to ``epochs``."""
    parts = [np.full(hold_epochs, warmup), np.linspace(warmup, final, warmup_epochs), np.full(epochs, final)]
    return np.concatenate(parts)[:epochs].astype(np.float64)


class Schedules:
    """All per-step schedules of a run.

    * lr: peak ``cfg.optim.lr * cfg.optim.batch_size / 256`` (linear scaling rule), linear warm-up from 0 over
      ``warmup_epochs`` then cosine to ``min_lr``;
    * wd: cosine ``weight_decay -> weight_decay_end``; momentum: ``momentum_teacher -> momentum_teacher_end`` along
      ``optim.momentum_schedule`` (cosine as in the paper, linear, or constant at ``momentum_teacher``);
    * teacher temperatures, per epoch: ``linspace(warmup, final, warmup_teacher_temp_epochs)`` then constant (the
      patch one is first held at its warm-up value for ``masking.start_epoch`` epochs, as iBOT does);
    * ``freeze_last_layer``: True while ``epoch < optim.freeze_last_layer``.
    """

    def __init__(self, cfg: IBOTConfig, steps_per_epoch: int) -> None:
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        cfg = resolved(cfg, steps_per_epoch)  # `auto` fields (ibot_ray/recipe.py) from this run's length
        o, lo = cfg.optim, cfg.loss
        self.steps_per_epoch = int(steps_per_epoch)
        self.epochs = int(o.epochs)
        self.total_steps: int = self.epochs * self.steps_per_epoch
        self.peak_lr = o.lr * o.batch_size / 256.0
        self.lr = cosine_schedule(self.peak_lr, o.min_lr, self.total_steps, o.warmup_epochs * self.steps_per_epoch)
        self.wd = cosine_schedule(o.weight_decay, o.weight_decay_end, self.total_steps)
        if o.momentum_schedule == "linear":
            self.momentum = np.linspace(o.momentum_teacher, o.momentum_teacher_end, self.total_steps)
        elif o.momentum_schedule == "constant":
            self.momentum = np.full(self.total_steps, float(o.momentum_teacher))
        else:
            self.momentum = cosine_schedule(o.momentum_teacher, o.momentum_teacher_end, self.total_steps)
        self.teacher_temp = _epoch_temperature(lo.warmup_teacher_temp, lo.teacher_temp, lo.warmup_teacher_temp_epochs,
                                               self.epochs)
        self.teacher_patch_temp = _epoch_temperature(lo.warmup_teacher_patch_temp, lo.teacher_patch_temp,
                                                     lo.warmup_teacher_temp_epochs, self.epochs,
                                                     hold_epochs=cfg.masking.start_epoch)
        self.freeze_last_layer_epochs = int(o.freeze_last_layer)

    def at(self, step: int) -> dict:
        """Values for global optimiser step ``step`` (0-based). Steps past the end get the last step's values."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        i = min(int(step), self.total_steps - 1)
        epoch = int(step) // self.steps_per_epoch
        e = min(epoch, self.epochs - 1)
        return {
            "epoch": epoch,
            "lr": float(self.lr[i]),
            "wd": float(self.wd[i]),
            "momentum": float(self.momentum[i]),
            "teacher_temp": float(self.teacher_temp[e]),
            "teacher_patch_temp": float(self.teacher_patch_temp[e]),
            "freeze_last_layer": epoch < self.freeze_last_layer_epochs,
        }


__all__ = ["Schedules", "cosine_schedule"]
