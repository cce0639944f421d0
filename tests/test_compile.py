"""train.compile: the backbone and head MLP compiled in place keep their names, give the eager step's numbers, and
compile once per crop size and grad mode, not again."""

import shutil

import pytest
import torch
from test_step import build, make_batch, make_images, tiny_cfg
from torch._dynamo.utils import counters

from ibot_ray.config import load_config
from ibot_ray.export import backbone_state_dict
from ibot_ray.model import build_student_teacher
from ibot_ray.step import compile_model, resolve_compile


def test_compile_setting_resolves_per_device():
    assert resolve_compile("auto", torch.device("cuda")) and not resolve_compile("auto", torch.device("cpu"))
    assert resolve_compile("true", torch.device("cpu")) and not resolve_compile("false", torch.device("cuda"))
    with pytest.raises(ValueError, match="train.compile"):
        load_config("demo", ["train.compile=sometimes"])


def test_a_compiled_models_checkpoint_and_export_keep_their_names():
    cfg = tiny_cfg()
    torch.manual_seed(0)
    plain, _ = build_student_teacher(cfg)
    torch.manual_seed(1)
    compiled, _ = build_student_teacher(cfg)
    compile_model(compiled)
    assert list(compiled.state_dict()) == list(plain.state_dict())
    assert not any("_orig_mod" in k for k in compiled.state_dict())
    assert list(backbone_state_dict(compiled.backbone)) == list(backbone_state_dict(plain.backbone))
    compiled.load_state_dict(plain.state_dict())  # an eager checkpoint into the compiled model ...
    assert all(torch.equal(a, b) for a, b in zip(compiled.state_dict().values(), plain.state_dict().values()))
    torch.manual_seed(2)
    other, _ = build_student_teacher(cfg)
    plain.load_state_dict(other.state_dict())
    other.load_state_dict(compiled.state_dict())  # ... and the compiled model's into an eager one
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), compiled.state_dict().values()))


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on a CPU needs a C++ compiler")
def test_the_compiled_step_equals_the_eager_step_and_does_not_recompile():
    """A one-block model: three compiled steps against three eager ones on the same batches (fp32: within float32
    rounding), then more steps compile nothing new. (Takes a minute or more: Inductor compiles five graphs.)"""
    torch.set_num_threads(2)
    base = ("model.depth=1", "optim.warmup_epochs=0", "optim.freeze_last_layer=0", "model.stem=patch",
            "optim.eps=1e-3")  # eps: see test_step_device.test_the_step_equals_the_reference_computation
    eager, comp = build(tiny_cfg(*base, "train.compile=false")), build(tiny_cfg(*base, "train.compile=true"))
    assert comp.compiled and not eager.compiled
    g = torch.Generator().manual_seed(0)
    batches = [make_batch(eager.cfg, make_images(16), g) for _ in range(3)]
    for batch in batches:
        a, b = eager(batch), comp(batch)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4) and b["grad_norm"] == pytest.approx(a["grad_norm"],
                                                                                                  rel=1e-3)
    lr = eager.optimizer.param_groups[0]["lr"]
    for (name, p), q in zip(eager.student.named_parameters(), comp.student.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=lr * 1e-2, msg=name)
    torch.testing.assert_close(comp.loss.center_patch, eager.loss.center_patch, rtol=1e-4, atol=1e-5)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 5  # backbone: student global + local, teacher; head MLP: student, teacher
    for _ in range(2):  # new batches: other masked-token counts, the same crop sizes
        comp(make_batch(eager.cfg, make_images(16), g), log=False)
    assert counters["stats"]["unique_graphs"] == graphs  # no recompile
    assert list(comp.student.state_dict()) == list(eager.student.state_dict())
