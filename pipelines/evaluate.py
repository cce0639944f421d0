"""``ibot-ray eval``: what a pretraining run learned, measured on a labelled train/val pair.

:func:`load_model` accepts a run checkpoint (``state.pt``; a Ray checkpoint folder holding ``state.pt`` and
``config.yaml``; a run folder -> its latest ``step_*`` checkpoint; the *teacher* backbone is evaluated), an exported
``.safetensors`` backbone (``ibot_ray/export.py``), or a timm model name (always ``pretrained=False``: no weights are
downloaded, so a timm name means a random initialisation of that architecture).

:func:`evaluate` streams both splits in chunks (read -> decode -> views -> features; only the N x D features and
labels are kept): once for the model and its random init, and once more for the raw-pixel baseline, each decode at
the draft scale its own view needs, exactly as the run's online k-NN decodes them (so both report the same figures
for the same splits). It reports on the same splits:

* ``knn``: weighted k-NN (``eval.knn_k`` = 20, ``eval.knn_temperature`` = 0.07, cosine on L2-normalised [CLS]
  features of the backbone, eval view ``eval.image_size``), top-1 / top-5;
* ``linear``: the fixed linear-probe recipe of ``ibot_ray/linear_probe.py`` on the same frozen features;
* ``pixel_knn``: the raw-pixel k-NN baseline (definition in ``pipelines/knn_eval.py``; the better of raw and
  per-image mean-centred pixels, with the winner named);
* ``random_init_knn``: the same architecture with random weights (seeded by ``train.seed``; for a checkpoint it is
  exactly the run's initial teacher), through the same k-NN;
* ``gains``: k-NN top-1 minus each baseline's top-1, in points.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import yaml
from torch import nn

from ibot_ray.config import ConfigError, IBOTConfig, apply_overrides, load_config
from ibot_ray.knn import extract_features
from ibot_ray.linear_probe import RECIPE, linear_probe
from pipelines.knn_eval import (
    DEFAULT_CHUNK_SIZE,
    EvalDataError,
    FeatureBuffer,
    LabelledSource,
    eval_min_side,
    eval_view,
    iter_decoded,
    knn_accuracy,
    open_labelled_pair,
    pixel_baseline,
)


class ModelLoadError(ValueError):
    """MODEL is not a checkpoint, export or timm model name, or cannot be loaded; the message says why."""


@dataclass
class LoadedModel:
    backbone: nn.Module  # images -> (B, 1 + N, D) tokens or (B, D) features; the [CLS] feature is evaluated
    cfg: IBOTConfig  # eval settings (k, T, image size, columns) and the seed of the random-init baseline
    kind: str  # "checkpoint", "export" or "timm"
    description: str
    random_init: Callable[[], nn.Module]  # same architecture, random weights (seed: cfg.train.seed)
    note: str = ""  # printed once (e.g. "random initialisation")


# ---- model loading -----------------------------------------------------------------------------------------------


def _latest_checkpoint_dir(run: Path) -> Optional[Path]:
    cands = [p.parent for p in run.glob("step_*/state.pt")] or [p.parent for p in run.glob("*/step_*/state.pt")]
    return max(cands, key=lambda p: (p.name, str(p))) if cands else None


def _seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _random_teacher(cfg: IBOTConfig) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from ibot_ray.model import build_student_teacher

        return _seeded(cfg.train.seed, lambda: build_student_teacher(cfg)[1].backbone)
    return build


def _finish_cfg(cfg: IBOTConfig, what: str) -> IBOTConfig:
    try:
        cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"{what}: {e}") from None
    return cfg


def _load_checkpoint_model(state_path: Path, overrides: list[str]) -> LoadedModel:
    from ibot_ray.backbone import MaskedViT
    from ibot_ray.checkpoint import load_checkpoint
    from ibot_ray.export import _strip_to_timm_keys

    state = load_checkpoint(state_path)
    cfg_file = state_path.parent / "config.yaml"
    raw = cfg_file.read_text() if cfg_file.is_file() else state.get("config")
    cfg_dict = yaml.safe_load(raw) if isinstance(raw, str) else raw
    if not isinstance(cfg_dict, dict):
        raise ModelLoadError(f"checkpoint {state_path} has no config (no config.yaml beside it, no 'config' key)")
    cfg = IBOTConfig.from_dict(cfg_dict, validate=False)
    apply_overrides(cfg, overrides)
    _finish_cfg(cfg, f"config of {state_path}")
    if not isinstance(state.get("teacher"), dict):
        raise ModelLoadError(f"checkpoint {state_path} has no teacher state dict")
    m = cfg.model
    backbone = MaskedViT(m.arch, img_size=cfg.crops.global_crops_size, patch_size=m.patch_size, depth=m.depth,
                         embed_dim=m.embed_dim, num_heads=m.num_heads, stem=m.stem, mask_token=False)
    try:
        backbone.vit.load_state_dict(_strip_to_timm_keys(state["teacher"]), strict=True)
    except RuntimeError as e:
        raise ModelLoadError(f"checkpoint {state_path}: the teacher does not match its config's backbone: "
                             f"{str(e).splitlines()[0]}") from None
    desc = f"checkpoint {state_path} (teacher, step {state.get('step')}, {m.arch})"
    return LoadedModel(backbone, cfg, "checkpoint", desc, _random_teacher(cfg))


def _load_export_model(path: Path, config: Optional[str], overrides: list[str]) -> LoadedModel:
    import timm

    from ibot_ray.export import exported_metadata, load_exported

    try:
        meta = exported_metadata(path)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a bad header
        raise ModelLoadError(f"{path} is not a readable .safetensors file ({type(e).__name__}: {e})") from None
    arch = meta.get("arch")
    if not arch:
        raise ModelLoadError(f"export {path} has no 'arch' in its metadata (not written by ibot_ray/export.py?)")
    kwargs = dict(meta.get("timm_kwargs") or {})
    kwargs["dynamic_img_size"] = True  # the eval view need not be the training crop size
    cfg = load_config(config, validate=False)
    cfg.model.arch = arch
    cfg.model.patch_size = kwargs.get("patch_size") if isinstance(kwargs.get("patch_size"), int) else None
    cfg.model.depth = kwargs.get("depth")
    cfg.model.embed_dim = kwargs.get("embed_dim")
    cfg.model.num_heads = kwargs.get("num_heads")
    img = kwargs.get("img_size")
    if config is None and isinstance(img, int):
        cfg.eval.image_size = img  # evaluate at the pretraining crop size unless told otherwise
    apply_overrides(cfg, overrides)
    _finish_cfg(cfg, f"config for {path}")
    try:
        backbone = load_exported(path, dynamic_img_size=True)
    except Exception as e:  # noqa: BLE001 - timm raises RuntimeError / KeyError / ValueError on a mismatch
        raise ModelLoadError(f"cannot build {arch} from {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from None

    def random_init() -> nn.Module:
        return _seeded(cfg.train.seed, lambda: timm.create_model(arch, pretrained=False, num_classes=0, **kwargs))

    desc = f"export {path} ({arch}, {meta.get('which', 'teacher')}" + (f", step {meta['step']})" if "step" in meta
                                                                       else ")")
    return LoadedModel(backbone, cfg, "export", desc, random_init)


def _load_timm_model(name: str, config: Optional[str], overrides: list[str]) -> LoadedModel:
    import timm

    cfg = load_config(config, overrides, validate=False)
    note = (f"timm model {name}: random initialisation (pretrained=False: no weights are downloaded), seed "
            f"train.seed={cfg.train.seed}")
    vit = name.startswith(("vit_", "deit", "eva", "vit"))
    if vit:
        cfg.model.arch = name
        _finish_cfg(cfg, f"config for {name}")
        build = _random_teacher(cfg)
        desc = f"timm {name} (random init, patch {cfg.patch_size}, depth {cfg.model.depth or 'native'})"
    else:
        _finish_cfg(cfg, f"config for {name}")

        def build() -> nn.Module:
            return _seeded(cfg.train.seed, lambda: timm.create_model(name, pretrained=False, num_classes=0))
        desc = f"timm {name} (random init)"
    return LoadedModel(build(), cfg, "timm", desc, build, note)


def load_model(spec: str, *, config: Optional[str] = None, overrides: Optional[list[str]] = None) -> LoadedModel:
    """Load MODEL (see the module docstring) and the config that goes with it.

    For a checkpoint the config is the checkpoint's (``config.yaml`` beside ``state.pt``, else its ``config`` key);
    ``config`` is ignored and ``overrides`` apply on top. For an export or a timm name it is ``config`` (default: the
    base config; an export then evaluates at its recorded ``img_size``) with ``overrides``.
    """
    overrides = list(overrides or [])
    p = Path(spec).expanduser()
    if p.is_dir():
        if (p / "state.pt").is_file():
            return _load_checkpoint_model(p / "state.pt", overrides)
        latest = _latest_checkpoint_dir(p)
        if latest is None:
            raise ModelLoadError(f"model {spec!r} is a folder with no state.pt and no step_*/state.pt checkpoint")
        return _load_checkpoint_model(latest / "state.pt", overrides)
    if p.is_file():
        if p.suffix == ".safetensors":
            return _load_export_model(p, config, overrides)
        return _load_checkpoint_model(p, overrides)
    if "/" in spec or p.suffix in (".pt", ".pth", ".safetensors"):
        raise ModelLoadError(f"model {spec!r} does not exist")
    import timm

    if not timm.is_model(spec):
        raise ModelLoadError(f"model {spec!r} is neither a file/folder nor a timm model name")
    return _load_timm_model(spec, config, overrides)


# ---- evaluation --------------------------------------------------------------------------------------------------


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EvalDataError(f"--device {device}: CUDA is not available on this machine")
    return torch.device(device)


def _split_report(src, n: int, skipped: list) -> dict:
    return {"source": src.uri, "format": src.format, "listed": src.num_listed, "selected": len(src), "images": n,
            "skipped": len(skipped), "skipped_examples": [f"{k} ({why})" for k, why in skipped[:5]],
            "unlabelled_rows": src.unlabelled_rows}


def evaluate(model: LoadedModel, train: str | LabelledSource, val: str | LabelledSource, *, device: str = "auto",
             max_images: Optional[int] = None, linear: bool = True, baselines: bool = True,
             chunk_size: int = DEFAULT_CHUNK_SIZE, log: Optional[Callable[[str], None]] = None) -> dict:
    """k-NN, linear probe and the two baselines of ``model`` on ``train`` (memory bank) / ``val`` (queries): sources,
    or splits listed already (a run's evaluation plan, pipelines/eval_split.py; ``max_images`` then does not apply).

    Returns the JSON-ready result (see the module docstring; percentages, gains in points)."""
    log = log or (lambda s: None)
    t0 = time.time()
    cfg = model.cfg
    dev = resolve_device(device)
    if isinstance(train, LabelledSource):
        bank_src, query_src = train, val
    else:
        bank_src, query_src = open_labelled_pair(train, val, cfg, max_images=max_images)
    num_classes = bank_src.label_map.num_classes
    encoders = {"model": model.backbone.to(dev).eval()}
    if baselines:
        encoders["random"] = model.random_init().to(dev).eval()
    size = cfg.eval.image_size
    views = {"eval": eval_view(size)}
    min_side = eval_min_side(size)  # the eval view's own draft scale, as the online k-NN decodes it

    feats: dict[str, dict] = {}
    labels: dict[str, torch.Tensor] = {}
    reports: dict[str, dict] = {}
    t_feat = time.time()
    for name, src in (("train", bank_src), ("val", query_src)):
        bufs = {k: FeatureBuffer(len(src)) for k in encoders}
        ys, skipped = [], []
        for chunk in iter_decoded(src, views, cfg, chunk_size=chunk_size, min_side=min_side):
            skipped += chunk.skipped
            if not len(chunk.labels):
                continue
            for k, enc in encoders.items():
                bufs[k].add(extract_features(enc, [chunk.views["eval"]], device=dev))
            ys.append(chunk.labels)
        if not ys:
            raise EvalDataError(f"{name} split {src.uri!r}: no decodable labelled images")
        feats[name] = {k: b.result() for k, b in bufs.items()}
        labels[name] = torch.cat(ys)
        reports[name] = _split_report(src, len(labels[name]), skipped)
        log(f"{name}: {len(labels[name])} images featurised ({len(skipped)} undecodable skipped)")
    pix = None
    if baselines:  # its own decode of both splits, as the online k-NN's baseline (pipelines/knn_eval.py)
        pix = pixel_baseline(bank_src, query_src, cfg, num_classes, device=dev, chunk_size=chunk_size)
    t_feat = time.time() - t_feat

    def knn(key: str) -> dict:
        return knn_accuracy(feats["train"][key].to(dev), labels["train"], feats["val"][key], labels["val"], cfg,
                            num_classes)

    t_knn = time.time()
    result: dict = {
        "model": {"spec": model.description, "kind": model.kind, "note": model.note},
        "train": reports["train"], "val": reports["val"], "num_classes": num_classes,
        "feature_dim": int(feats["train"]["model"].shape[1]), "device": str(dev),
        "eval_image_size": size,
        "knn": {**knn("model"), "k": cfg.eval.knn_k, "temperature": cfg.eval.knn_temperature},
        "linear": None, "pixel_knn": None, "random_init_knn": None, "gains": {},
    }
    if baselines:
        result["pixel_knn"] = pix
        result["random_init_knn"] = {**knn("random"), "seed": cfg.train.seed}
        result["gains"] = {
            "knn_top1_over_pixel_knn": result["knn"]["top1"] - pix["top1"],
            "knn_top1_over_random_init_knn": result["knn"]["top1"] - result["random_init_knn"]["top1"],
        }
    t_knn = time.time() - t_knn
    t_lin = time.time()
    if linear:
        lp = linear_probe(feats["train"]["model"], labels["train"], feats["val"]["model"], labels["val"],
                          num_classes=num_classes, device=dev)
        result["linear"] = lp
        if baselines:
            result["gains"]["linear_top1_over_pixel_knn"] = lp["top1"] - result["pixel_knn"]["top1"]
    t_lin = time.time() - t_lin
    result["timings_s"] = {"features": round(t_feat, 2), "knn": round(t_knn, 2), "linear": round(t_lin, 2),
                           "total": round(time.time() - t0, 2)}
    return result


def format_table(r: dict) -> str:
    """The human-readable summary ``ibot-ray eval`` prints."""
    t, v = r["train"], r["val"]
    lines = [
        f"model: {r['model']['spec']}",
        f"train: {t['source']}: {t['images']} images ({t['skipped']} undecodable skipped)",
        f"val:   {v['source']}: {v['images']} images ({v['skipped']} undecodable skipped)",
        f"{r['num_classes']} classes, {r['feature_dim']}-d features at {r['eval_image_size']} px, device "
        f"{r['device']}",
        "",
        f"{'metric':<46} {'top-1':>7} {'top-5':>7}",
    ]

    def row(name: str, d: Optional[dict]) -> None:
        if d is not None:
            lines.append(f"{name:<46} {d['top1']:>7.2f} {d['top5']:>7.2f}")

    k = r["knn"]
    row(f"k-NN (k={k['k']}, T={k['temperature']:g})", k)
    if r["linear"] is not None:
        row(f"linear probe ({r['linear']['steps']} AdamW steps)", r["linear"])
    if r["pixel_knn"] is not None:
        p = r["pixel_knn"]
        row(f"raw-pixel k-NN ({p['variant']}, {p['view']})", p)
    if r["random_init_knn"] is not None:
        row(f"random-init k-NN (seed {r['random_init_knn']['seed']})", r["random_init_knn"])
    g = r["gains"]
    if g:
        lines.append("")
        lines.append(f"k-NN top-1 gain over raw pixels: {g['knn_top1_over_pixel_knn']:+.2f} points; "
                     f"over random init: {g['knn_top1_over_random_init_knn']:+.2f} points")
    for name, s in (("train", t), ("val", v)):
        if s["skipped"]:
            examples = ", ".join(s["skipped_examples"][:2])
            lines.append(f"{name}: skipped {s['skipped']} undecodable images, e.g. {examples}")
    lines.append(f"wall time {r['timings_s']['total']:.1f} s (features {r['timings_s']['features']:.1f} s, "
                 f"k-NN {r['timings_s']['knn']:.1f} s, linear {r['timings_s']['linear']:.1f} s)")
    return "\n".join(lines)


def write_json(result: dict, path: str) -> None:
    p = Path(path)
    if p.parent != Path(""):
        p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(result, indent=2) + "\n")


__all__ = ["LoadedModel", "ModelLoadError", "RECIPE", "evaluate", "format_table", "load_model", "resolve_device",
           "write_json"]
