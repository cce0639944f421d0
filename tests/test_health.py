"""Run health: the step's health metrics against direct formulas, and collapse detection on real short runs.

Each collapse is provoked on purpose in a real run of the method on the shipped Fashion-MNIST images (decoded and
multi-cropped by the project's own transform) and must be detected within 200 steps; a healthy run raises nothing.
"""

import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from ibot_ray.config import load_config
from ibot_ray.health import DOMINANT, REPRESENTATION, UNIFORM, CollapseDetector, conditions, grace_steps
from ibot_ray.loss import IBOTLoss, health_metrics
from ibot_ray.model import build_student_teacher
from ibot_ray.multicrop import MultiCropTransform
from ibot_ray.step import IBOTStep, feature_spread, feature_spread_sums
from pipelines.sources import DEMO_DIR

TINY = [
    "model.depth=2", "model.patch_size=8", "crops.global_crops_size=32", "crops.local_crops_size=16",
    "crops.local_crops_number=2", "head.out_dim=256", "head.patch_out_dim=256", "head.hidden_dim=128",
    "head.bottleneck_dim=64", "optim.batch_size=16", "train.num_workers=[1,1]", "optim.warmup_epochs=1",
    "train.log_every_steps=5",
]
STEPS_PER_EPOCH = 40


# ---- the metrics -------------------------------------------------------------------------------------------------


def test_health_metrics_match_direct_formulas():
    g_, l_, b, k, n = 2, 3, 4, 16, 9
    gen = torch.Generator().manual_seed(0)
    s_gc, s_lc = torch.randn(g_ * b, k, generator=gen), torch.randn(l_ * b, k, generator=gen)
    t_gc = torch.randn(g_ * b, k, generator=gen) * 0.2
    s_gp, t_gp = torch.randn(g_ * b, n, k, generator=gen), torch.randn(g_ * b, n, k, generator=gen)
    masks = torch.rand(g_ * b, n, generator=gen) < 0.4
    loss = IBOTLoss(k, k, n_global=g_, n_local=l_)
    loss.center.copy_(torch.randn(1, k, generator=gen) * 0.1)
    out = loss(s_gc, s_gp, s_lc, t_gc, t_gp, masks, teacher_temp=0.05, teacher_patch_temp=0.07)
    m = health_metrics(out["health"], out["cls"].item(), k, k)

    t = F.softmax((t_gc - loss.center) / 0.05, dim=-1)
    ent = torch.special.entr(t).sum(-1)
    assert m["teacher_entropy"] == pytest.approx(ent.mean().item(), rel=1e-5)
    assert m["teacher_entropy_frac"] == pytest.approx(ent.mean().item() / math.log(k), rel=1e-5)
    tp = F.softmax((t_gp[masks] - loss.center_patch.view(1, -1)) / 0.07, dim=-1)
    assert m["teacher_patch_entropy"] == pytest.approx(torch.special.entr(tp).sum(-1).mean().item(), rel=1e-5)
    mean_t = t.mean(0)
    assert m["prototypes_used"] == pytest.approx(math.exp(torch.special.entr(mean_t).sum().item()), rel=1e-5)
    assert m["target_rows"] == g_ * b
    # KL(teacher || student) averaged over every cross-view pair, by a double loop
    s_all = torch.cat([s_gc, s_lc]).view(g_ + l_, b, k)
    kls = []
    for q in range(g_):
        tq = t.view(g_, b, k)[q]
        for v in range(g_ + l_):
            if v != q:
                logs = F.log_softmax(s_all[v] / 0.1, dim=-1)
                kls.append((tq * (tq.log() - logs)).sum(-1).mean())
    assert m["cls_kl"] == pytest.approx(torch.stack(kls).mean().item(), rel=1e-4, abs=1e-5)


def test_feature_spread_is_one_for_random_directions_and_zero_for_one_point():
    gen = torch.Generator().manual_seed(0)
    d = 64
    spread = feature_spread(feature_spread_sums(torch.randn(4000, d, generator=gen)), d)
    assert spread == pytest.approx(1.0, abs=0.03)
    same = torch.randn(1, d, generator=gen).repeat(50, 1) * torch.rand(50, 1, generator=gen)  # one direction
    assert feature_spread(feature_spread_sums(same), d) < 1e-3
    # sums over two halves equal the sums over the whole (what the all-reduce relies on)
    x = torch.randn(30, d, generator=gen)
    halves = feature_spread_sums(x[:11]) + feature_spread_sums(x[11:])
    assert feature_spread(halves, d) == pytest.approx(feature_spread(feature_spread_sums(x), d), rel=1e-9)


def test_conditions_and_patience():
    cfg = load_config("demo", TINY)
    ok = {"teacher_entropy_frac": 0.6, "prototypes_used": 90.0, "target_rows": 32, "feature_std": 0.6}
    assert conditions(ok, 256) == []
    assert conditions({**ok, "teacher_entropy_frac": 0.97}, 256) == [UNIFORM]
    assert conditions({**ok, "teacher_entropy_frac": 0.1, "prototypes_used": 1.5}, 256) == [DOMINANT]
    assert conditions({**ok, "teacher_entropy_frac": 0.1}, 256) == []  # sharp but spread: healthy
    # a long Fashion-MNIST run of the demo preset (K 256, 128 targets per step), epoch 12 of 16 with its k-NN still
    # rising: sharp targets on 25-33 prototypes are the dataset's 10 classes sorted finely, not a collapse ...
    fmnist = {"teacher_entropy_frac": 0.09, "prototypes_used": 24.7, "target_rows": 128, "feature_std": 0.97}
    assert conditions(fmnist, 256) == []
    # ... while the provoked one (frozen centre, teacher at 0.02) puts a whole batch on one prototype
    assert conditions({**fmnist, "teacher_entropy_frac": 0.001, "prototypes_used": 1.01}, 256) == [DOMINANT]
    assert conditions({**fmnist, "prototypes_used": 6.0}, 256) == [DOMINANT]  # 5 % of the 128 targets: 6.4
    assert conditions({**ok, "feature_std": 0.02}, 256) == [REPRESENTATION]
    det = CollapseDetector(cfg, grace_steps=10)
    bad = {**ok, "teacher_entropy_frac": 0.99}
    assert det.update({**bad, "step": 5}) == [] and det.status == "warm-up"
    for step in (15, 20, 25, 30):
        assert det.update({**bad, "step": step}) == []
    det.update({**ok, "step": 35})  # one healthy log resets the streak
    alarms = [a for step in range(40, 70, 5) for a in det.update({**bad, "step": step})]
    assert [(a.condition, a.step) for a in alarms] == [(UNIFORM, 60)]
    assert "loss.teacher_temp" in alarms[0].message and "99%" in alarms[0].message
    assert det.status == UNIFORM and "uniform-collapse" in det.verdict
    assert det.update({**bad, "step": 65}) == []  # warned once


# ---- real short runs ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_images():
    return pq.read_table(DEMO_DIR / "train.parquet", columns=["image"]).column("image").to_pylist()[:800]


def run_until_alarm(overrides, images, max_steps=200):
    """Train in-process on the demo images; returns (alarms, detector, logged metrics rows) after max_steps or the
    first alarm."""
    torch.manual_seed(0)
    cfg = load_config("demo", TINY + overrides)
    student, teacher = build_student_teacher(cfg)
    runner = IBOTStep(cfg, student, teacher, steps_per_epoch=STEPS_PER_EPOCH)
    transform = MultiCropTransform(cfg)
    det = CollapseDetector(cfg, grace_steps=grace_steps(cfg, STEPS_PER_EPOCH))
    rng = np.random.default_rng(0)
    b = cfg.optim.batch_size
    logged: list[dict] = []
    for _ in range(max_steps):
        idx = rng.integers(0, len(images), b)
        out, errors = transform([images[i] for i in idx], rng.integers(0, 2**31, b).tolist(), 0)
        assert not errors
        m = runner({k: torch.from_numpy(v) for k, v in out.items() if k != "index"})
        if m["step"] % cfg.train.log_every_steps == 0:
            logged.append(m)
            alarms = det.update(m)
            if alarms:
                return alarms, det, logged
    return [], det, logged


@pytest.mark.parametrize("name,overrides,expected", [
    ("teacher temperature far too high", ["loss.teacher_temp=1.0", "loss.teacher_patch_temp=1.0"], UNIFORM),
    ("centering switched off, sharp teacher",
     ["loss.center_momentum=0.9999", "loss.center_momentum_patch=0.9999", "loss.teacher_temp=0.02"], DOMINANT),
    # with the paper's loss: the demo's KoLeo term keeps the features apart (this lr then shows as a dominant collapse)
    ("a learning rate that kills the features", ["optim.lr=0.2", "optim.momentum_teacher=0.9", "loss.lambda_koleo=0"],
     REPRESENTATION),
])
def test_provoked_collapse_is_detected_within_200_steps(demo_images, name, overrides, expected):
    alarms, det, logged = run_until_alarm(overrides, demo_images)
    assert alarms, f"{name}: no alarm in 200 steps; last metrics {logged[-1]}"
    alarm = next((a for a in alarms if a.condition == expected), None)
    assert alarm is not None, (name, [a.message for a in alarms])
    # Raised at the first logged step where the condition had held for `patience` logs in a row after the warm-up,
    # as the logged numbers themselves show: not during the warm-up, not on a passing spike, not late.
    patience = det.thresholds.patience
    out_dim = load_config("demo", TINY + overrides).head.out_dim
    holds = [m["step"] > det.grace_steps and expected in conditions(m, out_dim) for m in logged]
    assert alarm.step == logged[-1]["step"] > det.grace_steps
    assert all(holds[-patience:]) and len(holds) >= patience, (name, holds)
    assert not any(all(holds[i - patience:i]) for i in range(patience, len(holds))), (name, holds)


def test_healthy_run_raises_no_alarm(demo_images):
    alarms, det, logged = run_until_alarm([], demo_images)
    m = logged[-1]
    assert alarms == [], [a.message for a in alarms]
    assert m["step"] == 200
    assert det.status == "ok" and det.verdict.startswith("healthy")
    assert 0.2 < m["teacher_entropy_frac"] < 0.95 and m["feature_std"] > 0.2
