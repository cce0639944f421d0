"""TeacherEMA arithmetic and name pairing, and the student/teacher pair built from a config."""

import copy

import pytest
import torch
from torch import nn

from ibot_ray.config import load_config
from ibot_ray.ema import TeacherEMA
from ibot_ray.model import IBOTModel, build_student_teacher, patch_logit_dim

TINY = ["head.out_dim=40", "head.patch_out_dim=24", "head.hidden_dim=32", "head.bottleneck_dim=16",
        "crops.global_crops_size=32", "crops.local_crops_size=16", "eval.image_size=32", "model.drop_path_rate=0.2"]


class Pair(nn.Module):
    def __init__(self, extra: bool):
        super().__init__()
        self.a = nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
        self.lin = nn.Linear(2, 1)
        if extra:
            self.mask_token = nn.Parameter(torch.tensor([5.0]))


class DDPLike(nn.Module):
    """Stands in for DistributedDataParallel: the real model is the `module` attribute (names get 'module.')."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module


def _set(student: Pair, teacher: Pair):
    with torch.no_grad():
        student.lin.weight.copy_(torch.tensor([[1.0, -1.0]]))
        student.lin.bias.fill_(4.0)
        teacher.a.copy_(torch.tensor([10.0, 20.0, 30.0]))
        teacher.lin.weight.copy_(torch.tensor([[0.0, 2.0]]))
        teacher.lin.bias.fill_(-6.0)


@pytest.mark.parametrize("wrap", [False, True])
def test_update_arithmetic_on_hand_set_values(wrap):
    student, teacher = Pair(extra=True), Pair(extra=False)
    _set(student, teacher)
    ema = TeacherEMA(DDPLike(student) if wrap else student, teacher)
    assert sorted(ema.names) == ["a", "lin.bias", "lin.weight"]  # mask_token exists only in the student
    ema.update(0.9)
    # t = 0.9 t + 0.1 s, written out
    torch.testing.assert_close(teacher.a.detach(), torch.tensor([0.9 * 10 + 0.1 * 1, 0.9 * 20 + 0.1 * 2,
                                                                 0.9 * 30 + 0.1 * 3]))
    torch.testing.assert_close(teacher.lin.weight.detach(), torch.tensor([[0.1 * 1.0, 0.9 * 2 - 0.1]]))
    torch.testing.assert_close(teacher.lin.bias.detach(), torch.tensor([0.9 * -6 + 0.1 * 4]))
    ema.update(0.5)
    torch.testing.assert_close(teacher.lin.bias.detach(), torch.tensor([0.5 * (0.9 * -6 + 0.4) + 0.5 * 4]))
    assert student.mask_token.item() == 5.0 and student.a.tolist() == [1.0, 2.0, 3.0]  # student untouched


def test_momentum_one_and_zero():
    student, teacher = Pair(extra=False), Pair(extra=False)
    _set(student, teacher)
    ema = TeacherEMA(student, teacher)
    ema.update(1.0)
    assert teacher.a.tolist() == [10.0, 20.0, 30.0]
    ema.update(0.0)
    assert teacher.a.tolist() == [1.0, 2.0, 3.0] and teacher.lin.bias.item() == 4.0
    with pytest.raises(ValueError, match="momentum"):
        ema.update(1.5)


def test_no_shared_names_raises():
    with pytest.raises(ValueError, match="share no parameter"):
        TeacherEMA(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)))


def _cfg(*extra):
    return load_config("demo", TINY + list(extra))


@pytest.fixture(scope="module")
def built():
    torch.manual_seed(0)
    cfg = _cfg()
    return cfg, *build_student_teacher(cfg)


def test_build_student_teacher_initial_copy_and_freezing(built):
    cfg, student, teacher = built
    assert isinstance(student, IBOTModel) and isinstance(teacher, IBOTModel)
    assert student.backbone.mask_token is not None and teacher.backbone.mask_token is None
    assert all(not p.requires_grad for p in teacher.parameters())
    s = dict(student.named_parameters())
    for name, p in teacher.named_parameters():
        assert torch.equal(p, s[name]), name
    assert set(s) - set(dict(teacher.named_parameters())) == {"backbone.mask_token"}
    # drop path: student ramps to cfg rate over its blocks, teacher has none
    assert student.backbone.vit.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)
    assert not hasattr(teacher.backbone.vit.blocks[-1].drop_path1, "drop_prob")
    # the demo trains prototype norms (norm_last_layer false) and shares the patch head
    assert student.head.last_layer2 is student.head.last_layer
    assert student.head.last_layer.parametrizations.weight.original0.requires_grad
    x = torch.randn(2, 3, 32, 32)
    teacher.eval()
    student.eval()
    with torch.no_grad():
        tc, tp = teacher(x)
        sc, sp = student(x, torch.zeros(2, 4, 4, dtype=torch.bool))
        lc, none = student(torch.randn(3, 3, 16, 16), patches=False)
    torch.testing.assert_close(tc, sc)
    torch.testing.assert_close(tp, sp)
    assert tc.shape == (2, 40) and tp.shape == (2, 16, patch_logit_dim(cfg)) and lc.shape == (3, 40) and none is None


def test_separate_student_patch_head_with_shared_teacher_head():
    torch.manual_seed(0)
    cfg = _cfg("head.shared_head=false", "head.shared_head_teacher=true", "head.patch_out_dim=40")
    student, teacher = build_student_teacher(cfg)
    assert student.head.last_layer2 is not student.head.last_layer
    assert teacher.head.last_layer2 is teacher.head.last_layer
    # the teacher's (shared) prototypes start from the student's [CLS] prototypes, not from its last_layer2
    torch.testing.assert_close(teacher.head.last_layer.weight, student.head.last_layer.weight)
    assert not torch.allclose(teacher.head.last_layer.weight, student.head.last_layer2.weight)
    ema = TeacherEMA(DDPLike(student), teacher)
    assert not any("last_layer2" in n for n in ema.names) and "backbone.mask_token" not in ema.names
    assert len(ema.names) == len(list(teacher.parameters()))


def test_ema_on_built_models_through_wrapper(built):
    student, teacher = copy.deepcopy(built[1:])
    ema = TeacherEMA(DDPLike(student), teacher)
    plain = TeacherEMA(student, teacher)
    assert ema.names == plain.names and "backbone.mask_token" not in ema.names
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    before = {n: p.clone() for n, p in teacher.named_parameters()}
    s = dict(student.named_parameters())
    ema.update(0.75)
    for n, p in teacher.named_parameters():
        torch.testing.assert_close(p, 0.75 * before[n] + 0.25 * s[n])


def test_patch_logit_dim_follows_sharing():
    assert patch_logit_dim(_cfg("head.shared_head=true")) == 40
    assert patch_logit_dim(_cfg("head.shared_head=false", "head.shared_head_teacher=true")) == 40
    assert patch_logit_dim(_cfg("head.shared_head=false", "head.shared_head_teacher=false")) == 24
    with pytest.raises(ValueError, match="shared_head_teacher"):
        build_student_teacher(_cfg("head.shared_head=true", "head.shared_head_teacher=false"))
