"""Settings derived from the planned run (`auto` fields): the rules, the paper recipe left alone, user values win."""

import pytest

from ibot_ray.config import AUTO_FIELDS, ConfigError, get_field, load_config, unresolved_auto
from ibot_ray.recipe import actor_batch_for, derive_settings, sample_bytes
from ibot_ray.schedules import Schedules

ALL_AUTO = [f"{f}=auto" for f in AUTO_FIELDS]


def test_auto_fields_are_derived_from_the_run_length_and_crop_size():
    cfg = load_config("vit_small_16", ALL_AUTO + ["optim.epochs=40", "crops.global_crops_size=32",
                                                  "crops.local_crops_size=16", "model.patch_size=8",
                                                  "eval.image_size=32"])
    assert unresolved_auto(cfg) == list(AUTO_FIELDS)
    first = derive_settings(cfg)  # no length yet: only what the data pipeline needs
    assert [d.field for d in first] == ["crops.blur_sigma", "data.actor_batch_size"]
    assert cfg.crops.blur_sigma == (pytest.approx(0.1 * 32 / 224, abs=1e-4), pytest.approx(2.0 * 32 / 224, abs=1e-4))
    rest = {d.field: d for d in derive_settings(cfg, steps_per_epoch=62)}  # 2,480 steps
    assert cfg.optim.momentum_teacher == pytest.approx(1 - 25 / 2480, abs=1e-4)
    assert "steps" in rest["optim.momentum_teacher"].why
    assert cfg.optim.warmup_epochs == 4
    assert cfg.loss.warmup_teacher_temp_epochs == 2  # ceil(40 * 30 / 800)
    assert cfg.optim.freeze_last_layer == 1
    assert unresolved_auto(cfg) == []
    cfg.validate()
    Schedules(cfg, 62)  # builds once nothing is auto


def test_a_momentum_end_under_the_derived_start_caps_it_and_says_so():
    base = ["optim.epochs=36", "optim.momentum_teacher=auto"]  # 36 x 62 steps would derive 0.9888
    cfg = load_config("vit_small_16", base + ["optim.momentum_teacher_end=0.98"])
    why = {d.field: d.why for d in derive_settings(cfg, steps_per_epoch=62)}["optim.momentum_teacher"]
    assert cfg.optim.momentum_teacher == 0.98
    assert "capped at optim.momentum_teacher_end" in why and "~50 steps" in why and "0.9888" in why
    assert Schedules(cfg, 62).momentum.tolist() == pytest.approx([0.98] * 36 * 62)  # constant: no rise, no fall
    free = load_config("vit_small_16", base)  # the paper's end, 1
    why = {d.field: d.why for d in derive_settings(free, steps_per_epoch=62)}["optim.momentum_teacher"]
    assert free.optim.momentum_teacher == 0.9888 and "capped" not in why


def test_momentum_is_clipped_to_the_paper_value_and_a_short_run_freezes_nothing():
    long = load_config("vit_small_16", ["optim.momentum_teacher=auto", "optim.freeze_last_layer=auto"])
    derive_settings(long, steps_per_epoch=1251)  # 800 epochs: a million steps
    assert long.optim.momentum_teacher == 0.996 and long.optim.freeze_last_layer == 1
    short = load_config("vit_small_16", ["optim.momentum_teacher=auto", "optim.freeze_last_layer=auto",
                                         "optim.epochs=3", "optim.warmup_epochs=0"])
    derive_settings(short, steps_per_epoch=10)  # 30 steps
    assert short.optim.momentum_teacher == 0.9 and short.optim.freeze_last_layer == 0


def test_the_paper_recipe_is_never_rewritten():
    cfg = load_config("vit_small_16")
    before = cfg.to_dict()
    assert derive_settings(cfg, steps_per_epoch=5) == []
    assert cfg.to_dict() == before
    for f in AUTO_FIELDS:
        assert get_field(load_config("vit_base_16"), f) != "auto"


def test_a_user_value_wins_over_auto(tmp_path):
    yaml_file = tmp_path / "mine.yaml"
    yaml_file.write_text("preset: vit_small_16\noptim:\n  momentum_teacher: auto\n  warmup_epochs: auto\n")
    cfg = load_config(str(yaml_file), ["optim.momentum_teacher=0.99"])
    assert cfg.optim.momentum_teacher == 0.99 and cfg.optim.warmup_epochs == "auto"
    derived = derive_settings(cfg, steps_per_epoch=10)
    assert [d.field for d in derived] == ["optim.warmup_epochs"] and cfg.optim.momentum_teacher == 0.99


def test_auto_is_refused_elsewhere_and_in_process_users_get_the_same_derivation():
    with pytest.raises(ConfigError, match="optim.lr: 'auto' is only allowed for"):
        load_config("demo", ["optim.lr=auto"])
    assert load_config("demo", ["data.format=auto"]).data.format == "auto"  # a string field's own 'auto'
    cfg = load_config("vit_small_16", ["optim.warmup_epochs=auto", "optim.momentum_teacher=auto", "optim.epochs=20"])
    in_process = Schedules(cfg, 10)  # e.g. IBOTStep in a user's own loop: derives from the same rules
    assert cfg.optim.warmup_epochs == "auto"  # the caller's config is left as it was
    derive_settings(cfg, steps_per_epoch=10)
    driver = Schedules(cfg, 10)
    assert (in_process.lr == driver.lr).all() and (in_process.momentum == driver.momentum).all()


def test_auto_actor_batch_fills_about_two_mib_per_block():
    demo = load_config("demo")  # 2 x 32 px + 2 x 16 px crops, 4 x 4 masks: 7,712 bytes per image
    assert sample_bytes(demo) == 2 * (3 * 32 * 32 + 16) + 2 * 3 * 16 * 16
    derived = {d.field: d for d in derive_settings(demo)}
    assert demo.data.actor_batch_size == 256 and "7,712 bytes" in derived["data.actor_batch_size"].why
    paper = load_config("vit_small_16", ["data.actor_batch_size=auto"])  # 578 kB per image: the floor of 16
    assert actor_batch_for(paper) == 16
    tiny = load_config("demo", ["crops.global_crops_size=8", "crops.local_crops_size=8", "model.patch_size=8",
                                "crops.local_crops_number=0"])
    assert actor_batch_for(tiny) == 1024  # the ceiling
    assert actor_batch_for(load_config("demo", ["data.actor_batch_size=24"])) == 24  # a given value is used as is
