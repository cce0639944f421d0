"""Run health: the three ways a DINO/iBOT run collapses, detected from the metrics every step already logs.

The step (:mod:`ibot_ray.step`) measures, from tensors it already has (no extra forward pass):

* ``teacher_entropy_frac``: the mean entropy of the teacher's centred, sharpened [CLS] targets over ln K;
* ``prototypes_used``: exp of the entropy of the batch-mean target, i.e. how many prototypes the batch spreads over;
* ``cls_kl``: KL(teacher || student) of the [CLS] pairs;
* ``feature_std``: the spread of the L2-normalised backbone [CLS] features over the batch (1 ~ random directions).

:class:`CollapseDetector` turns them into three conditions, each raised only when it holds for ``patience``
consecutive logged steps after the learning-rate warm-up (targets are close to uniform at initialisation, and
that is not a collapse):

============================  ===================================================================================
uniform collapse              the targets are uniform: ``teacher_entropy_frac >= 0.95``. Centering wins over
                              sharpening, the teacher says nothing, the [CLS] loss sits at ln K.
dominant collapse             a few prototypes take all the mass: the targets are sharp
                              (``teacher_entropy_frac < 0.2``) and the batch spreads over almost none of the
                              prototypes it could (``prototypes_used < max(2, 0.05 * min(K, targets in the
                              batch))``). Sharpening wins over centering. A sharp teacher that sorts a dataset
                              of few kinds into a few dozen prototypes is healthy, not collapsed (Fashion-MNIST's
                              10 classes, late in a long run: 25-33 of 128 targets, k-NN still rising).
representation collapse       every image gets (nearly) the same feature: ``feature_std < 0.1``.
============================  ===================================================================================

Each condition warns once, with its numbers and the settings to change; ``train.stop_on_collapse`` stops the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

UNIFORM = "uniform-collapse"
DOMINANT = "dominant-collapse"
REPRESENTATION = "representation-collapse"


@dataclass(frozen=True)
class HealthThresholds:
    uniform_entropy_frac: float = 0.95  # teacher [CLS] target entropy / ln K at or above this: uniform
    dominant_entropy_frac: float = 0.2  # targets at most this sharp ...
    dominant_prototype_frac: float = 0.05  # ... and the batch on under this fraction of the prototypes it could use
    dominant_prototype_floor: float = 2.0  # ... or on under this many (a batch of few targets)
    feature_std: float = 0.1  # feature spread below this: representation collapse
    patience: int = 5  # consecutive logged steps a condition must hold


@dataclass
class Alarm:
    condition: str
    step: int
    message: str


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and x == x and abs(x) != float("inf")


def conditions(m: dict, out_dim: int, th: HealthThresholds = HealthThresholds()) -> list[str]:
    """The collapse conditions that one row of step metrics shows (no patience, no warm-up)."""
    found = []
    h = m.get("teacher_entropy_frac")
    if _finite(h) and h >= th.uniform_entropy_frac:
        found.append(UNIFORM)
    rows = m.get("target_rows") or out_dim
    p = m.get("prototypes_used")
    if _finite(h) and _finite(p) and h < th.dominant_entropy_frac \
            and p < max(th.dominant_prototype_floor, th.dominant_prototype_frac * min(out_dim, rows)):
        found.append(DOMINANT)
    s = m.get("feature_std")
    if _finite(s) and s < th.feature_std:
        found.append(REPRESENTATION)
    return found


def _advice(condition: str, m: dict, cfg) -> str:
    lo, o = cfg.loss, cfg.optim
    k = cfg.head.out_dim
    if condition == UNIFORM:
        return (f"uniform collapse: the teacher's [CLS] targets are at {m['teacher_entropy_frac']:.0%} of the uniform "
                f"entropy ln K (K = {k}) and KL(teacher||student) is {m.get('cls_kl', float('nan')):.3f}: the "
                f"teacher no longer tells images apart. Lower loss.teacher_temp (now {lo.teacher_temp}) or "
                f"loss.warmup_teacher_temp_epochs (now {lo.warmup_teacher_temp_epochs}), raise "
                f"loss.center_momentum (now {lo.center_momentum}), or use a smaller head.out_dim.")
    if condition == DOMINANT:
        return (f"dominant collapse: the batch's [CLS] targets use {m['prototypes_used']:.1f} of K = {k} prototypes "
                f"and each target is sharp ({m['teacher_entropy_frac']:.0%} of ln K): a few prototypes take all the "
                f"mass. Raise loss.teacher_temp (now {lo.teacher_temp}), lower loss.center_momentum (now "
                f"{lo.center_momentum}) so the centering keeps up, or lower optim.lr (now {o.lr}).")
    return (f"representation collapse: the spread of the teacher's [CLS] features is {m['feature_std']:.3f} "
            f"(about 1 for random directions, 0 when every image gets the same feature). Lower optim.lr (now {o.lr}), "
            f"raise optim.momentum_teacher (now {o.momentum_teacher}), or lower optim.weight_decay_end "
            f"(now {o.weight_decay_end}).")


@dataclass
class CollapseDetector:
    """Feed it every logged row of step metrics; it returns an :class:`Alarm` the first time a condition has held
    for ``patience`` consecutive logs after ``grace_steps`` (the lr warm-up), and keeps ``status`` up to date."""

    cfg: object  # IBOTConfig
    grace_steps: int = 0
    thresholds: HealthThresholds = field(default_factory=HealthThresholds)
    streaks: dict = field(default_factory=dict)
    raised: list = field(default_factory=list)
    status: str = "ok"

    def update(self, metrics: dict) -> list[Alarm]:
        step = int(metrics.get("step", 0))
        if step <= self.grace_steps:
            self.status = "warm-up"
            return []
        now = conditions(metrics, self.cfg.head.out_dim, self.thresholds)
        self.streaks = {c: self.streaks.get(c, 0) + 1 for c in now}
        sustained = [c for c, n in self.streaks.items() if n >= self.thresholds.patience]
        self.status = "+".join(sustained) if sustained else "ok"
        alarms = [Alarm(c, step, _advice(c, metrics, self.cfg)) for c in sustained if c not in self.raised]
        self.raised += [a.condition for a in alarms]
        return alarms

    @property
    def verdict(self) -> str:
        """One line for the end of a run."""
        if not self.raised:
            return "healthy: no collapse detected"
        return "collapsed: " + ", ".join(self.raised) + " (see the warnings above)"


def verdict(metrics: dict) -> str:
    """The health verdict of a run from its last reported metrics (``health``: the last status, ``health_alarms``:
    every condition raised during the run), as the closing summary of ``ibot-ray pretrain`` states it."""
    alarms = metrics.get("health_alarms") or ""
    if alarms:
        return f"collapsed: {alarms}"
    return f"healthy: no collapse detected (last status: {metrics.get('health', 'unknown')})"


def grace_steps(cfg, steps_per_epoch: int) -> int:
    """Steps during which no alarm is raised: the learning-rate warm-up (at least one log interval)."""
    from ibot_ray.recipe import resolved

    warmup = resolved(cfg, steps_per_epoch).optim.warmup_epochs
    return max(int(warmup * steps_per_epoch), int(cfg.train.log_every_steps))


__all__ = ["Alarm", "CollapseDetector", "HealthThresholds", "conditions", "grace_steps", "verdict", "UNIFORM",
           "DOMINANT", "REPRESENTATION"]
