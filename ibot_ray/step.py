"""One full iBOT optimisation step on a batch of uint8 crops and masks.

The unit is deliberately free of Ray: the Ray Train worker, the CPU smoke test and any user loop call the same
:class:`IBOTStep`. A step is

    normalise on the device -> teacher forward on the unmasked global crops -> student forward on the masked
    global crops and the unmasked local crops -> loss -> backward -> per-parameter gradient clipping -> last-layer
    freeze -> AdamW (no weight decay on biases and norm weights) -> teacher EMA -> center EMA (all-reduced)

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

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F

from .config import IBOTConfig
from .ema import TeacherEMA
from .knn import IMAGENET_MEAN, IMAGENET_STD, normalize_images
from .loss import IBOTLoss, health_metrics, koleo_loss
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
    return torch.cat([f.sum(0), (f * f).sum(0), torch.tensor([float(f.shape[0])], device=f.device, dtype=f.dtype)])


def feature_spread(sums: Tensor, dim: int) -> float:
    """Per-dimension standard deviation of the L2-normalised features across the batch, averaged over dimensions and
    scaled by sqrt(D): about 1 for directions spread like random ones, 0 when every image gets the same feature
    (representation collapse)."""
    s = sums.double().cpu()
    n = float(s[2 * dim])
    if n < 2:
        return float("nan")
    mean = s[:dim] / n
    var = (s[dim:2 * dim] / n - mean * mean).clamp_min(0.0) * n / (n - 1)
    return float(var.sqrt().mean() * math.sqrt(dim))


@dataclass
class StepCounters:
    step: int = 0  # the global step that runs next
    skipped_steps: int = 0  # steps skipped because the loss or gradient was not finite
    consecutive_nonfinite: int = 0


class IBOTStep:
    """Owns the optimiser, loss (with its centers), schedules and teacher EMA of one training process."""

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
        self.optimizer = torch.optim.AdamW(param_groups(core), lr=0.0, betas=o.betas, eps=o.eps)
        self.schedules = Schedules(cfg, steps_per_epoch)
        self.ema = TeacherEMA(student, teacher)
        self.amp_dtype = resolve_precision(o.precision, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.counters = StepCounters()
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        self._params = [(n, p) for n, p in core.named_parameters() if p.requires_grad]
        self._last_layer = [p for n, p in self._params if "last_layer" in n]
        self._feature_dim = int(core.backbone.embed_dim)

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
    def __call__(self, batch: dict[str, Tensor], *, loss_weight: float = 1.0) -> dict[str, float]:
        """Run one step on a batch of uint8 crops and masks.

        ``{"global_crops": uint8 (B,G,3,S,S), "local_crops": uint8 (B,L,3,s,s), "masks": bool (B,G,h,w)}``.

        Returns the step's metrics. A non-finite loss or gradient skips the update (counted, with a warning); after
        ``optim.max_nonfinite_steps`` consecutive skips :class:`NonFiniteLossError` is raised."""
        cfg = self.cfg
        s = self.schedules.at(self.counters.step)
        apply_schedule(self.optimizer, s)

        globals_u8 = batch["global_crops"].to(self.device, non_blocking=True)
        locals_u8 = batch.get("local_crops")
        masks = batch["masks"].to(self.device, non_blocking=True).bool()
        b = globals_u8.shape[0]
        n_local = 0 if locals_u8 is None else locals_u8.shape[1]
        if n_local:
            locals_u8 = locals_u8.to(self.device, non_blocking=True)

        self.optimizer.zero_grad(set_to_none=True)
        self.student.train()
        totals = torch.zeros(4, device=self.device, dtype=torch.float64)  # loss, cls, mim, koleo
        center_sums: list[Tensor] | None = None
        health_sums: Tensor | None = None
        chunks = self._micro_batches(b)
        koleo = cfg.loss.lambda_koleo
        for ci, sl in enumerate(chunks):
            share = (sl.stop - sl.start) / b
            g = normalize_images(self._crop_major(globals_u8[sl]), self.mean, self.std)
            m = self._crop_major(masks[sl].unsqueeze(2)).squeeze(1)  # (G*b, h, w)
            sync = ci == len(chunks) - 1 or not hasattr(self.student, "no_sync")
            ctx = contextlib.nullcontext() if sync else self.student.no_sync()
            with ctx:
                with torch.no_grad(), self._autocast():
                    t_cls, t_patch, t_feat = self.teacher(g, patches=True, with_features=True)
                with self._autocast():
                    # the head only on [CLS] and the masked patches: L_mim reads no other student patch logits
                    s_cls, s_patch, *s_feat = self.student(g, mask=m, patches="masked", with_features=koleo > 0)
                    s_local = None
                    if n_local:
                        lc = normalize_images(self._crop_major(locals_u8[sl]), self.mean, self.std)
                        s_local, _ = self.student(lc, patches=False)
                parts = self.loss(
                    s_cls, s_patch, s_local, t_cls, t_patch, m.flatten(1),
                    teacher_temp=s["teacher_temp"], teacher_patch_temp=s["teacher_patch_temp"],
                )
                spread = koleo_loss(s_feat[0], cfg.crops.global_crops_number) if koleo > 0 else None
                total = parts["loss"] if spread is None else parts["loss"] + koleo * spread
                weighted = total * (share * loss_weight)
                self.scaler.scale(weighted).backward()
            parts_v = torch.stack([total.detach(), parts["cls"].detach(), parts["mim"].detach(),
                                   total.new_zeros(()) if spread is None else spread.detach()])
            totals += parts_v.double() * share
            stats = self.loss.center_stats(t_cls, t_patch)
            center_sums = list(stats) if center_sums is None else [a + c for a, c in zip(center_sums, stats)]
            chunk_health = torch.cat([parts["health"], feature_spread_sums(t_feat)])
            health_sums = chunk_health if health_sums is None else health_sums + chunk_health

        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        grad_norm = self._clip_gradients(cfg.optim.clip_grad)
        if s["freeze_last_layer"]:
            for p in self._last_layer:
                p.grad = None

        # One all-reduce makes the metrics global and the skip decision identical on every rank; the health sums
        # (target entropies, the batch's prototype histogram, the feature spread) ride along with them.
        finite = torch.isfinite(totals).all() & torch.isfinite(grad_norm)
        flags = torch.cat([totals, (~finite).double().view(1), health_sums])
        world = 1
        if dist.is_available() and dist.is_initialized():
            world = dist.get_world_size()
            # each rank's mean weighted like its gradient (share * W / G): the average is the global batch's mean
            flags[:4] *= loss_weight
            dist.all_reduce(flags)
            flags[:4] /= world
        loss_v, cls_v, mim_v, koleo_v, bad = flags[:5].tolist()
        n_target = health_sums.numel() - self._feature_dim * 2 - 1
        health = health_metrics(flags[5:5 + n_target], cls_v, self.loss.out_dim, self.loss.patch_out_dim)
        health["feature_std"] = feature_spread(flags[5 + n_target:], self._feature_dim)

        skipped = bad > 0
        if skipped:
            self.counters.skipped_steps += 1
            self.counters.consecutive_nonfinite += 1
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler.is_enabled():
                self.scaler.update()
            log.warning("step %d: non-finite loss or gradient (loss=%s); update skipped (%d skipped so far)",
                        self.counters.step, loss_v, self.counters.skipped_steps)
            if self.counters.consecutive_nonfinite >= cfg.optim.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"{self.counters.consecutive_nonfinite} consecutive non-finite steps (last at step "
                    f"{self.counters.step}); lower optim.lr or the teacher temperature, or use precision fp32/bf16")
        else:
            self.counters.consecutive_nonfinite = 0
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.ema.update(s["momentum"])
            self.loss.apply_center_update(*center_sums)

        self.counters.step += 1
        return {
            "step": self.counters.step,
            "epoch": s["epoch"],
            "loss": loss_v,
            "cls": cls_v,
            "mim": mim_v,
            **({"koleo": koleo_v} if koleo > 0 else {}),
            "lr": s["lr"],
            "wd": s["wd"],
            "momentum": s["momentum"],
            "teacher_temp": s["teacher_temp"],
            "teacher_patch_temp": s["teacher_patch_temp"],
            "grad_norm": float(grad_norm) if math.isfinite(float(grad_norm)) else float("nan"),
            "skipped_steps": self.counters.skipped_steps,
            "step_skipped": bool(skipped),
            "world_size": world,
            **health,
        }

    @torch.no_grad()
    def _clip_gradients(self, clip: float) -> Tensor:
        """Per-parameter norm clipping (as the reference does); returns the total gradient norm before clipping."""
        grads = [p.grad for _, p in self._params if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.device)
        norms = torch._foreach_norm(grads)
        total = torch.linalg.vector_norm(torch.stack(norms).float())
        if clip > 0:
            coefs = [torch.clamp(clip / (n + 1e-6), max=1.0) for n in norms]
            torch._foreach_mul_(grads, coefs)
        return total
