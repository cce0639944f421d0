"""Schedules against closed-form formulas."""

import math

import numpy as np
import pytest

from ibot_ray.config import load_config
from ibot_ray.schedules import Schedules, cosine_schedule


def _cos(base, final, i, n):
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / n))


def test_cosine_schedule_closed_form():
    s = cosine_schedule(2.0, 0.5, total_steps=20, warmup_steps=5, warmup_start=0.1)
    assert len(s) == 20
    for i in range(5):
        assert s[i] == pytest.approx(0.1 + (2.0 - 0.1) * i / 4)  # linspace: last warm-up step is the peak
    for i in range(5, 20):
        assert s[i] == pytest.approx(_cos(2.0, 0.5, i - 5, 15))
    assert s[5] == pytest.approx(2.0)
    assert np.all(np.diff(s[5:]) < 0) and s[-1] > 0.5
    np.testing.assert_allclose(cosine_schedule(1.0, 3.0, 7), [_cos(1.0, 3.0, i, 7) for i in range(7)])
    assert len(cosine_schedule(1.0, 0.0, 3, warmup_steps=10)) == 3
    with pytest.raises(ValueError):
        cosine_schedule(1.0, 0.0, -1)


@pytest.fixture
def cfg():
    return load_config("vit_small_16", [
        "optim.epochs=10", "optim.batch_size=512", "optim.lr=0.0005", "optim.min_lr=1e-5", "optim.warmup_epochs=2",
        "optim.weight_decay=0.04", "optim.weight_decay_end=0.4", "optim.momentum_teacher=0.996",
        "optim.momentum_teacher_end=1.0", "optim.freeze_last_layer=3", "loss.warmup_teacher_temp=0.04",
        "loss.teacher_temp=0.07", "loss.warmup_teacher_patch_temp=0.03", "loss.teacher_patch_temp=0.06",
        "loss.warmup_teacher_temp_epochs=4",
    ])


def test_values_at_key_steps(cfg):
    spe = 7
    s = Schedules(cfg, spe)
    total, warm = 10 * spe, 2 * spe
    assert s.total_steps == total
    peak = 0.0005 * 512 / 256
    a0 = s.at(0)
    assert a0["epoch"] == 0 and a0["lr"] == 0.0
    assert a0["wd"] == pytest.approx(0.04) and a0["momentum"] == pytest.approx(0.996)
    assert a0["freeze_last_layer"] is True
    # warm-up is linear from 0 and ends exactly at the peak on its last step
    assert s.at(3)["lr"] == pytest.approx(peak * 3 / (warm - 1))
    assert s.at(warm - 1)["lr"] == pytest.approx(peak)
    assert s.at(warm)["lr"] == pytest.approx(peak)  # first cosine step, i = 0
    mid = warm + (total - warm) // 2
    assert s.at(mid)["lr"] == pytest.approx(_cos(peak, 1e-5, mid - warm, total - warm))
    last = s.at(total - 1)
    assert last["lr"] == pytest.approx(_cos(peak, 1e-5, total - 1 - warm, total - warm))
    assert last["wd"] == pytest.approx(_cos(0.04, 0.4, total - 1, total))
    assert last["momentum"] == pytest.approx(_cos(0.996, 1.0, total - 1, total))
    assert s.at(35)["wd"] == pytest.approx(_cos(0.04, 0.4, 35, total))
    assert s.at(35)["momentum"] == pytest.approx(_cos(0.996, 1.0, 35, total))
    assert last["epoch"] == 9
    assert s.at(total + 5)["lr"] == last["lr"]  # past the end: clamped
    with pytest.raises(ValueError):
        s.at(-1)


def test_teacher_temperatures_are_per_epoch(cfg):
    s = Schedules(cfg, 5)
    for epoch in range(10):
        exp_t = 0.04 + (0.07 - 0.04) * epoch / 3 if epoch < 4 else 0.07
        exp_p = 0.03 + (0.06 - 0.03) * epoch / 3 if epoch < 4 else 0.06
        for step in (epoch * 5, epoch * 5 + 4):  # constant within an epoch
            v = s.at(step)
            assert v["epoch"] == epoch
            assert v["teacher_temp"] == pytest.approx(exp_t)
            assert v["teacher_patch_temp"] == pytest.approx(exp_p)
            assert v["freeze_last_layer"] is (epoch < 3)


def test_patch_temperature_held_until_masking_starts(cfg):
    cfg.masking.start_epoch = 2
    s = Schedules(cfg, 1)
    got = [s.at(e)["teacher_patch_temp"] for e in range(10)]
    expected = [0.03, 0.03] + [0.03 + 0.01 * i for i in range(4)] + [0.06] * 4
    np.testing.assert_allclose(got, expected)


def test_warmup_longer_than_run_is_truncated(cfg):
    cfg.loss.warmup_teacher_temp_epochs = 20
    s = Schedules(cfg, 2)
    assert s.at(19)["teacher_temp"] == pytest.approx(0.04 + 0.03 * 9 / 19)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        Schedules(cfg, 0)


def test_momentum_schedule_shapes():
    from ibot_ray.config import load_config
    from ibot_ray.schedules import Schedules

    spe, epochs = 5, 4
    n = spe * epochs
    base = ["optim.epochs=4", "optim.momentum_teacher=0.99", "optim.momentum_teacher_end=1.0"]
    lin = Schedules(load_config("demo", base + ["optim.momentum_schedule=linear"]), spe).momentum
    for i in (0, 7, n - 1):
        assert lin[i] == pytest.approx(0.99 + 0.01 * i / (n - 1))
    const = Schedules(load_config("demo", base + ["optim.momentum_schedule=constant"]), spe).momentum
    assert (const == 0.99).all()
    cos = Schedules(load_config("demo", base + ["optim.momentum_schedule=cosine"]), spe).momentum
    assert cos[0] == pytest.approx(0.99) and cos[n // 2] == pytest.approx(1.0 - 0.005 * (1 + math.cos(math.pi * 0.5)))
