"""Backbone + head, and the student/teacher pair of an iBOT run."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ibot_ray.backbone import MaskedViT
from ibot_ray.config import IBOTConfig
from ibot_ray.head import IBOTHead


class IBOTModel(nn.Module):
    """A :class:`MaskedViT` followed by an :class:`IBOTHead`."""

    def __init__(self, backbone: MaskedViT, head: IBOTHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, *, patches: bool | str = True,
                patch_rows: Optional[Tensor] = None, patch_mean: bool = False, with_features: bool = False) -> tuple:
        """Return ([CLS] logits (B, K), patch logits (B, N, Kp)); with ``patches=False`` only the [CLS] token goes
        through the head and the second item is ``None`` (local crops); with ``patches="masked"`` only the selected
        patch tokens do, and the second item is their (M, Kp) logits in row-major order. The selection is
        ``patch_rows`` (bool (B, N), or int64 flat positions built on the host: :meth:`IBOTHead.forward`), else
        ``mask`` (L_mim reads no other token). ``mask`` also masks the backbone's input (the student); the teacher
        selects with ``patch_rows`` alone and sees its crops whole.

        ``patch_mean`` appends each image's mean patch logits over all tokens, (B, Kp) float32 (the patch centre's
        input, :meth:`IBOTHead.forward`); ``with_features`` appends the backbone's [CLS] token (B, D), the feature
        that k-NN evaluates."""
        if isinstance(patches, str) and patches != "masked":
            raise ValueError(f'patches must be True, False or "masked", got {patches!r}')
        tokens = self.backbone(x, mask)
        if patches == "masked":
            rows = patch_rows if patch_rows is not None else mask
            if rows is None:
                raise ValueError('patches="masked" needs a mask or patch_rows')
            if rows.dtype == torch.bool:
                rows = rows.reshape(rows.shape[0], -1)
            out = self.head(tokens, patch_rows=rows, patch_mean=patch_mean)
        elif patches:
            out = self.head(tokens, patch_mean=patch_mean)
        else:
            if patch_mean:
                raise ValueError("patch_mean needs the patch tokens (patches=True or \"masked\")")
            out = (self.head.forward_cls(tokens[:, 0]), None)
        return (*out, tokens[:, 0]) if with_features else out


def patch_logit_dim(cfg: IBOTConfig) -> int:
    """Size of the patch logits student and teacher produce (the loss's ``patch_out_dim``).

    As in iBOT, a shared head on either side means the patch targets live in the [CLS] prototype space, so
    both sides use ``out_dim``; only when neither is shared do patches get ``patch_out_dim`` prototypes.
    """
    h = cfg.head
    return h.out_dim if (h.shared_head or h.shared_head_teacher) else h.patch_out_dim


def _build(cfg: IBOTConfig, *, drop_path_rate: float, mask_token: bool, shared_head: bool) -> IBOTModel:
    backbone = MaskedViT(cfg.model.arch, img_size=cfg.crops.global_crops_size, patch_size=cfg.model.patch_size,
                         drop_path_rate=drop_path_rate, mask_token=mask_token, depth=cfg.model.depth,
                         embed_dim=cfg.model.embed_dim, num_heads=cfg.model.num_heads, stem=cfg.model.stem)
    h = cfg.head
    head = IBOTHead(backbone.embed_dim, out_dim=h.out_dim, patch_out_dim=patch_logit_dim(cfg), hidden_dim=h.hidden_dim,
                    bottleneck_dim=h.bottleneck_dim, nlayers=h.nlayers, norm_last_layer=h.norm_last_layer,
                    shared_head=shared_head)
    return IBOTModel(backbone, head)


@torch.no_grad()
def copy_shared_weights(src: nn.Module, dst: nn.Module) -> list[str]:
    """Copy every parameter and buffer of ``src`` into the same-named one of ``dst``; return the copied names.

    Names come from ``named_parameters``/``named_buffers`` (which list a module shared under two names once, by
    its first name), so a teacher whose ``last_layer2`` *is* its ``last_layer`` receives the student's
    ``last_layer``, never the student's separate ``last_layer2``.
    """
    src_t = dict(src.named_parameters())
    src_t.update(dict(src.named_buffers()))
    copied = []
    for name, t in list(dst.named_parameters()) + list(dst.named_buffers()):
        s = src_t.get(name)
        if s is None:
            continue
        if s.shape != t.shape:
            raise ValueError(f"cannot copy {name!r}: shape {tuple(s.shape)} into {tuple(t.shape)}")
        t.copy_(s)
        copied.append(name)
    return copied


def build_student_teacher(cfg: IBOTConfig) -> tuple[IBOTModel, IBOTModel]:
    """Build the student (drop path, mask token) and the teacher (no drop path, no mask token, frozen).

    The teacher starts as a copy of the student for every parameter the two share by name; all its parameters
    have ``requires_grad=False`` (it is only ever updated by the EMA).
    """
    if cfg.head.shared_head and not cfg.head.shared_head_teacher:
        raise ValueError("head.shared_head_teacher=False with head.shared_head=True: the teacher's separate patch "
                         "prototypes would have no student counterpart and never be trained or EMA-updated")
    student = _build(cfg, drop_path_rate=cfg.model.drop_path_rate, mask_token=True,
                     shared_head=cfg.head.shared_head)
    teacher = _build(cfg, drop_path_rate=0.0, mask_token=False, shared_head=cfg.head.shared_head_teacher)
    copy_shared_weights(student, teacher)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher


__all__ = ["IBOTModel", "build_student_teacher", "copy_shared_weights", "patch_logit_dim"]
