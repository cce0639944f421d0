"""A distributed step with unequal shares equals one step on the whole global batch.

The Ray Train worker (``pipelines/train_worker.py``) gives each of W ranks its share of the global batch G from
``rank_batch`` (``G // W``, +1 on the first ``G % W`` ranks, rotated with the step by ``rotated_rank``) and weights
that rank's loss by ``share * W / G``; the student is wrapped in ``DistributedDataParallel`` (what
``ray.train.torch.prepare_model`` does on CPU), DDP averages the gradients, the centers are all-reduced as sums and
counts, and the step's metrics are all-reduced. Here two real processes run that step over gloo on CPU, with 63 images
per step (32 + 31, then 31 + 32), and must give what one process gives on the same 63 images: the same loss and
metrics, gradients, student and teacher weights, optimiser moments and centers, to float32 rounding.

Settings that are per rank by design are off: no drop-path (each rank draws its own masks from its (seed, rank, step)
stream) and no KoLeo term (a within-batch nearest-neighbour term, per rank as in DINOv2).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ibot_ray.checkpoint import seed_stream
from ibot_ray.config import IBOTConfig, load_config
from ibot_ray.model import build_student_teacher
from ibot_ray.step import IBOTStep, unwrap

GLOBAL_BATCH = 63  # G % W != 0: rank shares 32 and 31, swapping at the next step
WORLD = 2
STEPS = 2
STEPS_PER_EPOCH = 10
CFG = [
    "model.depth=2", "crops.local_crops_number=2", "head.out_dim=128", "head.patch_out_dim=128",
    "head.hidden_dim=64", "head.bottleneck_dim=32", f"optim.batch_size={GLOBAL_BATCH}", "optim.warmup_epochs=0",
    "optim.freeze_last_layer=0", "optim.epochs=2", "loss.lambda_koleo=0", "model.drop_path_rate=0",
    "train.num_workers=[2,2]",
]


def _config() -> IBOTConfig:
    return load_config("demo", CFG)


def _batches(cfg: IBOTConfig) -> list[dict]:
    """STEPS global batches of uint8 crops and masks (about 30 % of the tokens masked, one image without a mask)."""
    g = torch.Generator().manual_seed(7)
    c, h = cfg.crops, cfg.crops.global_crops_size // cfg.patch_size
    out = []
    for _ in range(STEPS):
        masks = torch.rand(GLOBAL_BATCH, c.global_crops_number, h, h, generator=g) < 0.3
        masks[5] = False
        out.append({
            "global_crops": torch.randint(0, 256, (GLOBAL_BATCH, c.global_crops_number, 3, c.global_crops_size,
                                                   c.global_crops_size), generator=g, dtype=torch.uint8),
            "local_crops": torch.randint(0, 256, (GLOBAL_BATCH, c.local_crops_number, 3, c.local_crops_size,
                                                  c.local_crops_size), generator=g, dtype=torch.uint8),
            "masks": masks,
        })
    return out


def _plan(world: int) -> list[list[tuple[int, int, float]]]:
    """Per rank, per step: (first row, end row, loss weight) of its share of the step's global batch (the ranks'
    shares laid end to end), from the worker loop's own ``rank_batch`` and ``rotated_rank``."""
    from pipelines.train_worker import rank_batch, rotated_rank  # here, not at import: the ranks need no Ray

    plan: list[list[tuple[int, int, float]]] = [[] for _ in range(world)]
    for step in range(STEPS):
        start = 0
        for rank in range(world):
            _, share, weight = rank_batch(GLOBAL_BATCH, world, rotated_rank(rank, step, world))
            plan[rank].append((start, start + share, weight))
            start += share
        assert start == GLOBAL_BATCH
    return plan


def _run(cfg: IBOTConfig, batches: list[dict], plan: list[tuple[int, int, float]], world: int, rank: int = 0) -> dict:
    """What one rank of the worker loop does for STEPS steps; returns every number the step produces."""
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank, as in the worker loop
    student, teacher = build_student_teacher(cfg)
    if world > 1:
        student = torch.nn.parallel.DistributedDataParallel(student)
    runner = IBOTStep(cfg, student, teacher, steps_per_epoch=STEPS_PER_EPOCH)
    init = {n: t.detach().clone() for n, t in unwrap(student).state_dict().items()}
    init_teacher = {n: t.detach().clone() for n, t in teacher.state_dict().items()}
    out: dict = {"metrics": [], "shares": [], "grads": [], "center": [], "center_patch": []}
    for step, (batch, (start, stop, weight)) in enumerate(zip(batches, plan)):
        out["shares"].append(stop - start)
        seed_stream(cfg.train.seed, rank, step)
        out["metrics"].append(runner({k: v[start:stop] for k, v in batch.items()}, loss_weight=weight))
        # the step's gradient as the optimiser used it (DDP-averaged, clipped); the centers after their update
        out["grads"].append({n: p.grad.detach().clone() for n, p in unwrap(student).named_parameters()
                             if p.grad is not None})
        out["center"].append(runner.loss.center.clone())
        out["center_patch"].append(runner.loss.center_patch.clone())
    core = unwrap(student)
    opt = runner.optimizer.state
    out["student_change"] = {n: t.detach() - init[n] for n, t in core.state_dict().items() if t.is_floating_point()}
    out["teacher_change"] = {n: t.detach() - init_teacher[n] for n, t in teacher.state_dict().items()
                             if t.is_floating_point()}
    out["exp_avg"] = {n: opt[p]["exp_avg"].clone() for n, p in core.named_parameters() if p in opt}
    out["exp_avg_sq"] = {n: opt[p]["exp_avg_sq"].clone() for n, p in core.named_parameters() if p in opt}
    return out


def _rank_main(rank: int, world: int, plan: list, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cfg = _config()
        torch.save(_run(cfg, _batches(cfg), plan[rank], world, rank), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The two-process run (both ranks' results) and the one-process reference on the same global batches."""
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(_rank_main, args=(WORLD, _plan(WORLD), str(tmp / "rendezvous"), str(tmp)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    cfg = _config()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = _run(cfg, _batches(cfg), [(0, GLOBAL_BATCH, 1.0)] * STEPS, world=1)
    finally:
        torch.set_num_threads(threads)
    return ranks, single


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """Equal to float32 rounding: sums over 32 + 31 rows in two processes versus 63 rows in one reorder the
    additions, so each entry may differ by a few ulps of the tensor's scale (measured: at most 4e-6 of it)."""
    scale = float(b.abs().max()) if b.numel() else 0.0
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * scale + 1e-12, msg=lambda m: f"{what}: {m}")


def _key_bias_max(name: str, t: torch.Tensor) -> float:
    """The key part of an attention block's qkv bias: softmax over the keys is invariant to it, so its gradient is 0
    in exact arithmetic and rounding noise in practice, which AdamW (dividing by sqrt(v) + eps) turns into updates of
    a few percent of lr that differ from run to run. Such entries cannot be compared to rounding; everything else is."""
    return float(t.view(3, -1)[1].abs().max()) if name.endswith("attn.qkv.bias") else 0.0


def _not_key_bias(name: str, t: torch.Tensor) -> torch.Tensor:
    return t.view(3, -1)[[0, 2]] if name.endswith("attn.qkv.bias") else t


def test_ranks_hold_unequal_shares_that_rotate(runs):
    ranks, single = runs
    assert [r["shares"] for r in ranks] == [[32, 31], [31, 32]]  # G % W != 0 really exercised, both ways round
    assert single["shares"] == [GLOBAL_BATCH] * STEPS
    assert all(m["world_size"] == WORLD for r in ranks for m in r["metrics"])
    assert all(m["world_size"] == 1 for m in single["metrics"])


def test_two_rank_step_equals_one_rank_step_on_the_global_batch(runs):
    ranks, single = runs
    lr = [m["lr"] for m in single["metrics"]]
    assert lr[0] > 0  # the first step already moves the weights (no warm-up)
    for rank, res in enumerate(ranks):
        for step in range(STEPS):
            m, ref = res["metrics"][step], single["metrics"][step]
            for key in ("loss", "cls", "mim", "grad_norm", "teacher_entropy", "teacher_patch_entropy",
                        "teacher_batch_entropy", "prototypes_used", "feature_std", "cls_kl"):
                assert m[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-7), (rank, step, key, m[key], ref[key])
            assert m["target_rows"] == ref["target_rows"] == 2 * GLOBAL_BATCH
            assert (m["lr"], m["momentum"]) == (ref["lr"], ref["momentum"])
            grads, ref_grads = res["grads"][step], single["grads"][step]
            assert grads.keys() == ref_grads.keys()
            for name in ref_grads:
                _close(grads[name], ref_grads[name], f"rank {rank} step {step} gradient of {name}")
            _close(res["center"][step], single["center"][step], f"rank {rank} step {step} center")
            _close(res["center_patch"][step], single["center_patch"][step], f"rank {rank} step {step} center_patch")
        for group in ("exp_avg", "exp_avg_sq"):  # AdamW's moments: every step's gradient, accumulated
            assert res[group].keys() == single[group].keys()
            for name in single[group]:
                _close(res[group][name], single[group][name], f"rank {rank} {group} of {name}")
        for group in ("student_change", "teacher_change"):  # the weights' change over the two steps, per tensor
            assert res[group].keys() == single[group].keys()
            for name in single[group]:
                a, b = _not_key_bias(name, res[group][name]), _not_key_bias(name, single[group][name])
                assert float((a - b).norm()) <= 1e-4 * float(b.norm()) + 1e-12, (rank, group, name)
                # the key biases moved by noise: far less than a trained weight's AdamW step (about lr)
                assert _key_bias_max(name, res[group][name]) <= 0.1 * sum(lr), (rank, group, name)
    # the test covers the whole model: the last layer trained (not frozen) and the key biases really get no gradient
    last = single["grads"][-1]
    assert any("last_layer" in n for n in last) and len(last) == len(single["exp_avg"])
    for name, g in last.items():
        assert _key_bias_max(name, g) <= 1e-6 * float(_not_key_bias(name, g).abs().max()), name
