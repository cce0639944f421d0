"""The convolutional stem (``model.stem: conv``): its shapes, that a masked patch stays hidden from every token, that
the default patch embedding is untouched, and that its exports and checkpoints load back."""

import pytest
import torch

from ibot_ray.backbone import MaskedViT
from ibot_ray.config import ConfigError, load_config
from ibot_ray.conv_stem import ConvStemPatchEmbed, conv_stem_widths
from ibot_ray.export import export_backbone, export_from_checkpoint, exported_metadata, load_exported
from ibot_ray.model import build_student_teacher

SMALL = dict(img_size=32, patch_size=8, depth=2, embed_dim=96, num_heads=3)


def _vit(stem: str, seed: int = 0) -> MaskedViT:
    torch.manual_seed(seed)
    return MaskedViT("vit_tiny_patch16_224", stem=stem, **SMALL).eval()


def test_widths_double_up_to_the_embedding_and_patch_sizes_are_checked():
    assert conv_stem_widths(8, 96) == [24, 48, 96]
    assert conv_stem_widths(16, 384) == [48, 96, 192, 384]
    assert conv_stem_widths(2, 64) == [64]
    for bad in (1, 6, 14):
        with pytest.raises(ValueError, match="power of two"):
            conv_stem_widths(bad, 96)


def test_conv_stem_keeps_the_token_grid_and_output_of_the_plain_vit():
    m = _vit("conv")
    assert isinstance(m.vit.patch_embed, ConvStemPatchEmbed)
    convs = [c for c in m.vit.patch_embed.proj if isinstance(c, torch.nn.Conv2d)]
    assert [c.stride for c in convs] == [(2, 2)] * 3 + [(1, 1)]
    with torch.no_grad():
        assert m(torch.randn(2, 3, 32, 32)).shape == (2, 1 + 16, 96)
        assert m(torch.randn(2, 3, 16, 16)).shape == (2, 1 + 4, 96)  # local crops: dynamic size, as the plain ViT
    plain = _vit("patch")
    assert isinstance(plain.vit.patch_embed.proj, torch.nn.Conv2d)  # iBOT's patch embedding stays the default
    assert type(plain.vit.patch_embed) is not ConvStemPatchEmbed


def test_masked_patch_content_reaches_no_token_with_the_conv_stem():
    """The stem's receptive field (15 px) overlaps the neighbouring patches: without zeroing a masked patch's pixels
    its content would reach its neighbours' tokens. Checked both ways so the test can fail."""
    m = _vit("conv")
    x = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[0, 1, 2] = True
    mask[1, 0:2, 0:2] = True
    y = x.clone()
    y[0, :, 8:16, 16:24] = torch.randn(3, 8, 8) * 5  # change only the masked patches' pixels
    y[1, :, 0:16, 0:16] = torch.randn(3, 16, 16) * 5
    with torch.no_grad():
        torch.testing.assert_close(m(x, mask), m(y, mask), rtol=0, atol=0)
        with pytest.raises(TypeError, match="bool"):
            m(x, mask.float())
        with pytest.raises(ValueError, match="does not match"):
            m(x, torch.zeros(2, 3, 3, dtype=torch.bool))
        # unmasked, the same change reaches the neighbouring patch tokens, not only the changed patch's own
        diff = (m(x) - m(y)).abs().amax(-1)
    assert diff[0, 1 + 1 * 4 + 1] > 1e-3 and diff[0, 1 + 2 * 4 + 2] > 1e-3  # (1,1) and (2,2) border patch (1,2)
    # the patch embedding itself leaks: the token of a neighbour changes before any attention mixes tokens
    with torch.no_grad():
        tx, ty = m.vit.patch_embed(x), m.vit.patch_embed(y)
    assert (tx[0, 1, 1] - ty[0, 1, 1]).abs().max() > 1e-3


def test_conv_stem_gradient_reaches_the_stem_and_not_through_masked_pixels():
    m = MaskedViT("vit_tiny_patch16_224", stem="conv", **SMALL)
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, 2, 3] = True
    m(x, mask).square().mean().backward()
    assert m.vit.patch_embed.proj[0].weight.grad.abs().sum() > 0
    assert x.grad[0, :, 16:24, 24:32].abs().sum() == 0  # the masked patch's pixels
    assert x.grad[0, :, 16:24, 16:24].abs().sum() > 0  # its unmasked neighbour


def test_config_option_builds_student_and_teacher_with_the_same_stem():
    cfg = load_config("demo")
    student, teacher = build_student_teacher(cfg)
    for model in (student, teacher):
        assert isinstance(model.backbone.vit.patch_embed, ConvStemPatchEmbed)
    s = student.backbone.vit.patch_embed.state_dict()
    t = teacher.backbone.vit.patch_embed.state_dict()
    assert s.keys() == t.keys() and all(torch.equal(s[k], t[k]) for k in s)
    assert load_config("vit_small_16").model.stem == "patch"  # the paper's recipe keeps iBOT's patch embedding
    assert load_config("demo").model.stem == "conv"
    with pytest.raises(ConfigError, match="model.stem"):
        load_config("demo", ["model.stem=resnet"])
    with pytest.raises(ConfigError, match="power of two"):
        load_config("demo", ["model.stem=conv", "model.patch_size=6", "crops.global_crops_size=36",
                             "crops.local_crops_size=18"])


def test_conv_stem_export_loads_into_timm_with_identical_features(tmp_path):
    m = _vit("conv")
    path = export_backbone(m, tmp_path / "stem.safetensors")
    assert exported_metadata(path)["embed_layer"] == "ibot_ray.conv_stem.ConvStemPatchEmbed"
    loaded = load_exported(path).eval()
    assert isinstance(loaded.patch_embed, ConvStemPatchEmbed)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_features(x)[:, 0], m(x)[:, 0])


def test_conv_stem_checkpoint_exports_with_its_embed_layer(tmp_path):
    from ibot_ray.checkpoint import save_checkpoint

    cfg = load_config("demo", ["model.stem=conv"])
    student, teacher = build_student_teacher(cfg)
    save_checkpoint(tmp_path / "state.pt", {"teacher": teacher.state_dict(), "student": student.state_dict(),
                                            "epoch": 1, "step": 10, "config": cfg.to_dict()})
    path = export_from_checkpoint(tmp_path / "state.pt", tmp_path / "teacher.safetensors")
    loaded = load_exported(path).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_features(x)[:, 0], teacher.backbone.eval()(x)[:, 0])


def test_the_step_trains_the_stem_and_the_teacher_follows_it():
    from ibot_ray.step import IBOTStep

    cfg = load_config("demo", ["model.depth=2", "optim.batch_size=8", "train.num_workers=[1,1]", "optim.epochs=1",
                               "optim.warmup_epochs=0", "optim.freeze_last_layer=0"])
    torch.manual_seed(0)
    student, teacher = build_student_teacher(cfg)
    runner = IBOTStep(cfg, student, teacher, steps_per_epoch=4)
    first = student.backbone.vit.patch_embed.proj[0].weight.detach().clone()
    t_first = teacher.backbone.vit.patch_embed.proj[0].weight.detach().clone()
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        batch = {"global_crops": torch.randint(0, 256, (8, 2, 3, 32, 32), dtype=torch.uint8, generator=g),
                 "local_crops": torch.randint(0, 256, (8, 2, 3, 16, 16), dtype=torch.uint8, generator=g),
                 "masks": torch.rand(8, 2, 4, 4, generator=g) < 0.3}
        m = runner(batch)
        assert not m["step_skipped"] and all(torch.isfinite(torch.tensor(m[k])) for k in ("loss", "cls", "mim"))
    s_w = student.backbone.vit.patch_embed.proj[0].weight.detach()
    t_w = teacher.backbone.vit.patch_embed.proj[0].weight.detach()
    assert (s_w - first).abs().max() > 1e-4  # the optimiser moved the stem
    assert (t_w - t_first).abs().max() > 0  # the EMA carried it to the teacher, part of the way
    assert (t_w - first).norm() < (s_w - first).norm()
