"""IBOTHead: shapes, normalisation before the prototypes, weight-norm magnitudes, shared vs separate prototypes."""

import pytest
import torch
from torch.nn import functional as F

from ibot_ray.head import IBOTHead


def _proto_weight(layer) -> torch.Tensor:
    """The effective prototype matrix computed by hand from weight norm's (g, v): w_k = g_k v_k / |v_k|."""
    g = layer.parametrizations.weight.original0
    v = layer.parametrizations.weight.original1
    return g * v / v.norm(dim=1, keepdim=True)


def test_shapes_and_mlp_structure():
    h = IBOTHead(32, out_dim=50, patch_out_dim=70, hidden_dim=24, bottleneck_dim=8, nlayers=3)
    linears = [m for m in h.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(32, 24), (24, 24), (24, 8)]
    assert sum(isinstance(m, torch.nn.GELU) for m in h.mlp) == 2
    cls, patches = h(torch.randn(3, 1 + 5, 32))
    assert cls.shape == (3, 50) and patches.shape == (3, 5, 70)
    assert h.forward_cls(torch.randn(4, 32)).shape == (4, 50)
    h4 = IBOTHead(32, out_dim=50, hidden_dim=24, bottleneck_dim=8, nlayers=4)
    assert sum(isinstance(m, torch.nn.Linear) for m in h4.mlp) == 4


def test_mlp_init_trunc_normal_zero_bias():
    torch.manual_seed(0)
    h = IBOTHead(256, out_dim=16, hidden_dim=512, bottleneck_dim=64)
    for m in h.mlp:
        if isinstance(m, torch.nn.Linear):
            assert torch.count_nonzero(m.bias) == 0
            assert abs(m.weight.std().item() - 0.02) < 0.002  # trunc at +-2 (100 sigma): effectively N(0, .02)
            assert m.weight.abs().max() <= 2.0


def test_output_is_prototypes_of_l2_normalised_bottleneck():
    torch.manual_seed(0)
    h = IBOTHead(16, out_dim=12, patch_out_dim=9, hidden_dim=20, bottleneck_dim=6)
    tokens = torch.randn(2, 4, 16)
    cls, patches = h(tokens)
    z = F.normalize(h.mlp(tokens), dim=-1)
    torch.testing.assert_close(cls, z[:, 0] @ _proto_weight(h.last_layer).T)
    torch.testing.assert_close(patches, z[:, 1:] @ _proto_weight(h.last_layer2).T)
    torch.testing.assert_close(h.forward_cls(tokens[:, 0]), cls)


def test_scaling_the_bottleneck_input_does_not_change_logits():
    # With one bias-free (zero-init bias) linear layer the bottleneck scales with the input: only the L2
    # normalisation before the prototypes makes the logits scale invariant.
    torch.manual_seed(0)
    h = IBOTHead(16, out_dim=12, patch_out_dim=12, bottleneck_dim=6, nlayers=1)
    tokens = torch.randn(2, 5, 16)
    c1, p1 = h(tokens)
    c2, p2 = h(37.0 * tokens)
    assert not torch.allclose(h.mlp(tokens), h.mlp(37.0 * tokens))
    torch.testing.assert_close(c1, c2)
    torch.testing.assert_close(p1, p2)


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_norm_last_layer_freezes_g_at_one(norm_last_layer):
    torch.manual_seed(0)
    h = IBOTHead(16, out_dim=12, patch_out_dim=7, hidden_dim=20, bottleneck_dim=6, norm_last_layer=norm_last_layer)
    for layer in (h.last_layer, h.last_layer2):
        g = layer.parametrizations.weight.original0
        assert torch.equal(g.detach(), torch.ones_like(g))
        assert g.requires_grad is (not norm_last_layer)
        assert layer.bias is None
        # g == 1 makes every prototype unit-norm, so each logit is a cosine similarity
        torch.testing.assert_close(layer.weight.norm(dim=1), torch.ones(layer.out_features))
    cls, patches = h(torch.randn(3, 4, 16))
    assert cls.abs().max() <= 1 + 1e-5 and patches.abs().max() <= 1 + 1e-5
    (cls.sum() + patches.sum()).backward()
    g = h.last_layer.parametrizations.weight.original0
    assert (g.grad is None) is norm_last_layer
    assert h.last_layer.parametrizations.weight.original1.grad is not None


def test_shared_vs_separate_patch_prototypes():
    shared = IBOTHead(16, out_dim=12, patch_out_dim=99, hidden_dim=20, bottleneck_dim=6, shared_head=True)
    assert shared.last_layer2 is shared.last_layer
    _, p = shared(torch.randn(2, 3, 16))
    assert p.shape == (2, 2, 12)  # patch_out_dim ignored: patches use the [CLS] prototypes
    sep = IBOTHead(16, out_dim=12, patch_out_dim=12, hidden_dim=20, bottleneck_dim=6, shared_head=False)
    assert sep.last_layer2 is not sep.last_layer
    w1 = sep.last_layer.parametrizations.weight.original1
    w2 = sep.last_layer2.parametrizations.weight.original1
    assert w1.data_ptr() != w2.data_ptr()

    def proto_names(h):
        return [n for n, _ in h.named_parameters() if not n.startswith("mlp.")]

    assert proto_names(shared) and all("last_layer" in n for n in proto_names(shared))
    assert len(proto_names(shared)) == 2  # g and v, listed once
    assert len(proto_names(sep)) == 4 and sum("last_layer2" in n for n in proto_names(sep)) == 2


@pytest.mark.parametrize("shared", [False, True])
def test_patch_rows_give_the_selected_tokens_logits(shared):
    torch.manual_seed(0)
    h = IBOTHead(16, out_dim=20, patch_out_dim=12, hidden_dim=24, bottleneck_dim=8, shared_head=shared)
    tokens = torch.randn(3, 1 + 6, 16)
    rows = torch.rand(3, 6) < 0.4
    rows[1] = False  # an image with no selected token
    cls, patches = h(tokens)
    cls_sel, sel = h(tokens, patch_rows=rows)
    assert sel.shape == (int(rows.sum()), h.patch_out_dim)
    torch.testing.assert_close(cls_sel, cls)
    torch.testing.assert_close(sel, patches[rows])
    with pytest.raises(ValueError, match="patch_rows"):
        h(tokens, patch_rows=rows[:, :5])
    with pytest.raises(ValueError, match="patch_rows"):
        h(tokens, patch_rows=rows.float())


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="nlayers"):
        IBOTHead(16, nlayers=0)
    h = IBOTHead(16, out_dim=8, hidden_dim=8, bottleneck_dim=4)
    with pytest.raises(ValueError, match="1\\+N"):
        h(torch.randn(2, 16))
