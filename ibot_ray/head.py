"""iBOT projection head: a shared MLP, L2 normalisation, and weight-normed prototype layers.

The MLP (and its bottleneck) is shared by the [CLS] and patch tokens; only the final prototype matrix may differ
(``shared_head=False`` gives the patches their own ``last_layer2``). The prototypes are a bias-free Linear under
weight normalisation with the magnitude ``g`` set to 1; with ``norm_last_layer`` it stays frozen at 1, so the
logits are cosine similarities between the normalised bottleneck and the prototype directions.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import weight_norm


def _prototypes(bottleneck_dim: int, out_dim: int, norm_last_layer: bool) -> nn.Linear:
    """Weight-normed bias-free Linear(bottleneck_dim, out_dim) with g = 1 (frozen when ``norm_last_layer``)."""
    layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
    g = layer.parametrizations.weight.original0
    g.data.fill_(1.0)
    g.requires_grad_(not norm_last_layer)
    return layer


class IBOTHead(nn.Module):
    """MLP -> L2 normalise -> prototypes, for [CLS] and patch tokens.

    Args:
        in_dim: backbone embedding size.
        out_dim: number of [CLS] prototypes K.
        patch_out_dim: number of patch prototypes (ignored when ``shared_head``: patches then use the K prototypes).
        hidden_dim, bottleneck_dim, nlayers: MLP shape; ``nlayers=1`` is a single Linear(in_dim, bottleneck_dim).
        norm_last_layer: freeze the weight-norm magnitudes at 1.
        shared_head: patches use the very same prototype module as [CLS] (``last_layer2 is last_layer``).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 8192,
        patch_out_dim: int = 8192,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        norm_last_layer: bool = True,
        shared_head: bool = False,
    ) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers must be >= 1, got {nlayers}")
        for name, v in (("in_dim", in_dim), ("out_dim", out_dim), ("patch_out_dim", patch_out_dim),
                        ("hidden_dim", hidden_dim), ("bottleneck_dim", bottleneck_dim)):
            if v < 1:
                raise ValueError(f"{name} must be positive, got {v}")
        if nlayers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.mlp.apply(self._init_weights)
        self.shared_head = shared_head
        self.out_dim = out_dim
        self.patch_out_dim = out_dim if shared_head else patch_out_dim
        # Registered first, so a shared module's parameters are named "last_layer.*" (named_parameters dedups).
        self.last_layer = _prototypes(bottleneck_dim, out_dim, norm_last_layer)
        self.last_layer2 = self.last_layer if shared_head else _prototypes(bottleneck_dim, patch_out_dim,
                                                                           norm_last_layer)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def _embed(self, x: Tensor) -> Tensor:
        return F.normalize(self.mlp(x), dim=-1)

    def forward(self, tokens: Tensor, patch_rows: Optional[Tensor] = None, *,
                patch_mean: bool = False) -> tuple[Tensor, ...]:
        """(B, 1+N, D) tokens -> ([CLS] logits (B, out_dim), patch logits (B, N, patch_out_dim)).

        ``patch_rows``: the patch tokens to put through the prototypes, as a bool (B, N) selection (the student's
        mask) or as their flat positions in (B*N), int64 ascending (:func:`ibot_ray.loss.mask_positions`, built on
        the host: a bool selection on a device costs a device-to-host sync). The patch logits are then (M,
        patch_out_dim) for the M selected tokens, in row-major order (image, then position), as ``logits[patch_rows]``
        would give them: L_mim reads nothing else, and the head is a per-token map, so the values are those of the
        full computation at a fraction of its cost.

        ``patch_mean``: also return each image's mean patch logits over all N tokens, (B, patch_out_dim) in float32,
        which the patch centre averages. The prototype layer is linear, so that is the prototypes of the mean
        normalised bottleneck feature: the MLP still runs on every token, the (B, N, patch_out_dim) logits are
        never made."""
        if tokens.ndim != 3 or tokens.shape[1] < 2:
            raise ValueError(f"expected tokens (B, 1+N, D) with N >= 1, got shape {tuple(tokens.shape)}")
        b, n = tokens.shape[0], tokens.shape[1] - 1
        index = None
        if patch_rows is not None:
            if patch_rows.dtype == torch.bool:
                if patch_rows.shape[0] != b or patch_rows[0].numel() != n:
                    raise ValueError(f"patch_rows: expected bool ({b}, {n}), got {tuple(patch_rows.shape)}")
                index = torch.nonzero(patch_rows.reshape(-1)).squeeze(1)
            elif patch_rows.dtype == torch.int64 and patch_rows.ndim == 1:
                index = patch_rows
            else:
                raise ValueError(f"patch_rows: expected bool ({b}, {n}) or int64 flat positions (M,), got "
                                 f"{patch_rows.dtype} {tuple(patch_rows.shape)}")
        mean = None
        if index is None and not patch_mean:
            z = self._embed(tokens)
            cls_z, patch_z = z[:, 0], z[:, 1:]
        elif patch_mean:  # every token through the MLP (the mean needs them all), the prototypes on the selection
            z = self._embed(tokens)
            cls_z, patch_z = z[:, 0], z[:, 1:]
            with torch.autocast(device_type=tokens.device.type, enabled=False):
                mean = self.last_layer2(patch_z.mean(dim=1, dtype=torch.float32))
            if index is not None:
                patch_z = patch_z.reshape(b * n, -1).index_select(0, index)
        else:  # the MLP only on [CLS] and the selected tokens
            sel = tokens[:, 1:].reshape(b * n, -1).index_select(0, index)
            z = self._embed(torch.cat([tokens[:, 0], sel]))  # (B + M, D)
            cls_z, patch_z = z[:b], z[b:]
        if self.shared_head and patch_z.ndim == 3:  # one matmul for all tokens; both outputs are views of it
            logits = self.last_layer(z)
            out = (logits[:, 0], logits[:, 1:])
        elif self.shared_head:  # one matmul for [CLS] and the selected tokens
            logits = self.last_layer(torch.cat([cls_z, patch_z]))
            out = (logits[:b], logits[b:])
        else:
            out = (self.last_layer(cls_z), self.last_layer2(patch_z))
        return out if mean is None else (*out, mean)

    def forward_cls(self, cls_token: Tensor) -> Tensor:
        """(B, D) [CLS] tokens -> (B, out_dim) logits (local crops: no patch logits)."""
        if cls_token.ndim != 2:
            raise ValueError(f"expected [CLS] tokens (B, D), got shape {tuple(cls_token.shape)}")
        return self.last_layer(self._embed(cls_token))


__all__ = ["IBOTHead"]
