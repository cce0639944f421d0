"""Search spaces: the shipped YAML files, what each entry type samples, and the errors of bad spaces (no cluster)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import yaml

from ibot_ray.config import ConfigError, load_config
from tune.space import SWEEPABLE, SpaceError, load_space, parse_space, space_names

N = 4000


@pytest.fixture(scope="module")
def demo():
    return load_config("demo")


def _draws(space, name, n=N, seed=0):
    return np.asarray(space.params[name].domain().sample(size=n, random_state=np.random.default_rng(seed)))


def test_shipped_spaces_load_and_use_the_reported_ranges(demo):
    assert {"tau_momentum", "tau_grid", "demo_quick"} <= set(space_names())
    for base in (demo, load_config("vit_small_16")):
        for name in space_names():
            assert load_space(name, base).names  # every shipped space validates against both presets
    s = load_space("tau_momentum", demo)
    tt, m = s.params["loss.teacher_temp"], s.params["optim.momentum_teacher"]
    assert (tt.type, tt.low, tt.high) == ("uniform", 0.02, 0.07)
    assert min(m.values) == 0.99 and max(m.values) == 0.9995
    assert not s.grid_only
    g = load_space("tau_grid", demo)
    assert g.grid_only and g.grid_size == math.prod(len(p.values) for p in g.params.values()) == 6
    assert g.param_space()["loss.teacher_temp"] == {"grid_search": [0.02, 0.04, 0.07]}


def test_each_entry_type_samples_its_distribution(demo):
    s = parse_space({
        "loss.teacher_temp": {"type": "uniform", "low": 0.02, "high": 0.07},
        "optim.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
        "loss.warmup_teacher_temp_epochs": {"type": "randint", "low": 0, "high": 3},
        "optim.momentum_teacher": {"type": "choice", "values": [0.99, 0.996, 0.9995]},
        "loss.center_momentum": {"type": "uniform", "low": 0.9, "high": 0.99, "q": 0.01},
    }, base=demo)
    u = _draws(s, "loss.teacher_temp")
    assert u.min() >= 0.02 and u.max() <= 0.07
    assert abs(u.mean() - 0.045) < 4 * (0.05 / math.sqrt(12)) / math.sqrt(N)  # mean of U(a, b), 4 sigma
    lg = np.log10(_draws(s, "optim.lr"))  # log-uniform: log10 is U(-4, -2)
    assert lg.min() >= -4 and lg.max() <= -2
    assert abs(lg.mean() + 3) < 4 * (2 / math.sqrt(12)) / math.sqrt(N)
    assert abs((lg < -3).mean() - 0.5) < 4 * 0.5 / math.sqrt(N)
    r = _draws(s, "loss.warmup_teacher_temp_epochs")  # both bounds included
    counts = np.bincount(r, minlength=5)
    assert counts[4:].sum() == 0 and all(abs(c / N - 0.25) < 4 * math.sqrt(0.25 * 0.75 / N) for c in counts[:4])
    c = _draws(s, "optim.momentum_teacher")
    for v in (0.99, 0.996, 0.9995):
        assert abs((c == v).mean() - 1 / 3) < 4 * math.sqrt(2 / 9 / N)
    q = _draws(s, "loss.center_momentum")
    assert np.allclose(np.round(q / 0.01) * 0.01, q) and q.min() >= 0.9 - 1e-9 and q.max() <= 0.99 + 1e-9


def test_trial_config_applies_the_values_and_validates_the_combination(demo):
    s = parse_space({"optim.momentum_teacher": {"type": "choice", "values": [0.99, 0.9995]},
                     "optim.momentum_teacher_end": {"type": "choice", "values": [0.999, 1]}}, base=demo)
    assert s.params["optim.momentum_teacher_end"].values == [0.999, 1.0]  # coerced to the field's float type
    cfg = s.trial_config(demo, {"optim.momentum_teacher": 0.9995, "optim.momentum_teacher_end": 1.0})
    assert (cfg.optim.momentum_teacher, cfg.optim.momentum_teacher_end) == (0.9995, 1.0)
    fresh = load_config("demo")
    assert cfg.loss.teacher_temp == demo.loss.teacher_temp  # the rest comes from the base ...
    assert demo.optim.momentum_teacher == fresh.optim.momentum_teacher  # ... which is left untouched
    with pytest.raises(ConfigError, match="optim.momentum_teacher"):  # each value alone is valid, not together
        s.trial_config(demo, {"optim.momentum_teacher": 0.9995, "optim.momentum_teacher_end": 0.999})


@pytest.mark.parametrize("entry, message", [
    ({"loss.teacher_tmp": {"type": "uniform", "low": 0.02, "high": 0.07}}, "unknown parameter 'loss.teacher_tmp'"),
    ({"model.depth": {"type": "choice", "values": [2, 4]}}, "config field that cannot be swept"),
    ({"loss.teacher_temp": {"type": "uniform", "low": 0.07, "high": 0.02}}, "empty range"),
    ({"loss.teacher_temp": {"type": "uniform", "low": 0.05, "high": 0.05}}, "empty range"),
    ({"loss.teacher_temp": {"type": "gaussian", "low": 0.02, "high": 0.07}}, "type must be one of"),
    ({"loss.teacher_temp": {"type": "uniform", "low": 0.02}}, "needs high"),
    ({"loss.teacher_temp": {"type": "uniform", "low": 0.02, "high": 0.07, "values": [1]}}, "unexpected key"),
    ({"loss.teacher_temp": {"type": "uniform", "low": "cold", "high": 0.07}}, "low must be a finite number"),
    ({"loss.teacher_temp": {"type": "randint", "low": 1, "high": 3}}, "randint is for integer fields"),
    ({"loss.warmup_teacher_temp_epochs": {"type": "uniform", "low": 0, "high": 30}}, "is an integer field"),
    ({"loss.warmup_teacher_temp_epochs": {"type": "randint", "low": 0.5, "high": 3}}, "bounds must be integers"),
    ({"loss.teacher_temp": {"type": "choice", "values": []}}, "non-empty list"),
    ({"loss.teacher_temp": {"type": "grid", "values": [0.04, 0.04]}}, "duplicates"),
    ({"loss.teacher_temp": {"type": "choice", "values": [0.04, "warm"]}}, "value 'warm' is invalid"),
    ({"optim.lr": {"type": "loguniform", "low": 0, "high": 1e-3}}, "loguniform needs low > 0"),
    ({"loss.teacher_temp": {"type": "uniform", "low": -0.01, "high": 0.07}}, "low=-0.01 is invalid: loss.teacher_temp"),
    ({"loss.center_momentum": {"type": "uniform", "low": 0.9, "high": 1.0}},
     "high=1.0 is invalid: loss.center_momentum"),
    ({"optim.momentum_teacher": {"type": "grid", "values": [0.99, 1.5]}}, "value 1.5 is invalid"),
    ({"loss.teacher_temp": [0.02, 0.07]}, "expected a mapping"),
])
def test_bad_entries_raise_errors_naming_the_file_and_entry(tmp_path, demo, entry, message):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"parameters": entry}))
    with pytest.raises(SpaceError) as e:
        load_space(path, demo)
    text = str(e.value)
    assert message in text and str(path) in text
    assert f"entry {next(iter(entry))}" in text or "unknown parameter" in text


def test_extremes_are_checked_against_the_base_config(demo):
    """momentum_teacher 0.9995 is valid with the demo's end momentum 1.0, but not when the base ends at 0.999."""
    entry = {"optim.momentum_teacher": {"type": "uniform", "low": 0.99, "high": 0.9995}}
    assert parse_space(entry, base=demo).params["optim.momentum_teacher"].high == 0.9995
    base = load_config("demo", ["optim.momentum_teacher_end=0.999"])
    with pytest.raises(SpaceError, match=r"high=0.9995 is invalid: optim.momentum_teacher"):
        parse_space(entry, base=base)


def test_malformed_files(tmp_path, demo):
    with pytest.raises(SpaceError, match="neither a YAML file nor a shipped space"):
        load_space(tmp_path / "missing.yaml", demo)
    bad = tmp_path / "bad.yaml"
    bad.write_text("parameters: {loss.teacher_temp: [unclosed\n")
    with pytest.raises(SpaceError, match="not valid YAML"):
        load_space(bad, demo)
    with pytest.raises(SpaceError, match="unexpected top-level key"):
        parse_space({"parameters": {"loss.teacher_temp": {"type": "grid", "values": [0.04]}}, "trials": 3}, base=demo)
    with pytest.raises(SpaceError, match="non-empty mapping"):
        parse_space({"parameters": {}}, base=demo)
    flat = parse_space({"description": "flat", "loss.student_temp": {"type": "grid", "values": [0.1, 0.2]}},
                       base=demo)  # parameters may also sit at the top level
    assert flat.names == ["loss.student_temp"] and flat.description == "flat"
    assert set(SWEEPABLE) >= {"loss.teacher_temp", "loss.teacher_patch_temp", "loss.warmup_teacher_temp",
                              "loss.warmup_teacher_temp_epochs", "loss.student_temp", "optim.momentum_teacher",
                              "optim.momentum_teacher_end", "loss.center_momentum", "loss.center_momentum_patch"}


def test_momentum_schedule_shape_is_sweepable_and_checked():
    """A grid over the momentum schedule's shape: each trial's config gets its shape, and its run's schedule has it
    (0.996 -> 1, the ViT-S/16 preset's). An unknown shape is refused, naming the entry."""
    from ibot_ray.schedules import Schedules

    shapes = ["cosine", "linear", "constant"]
    base = load_config("vit_small_16")
    space = parse_space({"optim.momentum_schedule": {"type": "grid", "values": shapes}}, base=base)
    assert space.grid_only and space.grid_size == 3
    assert space.param_space() == {"optim.momentum_schedule": {"grid_search": shapes}}
    m0, m1 = base.optim.momentum_teacher, base.optim.momentum_teacher_end
    assert (m0, m1) == (0.996, 1.0)
    n = base.optim.epochs  # one step per epoch
    step = np.arange(n)
    expected = {"cosine": m1 + 0.5 * (m0 - m1) * (1 + np.cos(np.pi * step / n)),
                "linear": m0 + (m1 - m0) * step / (n - 1),
                "constant": np.full(n, m0)}
    for shape in shapes:
        cfg = space.trial_config(base, {"optim.momentum_schedule": shape})
        assert cfg.optim.momentum_schedule == shape
        momentum = Schedules(cfg, steps_per_epoch=1).momentum
        np.testing.assert_allclose(momentum, expected[shape], rtol=0, atol=1e-12, err_msg=shape)
    with pytest.raises(SpaceError, match="optim.momentum_schedule"):
        parse_space({"optim.momentum_schedule": {"type": "choice", "values": ["cosine", "exponential"]}})


def test_recipe_levers_are_sweepable_with_tuple_and_bool_values(demo):
    s = load_space("demo_recipe", demo)
    assert {"optim.lr", "head.out_dim", "crops.local_crops_number", "crops.global_crops_scale"} <= set(s.names)
    assert s.params["crops.global_crops_scale"].values[0] == (0.35, 1.0)  # lists coerced to the field's tuples
    cfg = s.trial_config(demo, {"optim.lr": 0.01, "head.out_dim": 1024, "crops.local_crops_number": 0,
                                "crops.global_crops_scale": (0.7, 1.0), "loss.teacher_temp": 0.06})
    assert (cfg.head.out_dim, cfg.crops.local_crops_number, cfg.crops.global_crops_scale) == (1024, 0, (0.7, 1.0))
    nl = parse_space({"head.norm_last_layer": {"type": "grid", "values": [True, False]}}, base=demo)
    assert nl.params["head.norm_last_layer"].values == [True, False]
    with pytest.raises(SpaceError, match=r"entry crops.global_crops_scale: value \[1.0, 0.5\] is invalid"):
        parse_space({"crops.global_crops_scale": {"type": "choice", "values": [[0.5, 1.0], [1.0, 0.5]]}}, base=demo)
    with pytest.raises(SpaceError, match="config field that cannot be swept"):  # steps per epoch stay fixed
        parse_space({"optim.batch_size": {"type": "choice", "values": [32, 64]}}, base=demo)
