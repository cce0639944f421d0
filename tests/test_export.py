"""timm-loadable safetensors export of the backbone, from a live model and from a training checkpoint."""

from __future__ import annotations

import copy
import logging

import pytest
import timm
import torch
from safetensors.torch import load_file
from torch import nn

from ibot_ray.checkpoint import CheckpointError, save_checkpoint, training_state
from ibot_ray.export import (
    backbone_state_dict,
    export_backbone,
    export_from_checkpoint,
    exported_metadata,
    load_exported,
)

ARCH = "vit_tiny_patch16_224"
DEPTH = 2  # fewer blocks than the arch's 12 keeps the tests fast; passed identically when loading


class StandInBackbone(nn.Module):
    """What ibot_ray.backbone.MaskedViT exposes: a timm ViT as ``.vit`` plus a ``.mask_token`` parameter."""

    def __init__(self, img_size=32, patch_size=None, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        kwargs = {"patch_size": patch_size} if patch_size else {}
        self.vit = timm.create_model(ARCH, pretrained=False, num_classes=0, img_size=img_size,
                                     dynamic_img_size=True, depth=DEPTH, **kwargs)
        self.mask_token = nn.Parameter(torch.randn(1, self.vit.embed_dim))
        with torch.no_grad():  # move every weight away from its (partly constant) init
            for p in self.vit.parameters():
                p.add_(0.05 * torch.randn_like(p))

    def forward(self, x, mask=None):
        return self.vit.forward_features(x)


class StandInModel(nn.Module):
    """What the iBOT model looks like to a checkpoint: backbone + head."""

    def __init__(self, seed=0, img_size=32, patch_size=None):
        super().__init__()
        self.backbone = StandInBackbone(img_size=img_size, patch_size=patch_size, seed=seed)
        self.head = nn.Sequential(nn.Linear(192, 16), nn.GELU(), nn.Linear(16, 8))


def load_with_timm(path, caplog, **kwargs):
    """The documented way to consume an export; returns the model and any missing/unexpected-key log lines."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="timm"):
        model = timm.create_model(ARCH, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=str(path)),
                                  dynamic_img_size=True, depth=DEPTH, **kwargs)
    complaints = [r.getMessage() for r in caplog.records if "issing keys" in r.getMessage()
                  or "nexpected keys" in r.getMessage()]
    return model.eval(), complaints


@pytest.mark.parametrize("patch_size", [None, 8])
def test_exported_backbone_loads_in_timm_with_identical_features(tmp_path, caplog, patch_size):
    backbone = StandInBackbone(patch_size=patch_size).eval()
    path = export_backbone(backbone, tmp_path / "backbone.safetensors", metadata={"epoch": 5, "note": "hi"})
    assert path == tmp_path / "backbone.safetensors" and path.exists()

    sd = load_file(str(path))
    assert set(sd) == set(backbone.vit.state_dict())
    assert "mask_token" not in sd and not any(k.startswith("vit.") for k in sd)
    for k, v in backbone.vit.state_dict().items():
        assert torch.equal(sd[k], v), k

    kwargs = {"img_size": 32, **({"patch_size": patch_size} if patch_size else {})}
    model, complaints = load_with_timm(path, caplog, **kwargs)
    assert complaints == []
    result = model.load_state_dict(sd, strict=True)  # no missing or unexpected keys
    assert not result.missing_keys and not result.unexpected_keys

    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = backbone(x)
        got = model.forward_features(x)
        assert torch.equal(got, expected)
        assert torch.equal(model(x), expected[:, 0])  # num_classes=0: pooled output is the normed CLS
        x48 = torch.randn(2, 3, 48, 48)  # other resolutions: the pos-embed interpolation matches too
        assert torch.equal(model.forward_features(x48), backbone(x48))

    meta = exported_metadata(path)
    assert meta["arch"] == ARCH and meta["epoch"] == 5 and meta["note"] == "hi"
    assert meta["timm_kwargs"] == {"img_size": 32, "patch_size": patch_size or 16, "dynamic_img_size": True,
                                   "depth": DEPTH, "embed_dim": 192, "num_heads": 3}
    rebuilt = load_exported(path).eval()  # arch and kwargs taken from the metadata
    with torch.no_grad():
        assert torch.equal(rebuilt.forward_features(x), expected)


def test_backbone_state_dict_is_a_detached_copy():
    backbone = StandInBackbone()
    sd = backbone_state_dict(backbone)
    assert list(sd) == list(backbone.vit.state_dict())
    assert all(v.is_contiguous() and not v.requires_grad for v in sd.values())
    with torch.no_grad():
        backbone.vit.cls_token.add_(1.0)
    assert not torch.equal(sd["cls_token"], backbone.vit.cls_token)
    assert backbone_state_dict(nn.parallel.DataParallel(backbone)).keys() == sd.keys()


def test_export_path_must_be_safetensors(tmp_path):
    with pytest.raises(ValueError, match="safetensors"):
        export_backbone(StandInBackbone(), tmp_path / "backbone.pt")


def _checkpoint(tmp_path, wrap_student_keys=False):
    student = StandInModel(seed=0, patch_size=8)
    teacher = copy.deepcopy(student)
    with torch.no_grad():  # teacher != student, as after EMA steps
        for p in teacher.parameters():
            p.mul_(0.9)
    opt = torch.optim.AdamW(student.parameters())
    loss = nn.Module()
    loss.register_buffer("center", torch.zeros(1, 8))
    config = {"model": {"arch": ARCH, "patch_size": 8}, "crops": {"global_crops_size": 32}}
    state = training_state(student=student, teacher=teacher, optimizer=opt, loss=loss, epoch=4, step=99,
                           config=config)
    assert "backbone.vit.cls_token" in state["teacher"] and "backbone.mask_token" in state["teacher"]
    assert any(k.startswith("head.") for k in state["teacher"])
    if wrap_student_keys:  # as written by code that saved a DDP-wrapped model directly
        state["student"] = {f"module.{k}": v for k, v in state["student"].items()}
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, state)
    return path, student, teacher


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_export_from_checkpoint(tmp_path, caplog, which):
    ckpt, student, teacher = _checkpoint(tmp_path, wrap_student_keys=True)
    out = export_from_checkpoint(ckpt, tmp_path / f"{which}.safetensors", which=which)
    source = {"teacher": teacher, "student": student}[which].backbone.eval()
    other = {"teacher": student, "student": teacher}[which].backbone.eval()
    assert set(load_file(str(out))) == set(source.vit.state_dict())
    model, complaints = load_with_timm(out, caplog, img_size=32, patch_size=8)
    assert complaints == []
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.forward_features(x), source(x))
        assert not torch.allclose(model.forward_features(x), other(x))
    meta = exported_metadata(out)
    assert meta["which"] == which and meta["epoch"] == 4 and meta["step"] == 99 and meta["arch"] == ARCH
    assert meta["timm_kwargs"] == {"dynamic_img_size": True, "img_size": 32, "patch_size": 8, "depth": DEPTH,
                                   "embed_dim": 192}
    with torch.no_grad():
        assert torch.equal(load_exported(out).eval().forward_features(x), source(x))


def test_export_from_checkpoint_errors(tmp_path):
    ckpt, _, _ = _checkpoint(tmp_path)
    with pytest.raises(ValueError, match="which"):
        export_from_checkpoint(ckpt, tmp_path / "x.safetensors", which="ema")
    bad = tmp_path / "plain.pt"
    torch.save({"backbone.vit.cls_token": torch.zeros(1, 1, 192)}, bad)
    with pytest.raises(CheckpointError, match="plain.pt"):
        export_from_checkpoint(bad, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_export_from_checkpoint_accepts_bare_backbone_state(tmp_path):
    """A state dict of plain timm keys plus a top-level mask_token: the token must go (timm reads it as DINOv2)."""
    backbone = StandInBackbone(seed=3).eval()
    state = {"teacher": {**backbone.vit.state_dict(), "mask_token": backbone.mask_token.detach()}, "step": 1}
    save_checkpoint(tmp_path / "bare.pt", state)
    out = export_from_checkpoint(tmp_path / "bare.pt", tmp_path / "bare.safetensors")
    assert set(load_file(str(out))) == set(backbone.vit.state_dict())


def test_narrow_backbone_round_trips_with_its_width_and_heads(tmp_path):
    """model.embed_dim / model.num_heads overrides are recorded, so timm rebuilds the same narrow model."""
    from ibot_ray.backbone import MaskedViT

    torch.manual_seed(0)
    backbone = MaskedViT(ARCH, img_size=32, patch_size=8, depth=DEPTH, embed_dim=96, num_heads=3).eval()
    assert backbone.embed_dim == 96 and backbone.vit.blocks[0].attn.num_heads == 3
    path = export_backbone(backbone, tmp_path / "narrow.safetensors")
    assert exported_metadata(path)["timm_kwargs"]["num_heads"] == 3
    rebuilt = load_exported(path).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt.forward_features(x), backbone(x))
