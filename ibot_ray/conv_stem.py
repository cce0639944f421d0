"""A convolutional stem for a timm ViT: ``model.stem: conv`` (not in iBOT; the small-image presets' option).

The plain ViT embeds each p x p patch with one linear map. "Early convolutions help transformers see better" (Xiao
et al., 2021) replaces that map by a few stride-2 3 x 3 convolutions and a 1 x 1 projection, which trains faster and
more stably. :class:`ConvStemPatchEmbed` is a drop-in for timm's ``PatchEmbed`` (``timm.create_model(arch,
embed_layer=ConvStemPatchEmbed)``): the same grid of ``p``-strided tokens, the same output format, only ``proj``
differs. For p = 2^k it has k convolutions whose widths double up to the embedding width (GroupNorm with one group
and GELU after each), then a 1 x 1 convolution to the embedding.

Masked image modelling and an overlapping stem: each token's receptive field (15 px at p = 8) reaches into its
neighbours' patches, so replacing a masked patch's *token* no longer hides its content from the rest of the image.
:class:`~ibot_ray.backbone.MaskedViT` therefore also zeroes the pixels of masked patches (the normalised mean colour)
before such a stem; a test checks that a masked patch's pixels then change no output token.
"""

from __future__ import annotations

from timm.layers import PatchEmbed
from torch import nn


def conv_stem_widths(patch_size: int, embed_dim: int) -> list[int]:
    """The widths of the stride-2 convolutions for a ``patch_size`` (a power of two, at least 2) stem."""
    if patch_size < 2 or patch_size & (patch_size - 1):
        raise ValueError(f"a convolutional stem needs a patch size that is a power of two >= 2, got {patch_size}")
    k = patch_size.bit_length() - 1
    return [max(1, embed_dim >> (k - 1 - i)) for i in range(k)]


class ConvStemPatchEmbed(PatchEmbed):
    """timm's ``PatchEmbed`` with a convolutional stem as its ``proj`` (module doc); takes ``PatchEmbed``'s
    arguments, so timm's ViT builds it through ``embed_layer``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        p = self.patch_size
        if p[0] != p[1]:
            raise ValueError(f"a convolutional stem needs square patches, got {tuple(p)}")
        in_chans, embed_dim = self.proj.in_channels, self.proj.out_channels
        layers: list[nn.Module] = []
        c = in_chans
        for width in conv_stem_widths(int(p[0]), embed_dim):
            layers += [nn.Conv2d(c, width, 3, stride=2, padding=1, bias=False), nn.GroupNorm(1, width), nn.GELU()]
            c = width
        layers.append(nn.Conv2d(c, embed_dim, 1))
        self.proj = nn.Sequential(*layers)

    def set_input_size(self, img_size=None, patch_size=None) -> None:
        if patch_size is not None and tuple(patch_size if isinstance(patch_size, (tuple, list)) else
                                            (patch_size, patch_size)) != tuple(self.patch_size):
            raise ValueError("a convolutional stem's patch size cannot be changed after it is built")
        super().set_input_size(img_size=img_size)


__all__ = ["ConvStemPatchEmbed", "conv_stem_widths"]
