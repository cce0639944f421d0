"""Settings derived from the planned run: what a config leaves as ``auto`` is set from the run length and crop size.

The paper's recipe is tuned for ImageNet and 800 epochs of 1,251 steps. Several of its values only make sense
relative to that length: the teacher's averaging horizon, the warm-ups, the last-layer freeze. The blur is measured
in pixels of a 224 px crop. A preset that should work at any length and size (``demo``) gives ``auto``
for these fields, and :func:`derive_settings` sets them when the run starts, from the planned number of steps and
the crop size, and says what it chose and why. A number given by the user (``--set``, a YAML file) is used as is;
the ``vit_small_16`` and ``vit_base_16`` presets give numbers everywhere, so they keep the paper's values.

============================  ====================================================================================
field                         derived value
============================  ====================================================================================
optim.momentum_teacher        ``1 - 25 / total_steps``, clipped to [0.9, 0.996]: the teacher averages over about
                              4 % of the run (1/(1-m) steps), never longer than the paper's 250 steps. With the
                              paper's 0.996 a 2,000-step run has a teacher that lags an eighth of the run behind.
optim.warmup_epochs           ``ceil(epochs / 10)``, at most 10 (the paper's 10 epochs)
loss.warmup_teacher_temp_     ``ceil(epochs * 30 / 800)``: the paper's fraction of the run (30 of 800 epochs)
epochs
optim.freeze_last_layer       1 epoch (the paper), or 0 when one epoch is over 5 % of the run
crops.blur_sigma              the paper's (0.1, 2.0) px scaled by ``global_crops_size / 224``: the same blur
                              relative to the image (at 32 px, sigma up to 2 px erases the object)
data.actor_batch_size         images whose crops and masks fill about 2 MiB (a multiple of 16, from 16 to 1,024):
                              each Ray Data block costs tens of ms of scheduling and copying whatever its size, so
                              small crops need many images per block (the demo: 256; 224 px crops: 16)
============================  ====================================================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ibot_ray.config import AUTO, IBOTConfig, load_config, set_field, unresolved_auto

PAPER_BLUR_SIGMA = (0.1, 2.0)
#: Crops and masks one Ray Data block of the training stream should hold (``data.actor_batch_size: auto``).
ACTOR_BLOCK_BYTES = 2 << 20


@dataclass
class Derived:
    field: str
    value: object
    why: str

    def __str__(self) -> str:
        return f"{self.field} = {self.value}: {self.why}"


#: Fields whose derived value needs the run's length (the others only need the config).
LENGTH_FIELDS = ("optim.momentum_teacher", "optim.warmup_epochs", "loss.warmup_teacher_temp_epochs",
                 "optim.freeze_last_layer")


def derive_settings(cfg: IBOTConfig, steps_per_epoch: int | None = None) -> list[Derived]:
    """Replace the ``auto`` fields of ``cfg`` (in place) by their derived values; returns what was derived.

    Without ``steps_per_epoch`` only the fields that do not depend on the run's length are derived (the data
    pipeline needs the blur and its batch size before the source is listed); call again with it for the rest."""
    epochs = int(cfg.optim.epochs)
    total = max(1, epochs * int(steps_per_epoch or 1))
    rules = {
        "optim.momentum_teacher": lambda: _momentum(cfg, total),
        "optim.warmup_epochs": lambda: Derived(
            "optim.warmup_epochs", min(10, math.ceil(epochs / 10)),
            f"a tenth of the {epochs} epochs, at most the paper's 10"),
        "loss.warmup_teacher_temp_epochs": lambda: Derived(
            "loss.warmup_teacher_temp_epochs", min(epochs, math.ceil(epochs * 30 / 800)),
            f"the paper's 30 of 800 epochs, scaled to {epochs} epochs"),
        "optim.freeze_last_layer": lambda: Derived(
            "optim.freeze_last_layer", 1 if epochs >= 20 else 0,
            "1 epoch, as the paper" if epochs >= 20 else f"one epoch would be over 5 % of a {epochs}-epoch run"),
        "crops.blur_sigma": lambda: _blur(cfg),
        "data.actor_batch_size": lambda: Derived(
            "data.actor_batch_size", actor_batch_for(cfg),
            f"images whose crops fill about {ACTOR_BLOCK_BYTES >> 20} MiB ({sample_bytes(cfg):,} bytes each): one "
            "Ray Data block per actor call, few enough blocks that their fixed cost stays small"),
    }
    out = []
    for name in unresolved_auto(cfg):
        if steps_per_epoch is None and name in LENGTH_FIELDS:
            continue
        d = rules[name]()
        set_field(cfg, name, d.value)
        out.append(d)
    return out


def _momentum(cfg: IBOTConfig, total: int) -> Derived:
    m = round(min(0.996, max(0.9, 1.0 - 25.0 / total)), 4)
    end = cfg.optim.momentum_teacher_end
    if end < m:  # the start may not exceed the end: a constant momentum, the end's horizon
        return Derived("optim.momentum_teacher", end,
                       f"capped at optim.momentum_teacher_end = {end}: the teacher averages over ~{1 / (1 - end):.0f} "
                       f"steps throughout, {100 / (1 - end) / total:.1f} % of the {total}-step run (uncapped: {m})")
    return Derived("optim.momentum_teacher", m,
                   f"the teacher averages over ~{1 / (1 - m):.0f} steps, 4 % of the {total}-step run "
                   "(at most the paper's 250)")


def blur_sigma_for(global_crops_size: int) -> tuple[float, float]:
    """The paper's blur range (px at 224 px) scaled to ``global_crops_size``."""
    s = global_crops_size / 224
    lo, hi = (round(max(0.01, v * s), 4) for v in PAPER_BLUR_SIGMA)
    return lo, hi


def sample_bytes(cfg: IBOTConfig) -> int:
    """Bytes of one training sample as the ingest emits it: uint8 global and local crops, one byte per mask cell."""
    c = cfg.crops
    h, w = cfg.grid(c.global_crops_size)
    return (c.global_crops_number * (3 * c.global_crops_size ** 2 + h * w)
            + c.local_crops_number * 3 * c.local_crops_size ** 2)


def actor_batch_for(cfg: IBOTConfig) -> int:
    """``data.actor_batch_size`` as given, or for ``auto`` the images whose samples fill about
    :data:`ACTOR_BLOCK_BYTES`: a multiple of 16, from 16 to 1,024."""
    n = cfg.data.actor_batch_size
    if n != AUTO:
        return int(n)
    return int(min(1024, max(16, ACTOR_BLOCK_BYTES // sample_bytes(cfg) // 16 * 16)))


def _blur(cfg: IBOTConfig) -> Derived:
    return Derived("crops.blur_sigma", blur_sigma_for(cfg.crops.global_crops_size),
                   f"the paper's {PAPER_BLUR_SIGMA} px at 224 px, scaled to {cfg.crops.global_crops_size} px crops")


def resolved(cfg: IBOTConfig, steps_per_epoch: int) -> IBOTConfig:
    """``cfg`` itself when nothing is ``auto``, else a copy with every ``auto`` field derived (for code that runs the
    method outside ``ibot-ray pretrain``, which derives and prints them once for the whole run)."""
    if not unresolved_auto(cfg):
        return cfg
    out = IBOTConfig.from_dict(cfg.to_dict(), validate=False)
    derive_settings(out, steps_per_epoch)
    return out


# ---- a preset for the data: `ibot-ray pretrain --data X` without --config ------------------------------------------

#: Images whose shorter side is at most this many pixels (the median of a sample) are "small" (scans, icons,
#: thumbnails, CIFAR-sized photos): the presets with 32 px global crops fit them. Larger ones are photos.
SMALL_IMAGE_MAX_SIDE = 64
#: The steps a CPU preset was chosen at (its epochs on the data it was measured on): on a CPU the budget is minutes,
#: so another dataset keeps the steps, not the epochs. demo: 36 epochs x 62 steps (4,000 Fashion-MNIST images);
#: photo_cpu: its epochs x 41 steps (2,664 scene crops of benchmarks/photo_scenes.py, 10 % held out).
CPU_STEP_BUDGET = {"demo": 36 * 62, "photo_cpu": 14 * 41}
#: A run on more than this many epochs of a tiny source is cut here (the steps then fall under the budget).
MAX_DERIVED_EPOCHS = 300
#: Photos on a GPU: ``vit_small_16`` for this many epochs, its length-dependent settings derived from the run.
GPU_PHOTO_EPOCHS = 100
GPU_PHOTO_AUTO = ("optim.momentum_teacher", "optim.warmup_epochs", "loss.warmup_teacher_temp_epochs",
                  "optim.freeze_last_layer")


@dataclass
class PresetChoice:
    """The preset ``ibot-ray pretrain --data X`` picks without ``--config``, the ``--set`` values derived with it
    (each applied only where the user set nothing), and one line per choice saying why."""

    preset: str
    overrides: dict
    reasons: list


def choose_preset(short_side: int, num_images: int, gpu: bool, *, user_set: frozenset = frozenset()) -> PresetChoice:
    """A preset for ``num_images`` images whose median shorter side is ``short_side`` px, on a GPU or a CPU.

    ==============  =========================================  ==================================================
    images          CPU                                        GPU
    ==============  =========================================  ==================================================
    <= 64 px        ``demo``                                   ``small_gpu``
    photos          ``photo_cpu``                              ``vit_small_16``, 100 epochs, warm-ups, teacher
                                                               momentum and last-layer freeze derived from the run
    ==============  =========================================  ==================================================

    On a CPU the epochs keep the preset's step budget (:data:`CPU_STEP_BUDGET`: minutes, whatever the image count);
    on any device the global batch stays within a quarter of the images (at least four steps per epoch). Fields in
    ``user_set`` (the user's ``--set`` keys) are never derived."""
    small = short_side <= SMALL_IMAGE_MAX_SIDE
    kind = f"{'small images' if small else 'photos'} (median shorter side {short_side} px"
    kind += f", {'at most' if small else 'over'} {SMALL_IMAGE_MAX_SIDE})"
    device = "a GPU" if gpu else "CPU only"
    preset = ("small_gpu" if gpu else "demo") if small else ("vit_small_16" if gpu else "photo_cpu")
    reasons = [f"--config {preset}: {num_images} {kind}, {device} (give --config to choose)"]
    overrides: dict = {}

    def derive(field: str, value, why: str) -> None:
        if field not in user_set:
            overrides[field] = value
            reasons.append(f"{field} = {value}: {why}")

    base = load_config(preset, validate=False)
    batch = int(base.optim.batch_size)
    if num_images < 4 * batch:
        fit = max(8, 2 ** int(math.log2(max(1, num_images // 4))))
        if fit < batch:
            derive("optim.batch_size", fit, f"the preset's {batch} would leave under 4 steps per epoch of "
                   f"{num_images} images")
            batch = fit
    if preset == "vit_small_16":
        derive("optim.epochs", GPU_PHOTO_EPOCHS, "a run on your data, not the paper's 800 ImageNet epochs")
        for f in GPU_PHOTO_AUTO:
            derive(f, AUTO, "derived from the run's length when it starts (the paper's values fit 800 epochs)")
    elif not gpu:
        steps = max(1, num_images // batch)
        budget = CPU_STEP_BUDGET[preset]
        epochs = int(min(MAX_DERIVED_EPOCHS, max(1, round(budget / steps))))
        if epochs != base.optim.epochs:
            derive("optim.epochs", epochs, f"the preset's budget of ~{budget} steps at {steps} steps per epoch "
                   "(minutes on a CPU)")
    return PresetChoice(preset, overrides, reasons)


__all__ = ["ACTOR_BLOCK_BYTES", "CPU_STEP_BUDGET", "Derived", "PresetChoice", "SMALL_IMAGE_MAX_SIDE",
           "actor_batch_for", "blur_sigma_for", "choose_preset", "derive_settings", "resolved", "sample_bytes"]
