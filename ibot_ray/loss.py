"""The iBOT objective: cross-view [CLS] self-distillation plus same-view masked patch distillation.

Inputs are crop-major (rows ``[v*B:(v+1)*B]`` are crop ``v`` of every image). Teacher outputs are centred with an
EMA of their batch mean and sharpened with a (scheduled) temperature; there is no Sinkhorn step.

* ``L_cls``: for every teacher global view q and every student view v != q (other globals and all locals),
  the batch-mean cross-entropy ``-sum_k T_q log S_v``; averaged over the ``G * (G + L - 1)`` pairs.
* ``L_mim``: for every global view, the per-token cross-entropy between the teacher's (unmasked) and the
  student's (masked) patch distributions, summed over the masked patches of each image and divided by that image's
  mask count (at least 1), then averaged over all B images (unmasked images count as 0); averaged over views.
* ``L_koleo`` (optional, :func:`koleo_loss`, not in iBOT; DINOv2): spreads the student's global-view backbone [CLS]
  features within each batch; ``IBOTStep`` adds it with weight ``loss.lambda_koleo`` (0 in the paper presets), since
  it reads the backbone's features, not the head's logits that ``IBOTLoss`` takes.

The patch term only evaluates masked tokens, which saves most of the memory and compute of the (G*B, N, K)
softmaxes at typical mask ratios. They are picked with ``mask_index``, the flat positions of the masked tokens, which
the caller builds on the host where the masks are (``ibot_ray.step.IBOTStep.stage``): without it the loss finds them
itself (one device-to-host sync). Student and teacher heads can skip the other tokens altogether
(``IBOTModel(..., patches="masked")``) and pass only the masked tokens' logits.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F


def _no_autocast(device_type: str):
    return torch.autocast(device_type=device_type, enabled=False)


class IBOTLoss(nn.Module):
    """iBOT loss with centring buffers ``center`` (1, K) and ``center_patch`` (1, 1, Kp), saved in ``state_dict``."""

    center: Tensor
    center_patch: Tensor

    def __init__(
        self,
        out_dim: int,
        patch_out_dim: int,
        n_global: int = 2,
        n_local: int = 10,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        center_momentum_patch: float = 0.9,
        lambda_cls: float = 1.0,
        lambda_mim: float = 1.0,
    ) -> None:
        super().__init__()
        if n_global < 1:
            raise ValueError(f"n_global must be >= 1, got {n_global}")
        if n_local < 0:
            raise ValueError(f"n_local must be >= 0, got {n_local}")
        if n_global + n_local < 2:
            raise ValueError(f"the [CLS] loss needs at least 2 crops, got {n_global} global + {n_local} local")
        if student_temp <= 0:
            raise ValueError(f"student_temp must be positive, got {student_temp}")
        for name, m in (("center_momentum", center_momentum), ("center_momentum_patch", center_momentum_patch)):
            if not 0.0 <= m <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {m}")
        self.out_dim = out_dim
        self.patch_out_dim = patch_out_dim
        self.n_global = n_global
        self.n_local = n_local
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.center_momentum_patch = center_momentum_patch
        self.lambda_cls = lambda_cls
        self.lambda_mim = lambda_mim
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("center_patch", torch.zeros(1, 1, patch_out_dim))

    # ---- loss -----------------------------------------------------------------------------------
    def _check_shapes(self, s_gc: Tensor, s_gp: Tensor, s_lc: Optional[Tensor], t_gc: Tensor, t_gp: Tensor,
                      masks: Tensor) -> int:
        g = self.n_global
        if s_gc.ndim != 2 or s_gc.shape[0] % g or s_gc.shape[1] != self.out_dim:
            raise ValueError(f"student_global_cls: expected ({g}*B, {self.out_dim}), got {tuple(s_gc.shape)}")
        b = s_gc.shape[0] // g
        if t_gc.shape != s_gc.shape:
            raise ValueError(f"teacher_global_cls shape {tuple(t_gc.shape)} != student's {tuple(s_gc.shape)}")
        if masks.dtype != torch.bool or masks.ndim < 2 or masks.shape[0] != g * b:
            raise ValueError(f"masks: expected bool ({g * b}, N), got {masks.dtype} {tuple(masks.shape)}")
        n = masks[0].numel()
        for name, t in (("teacher_global_patch", t_gp), ("student_global_patch", s_gp)):
            if t.ndim == 3 and (t.shape[0] != g * b or t.shape[1] != n or t.shape[2] != self.patch_out_dim):
                raise ValueError(f"{name}: expected ({g * b}, {n}, {self.patch_out_dim}) or the masked tokens' "
                                 f"(M, {self.patch_out_dim}), got {tuple(t.shape)} (masks {tuple(masks.shape)})")
            if t.ndim not in (2, 3) or t.shape[-1] != self.patch_out_dim:
                raise ValueError(f"{name}: expected ({g * b}, N, {self.patch_out_dim}) or the masked tokens' "
                                 f"(M, {self.patch_out_dim}), got {tuple(t.shape)}")
        n_loc = 0 if s_lc is None else s_lc.shape[0]
        if n_loc != self.n_local * b:
            raise ValueError(f"student_local_cls: expected {self.n_local}*{b} rows, got {n_loc}")
        if s_lc is not None and n_loc and (s_lc.ndim != 2 or s_lc.shape[1] != self.out_dim):
            raise ValueError(f"student_local_cls: expected ({n_loc}, {self.out_dim}), got {tuple(s_lc.shape)}")
        return b

    def forward(
        self,
        student_global_cls: Tensor,
        student_global_patch: Tensor,
        student_local_cls: Optional[Tensor],
        teacher_global_cls: Tensor,
        teacher_global_patch: Tensor,
        masks: Tensor,
        teacher_temp: float,
        teacher_patch_temp: float,
        *,
        mask_index: Optional[Tensor] = None,
        with_health: bool = True,
    ) -> dict[str, Tensor]:
        """Return ``{"loss": lambda_cls * cls + lambda_mim * mim, "cls": ..., "mim": ..., "health": ...}``.

        ``student_global_patch`` and ``teacher_global_patch`` are each either every token's logits, (G*B, N, Kp),
        or only the masked tokens' (M, Kp) in ``masks`` order (the head then skipped the tokens L_mim does not read).
        ``mask_index``: the masked tokens' positions in the flattened (G*B*N) masks, ascending (``masks`` order),
        as :func:`mask_positions` gives them; built on the host it spares the device-to-host sync of finding them.

        ``loss`` carries the graph; ``cls`` and ``mim`` are detached float32 copies for logging (so accumulating them
        across steps never keeps a graph alive); ``health`` (only ``with_health``) holds the sums of
        :meth:`_target_stats`.
        """
        if teacher_temp <= 0 or teacher_patch_temp <= 0:
            raise ValueError(f"teacher temperatures must be positive, got {teacher_temp}, {teacher_patch_temp}")
        b = self._check_shapes(student_global_cls, student_global_patch, student_local_cls, teacher_global_cls,
                               teacher_global_patch, masks)
        g, n_loc = self.n_global, self.n_local
        m = masks.reshape(g * b, -1)
        idx = mask_positions(m) if mask_index is None else mask_index
        with _no_autocast(student_global_cls.device.type):
            # ---- [CLS]: sum over pairs (q, v != q) of -T_q . log S_v, in closed form per student view ----------
            t_cls = F.softmax((teacher_global_cls.detach().float() - self.center) / teacher_temp, dim=-1)
            t_cls = t_cls.view(g, b, -1)
            t_sum = t_cls.sum(0)  # (B, K): every teacher view pairs with every local crop
            logp_g = F.log_softmax(student_global_cls.float() / self.student_temp, dim=-1).view(g, b, -1)
            # a global student view v pairs with every teacher view except itself
            cls_total = -torch.einsum("gbk,gbk->", t_sum.unsqueeze(0) - t_cls, logp_g)
            if n_loc:
                logp_l = F.log_softmax(student_local_cls.float() / self.student_temp, dim=-1).view(n_loc, b, -1)
                cls_total = cls_total - torch.einsum("bk,lbk->", t_sum, logp_l)
            n_pairs = g * (g + n_loc - 1)
            loss_cls = cls_total / (b * n_pairs)

            # ---- MIM: same-view pairs, masked tokens only, per-image normalised --------------------------------
            # (M, Kp): the logits of the masked tokens, selected here or already by the heads
            s_sel = _masked_rows(student_global_patch, idx).float()
            t_sel = _masked_rows(teacher_global_patch.detach(), idx).float()
            if s_sel.shape[0] != idx.shape[0] or t_sel.shape[0] != idx.shape[0]:
                raise ValueError(f"student_global_patch / teacher_global_patch: {s_sel.shape[0]} / "
                                 f"{t_sel.shape[0]} rows of masked tokens, but the masks select {idx.shape[0]}")
            # 1 / (the image's mask count) at each masked token
            weight = (m.float() / m.sum(dim=1, keepdim=True).clamp(min=1).float()).reshape(-1).index_select(0, idx)
            t_patch = F.softmax((t_sel - self.center_patch.view(1, -1)) / teacher_patch_temp, dim=-1)
            ce = -torch.einsum("mk,mk->m", t_patch, F.log_softmax(s_sel / self.student_temp, dim=-1))  # (M,)
            loss_mim = (ce * weight).sum() / (g * b)

            loss = self.lambda_cls * loss_cls + self.lambda_mim * loss_mim
            out = {"loss": loss, "cls": loss_cls.detach(), "mim": loss_mim.detach()}
            if with_health:
                out["health"] = self._target_stats(t_cls.view(g * b, -1), t_patch)
        return out

    @staticmethod
    @torch.no_grad()
    def _target_stats(t_cls: Tensor, t_patch: Tensor) -> Tensor:
        """Sums for the run-health metrics, from the teacher targets the loss already computed (no extra forward).

        Returns float64 ``[sum of [CLS] target entropies, rows, sum of masked-patch target entropies, masked
        patches, *sum of the [CLS] target distributions (K)]``: sums, so that micro-batches and ranks add up
        exactly; :func:`health_metrics` turns the global sums into means. Entropies are taken per row in float32
        and summed in float64."""

        def entropy_sum(p: Tensor) -> Tensor:
            return -(p * p.clamp_min(1e-30).log()).sum(-1).sum(dtype=torch.float64)

        f64 = dict(dtype=torch.float64, device=t_cls.device)
        head = torch.stack([entropy_sum(t_cls), torch.full((), t_cls.shape[0], **f64),
                            entropy_sum(t_patch), torch.full((), t_patch.shape[0], **f64)])
        return torch.cat([head, t_cls.sum(0, dtype=torch.float64)])

    # ---- centring -------------------------------------------------------------------------------------
    @torch.no_grad()
    def center_stats(self, teacher_global_cls: Tensor, teacher_global_patch: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Local sums for the centre update: ([CLS] logits summed over rows (K,), per-row mean over all patch tokens
        summed over rows (Kp,), row count as a float tensor).

        ``teacher_global_patch`` is every token's logits (rows, N, Kp), or each row's mean over its N tokens already
        (rows, Kp): the head gives that mean at the cost of one row (the prototypes are linear, so the mean of the
        logits is the logits of the mean bottleneck feature; ``IBOTModel(..., patch_mean=True)``)."""
        cls_sum = teacher_global_cls.sum(dim=0, dtype=torch.float32)
        patch = teacher_global_patch
        if patch.ndim == 3:
            patch = patch.mean(dim=1, dtype=torch.float32)
        if patch.ndim != 2 or patch.shape[0] != teacher_global_cls.shape[0]:
            raise ValueError(f"teacher_global_patch: expected ({teacher_global_cls.shape[0]}, N, Kp) logits or their "
                             f"per-row means ({teacher_global_cls.shape[0]}, Kp), got {tuple(patch.shape)}")
        patch_sum = patch.sum(dim=0, dtype=torch.float32)
        count = cls_sum.new_full((), teacher_global_cls.shape[0])
        return cls_sum, patch_sum, count

    @torch.no_grad()
    def apply_center_update(self, cls_sum: Tensor, patch_sum: Tensor, count: Tensor, *, reduce: bool = True,
                            apply: Optional[Tensor] = None) -> None:
        """EMA both centres with the batch means of these sums.

        ``reduce``: all-reduce (sum) the statistics over ranks first when a process group exists (the step passes
        False: its sums already rode its one all-reduce). ``apply``: a bool device tensor; where it is False the
        centres stay as they are (a skipped step), decided on the device without a sync."""
        k, kp = cls_sum.numel(), patch_sum.numel()
        if k != self.out_dim or kp != self.patch_out_dim:
            raise ValueError(f"center stats of size {k}, {kp} do not match out dims {self.out_dim}, "
                             f"{self.patch_out_dim}")
        device = self.center.device
        if reduce and dist.is_available() and dist.is_initialized():
            flat = torch.cat([cls_sum.reshape(-1).float(), patch_sum.reshape(-1).float(),
                              count.reshape(1).float()]).to(device)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            cls_sum, patch_sum, count = flat[:k], flat[k:k + kp], flat[k + kp]
        n = count.to(device=device, dtype=torch.float32).clamp(min=1.0)
        m, mp = self.center_momentum, self.center_momentum_patch
        center = self.center * m
        center.add_(cls_sum.to(device).float().view(1, -1) / n, alpha=1 - m)
        center_patch = self.center_patch * mp
        center_patch.add_(patch_sum.to(device).float().view(1, 1, -1) / n, alpha=1 - mp)
        if apply is not None:
            center = torch.where(apply, center, self.center)
            center_patch = torch.where(apply, center_patch, self.center_patch)
        self.center.copy_(center)
        self.center_patch.copy_(center_patch)

    def update_center(self, teacher_global_cls: Tensor, teacher_global_patch: Tensor) -> None:
        """``center_stats`` + ``apply_center_update`` on the current teacher outputs."""
        self.apply_center_update(*self.center_stats(teacher_global_cls, teacher_global_patch))


def mask_positions(masks: Tensor) -> Tensor:
    """The flat positions (int64, ascending) of the True entries of ``masks``: the order ``x[masks]`` selects in.
    On a device tensor this is a device-to-host sync (the count decides the output's size): build it on the host."""
    return torch.nonzero(masks.reshape(-1)).squeeze(1)


def _masked_rows(patch: Tensor, index: Tensor) -> Tensor:
    """(G*B, N, Kp) logits -> the (M, Kp) rows at the flat token positions ``index``; (M, Kp) logits as they are."""
    return patch.reshape(-1, patch.shape[-1]).index_select(0, index) if patch.ndim == 3 else patch


def koleo_loss(features: Tensor, n_views: int) -> Tensor:
    """The Kozachenko-Leonenko entropy estimator's loss (DINOv2): ``-mean_i log(min_{j != i} ||x_i - x_j||)`` of the
    L2-normalised features of each view's batch (crop-major rows), averaged over views. Minimising it spreads the
    features of a batch over the sphere, which is what a nearest-neighbour evaluation looks at. Per rank, as DINOv2."""
    x = F.normalize(features.float(), dim=-1, eps=1e-8).view(n_views, -1, features.shape[-1])
    if x.shape[1] < 2:
        return x.new_zeros(())
    with torch.no_grad():  # the nearest neighbour of each row (largest cosine, i.e. smallest distance)
        sim = torch.bmm(x, x.transpose(1, 2))
        sim.diagonal(dim1=1, dim2=2).fill_(-2.0)
        nearest = sim.argmax(dim=2)  # (V, B)
    dist_nn = (x - torch.gather(x, 1, nearest.unsqueeze(-1).expand_as(x))).norm(dim=-1)
    return -torch.log(dist_nn + 1e-8).mean()


def health_metrics(sums, cls_loss: float, out_dim: int, patch_out_dim: int) -> dict[str, float]:
    """Run-health metrics from the (global) sums of :meth:`IBOTLoss._target_stats` (a tensor, or the list of its
    values that the step already read back) and the [CLS] loss.

    * ``teacher_entropy``: mean entropy (nats) of the teacher's centred, sharpened [CLS] targets; ``_frac`` divides
      by ln K. Near 1: the targets are uniform (uniform collapse).
    * ``teacher_patch_entropy``: the same for the masked-patch targets of L_mim (NaN when no patch was masked).
    * ``teacher_batch_entropy``: entropy of the batch-mean [CLS] target, i.e. of how the batch spreads over the
      prototypes; ``prototypes_used`` = exp of it (out of at most min(K, ``target_rows``)). A few prototypes
      taking all the mass is dominant collapse.
    * ``cls_kl``: KL(teacher || student) of the [CLS] pairs. Every teacher view is paired with the same number of
      student views, so the mean cross-entropy (``cls``) is the mean teacher entropy plus the mean KL; near 0 the
      student has nothing left to learn (both collapses end there).
    """
    s = np.asarray(sums.detach().double().cpu() if torch.is_tensor(sums) else sums, dtype=np.float64)
    h_cls = float(s[0] / max(s[1], 1.0))
    h_patch = float(s[2] / s[3]) if s[3] > 0 else float("nan")
    mean_p = s[4:] / max(float(s[4:].sum()), 1e-30)
    h_batch = float(-(mean_p * np.log(np.maximum(mean_p, 1e-30))).sum())
    return {
        "teacher_entropy": h_cls,
        "teacher_entropy_frac": h_cls / math.log(out_dim),
        "teacher_patch_entropy": h_patch,
        "teacher_patch_entropy_frac": h_patch / math.log(patch_out_dim),
        "teacher_batch_entropy": h_batch,
        "teacher_batch_entropy_frac": h_batch / math.log(out_dim),
        "prototypes_used": math.exp(h_batch),
        "target_rows": int(s[1]),
        "cls_kl": max(0.0, cls_loss - h_cls),
    }


__all__ = ["IBOTLoss", "health_metrics", "koleo_loss", "mask_positions"]
