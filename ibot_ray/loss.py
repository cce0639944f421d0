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

The patch term only evaluates masked tokens (selected once), which saves most of the memory and compute of the
(G*B, N, K) softmaxes at typical mask ratios; the selection costs one device-to-host sync. The student's head can
skip the unmasked tokens altogether (``IBOTModel(..., patches="masked")``) and pass only the masked tokens' logits.
"""

from __future__ import annotations

import math
from typing import Optional

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
        if t_gp.ndim != 3 or t_gp.shape[0] != g * b or t_gp.shape[2] != self.patch_out_dim:
            raise ValueError(f"teacher_global_patch: expected ({g * b}, N, {self.patch_out_dim}), "
                             f"got {tuple(t_gp.shape)}")
        if s_gp.ndim == 3 and s_gp.shape != t_gp.shape:
            raise ValueError(f"student_global_patch shape {tuple(s_gp.shape)} != the teacher's {tuple(t_gp.shape)}")
        if s_gp.ndim not in (2, 3) or s_gp.shape[-1] != self.patch_out_dim:
            raise ValueError(f"student_global_patch: expected ({g * b}, N, {self.patch_out_dim}) or the masked "
                             f"tokens' (M, {self.patch_out_dim}), got {tuple(s_gp.shape)}")
        if masks.dtype != torch.bool or masks.shape[0] != g * b or masks[0].numel() != t_gp.shape[1]:
            raise ValueError(f"masks: expected bool ({g * b}, {t_gp.shape[1]}), got {masks.dtype} "
                             f"{tuple(masks.shape)}")
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
    ) -> dict[str, Tensor]:
        """Return ``{"loss": lambda_cls * cls + lambda_mim * mim, "cls": ..., "mim": ..., "health": ...}``.

        ``student_global_patch`` is either every token's logits, (G*B, N, Kp) like the teacher's, or only the masked
        tokens' (M, Kp) in ``masks`` order (the student's head then skipped the tokens L_mim does not read).

        ``loss`` carries the graph; ``cls`` and ``mim`` are detached float32 copies for logging (so accumulating them
        across steps never keeps a graph alive); ``health`` holds the sums of :meth:`_target_stats`.
        """
        if teacher_temp <= 0 or teacher_patch_temp <= 0:
            raise ValueError(f"teacher temperatures must be positive, got {teacher_temp}, {teacher_patch_temp}")
        b = self._check_shapes(student_global_cls, student_global_patch, student_local_cls, teacher_global_cls,
                               teacher_global_patch, masks)
        g, n_loc = self.n_global, self.n_local
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
            m = masks.reshape(g * b, -1)
            weight = m.float() / m.sum(dim=1, keepdim=True).clamp(min=1).float()  # (G*B, N): 1/count where masked
            # (M, Kp): the student's logits of the masked tokens, selected here or already by the head
            s_sel = (student_global_patch[m] if student_global_patch.ndim == 3 else student_global_patch).float()
            t_sel = teacher_global_patch.detach()[m].float()
            if s_sel.shape[0] != t_sel.shape[0]:
                raise ValueError(f"student_global_patch: {s_sel.shape[0]} rows of masked tokens, but the masks "
                                 f"select {t_sel.shape[0]}")
            t_patch = F.softmax((t_sel - self.center_patch.view(1, -1)) / teacher_patch_temp, dim=-1)
            ce = -torch.einsum("mk,mk->m", t_patch, F.log_softmax(s_sel / self.student_temp, dim=-1))  # (M,)
            loss_mim = (ce * weight[m]).sum() / (g * b)

            loss = self.lambda_cls * loss_cls + self.lambda_mim * loss_mim
            health = self._target_stats(t_cls.view(g * b, -1), t_patch)
        return {"loss": loss, "cls": loss_cls.detach(), "mim": loss_mim.detach(), "health": health}

    @staticmethod
    @torch.no_grad()
    def _target_stats(t_cls: Tensor, t_patch: Tensor) -> Tensor:
        """Sums for the run-health metrics, from the teacher targets the loss already computed (no extra forward).

        Returns float64 ``[sum of [CLS] target entropies, rows, sum of masked-patch target entropies, masked
        patches, *sum of the [CLS] target distributions (K)]``: sums, so that micro-batches and ranks add up
        exactly; :func:`health_metrics` turns the global sums into means."""

        def entropy_sum(p: Tensor) -> Tensor:
            return -(p * p.clamp_min(1e-30).log()).sum()

        head = torch.stack([entropy_sum(t_cls), torch.tensor(float(t_cls.shape[0]), device=t_cls.device),
                            entropy_sum(t_patch), torch.tensor(float(t_patch.shape[0]), device=t_cls.device)])
        return torch.cat([head.double(), t_cls.sum(0).double()])

    # ---- centring -------------------------------------------------------------------------------------
    @torch.no_grad()
    def center_stats(self, teacher_global_cls: Tensor, teacher_global_patch: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Local sums for the centre update: ([CLS] logits summed over rows (K,), per-row mean over all patch tokens
        summed over rows (Kp,), row count as a float tensor)."""
        cls_sum = teacher_global_cls.sum(dim=0, dtype=torch.float32)
        patch_sum = teacher_global_patch.mean(dim=1, dtype=torch.float32).sum(dim=0)
        count = torch.tensor(float(teacher_global_cls.shape[0]), device=cls_sum.device)
        return cls_sum, patch_sum, count

    @torch.no_grad()
    def apply_center_update(self, cls_sum: Tensor, patch_sum: Tensor, count: Tensor) -> None:
        """All-reduce (sum) the statistics over ranks when a process group exists, then EMA both centres."""
        k, kp = cls_sum.numel(), patch_sum.numel()
        if k != self.out_dim or kp != self.patch_out_dim:
            raise ValueError(f"center stats of size {k}, {kp} do not match out dims {self.out_dim}, "
                             f"{self.patch_out_dim}")
        device = self.center.device
        if dist.is_available() and dist.is_initialized():
            flat = torch.cat([cls_sum.reshape(-1).float(), patch_sum.reshape(-1).float(),
                              count.reshape(1).float()]).to(device)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            cls_sum, patch_sum, count = flat[:k], flat[k:k + kp], flat[k + kp]
        n = count.to(device=device, dtype=torch.float32).clamp(min=1.0)
        m, mp = self.center_momentum, self.center_momentum_patch
        self.center.mul_(m).add_(cls_sum.to(device).float().view(1, -1) / n, alpha=1 - m)
        self.center_patch.mul_(mp).add_(patch_sum.to(device).float().view(1, 1, -1) / n, alpha=1 - mp)

    def update_center(self, teacher_global_cls: Tensor, teacher_global_patch: Tensor) -> None:
        """``center_stats`` + ``apply_center_update`` on the current teacher outputs."""
        self.apply_center_update(*self.center_stats(teacher_global_cls, teacher_global_patch))


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


def health_metrics(sums: Tensor, cls_loss: float, out_dim: int, patch_out_dim: int) -> dict[str, float]:
    """Run-health metrics from the (global) sums of :meth:`IBOTLoss._target_stats` and the [CLS] loss.

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
    s = sums.double().cpu()
    h_cls = float(s[0] / s[1].clamp_min(1))
    h_patch = float(s[2] / s[3]) if float(s[3]) > 0 else float("nan")
    mean_p = s[4:] / s[4:].sum().clamp_min(1e-30)
    h_batch = float(-(mean_p * mean_p.clamp_min(1e-30).log()).sum())
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


__all__ = ["IBOTLoss", "health_metrics"]
