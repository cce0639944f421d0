"""A timm Vision Transformer with iBOT's masked-image-modelling input.

iBOT replaces the patch embeddings of masked positions with a learned ``mask_token`` *before* the positional
embedding is added, so a masked token still knows where it is (``mask_token + pos_embed``). timm has no hook for
that, so :class:`MaskedViT` re-runs timm's own ``forward_features`` steps in order and inserts the replacement
between ``patch_embed`` and ``_pos_embed``. Because every step is timm's own submodule, class tokens, register
tokens, ``no_embed_class`` (DeiT-3) and dynamic image sizes all behave exactly as in timm, and ``.vit`` keeps
timm's parameter names so its state dict loads straight into ``timm.create_model(arch)``.
"""

from __future__ import annotations

from typing import Optional

import timm
import torch
from timm.models import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from ibot_ray.conv_stem import ConvStemPatchEmbed


def _check_mask(mask: Tensor, b: int, n: int, grid: tuple) -> None:
    """A patch mask must be bool, one row of ``n`` patches (any shape) per image."""
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got dtype {mask.dtype}")
    if mask.shape[0] != b or mask[0].numel() != n:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not match {b} images of {grid} patches")


class MaskedViT(nn.Module):
    """Any timm ViT (``vit_*``, ``deit*``, register variants) returning the final-normed CLS + patch tokens.

    Args:
        arch: timm model name, built with ``pretrained=False`` and ``num_classes=0``.
        img_size: the size the positional embedding is created for (the global crop size); other multiples of the
            patch size work through timm's dynamic image size (bicubic resampling of the position grid).
        patch_size: override of the architecture's patch size (``None``: the architecture's own).
        drop_path_rate: stochastic depth, linear over blocks as in timm.
        mask_token: create the ``(1, D)`` zero-initialised mask token (the student has one, the teacher not).
        depth: override of the number of transformer blocks (``None``: the architecture's own).
        embed_dim, num_heads: overrides of the width and the attention heads (``None``: the architecture's own).
        stem: ``"patch"`` (timm's linear patch embedding, iBOT's) or ``"conv"`` (:mod:`ibot_ray.conv_stem`; masked
            patches are then also zeroed in pixels, so that no token's receptive field sees their content).
    """

    def __init__(
        self,
        arch: str,
        *,
        img_size: int = 224,
        patch_size: Optional[int] = None,
        drop_path_rate: float = 0.0,
        mask_token: bool = True,
        depth: Optional[int] = None,
        embed_dim: Optional[int] = None,
        num_heads: Optional[int] = None,
        stem: str = "patch",
    ) -> None:
        super().__init__()
        if stem not in ("patch", "conv"):
            raise ValueError(f"stem must be 'patch' or 'conv', got {stem!r}")
        kwargs = dict(pretrained=False, num_classes=0, img_size=img_size, dynamic_img_size=True,
                      drop_path_rate=drop_path_rate)
        if patch_size is not None:
            kwargs["patch_size"] = patch_size
        for name, value in (("depth", depth), ("embed_dim", embed_dim), ("num_heads", num_heads)):
            if value is not None:
                kwargs[name] = value
        if stem == "conv":
            kwargs["embed_layer"] = ConvStemPatchEmbed
        vit = timm.create_model(arch, **kwargs)
        if not isinstance(vit, VisionTransformer):
            raise TypeError(f"arch {arch!r} builds a {type(vit).__name__}, not a timm VisionTransformer")
        if vit.cls_token is None:
            raise ValueError(f"arch {arch!r} has no class token; iBOT needs a [CLS] token")
        self.vit = vit
        self.embed_dim: int = int(vit.embed_dim)
        p = vit.patch_embed.patch_size
        p = p if isinstance(p, (tuple, list)) else (p, p)
        if p[0] != p[1]:
            raise ValueError(f"arch {arch!r}: non-square patches {tuple(p)} are not supported")
        self.patch_size: int = int(p[0])
        self.num_prefix_tokens: int = int(vit.num_prefix_tokens)
        self.stem = stem
        self.mask_token: Optional[nn.Parameter] = (
            nn.Parameter(torch.zeros(1, self.embed_dim)) if mask_token else None
        )

    def _apply_mask(self, x: Tensor, mask: Tensor) -> Tensor:
        """Replace masked patch embeddings by the mask token (out of place, so autograd sees both paths)."""
        if self.mask_token is None:
            raise ValueError("a mask was given but this MaskedViT was built with mask_token=False")
        b = x.shape[0]
        grid = x.shape[1:-1]  # (h, w) for NHWC output (dynamic size) or (N,) for NLC output
        n = 1
        for s in grid:
            n *= s
        _check_mask(mask, b, n, tuple(grid))
        m = mask.reshape(b, *grid, 1)
        return torch.where(m, self.mask_token.to(x.dtype), x)  # (1, D) broadcasts over the grid

    def _mask_pixels(self, x: Tensor, mask: Tensor) -> Tensor:
        """Zero the pixels of masked patches (an overlapping stem would otherwise show them to their neighbours)."""
        p = self.patch_size
        b, h, w = x.shape[0], x.shape[-2] // p, x.shape[-1] // p
        _check_mask(mask, b, h * w, (h, w))
        m = mask.reshape(b, 1, h, w).repeat_interleave(p, dim=2).repeat_interleave(p, dim=3)
        return x.masked_fill(m, 0.0)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """Encode images, optionally masked.

        Args:
            x: (B, 3, H, W) with H and W multiples of the patch size.
            mask: (B, h, w) or (B, h*w) bool, True where the patch is replaced by the mask token; ``None`` for no
                masking. Pass an all-False mask rather than ``None`` to keep the mask token in the autograd graph
                (DDP without ``find_unused_parameters`` needs every parameter to take part in each backward).

        Returns:
            (B, 1 + N, D) final-normed tokens: [CLS] then the N patch tokens; register/distillation tokens dropped.
        """
        if x.ndim != 4:
            raise ValueError(f"expected images (B, 3, H, W), got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {self.patch_size}")
        vit = self.vit
        if mask is not None and self.stem == "conv":
            x = self._mask_pixels(x, mask)
        t = vit.patch_embed(x)
        if mask is not None:
            t = self._apply_mask(t, mask)
        t = vit._pos_embed(t)
        t = vit.patch_drop(t)
        t = vit.norm_pre(t)
        if vit.grad_checkpointing and not torch.jit.is_scripting():
            t = checkpoint_seq(vit.blocks, t)
        else:
            t = vit.blocks(t)
        t = vit.norm(t)
        if self.num_prefix_tokens == 1:
            return t
        return torch.cat([t[:, :1], t[:, self.num_prefix_tokens:]], dim=1)


__all__ = ["MaskedViT"]
