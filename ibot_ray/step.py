"""One full iBOT optimisation step on a batch of uint8 crops and masks.

The unit is deliberately free of Ray: the Ray Train worker, the CPU smoke test and any user loop call the same
:class:`IBOTStep`. A step is

    stage on the host (masked-token positions, the copy to the device) -> normalise on the device -> teacher
    forward on the unmasked global crops -> student forward on the masked global crops and the unmasked local crops
    -> loss -> backward -> per-parameter gradient clipping -> last-layer freeze -> AdamW (fused; no weight decay on
    biases and norm weights) -> teacher EMA -> center EMA (all-reduced)

and it does not wait for the device: only a logged step (``log=True``) reads its metrics back, once (see
:class:`IBOTStep`; ``train.compile`` compiles the backbone and head on a GPU).

A per-worker batch can be split into micro-batches (gradient accumulation): the gradient, the loss and the center update
are then exactly those of the whole batch. ``loss_weight`` lets a distributed caller whose ranks hold unequal shares of
the global batch weight its gradient and its loss metrics so that their averages over the ranks (DDP's gradient
average, the metrics' all-reduce) equal the global-batch mean.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch._dynamo
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F

from .config import IBOTConfig
from .ema import TeacherEMA
from .knn import IMAGENET_MEAN, IMAGENET_STD, normalize_images
from .loss import IBOTLoss, health_metrics, koleo_loss, mask_positions
from .schedules import Schedules

log = logging.getLogger(__name__)



class NonFiniteLossError(RuntimeError):
    """Raised after ``optim.max_nonfinite_steps`` consecutive steps with a non-finite loss or gradient."""


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def param_groups(model: nn.Module) -> list[dict]:
    """AdamW groups: weight decay on weights, none on biases and 1-D tensors (norm weights). Frozen params excluded.

    Group 0 is the regularised group; the weight-decay schedule writes only to it."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "name": "decay"}, {"params": no_decay, "name": "no_decay", "weight_decay": 0.0}]


def apply_schedule(optimizer: torch.optim.Optimizer, values: dict) -> None:
    """Set one step's scheduled ``lr`` on every group of a :func:`param_groups` optimiser and its ``wd`` on group 0."""
    for i, group in enumerate(optimizer.param_groups):
        group["lr"] = values["lr"]
        if i == 0:
            group["weight_decay"] = values["wd"]


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for full fp32. ``auto`` is bf16 on CUDA and fp32 elsewhere."""
    if precision == "fp32":
        return None
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if precision == "fp16":
        if device.type != "cuda":
            raise ValueError("optim.precision: fp16 needs a CUDA device; use bf16 or fp32 on CPU")
        return torch.float16
    return torch.bfloat16


@torch.no_grad()
def feature_spread_sums(features: Tensor) -> Tensor:
    """float64 ``[sum of the L2-normalised rows (D), sum of their squares (D), rows]``, summable over ranks."""
    f = F.normalize(features.float(), dim=-1).double()
    return torch.cat([f.sum(0), (f * f).sum(0), f.new_full((1,), f.shape[0])])


def feature_spread(sums, dim: int) -> float:
    """Per-dimension standard deviation of the L2-normalised features across the batch, averaged over dimensions and
    scaled by sqrt(D): about 1 for directions spread like random ones, 0 when every image gets the same feature
    (representation collapse). ``sums``: :func:`feature_spread_sums` (summed over ranks), a tensor or its values."""
    s = np.asarray(sums.detach().double().cpu() if torch.is_tensor(sums) else sums, dtype=np.float64)
    n = float(s[2 * dim])
    if n < 2:
        return float("nan")
    mean = s[:dim] / n
    var = np.maximum(s[dim:2 * dim] / n - mean * mean, 0.0) * n / (n - 1)
    return float(np.sqrt(var).mean() * math.sqrt(dim))


@dataclass
class StepCounters:
    step: int = 0  # the global step that runs next
    skipped_steps: int = 0  # steps skipped because the loss or gradient was not finite (as of the last logged step)
    consecutive_nonfinite: int = 0  # (as of the last logged step)


#: The key :meth:`IBOTStep.stage` adds: one int64 tensor of masked-token positions per micro-batch.
MASK_INDEX = "mask_index"


def resolve_compile(setting: str | bool, device: torch.device) -> bool:
    """``train.compile``: ``auto`` compiles on CUDA only (on a CPU no gain is measured, and each start pays it)."""
    if isinstance(setting, bool):
        return setting
    if setting not in ("auto", "true", "false"):
        raise ValueError(f"train.compile must be auto, true or false, got {setting!r}")
    return device.type == "cuda" if setting == "auto" else setting == "true"


#: Compiled variants dynamo keeps per function before it falls back to eager: the backbone has one per crop size,
#: grad mode (student, teacher) and batch size (an elastic run's ranks alternate between two shares; a last
#: micro-batch can be smaller)
RECOMPILE_LIMIT = 32


def compile_model(model: nn.Module) -> None:
    """Compile an :class:`~ibot_ray.model.IBOTModel`'s backbone and head MLP in place (``nn.Module.compile``).

    In place keeps every module and parameter name (no ``_orig_mod.`` prefix), so checkpoints and exports of a
    compiled model load into an uncompiled one and back. The backbone (patch embedding, mask token, position
    embedding, the blocks and the final norm: one graph, so the drop-path rate of each block is a constant in it) is
    compiled with static shapes, one graph per crop size and grad mode (the student's global and local crops, the
    teacher's global crops); the head MLP's row count ([CLS] + masked tokens) changes every step, so it is compiled
    dynamic from the start."""
    core = unwrap(model)
    dyn = torch._dynamo.config
    limit = "recompile_limit" if hasattr(dyn, "recompile_limit") else "cache_size_limit"  # its name before torch 2.6
    setattr(dyn, limit, max(getattr(dyn, limit), RECOMPILE_LIMIT))
    core.backbone.compile(dynamic=False)
    core.head.mlp.compile(dynamic=True)


class IBOTStep:
    """Owns the optimiser, loss (with its centers), schedules and teacher EMA of one training process.

    The step never waits for the device except once on a logged step (``log=True``), when it reads its metrics back:
    the masked tokens are found on the host (:meth:`stage`), the skip decision on a non-finite loss or gradient is
    taken on the device (fused AdamW's ``found_inf``, the EMA and the centres keep their values where it is set),
    and the health metrics are computed on logged steps only. With a process group the centre sums, the loss parts
    and the skip flag (and on logged steps the health sums) ride one all-reduce."""

    def __init__(
        self,
        cfg: IBOTConfig,
        student: nn.Module,
        teacher: nn.Module,
        *,
        steps_per_epoch: int,
        device: torch.device | str = "cpu",
    ) -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.student = student  # possibly DDP-wrapped: forward goes through the wrapper
        self.teacher = teacher.eval()
        core = unwrap(student)
        head = cfg.head
        patch_dim = head.out_dim if (head.shared_head or head.shared_head_teacher) else head.patch_out_dim
        self.loss = IBOTLoss(
            head.out_dim,
            patch_dim,
            n_global=cfg.crops.global_crops_number,
            n_local=cfg.crops.local_crops_number,
            student_temp=cfg.loss.student_temp,
            center_momentum=cfg.loss.center_momentum,
            center_momentum_patch=cfg.loss.center_momentum_patch,
            lambda_cls=cfg.loss.lambda_cls,
            lambda_mim=cfg.loss.lambda_mim,
        ).to(self.device)
        o = cfg.optim
        self.optimizer, self.fused = _adamw(param_groups(core), o.betas, o.eps)
        self.schedules = Schedules(cfg, steps_per_epoch)
        self.ema = TeacherEMA(student, teacher)
        self.amp_dtype = resolve_precision(o.precision, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.counters = StepCounters()
        # on the device: [skipped since the last logged step, consecutive skips now, longest run since that step]
        self._nonfinite = torch.zeros(3, device=self.device, dtype=torch.float64)
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        self._params = [(n, p) for n, p in core.named_parameters() if p.requires_grad]
        self._last_layer = [p for n, p in self._params if "last_layer" in n]
        self._feature_dim = int(core.backbone.embed_dim)
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.compiled = resolve_compile(cfg.train.compile, self.device)
        if self.compiled:
            compile_model(student)
            compile_model(teacher)

    # ------------------------------------------------------------------------------------------
    @property
    def step(self) -> int:
        return self.counters.step

    @property
    def total_steps(self) -> int:
        return self.schedules.total_steps

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _crop_major(self, crops: Tensor) -> Tensor:
        """(B, C, 3, H, W) -> (C*B, 3, H, W) with all images of crop 0 first (the loss relies on this order)."""
        b, c = crops.shape[:2]
        return crops.transpose(0, 1).reshape(c * b, *crops.shape[2:])

    def _micro_batches(self, batch_size: int) -> list[slice]:
        mb = self.cfg.optim.micro_batch_size  # `auto` is sized by the run planner; unplanned (in-process): one pass
        mb = mb if isinstance(mb, int) and mb > 0 else batch_size
        return [slice(i, min(i + mb, batch_size)) for i in range(0, batch_size, mb)]

    # ------------------------------------------------------------------------------------------
    def stage(self, batch: dict[str, Tensor]) -> dict:
        """The host side of a step: find each micro-batch's masked tokens on the host (where the masks are) and
        start the batch's copy to the device.

        Returns ``{"global_crops", "local_crops", "masks"}`` on the device and ``MASK_INDEX``: per micro-batch, the
        flat positions of its masked tokens in its crop-major (G*b*N) masks. On a CUDA device the host tensors are
        pinned (unless Ray Data pinned them already) and copied on a side stream, which the step's stream waits for:
        the copy of the next batch overlaps the kernels of the step before it, which the host has queued without
        waiting. Masks that are already on a device are searched there (one sync per micro-batch)."""
        masks = batch["masks"].bool()
        index = [mask_positions(self._crop_major(masks[sl].unsqueeze(2))) for sl in self._micro_batches(masks.shape[0])]
        host = {"global_crops": batch["global_crops"], "masks": masks, MASK_INDEX: index}
        if batch.get("local_crops") is not None and batch["local_crops"].shape[1]:
            host["local_crops"] = batch["local_crops"]
        return self._to_device(host)

    def _to_device(self, host: dict) -> dict:
        def move(t: Tensor) -> Tensor:
            if t.device == self.device:
                return t
            if self._copy_stream is not None and t.device.type == "cpu" and not t.is_pinned():
                t = t.pin_memory()
            return t.to(self.device, non_blocking=True)

        if self._copy_stream is None:
            return {k: [move(t) for t in v] if isinstance(v, list) else move(v) for k, v in host.items()}
        compute = torch.cuda.current_stream(self.device)
        # the copy stream waits for nothing: it copies while the compute stream runs the steps queued before
        with torch.cuda.stream(self._copy_stream):
            out = {k: [move(t) for t in v] if isinstance(v, list) else move(v) for k, v in host.items()}
        compute.wait_stream(self._copy_stream)
        for v in out.values():
            for t in v if isinstance(v, list) else [v]:
                t.record_stream(compute)  # memory made on the copy stream, used on the compute stream
        return out

    # ------------------------------------------------------------------------------------------
    def __call__(self, batch: dict[str, Tensor], *, loss_weight: float = 1.0, log: bool = True) -> dict[str, float]:
        """Run one step on a batch of uint8 crops and masks.

        ``{"global_crops": uint8 (B,G,3,S,S), "local_crops": uint8 (B,L,3,s,s), "masks": bool (B,G,h,w)}`` on the
        host (or the output of :meth:`stage`).

        Returns the step's metrics. ``log=False`` queues the step and returns without waiting for the device: only
        the scheduled values (lr, momentum, ...) are in the metrics, and no health metric is computed. ``log=True``
        reads the loss, the gradient norm and the health metrics back (one sync). A non-finite loss or gradient skips
        the update on the device (counted); skipped steps are reported, with a warning, at the next logged step, which
        raises :class:`NonFiniteLossError` if ``optim.max_nonfinite_steps`` consecutive steps were skipped."""
        cfg = self.cfg
        s = self.schedules.at(self.counters.step)
        apply_schedule(self.optimizer, s)
        staged = batch if MASK_INDEX in batch else self.stage(batch)
        globals_u8, locals_u8, masks = staged["global_crops"], staged.get("local_crops"), staged["masks"]
        b = globals_u8.shape[0]
        n_local = 0 if locals_u8 is None else locals_u8.shape[1]

        self.optimizer.zero_grad(set_to_none=True)
        self.student.train()
        totals = torch.zeros(4, device=self.device, dtype=torch.float64)  # loss, cls, mim, koleo
        center_sums: list[Tensor] | None = None
        health_sums: Tensor | None = None
        chunks = self._micro_batches(b)
        if len(chunks) != len(staged[MASK_INDEX]):
            raise ValueError(f"the batch was staged as {len(staged[MASK_INDEX])} micro-batches, the step makes "
                             f"{len(chunks)}")
        koleo = cfg.loss.lambda_koleo
        for ci, (sl, index) in enumerate(zip(chunks, staged[MASK_INDEX])):
            share = (sl.stop - sl.start) / b
            g = normalize_images(self._crop_major(globals_u8[sl]), self.mean, self.std)
            m = self._crop_major(masks[sl].unsqueeze(2)).squeeze(1)  # (G*b, h, w)
            sync = ci == len(chunks) - 1 or not hasattr(self.student, "no_sync")
            ctx = contextlib.nullcontext() if sync else self.student.no_sync()
            with ctx:
                with torch.no_grad(), self._autocast():
                    # the prototypes only on [CLS] and the masked patches (L_mim reads no other target); the patch
                    # centre's mean of every token's logits comes from the mean bottleneck feature
                    t_cls, t_patch, t_mean, t_feat = self.teacher(g, patches="masked", patch_rows=index,
                                                                  patch_mean=True, with_features=True)
                with self._autocast():
                    # the head only on [CLS] and the masked patches: L_mim reads no other student patch logits
                    s_cls, s_patch, *s_feat = self.student(g, mask=m, patches="masked", patch_rows=index,
                                                           with_features=koleo > 0)
                    s_local = None
                    if n_local:
                        lc = normalize_images(self._crop_major(locals_u8[sl]), self.mean, self.std)
                        s_local, _ = self.student(lc, patches=False)
                parts = self.loss(
                    s_cls, s_patch, s_local, t_cls, t_patch, m.flatten(1),
                    teacher_temp=s["teacher_temp"], teacher_patch_temp=s["teacher_patch_temp"],
                    mask_index=index, with_health=log,
                )
                spread = koleo_loss(s_feat[0], cfg.crops.global_crops_number) if koleo > 0 else None
                total = parts["loss"] if spread is None else parts["loss"] + koleo * spread
                weighted = total * (share * loss_weight)
                self.scaler.scale(weighted).backward()
            parts_v = torch.stack([total.detach(), parts["cls"], parts["mim"],
                                   total.new_zeros(()) if spread is None else spread.detach()])
            totals += parts_v.double() * share
            stats = self.loss.center_stats(t_cls, t_mean)
            center_sums = list(stats) if center_sums is None else [a + c for a, c in zip(center_sums, stats)]
            if log:
                chunk_health = torch.cat([parts["health"], feature_spread_sums(t_feat)])
                health_sums = chunk_health if health_sums is None else health_sums + chunk_health

        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        grad_norm = self._clip_gradients(cfg.optim.clip_grad)
        if s["freeze_last_layer"]:
            for p in self._last_layer:
                p.grad = None

        # One all-reduce makes the centres' batch means and the metrics global and the skip decision identical on
        # every rank; on logged steps the health sums (target entropies, the batch's prototype histogram, the
        # feature spread) ride along.
        bad = ~(torch.isfinite(totals).all() & torch.isfinite(grad_norm))
        packed = [*center_sums, totals, bad.double()] + ([health_sums] if log else [])
        world = 1
        if dist.is_available() and dist.is_initialized():
            world = dist.get_world_size()
            # each rank's loss parts weighted like its gradient (share * W / G): their mean over the ranks is the
            # global batch's mean
            packed[3] = packed[3] * loss_weight
            sizes = [t.numel() for t in packed]
            flat = torch.cat([t.reshape(-1).double() for t in packed])
            dist.all_reduce(flat)
            packed = [p.view_as(t).to(t.dtype) for p, t in zip(flat.split(sizes), packed)]
            packed[3] = packed[3] / world  # the loss parts: the mean over ranks
        cls_sum, patch_sum, count, totals, bad = packed[:5]
        apply = bad == 0

        if self.fused:  # the fused kernel skips the update (and the step count) where found_inf is 1
            self.optimizer.found_inf = (~apply).float()
            self.optimizer.step()
        elif bool(apply):  # an optimiser without a fused kernel on this device: the decision is read back (a sync)
            self.optimizer.step()
        if self.scaler.is_enabled():
            self.scaler.update()  # backs off its scale on the inf/NaN its unscale_ found
        self.ema.update(s["momentum"], apply=apply)
        self.loss.apply_center_update(cls_sum, patch_sum, count, reduce=False, apply=apply)
        nf = self._nonfinite
        skipped = (~apply).double()
        nf[0] += skipped
        nf[1] = (nf[1] + 1) * skipped
        nf[2] = torch.maximum(nf[2], nf[1])

        self.counters.step += 1
        metrics = {
            "step": self.counters.step,
            "epoch": s["epoch"],
            "lr": s["lr"],
            "wd": s["wd"],
            "momentum": s["momentum"],
            "teacher_temp": s["teacher_temp"],
            "teacher_patch_temp": s["teacher_patch_temp"],
            "world_size": world,
        }
        if log:
            metrics.update(self._read_metrics(totals, grad_norm, packed[5], koleo > 0))
        return metrics

    def _read_metrics(self, totals: Tensor, grad_norm: Tensor, health_sums: Tensor, koleo: bool) -> dict:
        """The logged step's one device-to-host read: loss parts, gradient norm, skip counters and health sums."""
        values = torch.cat([totals, grad_norm.double().view(1), self._nonfinite, health_sums]).tolist()
        loss_v, cls_v, mim_v, koleo_v, gn, skipped, consecutive, longest = values[:8]
        self._nonfinite[0].fill_(0.0)  # fill_ takes the value as a kernel argument: no copy to the device
        self._nonfinite[2].fill_(consecutive)
        sums = values[8:]
        n_target = len(sums) - self._feature_dim * 2 - 1
        health = health_metrics(sums[:n_target], cls_v, self.loss.out_dim, self.loss.patch_out_dim)
        health["feature_std"] = feature_spread(sums[n_target:], self._feature_dim)
        c = self.counters
        c.skipped_steps += int(skipped)
        c.consecutive_nonfinite = int(consecutive)
        step_skipped = consecutive > 0
        if skipped:
            log.warning("step %d: %d of the steps since the last log skipped for a non-finite loss or gradient "
                        "(this step's loss=%s; %d skipped so far)", c.step, int(skipped), loss_v, c.skipped_steps)
        if longest >= self.cfg.optim.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"{int(longest)} consecutive non-finite steps (by step {c.step}); lower optim.lr or the teacher "
                "temperature, or use precision fp32/bf16")
        return {
            "loss": loss_v,
            "cls": cls_v,
            "mim": mim_v,
            **({"koleo": koleo_v} if koleo else {}),
            "grad_norm": gn if math.isfinite(gn) else float("nan"),
            "skipped_steps": c.skipped_steps,
            "step_skipped": step_skipped,
            **health,
        }

    @torch.no_grad()
    def _clip_gradients(self, clip: float) -> Tensor:
        """Per-parameter norm clipping (as the reference does); returns the total gradient norm before clipping.

        The norms are one multi-tensor kernel, the clip coefficients three kernels on their stack, and the scaling
        one multi-tensor call; nothing is read back."""
        grads = [p.grad for _, p in self._params if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.device)
        norms = torch.stack(torch._foreach_norm(grads))
        total = torch.linalg.vector_norm(norms.float())
        if clip > 0:
            coefs = torch.clamp(clip / (norms + 1e-6), max=1.0)
            torch._foreach_mul_(grads, list(coefs.unbind(0)))
        return total


def _adamw(groups: list[dict], betas, eps: float) -> tuple[torch.optim.AdamW, bool]:
    """AdamW with the fused kernel where the device has one (CUDA, CPU: one pass over each parameter, and the skip
    of a non-finite step decided on the device through ``found_inf``); torch's default implementation elsewhere."""
    try:
        opt, fused = torch.optim.AdamW(groups, lr=0.0, betas=betas, eps=eps, fused=True), True
    except (RuntimeError, ValueError):
        opt, fused = torch.optim.AdamW(groups, lr=0.0, betas=betas, eps=eps), False

    def keep_implementation(optimizer, state_dict: dict) -> dict:
        """A checkpoint's groups replace the optimiser's on load, their implementation flags included: keep this
        one's (a checkpoint of the unfused AdamW resumes fused, its step counts moved to the device)."""
        groups = [{**g, "fused": fused, "foreach": None if fused else g.get("foreach")}
                  for g in state_dict["param_groups"]]
        return {**state_dict, "param_groups": groups}

    opt.register_load_state_dict_pre_hook(keep_implementation)
    return opt, fused
