"""The run config: presets, YAML files, overrides, validation errors that name the field, round trip."""

import subprocess
import sys

import pytest
import yaml

from ibot_ray.config import ConfigError, IBOTConfig, load_config, preset_names


def test_presets_resolve_to_the_papers_recipe():
    assert {"vit_small_16", "vit_base_16", "demo", "small_gpu"} <= set(preset_names())
    s = load_config("vit_small_16")
    assert s.model.arch == "vit_small_patch16_224" and s.patch_size == 16
    assert s.optim.batch_size == 1024 and s.optim.epochs == 800
    assert s.crops.local_crops_number == 10
    assert s.crops.global_crops_scale == (0.25, 1.0) and s.crops.local_crops_scale == (0.05, 0.25)
    assert s.masking.ratio == (0.0, 0.3) and s.masking.ratio_var == (0.0, 0.2)  # 0 or U(0.1, 0.5)
    assert s.head.out_dim == 8192 and s.head.hidden_dim == 2048 and s.head.bottleneck_dim == 256
    assert (s.loss.student_temp, s.loss.warmup_teacher_temp, s.loss.teacher_temp) == (0.1, 0.04, 0.07)
    assert (s.optim.weight_decay, s.optim.weight_decay_end, s.optim.momentum_teacher) == (0.04, 0.4, 0.996)
    assert s.loss.center_momentum == 0.9 and s.optim.freeze_last_layer == 1
    b = load_config("vit_base_16")
    assert b.model.arch == "vit_base_patch16_224" and b.head.norm_last_layer is True
    assert b.crops.local_crops_number == 10  # inherited from vit_small_16 through `preset:`
    d = load_config("demo")
    assert d.crops.local_crops_size < d.crops.global_crops_size and d.optim.batch_size < 1024


def test_yaml_file_with_base_preset_and_overrides(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text(yaml.safe_dump({"preset": "demo", "loss": {"teacher_temp": 0.05}, "optim": {"epochs": 3}}))
    cfg = load_config(str(f), ["loss.teacher_temp=0.06", "train.num_workers=[1,4]", "masking.ratio=[0.3]",
                               "masking.ratio_var=[0.1]", "head.shared_head=false"])
    assert cfg.loss.teacher_temp == 0.06  # override wins over the file
    assert cfg.optim.epochs == 3  # file wins over the preset
    assert cfg.model.arch == load_config("demo").model.arch  # preset wins over defaults
    assert cfg.train.num_workers == (1, 4) and cfg.elastic
    assert cfg.masking.ratio == (0.3,) and cfg.head.shared_head is False


@pytest.mark.parametrize(
    "override, field",
    [
        ("loss.teacher_temp=-0.1", "loss.teacher_temp"),
        ("loss.student_temp=0", "loss.student_temp"),
        ("masking.ratio=[1.0]", "masking.ratio"),
        ("masking.ratio=[-0.1]", "masking.ratio"),
        ("crops.local_crops_size=128", "crops.local_crops_size"),
        ("crops.global_crops_size=70", "crops.global_crops_size"),
        ("model.arch=vit_does_not_exist", "model.arch"),
        ("model.arch=resnet50", "model.arch"),
        ("optim.batch_size=1", "optim.batch_size"),  # smaller than the 2 demo workers
        ("optim.batch_size=abc", "optim.batch_size"),
        ("train.num_workers=[3,2]", "train.num_workers"),
        ("crops.global_crops_scale=[0.5,0.2]", "crops.global_crops_scale"),
        ("crops.flip_p=1.5", "crops.flip_p"),
        ("optim.momentum_teacher=1.2", "optim.momentum_teacher"),
        ("loss.nope=1", "loss.nope"),
        ("loss.lambda_koleo=-0.1", "loss.lambda_koleo"),
        ("nosection.x=1", "nosection"),
    ],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        load_config("demo", [override])
    assert str(e.value).startswith(field), str(e.value)


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config("demo", ["loss.teacher_temp=0.05"])
    path = tmp_path / "c.yaml"
    cfg.save(path)
    again = load_config(str(path))
    assert again == cfg
    assert IBOTConfig.from_dict(cfg.to_dict()) == cfg


def test_missing_config_file_is_a_clear_error():
    with pytest.raises(ConfigError, match="neither a YAML file nor a preset"):
        load_config("no_such_preset")


def test_cli_config_command_prints_and_rejects():
    ok = subprocess.run([sys.executable, "-m", "ibot_ray.cli", "config", "--config", "demo", "--set",
                         "loss.teacher_temp=0.05"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert yaml.safe_load(ok.stdout)["loss"]["teacher_temp"] == 0.05
    bad = subprocess.run([sys.executable, "-m", "ibot_ray.cli", "config", "--set", "loss.teacher_temp=-1"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "loss.teacher_temp" in bad.stderr
