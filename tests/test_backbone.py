"""MaskedViT: token shapes, register exclusion, where the mask token goes, and its gradient."""

import pytest
import torch

from ibot_ray.backbone import MaskedViT


def _first_block_input(model: MaskedViT, x, mask=None):
    seen = {}
    h = model.vit.blocks[0].register_forward_pre_hook(lambda mod, args: seen.__setitem__("x", args[0].detach()))
    try:
        out = model(x, mask)
    finally:
        h.remove()
    return seen["x"], out


def test_shapes_global_and_local_crops_224_model():
    torch.manual_seed(0)
    m = MaskedViT("vit_tiny_patch16_224", img_size=224).eval()
    assert m.patch_size == 16 and m.embed_dim == 192 and m.num_prefix_tokens == 1
    with torch.no_grad():
        assert m(torch.randn(1, 3, 224, 224)).shape == (1, 1 + 14 * 14, 192)
        assert m(torch.randn(2, 3, 96, 96)).shape == (2, 1 + 6 * 6, 192)
        mask = torch.zeros(2, 6, 6, dtype=torch.bool)
        mask[:, 1:3, 2:4] = True
        assert m(torch.randn(2, 3, 96, 96), mask).shape == (2, 37, 192)


def test_patch_size_override_and_small_img_size():
    m = MaskedViT("vit_tiny_patch16_224", img_size=32, patch_size=8).eval()
    assert m.patch_size == 8
    with torch.no_grad():
        assert m(torch.randn(3, 3, 32, 32)).shape == (3, 1 + 16, 192)
        assert m(torch.randn(3, 3, 16, 16)).shape == (3, 1 + 4, 192)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        m(torch.randn(1, 3, 20, 20))


@pytest.mark.parametrize("arch,img,patch", [
    ("vit_tiny_patch16_224", 32, 8),  # class token, pos_embed covers it
    ("deit3_small_patch16_224", 32, 16),  # no_embed_class: pos_embed for patches only
    ("vit_small_patch14_reg4_dinov2", 28, 14),  # 4 register tokens
])
def test_unmasked_output_matches_timm_without_prefix_extras(arch, img, patch):
    torch.manual_seed(0)
    m = MaskedViT(arch, img_size=img, patch_size=patch).eval()
    x = torch.randn(2, 3, img, img)
    with torch.no_grad():
        ref = m.vit.forward_features(x)
        out = m(x)
    npt = m.vit.num_prefix_tokens
    n = (img // patch) ** 2
    assert ref.shape[1] == npt + n
    assert out.shape == (2, 1 + n, m.embed_dim)
    torch.testing.assert_close(out[:, 0], ref[:, 0])
    torch.testing.assert_close(out[:, 1:], ref[:, npt:])
    if "reg4" in arch:
        assert npt == 5


@pytest.mark.parametrize("arch,img,patch", [
    ("vit_tiny_patch16_224", 32, 8),
    ("deit3_small_patch16_224", 32, 16),
    ("vit_small_patch14_reg4_dinov2", 42, 14),
])
def test_masked_tokens_are_mask_token_plus_pos_embed(arch, img, patch):
    torch.manual_seed(1)
    m = MaskedViT(arch, img_size=img, patch_size=patch).eval()
    with torch.no_grad():
        m.mask_token.normal_()
    g = img // patch
    x = torch.randn(2, 3, img, img)
    mask = torch.zeros(2, g, g, dtype=torch.bool)
    mask[0, 0, 1] = True
    mask[0, g - 1, 0] = True
    mask[1, 1, 1] = True
    with torch.no_grad():
        masked_in, _ = _first_block_input(m, x, mask)
        plain_in, _ = _first_block_input(m, x, None)
    vit = m.vit
    npt = vit.num_prefix_tokens
    pos = vit.pos_embed[0]
    patch_pos = pos if vit.no_embed_class else pos[npt:]  # (N, D) positional embedding of each patch
    flat = mask.flatten(1)
    for b in range(2):
        for n in range(g * g):
            got = masked_in[b, npt + n]
            if flat[b, n]:
                torch.testing.assert_close(got, m.mask_token[0] + patch_pos[n])
                assert not torch.allclose(got, plain_in[b, npt + n])
            else:
                torch.testing.assert_close(got, plain_in[b, npt + n])
    torch.testing.assert_close(masked_in[:, :npt], plain_in[:, :npt])  # prefix tokens untouched


def test_mask_accepts_flat_shape_and_rejects_bad_masks():
    torch.manual_seed(0)
    m = MaskedViT("vit_tiny_patch16_224", img_size=32, patch_size=8).eval()
    x = torch.randn(2, 3, 32, 32)
    mask = torch.rand(2, 4, 4) < 0.5
    with torch.no_grad():
        torch.testing.assert_close(m(x, mask), m(x, mask.flatten(1)))
        with pytest.raises(ValueError, match="does not match"):
            m(x, torch.zeros(2, 3, 3, dtype=torch.bool))
        with pytest.raises(TypeError, match="bool"):
            m(x, mask.float())
    teacher = MaskedViT("vit_tiny_patch16_224", img_size=32, patch_size=8, mask_token=False)
    assert teacher.mask_token is None
    with pytest.raises(ValueError, match="mask_token=False"):
        teacher(x, mask)


def test_mask_token_gradient_only_when_something_is_masked():
    torch.manual_seed(0)
    m = MaskedViT("vit_tiny_patch16_224", img_size=32, patch_size=8)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(m.mask_token.detach(), torch.zeros(1, 192))  # zero init

    m(x, None).square().mean().backward()
    assert m.mask_token.grad is None

    m.zero_grad(set_to_none=True)
    m(x, torch.zeros(2, 4, 4, dtype=torch.bool)).square().mean().backward()
    assert m.mask_token.grad is not None and torch.count_nonzero(m.mask_token.grad) == 0

    m.zero_grad(set_to_none=True)
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[1, 2, 2] = True
    m(x, mask).square().mean().backward()
    assert m.mask_token.grad.abs().sum() > 0


def test_state_dict_loads_into_plain_timm_model():
    import timm

    m = MaskedViT("vit_tiny_patch16_224", img_size=32, patch_size=8)
    plain = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8)
    res = plain.load_state_dict(m.vit.state_dict(), strict=True)
    assert not res.missing_keys and not res.unexpected_keys
