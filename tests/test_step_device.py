"""The step on a device's terms: no host sync except one on a logged step, the host-side staging of a batch, fused
AdamW, and a full step that still equals the reference computation (teacher prototypes on every token, boolean
masks, unfused AdamW, one clamp per parameter) within float32 rounding."""

import contextlib
import copy
import math

import pytest
import torch
from test_step import build, make_batch, make_images, tiny_cfg
from torch.utils._python_dispatch import TorchDispatchMode

from ibot_ray.knn import normalize_images
from ibot_ray.loss import koleo_loss, mask_positions
from ibot_ray.step import MASK_INDEX, IBOTStep, param_groups

aten = torch.ops.aten

#: Tensor methods that copy a value to the host (on a GPU: wait for every kernel queued before them)
SYNC_METHODS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")
#: aten ops whose output size or value the host must know before it can go on (a sync on a GPU), or that copy
#: Python data to the device (torch.tensor(x, device=...): a blocking copy from pageable memory on a GPU)
SYNC_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
            aten.is_nonzero.default, aten.equal.default, aten.lift_fresh.default, aten._unique2.default,
            aten.unique_consecutive.default, aten.unique_dim.default, aten.repeat_interleave.Tensor}


def _bool_index(func, args) -> bool:
    """aten.index / index_put with a bool mask among the indices: boolean-mask indexing (a nonzero inside)."""
    if func not in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default):
        return False
    return any(t is not None and t.dtype == torch.bool for t in args[1])


class _SyncOps(TorchDispatchMode):
    def __init__(self, events: list, depth: list):
        super().__init__()
        self.events, self.depth = events, depth

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.depth[0] and (func in SYNC_OPS or _bool_index(func, args)):
            self.events.append(str(func))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_host_syncs():
    """Record every host sync a block makes, as a CPU run can see them: the Tensor methods that read values back
    (wrapped) and the aten ops that need a value or size on the host (a dispatch mode). A method call counts once,
    whatever ops it runs inside."""
    events: list[str] = []
    depth = [0]
    originals = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS}

    def wrap(name, orig):
        def method(self, *args, **kwargs):
            if not depth[0]:
                events.append(f"Tensor.{name}")
            depth[0] += 1
            try:
                return orig(self, *args, **kwargs)
            finally:
                depth[0] -= 1
        return method

    for name, orig in originals.items():
        setattr(torch.Tensor, name, wrap(name, orig))
    try:
        with _SyncOps(events, depth):
            yield events
    finally:
        for name, orig in originals.items():
            setattr(torch.Tensor, name, orig)


def test_the_sync_counter_sees_each_kind_of_sync():
    x, m = torch.randn(4, 3), torch.rand(4) > 0.5
    for fn in (lambda: x.sum().item(), lambda: float(x.sum()), lambda: x.tolist(), lambda: x[m],
               lambda: bool(m.any()), lambda: torch.tensor(2.0), lambda: torch.nonzero(m), lambda: int(x.argmax()),
               lambda: x.cpu(), lambda: x[m.nonzero().squeeze(1)]):
        with count_host_syncs() as events:
            fn()
        assert len(events) >= 1, fn
    with count_host_syncs() as events:  # what the step uses instead: sizes known to the host, values on the device
        x.index_select(0, torch.arange(2))
        torch.where(m.any(), 1.0, 0.5) * x
    assert events == []


@pytest.mark.parametrize("extra", [(), ("optim.micro_batch_size=8", "optim.freeze_last_layer=0")])
def test_a_step_waits_for_the_device_only_on_logged_steps(extra):
    """Zero host syncs on a step that is not logged, one on a logged step (its metrics), also on a skipped step."""
    cfg = tiny_cfg("optim.warmup_epochs=0", "optim.max_nonfinite_steps=5", *extra)
    assert cfg.loss.lambda_koleo > 0 and cfg.model.stem == "conv"  # every branch of the demo's step
    runner = build(cfg)
    g = torch.Generator().manual_seed(0)
    batch = make_batch(cfg, make_images(16), g)
    runner(batch)  # the first step also creates AdamW's state (its step counts: torch.tensor on the device)
    poison = {"on": False}
    handle = runner.student.backbone.register_forward_hook(
        lambda mod, inp, out: out * float("nan") if poison["on"] else out)
    counts = []
    for i, log in enumerate([False, False, True, False, True, False, True]):
        poison["on"] = i in (3, 4)  # two skipped steps: one not logged, one logged
        staged = runner.stage(batch)  # host side: finds the masked tokens, starts the copy
        with count_host_syncs() as events:
            m = runner(staged, log=log)
        counts.append((log, len(events), events))
        if log:
            assert math.isfinite(m["loss"]) != poison["on"] and m["step_skipped"] == poison["on"]
        else:
            assert "loss" not in m and m["step"] == runner.step
    handle.remove()
    assert [n for log, n, _ in counts if not log] == [0, 0, 0, 0], counts
    assert [n for log, n, _ in counts if log] == [1, 1, 1], counts
    assert m["skipped_steps"] == 2 and not m["step_skipped"]


def test_stage_finds_each_micro_batchs_masked_tokens_on_the_host():
    cfg = tiny_cfg("optim.micro_batch_size=6")
    runner = build(cfg)
    g = torch.Generator().manual_seed(2)
    batch = make_batch(cfg, make_images(16), g)
    staged = runner.stage(batch)
    assert [tuple(t.shape) for t in staged[MASK_INDEX]] != [] and len(staged[MASK_INDEX]) == 3  # 6 + 6 + 4 images
    for sl, index in zip(runner._micro_batches(16), staged[MASK_INDEX]):
        crop_major = batch["masks"][sl].transpose(0, 1).reshape(-1)  # crop 0 of every image, then crop 1
        assert index.dtype == torch.int64 and torch.equal(index, torch.nonzero(crop_major).squeeze(1))
    # a step on the staged batch is the step on the batch
    a, b = build(cfg), build(cfg)
    ma, mb = a(batch), b(staged)
    assert ma["loss"] == mb["loss"] and ma["grad_norm"] == mb["grad_norm"]
    with pytest.raises(ValueError, match="staged as 3 micro-batches"):
        build(tiny_cfg("optim.micro_batch_size=8"))(staged)


def test_fused_adamw_makes_the_unfused_update_and_skips_where_found_inf():
    torch.manual_seed(0)
    shapes = [(7, 5), (5,), (3, 4, 2)]
    ref = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    fused = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.04)
    opt_r, opt_f = torch.optim.AdamW(ref, foreach=False, **kw), torch.optim.AdamW(fused, fused=True, **kw)
    for _ in range(4):
        for a, b in zip(ref, fused):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        opt_r.step()
        opt_f.found_inf = torch.zeros(())
        opt_f.step()
        for a, b in zip(ref, fused):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    before = ([p.detach().clone() for p in fused],
              [{k: v.clone() for k, v in opt_f.state[p].items()} for p in fused])
    for p in fused:
        p.grad = torch.full_like(p, float("nan"))
    opt_f.found_inf = torch.ones(())
    opt_f.step()
    for p, p0, s0 in zip(fused, *before):
        assert torch.equal(p, p0)
        assert all(torch.equal(opt_f.state[p][k], v) for k, v in s0.items())  # moments and step count too


def _reference_step(runner: IBOTStep, batch: dict, opt: torch.optim.Optimizer) -> float:
    """The step as the reference computes it, from the same parts: the teacher's prototypes on every token, the
    masks as bool selections, the patch centre from every token's logits, one clamp per parameter, unfused AdamW,
    the EMA with Python scalars."""
    s = runner.schedules.at(runner.counters.step)
    for i, group in enumerate(opt.param_groups):
        group["lr"] = s["lr"]
        if i == 0:
            group["weight_decay"] = s["wd"]
    cfg = runner.cfg
    g = normalize_images(runner._crop_major(batch["global_crops"]), runner.mean, runner.std)
    local = normalize_images(runner._crop_major(batch["local_crops"]), runner.mean, runner.std)
    m = runner._crop_major(batch["masks"].unsqueeze(2)).squeeze(1)
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        t_cls, t_patch, t_feat = runner.teacher(g, with_features=True)
    s_cls, s_patch, s_feat = runner.student(g, mask=m, with_features=True)
    s_local, _ = runner.student(local, patches=False)
    parts = runner.loss(s_cls, s_patch, s_local, t_cls, t_patch, m.flatten(1), s["teacher_temp"],
                        s["teacher_patch_temp"])
    total = parts["loss"] + cfg.loss.lambda_koleo * koleo_loss(s_feat, cfg.crops.global_crops_number)
    total.backward()
    with torch.no_grad():
        for _, p in runner._params:
            if p.grad is not None:
                coef = cfg.optim.clip_grad / (p.grad.norm(2) + 1e-6)
                if coef < 1:
                    p.grad.mul_(coef)
    if s["freeze_last_layer"]:
        for p in runner._last_layer:
            p.grad = None
    opt.step()
    runner.ema.update(s["momentum"])
    runner.loss.update_center(t_cls, t_patch)
    runner.counters.step += 1
    return total.item()


def test_the_step_equals_the_reference_computation():
    """Two steps (the prototypes frozen in the first, trained in the second) of IBOTStep against the reference
    computation on the same initial weights and batches: loss, student, teacher and both centres agree within float32
    rounding (the patch centre is now the prototypes of the mean feature, the clip coefficients one stack)."""
    # AdamW eps 1e-3: Adam divides gradients that are 0 up to float noise (the key bias) by their own size, which
    # turns noise into steps of lr; the eps keeps those steps noise-sized, the others still lr-sized
    cfg = tiny_cfg("optim.warmup_epochs=0", "optim.freeze_last_layer=1", "model.drop_path_rate=0", "optim.eps=1e-3",
                   "loss.center_momentum=0.5", "loss.center_momentum_patch=0.5", "optim.lr=0.01")
    ours, ref = build(cfg, steps_per_epoch=1), build(cfg, steps_per_epoch=1)
    assert ours.fused  # fused AdamW on this device (CPU)
    ref_opt = torch.optim.AdamW(param_groups(ref.student), lr=0.0, betas=cfg.optim.betas, eps=cfg.optim.eps,
                                foreach=False)
    g = torch.Generator().manual_seed(4)
    for _ in range(2):
        batch = make_batch(cfg, make_images(16), g)
        got = ours(batch)["loss"]
        want = _reference_step(ref, batch, ref_opt)
        assert got == pytest.approx(want, rel=1e-5)
    lr = ours.optimizer.param_groups[0]["lr"]
    for (name, a), b in zip(ours.student.named_parameters(), ref.student.parameters()):
        # Adam's g / (|g| + eps) amplifies float noise only where |g| ~ eps; the step is at most lr there
        torch.testing.assert_close(a, b, rtol=1e-5, atol=lr * 1e-3, msg=name)
    for (name, a), b in zip(ours.teacher.named_parameters(), ref.teacher.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=lr * 1e-3, msg=name)
    torch.testing.assert_close(ours.loss.center, ref.loss.center, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.loss.center_patch, ref.loss.center_patch, rtol=1e-5, atol=1e-6)
    assert ours.loss.center_patch.abs().max() > 1e-3  # the patch centre moved


def test_mask_positions_are_the_boolean_selection_order():
    m = torch.rand(3, 4, 5, generator=torch.Generator().manual_seed(0)) < 0.3
    x = torch.randn(3, 4, 5, 2)
    torch.testing.assert_close(x.reshape(-1, 2).index_select(0, mask_positions(m)), x[m], rtol=0, atol=0)


def test_an_unfused_adamw_checkpoint_resumes_fused():
    """Checkpoints written before AdamW was fused hold groups with fused=False (and step counts on the host): loaded,
    the optimiser stays fused and its next step (with the device-side skip flag) runs and equals the unfused one."""
    cfg = tiny_cfg("optim.warmup_epochs=0", "optim.freeze_last_layer=0", "optim.eps=1e-3")  # eps: see above
    g = torch.Generator().manual_seed(6)
    batch = make_batch(cfg, make_images(16), g)
    old = build(cfg)
    old.optimizer = torch.optim.AdamW(param_groups(old.student), lr=0.0, betas=cfg.optim.betas, eps=cfg.optim.eps)
    old.fused = False
    old(batch)
    state = copy.deepcopy(old.optimizer.state_dict())  # as saved: state_dict() shares the optimiser's tensors
    assert not state["param_groups"][0]["fused"]
    new = build(cfg)
    new.student.load_state_dict(old.student.state_dict())
    new.teacher.load_state_dict(old.teacher.state_dict())
    new.loss.load_state_dict(old.loss.state_dict())
    new.counters.step = old.counters.step
    new.optimizer.load_state_dict(state)
    assert all(group["fused"] for group in new.optimizer.param_groups)
    a, b = old(batch), new(batch)
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-6) and not b["step_skipped"]
    for p, q in zip(old.student.parameters(), new.student.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=old.optimizer.param_groups[0]["lr"] * 1e-2)
