"""IBOTLoss against a direct double-loop transcription of the iBOT objective, and the centre EMA."""

import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ibot_ray.loss import IBOTLoss, koleo_loss


def _softmax(x):
    e = [math.exp(v - max(x)) for v in x]
    return [v / sum(e) for v in e]


def _log_softmax(x):
    m = max(x)
    lse = m + math.log(sum(math.exp(v - m) for v in x))
    return [v - lse for v in x]


def _ce(teacher_row, center_row, t_temp, student_row, s_temp):
    """-sum_k softmax((t - c)/T_t)_k * log_softmax(s/T_s)_k, in plain Python floats."""
    p = _softmax([(t - c) / t_temp for t, c in zip(teacher_row, center_row)])
    logq = _log_softmax([s / s_temp for s in student_row])
    return -sum(a * b for a, b in zip(p, logq))


def reference_loss(s_gc, s_gp, s_lc, t_gc, t_gp, masks, center, center_p, G, L, B, t_temp, tp_temp, s_temp=0.1):
    """Direct transcription: loop over teacher view q and student view v (crop-major rows v*B + i)."""
    s_gc, s_gp, t_gc, t_gp = s_gc.tolist(), s_gp.tolist(), t_gc.tolist(), t_gp.tolist()
    s_lc = s_lc.tolist() if L else []
    masks, center, center_p = masks.tolist(), center.flatten().tolist(), center_p.flatten().tolist()
    cls_sum, n_cls, mim_sum, n_mim = 0.0, 0, 0.0, 0
    for q in range(G):
        for v in range(G + L):
            if v == q:
                per_image = []
                for i in range(B):
                    r = q * B + i
                    total, count = 0.0, 0
                    for n, is_masked in enumerate(masks[r]):
                        if is_masked:
                            total += _ce(t_gp[r][n], center_p, tp_temp, s_gp[r][n], s_temp)
                            count += 1
                    per_image.append(total / max(1, count))
                mim_sum += sum(per_image) / B
                n_mim += 1
            else:
                rows = [s_gc[v * B + i] if v < G else s_lc[(v - G) * B + i] for i in range(B)]
                cls_sum += sum(_ce(t_gc[q * B + i], center, t_temp, rows[i], s_temp) for i in range(B)) / B
                n_cls += 1
    return cls_sum / n_cls, mim_sum / n_mim


def _inputs(G, L, B, N, K, Kp, seed=0):
    g = torch.Generator().manual_seed(seed)
    s_gc = torch.randn(G * B, K, generator=g)
    s_gp = torch.randn(G * B, N, Kp, generator=g)
    s_lc = torch.randn(L * B, K, generator=g) if L else None
    t_gc = 2 * torch.randn(G * B, K, generator=g)
    t_gp = 2 * torch.randn(G * B, N, Kp, generator=g)
    masks = torch.rand(G * B, N, generator=g) < 0.4
    masks[1] = False  # an image with no masked patch (counts as 0 in the MIM mean)
    masks[G * B - 1] = True  # a fully masked image
    masks[0, :2] = True
    return s_gc, s_gp, s_lc, t_gc, t_gp, masks


@pytest.mark.parametrize("G,L", [(2, 3), (2, 0), (3, 2)])
def test_matches_double_loop_reference(G, L):
    B, N, K, Kp = 3, 5, 7, 6
    s_gc, s_gp, s_lc, t_gc, t_gp, masks = _inputs(G, L, B, N, K, Kp)
    loss = IBOTLoss(K, Kp, n_global=G, n_local=L, lambda_cls=0.7, lambda_mim=1.3)
    g = torch.Generator().manual_seed(5)
    loss.center.copy_(torch.randn(1, K, generator=g))
    loss.center_patch.copy_(torch.randn(1, 1, Kp, generator=g))
    out = loss(s_gc, s_gp, s_lc, t_gc, t_gp, masks, teacher_temp=0.05, teacher_patch_temp=0.065)
    ref_cls, ref_mim = reference_loss(s_gc, s_gp, s_lc, t_gc, t_gp, masks, loss.center, loss.center_patch,
                                      G, L, B, 0.05, 0.065)
    assert out["cls"].item() == pytest.approx(ref_cls, rel=1e-5)
    assert out["mim"].item() == pytest.approx(ref_mim, rel=1e-5)
    assert out["loss"].item() == pytest.approx(0.7 * ref_cls + 1.3 * ref_mim, rel=1e-5)
    assert all(out[k].dtype == torch.float32 and out[k].ndim == 0 for k in ("loss", "cls", "mim"))


@pytest.mark.parametrize("G,L", [(2, 3), (3, 0)])
def test_student_patches_of_the_masked_tokens_only_give_the_same_loss_and_gradient(G, L):
    B, N, K, Kp = 3, 5, 7, 6
    s_gc, s_gp, s_lc, t_gc, t_gp, masks = _inputs(G, L, B, N, K, Kp)
    loss = IBOTLoss(K, Kp, n_global=G, n_local=L)
    loss.center_patch.copy_(torch.randn(1, 1, Kp, generator=torch.Generator().manual_seed(3)))
    full_in = s_gp.clone().requires_grad_(True)
    sel_in = s_gp[masks].clone().requires_grad_(True)
    full = loss(s_gc, full_in, s_lc, t_gc, t_gp, masks, 0.04, 0.07)
    sel = loss(s_gc, sel_in, s_lc, t_gc, t_gp, masks, 0.04, 0.07)
    assert sel["mim"].item() == full["mim"].item() and sel["loss"].item() == full["loss"].item()
    torch.testing.assert_close(sel["health"], full["health"], rtol=0, atol=0)
    full["loss"].backward()
    sel["loss"].backward()
    torch.testing.assert_close(sel_in.grad, full_in.grad[masks], rtol=0, atol=0)
    with pytest.raises(ValueError, match="rows of masked tokens"):
        loss(s_gc, s_gp[masks][1:], s_lc, t_gc, t_gp, masks, 0.04, 0.07)
    with pytest.raises(ValueError, match="student_global_patch"):
        loss(s_gc, s_gp[masks][:, :-1], s_lc, t_gc, t_gp, masks, 0.04, 0.07)


def test_empty_local_tensor_equals_none():
    s_gc, s_gp, _, t_gc, t_gp, masks = _inputs(2, 0, 2, 4, 5, 5)
    loss = IBOTLoss(5, 5, n_local=0)
    a = loss(s_gc, s_gp, None, t_gc, t_gp, masks, 0.04, 0.07)
    b = loss(s_gc, s_gp, torch.empty(0, 5), t_gc, t_gp, masks, 0.04, 0.07)
    torch.testing.assert_close(a["loss"], b["loss"])


def test_gradients_reach_student_only_and_masks_select_tokens():
    G, L, B, N, K = 2, 2, 2, 4, 6
    s_gc, s_gp, s_lc, t_gc, t_gp, masks = _inputs(G, L, B, N, K, K)
    tensors = [s_gc, s_gp, s_lc, t_gc, t_gp]
    for t in tensors:
        t.requires_grad_(True)
    out = IBOTLoss(K, K, n_global=G, n_local=L)(s_gc, s_gp, s_lc, t_gc, t_gp, masks, 0.04, 0.07)
    out["loss"].backward()
    assert t_gc.grad is None and t_gp.grad is None
    assert s_gc.grad.abs().sum() > 0 and s_lc.grad.abs().sum() > 0
    # unmasked patch tokens get no gradient, masked ones do
    row_grad = s_gp.grad.abs().sum(-1)
    assert torch.all(row_grad[~masks] == 0) and torch.all(row_grad[masks] > 0)


def test_float32_under_autocast_with_bf16_inputs():
    G, L, B, N, K = 2, 2, 2, 4, 6
    inputs = [t.bfloat16() if t is not None else None for t in _inputs(G, L, B, N, K, K)[:5]]
    masks = _inputs(G, L, B, N, K, K)[5]
    loss = IBOTLoss(K, K, n_global=G, n_local=L)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss(*inputs, masks, 0.04, 0.07)
    ref = loss(*[t.float() for t in inputs], masks, 0.04, 0.07)
    assert out["loss"].dtype == torch.float32
    assert out["loss"].item() == pytest.approx(ref["loss"].item(), rel=1e-6)


def test_shape_errors_name_the_argument():
    s_gc, s_gp, s_lc, t_gc, t_gp, masks = _inputs(2, 2, 2, 4, 6, 6)
    loss = IBOTLoss(6, 6, n_local=3)
    with pytest.raises(ValueError, match="student_local_cls"):
        loss(s_gc, s_gp, s_lc, t_gc, t_gp, masks, 0.04, 0.07)
    loss = IBOTLoss(6, 6, n_local=2)
    with pytest.raises(ValueError, match="masks"):
        loss(s_gc, s_gp, s_lc, t_gc, t_gp, masks[:, :3], 0.04, 0.07)


def test_center_ema_values_and_state_dict():
    G, B, N, K, Kp = 2, 3, 4, 5, 3
    _, _, _, t_gc, t_gp, _ = _inputs(G, 0, B, N, K, Kp)
    loss = IBOTLoss(K, Kp, n_global=G, n_local=0, center_momentum=0.8, center_momentum_patch=0.6)
    assert torch.count_nonzero(loss.center) == 0 and torch.count_nonzero(loss.center_patch) == 0
    c0 = torch.arange(K, dtype=torch.float32).view(1, K)
    cp0 = -torch.arange(Kp, dtype=torch.float32).view(1, 1, Kp)
    loss.center.copy_(c0)
    loss.center_patch.copy_(cp0)
    loss.update_center(t_gc, t_gp)
    rows = G * B
    for k in range(K):
        batch_mean = sum(t_gc[r, k].item() for r in range(rows)) / rows
        assert loss.center[0, k].item() == pytest.approx(0.8 * k + 0.2 * batch_mean, abs=1e-6)
    for k in range(Kp):
        # mean over all patch tokens of each row (masked or not), then over rows
        token_mean = sum(sum(t_gp[r, n, k].item() for n in range(N)) / N for r in range(rows)) / rows
        assert loss.center_patch[0, 0, k].item() == pytest.approx(0.6 * -k + 0.4 * token_mean, abs=1e-6)
    sd = loss.state_dict()
    assert set(sd) == {"center", "center_patch"}
    assert sd["center"].shape == (1, K) and sd["center_patch"].shape == (1, 1, Kp)


def test_center_stats_and_apply_split():
    _, _, _, t_gc, t_gp, _ = _inputs(2, 0, 3, 4, 5, 3)
    a, b = IBOTLoss(5, 3, n_local=0), IBOTLoss(5, 3, n_local=0)
    cls_sum, patch_sum, count = a.center_stats(t_gc, t_gp)
    assert cls_sum.shape == (5,) and patch_sum.shape == (3,) and count.item() == 6.0
    torch.testing.assert_close(cls_sum, t_gc.sum(0))
    torch.testing.assert_close(patch_sum, t_gp.mean(1).sum(0))
    a.apply_center_update(cls_sum, patch_sum, count)
    b.update_center(t_gc, t_gp)
    torch.testing.assert_close(a.center, b.center)
    torch.testing.assert_close(a.center_patch, b.center_patch)


def _dist_worker(rank: int, world: int, init_file: str, result_file: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(100 + rank)
        n_rows = 2 + 2 * rank  # unequal local batches: the global mean weights rows, not ranks
        t_gc = torch.randn(n_rows, 4, generator=g)
        t_gp = torch.randn(n_rows, 3, 2, generator=g)
        loss = IBOTLoss(4, 2, n_local=0)
        loss.update_center(t_gc, t_gp)
        torch.save({"center": loss.center, "center_patch": loss.center_patch}, f"{result_file}.{rank}")
    finally:
        dist.destroy_process_group()


def test_center_update_all_reduces_across_ranks():
    world = 2
    with tempfile.TemporaryDirectory() as d:
        init_file, result = os.path.join(d, "init"), os.path.join(d, "res")
        mp.spawn(_dist_worker, args=(world, init_file, result), nprocs=world, join=True)
        outs = [torch.load(f"{result}.{r}") for r in range(world)]
    all_cls, all_patch = [], []
    for rank in range(world):
        g = torch.Generator().manual_seed(100 + rank)
        n_rows = 2 + 2 * rank
        all_cls.append(torch.randn(n_rows, 4, generator=g))
        all_patch.append(torch.randn(n_rows, 3, 2, generator=g))
    cls_mean = torch.cat(all_cls).mean(0)
    patch_mean = torch.cat(all_patch).mean(1).mean(0)
    for o in outs:
        torch.testing.assert_close(o["center"], 0.1 * cls_mean.view(1, 4))
        torch.testing.assert_close(o["center_patch"], 0.1 * patch_mean.view(1, 1, 2))


# ---- the KoLeo regulariser (loss.lambda_koleo) -----------------------------------


def test_koleo_is_the_log_nearest_neighbour_distance_and_spreads_points():
    # 8 points evenly spaced on a circle (in 2 dims of 4), one view: every nearest neighbour is one chord away
    angles = torch.arange(8) * (2 * math.pi / 8)
    x = torch.zeros(8, 4)
    x[:, 0], x[:, 1] = torch.cos(angles), torch.sin(angles)
    chord = 2 * math.sin(math.pi / 8)
    assert koleo_loss(3 * x, 1).item() == pytest.approx(-math.log(chord), rel=1e-5)  # scale-free (normalised)
    # two views are two separate batches: a duplicate across views is not a neighbour
    assert koleo_loss(torch.cat([x, x]), 2).item() == pytest.approx(-math.log(chord), rel=1e-5)
    # gradient descent on it pushes a clustered batch apart
    g = torch.Generator().manual_seed(0)
    y = (torch.tensor([1.0, 0, 0, 0]) + 0.05 * torch.randn(16, 4, generator=g)).requires_grad_(True)

    def min_gap(t):
        n = torch.nn.functional.normalize(t.detach(), dim=-1)
        d = torch.cdist(n, n) + 10 * torch.eye(len(n))
        return d.min().item()

    before = min_gap(y)
    opt = torch.optim.SGD([y], lr=0.05)
    for _ in range(50):
        opt.zero_grad()
        koleo_loss(y, 1).backward()
        opt.step()
    assert min_gap(y) > 2 * before
