"""Export a pretrained backbone as a timm-loadable ``.safetensors`` file.

The file holds exactly the timm VisionTransformer's state dict (``MaskedViT.vit``), so

    timm.create_model(arch, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=path), **timm_kwargs)

loads it with no missing or unexpected keys. ``timm_kwargs`` (``img_size``, ``patch_size``, ``dynamic_img_size``,
``depth``, ``embed_dim``, ``num_heads``) and ``arch`` are recorded in the file's metadata; :func:`load_exported` does
the call above from them.

A backbone with a convolutional stem (``model.stem: conv``) is a timm ViT built with ``embed_layer=
ibot_ray.conv_stem.ConvStemPatchEmbed``; its metadata names that layer (``embed_layer``) and :func:`load_exported`
passes it to timm.

The iBOT mask token is left out on purpose: besides not being part of a timm ViT, a top-level ``mask_token`` key
makes timm's ViT checkpoint filter treat the file as a DINOv2 checkpoint.
As in the reference, the teacher is exported by default (it is "generally better" for downstream use).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import yaml
from safetensors.torch import save_file
from torch import Tensor, nn

from ibot_ray.checkpoint import CheckpointError, load_checkpoint, unwrap_model
from ibot_ray.conv_stem import ConvStemPatchEmbed

PathLike = Union[str, Path]
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
#: the metadata value naming the convolutional stem's embed layer (``model.stem: conv``)
CONV_STEM_LAYER = f"{ConvStemPatchEmbed.__module__}.{ConvStemPatchEmbed.__qualname__}"


def _timm_vit(backbone: nn.Module) -> nn.Module:
    """The timm model inside a MaskedViT (``.vit``), or ``backbone`` itself when it is already the timm model."""
    backbone = unwrap_model(backbone)
    vit = getattr(backbone, "vit", backbone)
    if not isinstance(vit, nn.Module):
        raise TypeError(f"backbone.vit must be an nn.Module, got {type(vit).__qualname__}")
    return unwrap_model(vit)


def backbone_state_dict(backbone: nn.Module) -> dict[str, Tensor]:
    """The timm model's state dict (keys as timm names them), as detached contiguous CPU copies; no mask token."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in _timm_vit(backbone).state_dict().items()}


def _timm_kwargs(vit: nn.Module) -> dict[str, Any]:
    """The create_model kwargs that reproduce ``vit``'s shapes (read from its patch embedding)."""
    kwargs: dict[str, Any] = {}
    pe = getattr(vit, "patch_embed", None)
    if pe is not None:
        img = getattr(pe, "img_size", None)
        patch = getattr(pe, "patch_size", None)
        if img is not None:
            img = [int(v) for v in img]
            kwargs["img_size"] = img[0] if img[0] == img[1] else img
        if patch is not None:
            patch = [int(v) for v in patch]
            kwargs["patch_size"] = patch[0] if patch[0] == patch[1] else patch
    if hasattr(vit, "dynamic_img_size"):
        kwargs["dynamic_img_size"] = bool(vit.dynamic_img_size)
    if isinstance(getattr(vit, "blocks", None), nn.Sequential):  # model.depth may override the arch's block count
        kwargs["depth"] = len(vit.blocks)
        if len(vit.blocks) and hasattr(vit.blocks[0], "attn"):  # model.embed_dim / num_heads may override them too
            kwargs["num_heads"] = int(vit.blocks[0].attn.num_heads)
    if getattr(vit, "embed_dim", None):
        kwargs["embed_dim"] = int(vit.embed_dim)
    return kwargs


def _depth_from_keys(tensors: dict[str, Tensor]) -> Optional[int]:
    """Number of transformer blocks in a timm ViT state dict (``blocks.<i>.`` keys), None without blocks."""
    indices = {int(k.split(".")[1]) for k in tensors if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    return max(indices) + 1 if indices else None


def _metadata_strings(metadata: dict) -> dict[str, str]:
    """safetensors metadata is str -> str: strings stay, anything else is stored as JSON."""
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}


def _write_safetensors(tensors: dict[str, Tensor], path: PathLike, metadata: dict) -> Path:
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"export path {path} must end in .safetensors (timm picks the loader by extension)")
    if not tensors:
        raise ValueError(f"nothing to export to {path}: the state dict is empty")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_name, metadata=_metadata_strings(metadata))
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def export_backbone(backbone: nn.Module, path: PathLike, *, metadata: Optional[dict] = None) -> Path:
    """Write the backbone's timm weights to ``path`` (``.safetensors``, written atomically); returns the path.

    Metadata records ``arch`` (when timm knows it) and ``timm_kwargs`` (JSON), plus the caller's ``metadata``.
    """
    vit = _timm_vit(backbone)
    meta: dict[str, Any] = {"format": "pt", "producer": "ibot_ray", "timm_kwargs": _timm_kwargs(vit)}
    if isinstance(getattr(vit, "patch_embed", None), ConvStemPatchEmbed):
        meta["embed_layer"] = CONV_STEM_LAYER
    arch = (getattr(vit, "pretrained_cfg", None) or {}).get("architecture")
    if arch:
        meta["arch"] = arch
    meta.update(metadata or {})
    return _write_safetensors(backbone_state_dict(vit), path, meta)


def _strip_to_timm_keys(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """IBOTModel keys (``[module.]backbone.vit.<timm key>``) -> timm keys; head and mask token are dropped.

    Also accepts a bare MaskedViT state dict (``vit.<key>``, ``mask_token``) or a plain timm one.
    """
    def strip_wrappers(key: str) -> str:
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        return key

    sd = {strip_wrappers(k): v for k, v in state_dict.items()}
    for prefix in ("backbone.", "vit."):
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    sd.pop("mask_token", None)
    return sd


def export_from_checkpoint(checkpoint_path: PathLike, out_path: PathLike, *, which: str = "teacher") -> Path:
    """Export the ``teacher`` (default) or ``student`` backbone of a training checkpoint as timm safetensors.

    The metadata gets ``arch`` and ``timm_kwargs`` from the checkpoint's config (``model.arch``, ``model.patch_size``,
    ``crops.global_crops_size``; ``depth`` counted from the weights), plus ``which``, ``epoch`` and ``step``.
    """
    if which not in ("teacher", "student"):
        raise ValueError(f"which must be 'teacher' or 'student', got {which!r}")
    state = load_checkpoint(checkpoint_path)
    if not isinstance(state.get(which), dict):
        raise CheckpointError(f"checkpoint {checkpoint_path} has no {which!r} state dict")
    tensors = {k: v.detach().cpu().contiguous() for k, v in _strip_to_timm_keys(state[which]).items()}
    if not tensors:
        raise CheckpointError(f"checkpoint {checkpoint_path}: the {which!r} state dict has no backbone weights")
    meta: dict[str, Any] = {"format": "pt", "producer": "ibot_ray", "which": which}
    for key in ("epoch", "step"):
        if isinstance(state.get(key), int):
            meta[key] = state[key]
    config = state.get("config")
    if isinstance(config, str):
        try:
            config = yaml.safe_load(config)
        except yaml.YAMLError:
            config = None
    if isinstance(config, dict):
        meta.update(export_metadata(config, tensors))
    return _write_safetensors(tensors, out_path, meta)


def export_metadata(config: dict, tensors: Optional[dict[str, Tensor]] = None) -> dict[str, Any]:
    """``{"arch", "timm_kwargs"}`` of an export, from a run config (as a dict) and, where the config leaves a value
    to the architecture, from the weights: ``img_size`` (the global crop size), ``patch_size``, ``depth``,
    ``embed_dim``, ``num_heads`` and ``dynamic_img_size``, everything ``timm.create_model`` needs to rebuild it, and
    ``embed_layer`` for a convolutional stem."""
    model = config.get("model") or {}
    crops = config.get("crops") or {}
    tensors = tensors or {}
    kwargs: dict[str, Any] = {"dynamic_img_size": True}
    if crops.get("global_crops_size"):
        kwargs["img_size"] = int(crops["global_crops_size"])
    if model.get("patch_size"):
        kwargs["patch_size"] = int(model["patch_size"])
    elif "patch_embed.proj.weight" in tensors:
        kwargs["patch_size"] = int(tensors["patch_embed.proj.weight"].shape[-1])
    depth = model.get("depth") or _depth_from_keys(tensors)
    if depth is not None:
        kwargs["depth"] = int(depth)
    if model.get("embed_dim") or "cls_token" in tensors:
        kwargs["embed_dim"] = int(model.get("embed_dim") or tensors["cls_token"].shape[-1])
    if model.get("num_heads"):  # not recoverable from the weights
        kwargs["num_heads"] = int(model["num_heads"])
    meta: dict[str, Any] = {"timm_kwargs": kwargs}
    if model.get("stem") == "conv":
        meta["embed_layer"] = CONV_STEM_LAYER
    if model.get("arch"):
        meta["arch"] = model["arch"]
    return meta


def exported_metadata(path: PathLike) -> dict[str, Any]:
    """Read an export's metadata back (JSON values decoded), e.g. to rebuild it with ``timm.create_model``."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
    out: dict[str, Any] = {}
    for k, v in raw.items():
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    return out


def load_exported(path: PathLike, arch: Optional[str] = None, **kwargs: Any) -> nn.Module:
    """Build the timm model for an export (arch and kwargs from its metadata unless given) with its weights."""
    import timm

    meta = exported_metadata(path)
    arch = arch or meta.get("arch")
    if not arch:
        raise ValueError(f"{path}: no 'arch' in the metadata; pass arch=")
    create_kwargs = {**(meta.get("timm_kwargs") or {}), **kwargs}
    create_kwargs.setdefault("num_classes", 0)
    layer = meta.get("embed_layer")
    if layer is not None and "embed_layer" not in kwargs:
        if layer != CONV_STEM_LAYER:
            raise ValueError(f"{path}: unknown embed_layer {layer!r} in the metadata; pass embed_layer=")
        create_kwargs["embed_layer"] = ConvStemPatchEmbed
    return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **create_kwargs)


__all__ = ["backbone_state_dict", "export_backbone", "export_from_checkpoint", "export_metadata", "exported_metadata",
           "load_exported"]
