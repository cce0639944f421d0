"""One typed configuration for an iBOT pretraining run.

The defaults of every dataclass are the paper's ViT-S/16 recipe (``vit_small_16``); the other presets are
YAML files in ``ibot_ray/configs/`` that override some fields. A config is resolved as

    defaults  <-  preset or --config YAML  <-  --set section.field=value overrides

and validated up front: a bad value raises :class:`ConfigError` naming the field.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

import yaml

PRESET_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


#: The value a preset or YAML file gives a field to have it derived from the planned run (ibot_ray/recipe.py).
AUTO = "auto"
#: The fields that may be ``auto``.
AUTO_FIELDS = ("optim.momentum_teacher", "optim.warmup_epochs", "loss.warmup_teacher_temp_epochs",
               "optim.freeze_last_layer", "crops.blur_sigma", "data.actor_batch_size")
#: The highest unreadable fraction of a source that a training stream is sized for (``data.expected_bad_fraction``
#: and the measured one; pipelines/ingest.py stream_epochs): 10 data epochs per training epoch.
MAX_BAD_FRACTION = 0.9
#: The fields that may be ``auto`` and are sized to the cluster when the run starts (pipelines/cluster_plan.py).
CLUSTER_AUTO_FIELDS = ("train.num_workers", "data.actors", "optim.micro_batch_size")
#: The experiment trackers ``train.loggers`` may name, with the modules each needs and the extra that installs them.
LOGGERS = {"tensorboard": ((), None), "mlflow": (("mlflow", "sqlalchemy", "alembic"), "mlflow"),
           "wandb": (("wandb",), "wandb")}


@dataclass
class ModelConfig:
    arch: str = "vit_small_patch16_224"  # any timm Vision Transformer
    patch_size: Optional[int] = None  # None: the timm architecture's own patch size
    depth: Optional[int] = None  # None: the architecture's own number of blocks (smaller for CPU demos)
    embed_dim: Optional[int] = None  # None: the architecture's own width
    num_heads: Optional[int] = None  # None: the architecture's own number of attention heads
    # "patch": timm's linear patch embedding (iBOT's); "conv": a convolutional stem (ibot_ray/conv_stem.py), for
    # small images; its exports load into timm with embed_layer=ibot_ray.conv_stem.ConvStemPatchEmbed
    stem: str = "patch"
    drop_path_rate: float = 0.1  # student only; the teacher has none


@dataclass
class HeadConfig:
    out_dim: int = 8192  # K, prototypes for the [CLS] token
    patch_out_dim: int = 8192  # prototypes for patch tokens (used when shared_head is False)
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    nlayers: int = 3
    norm_last_layer: bool = False  # the ViT-S recipe trains the prototype norms
    shared_head: bool = True  # patch tokens use the [CLS] prototype layer (student)
    shared_head_teacher: bool = True


@dataclass
class CropsConfig:
    global_crops_number: int = 2
    global_crops_size: int = 224
    global_crops_scale: tuple[float, float] = (0.25, 1.0)
    local_crops_number: int = 10
    local_crops_size: int = 96
    local_crops_scale: tuple[float, float] = (0.05, 0.25)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    color_jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    global_blur_p: tuple[float, ...] = (1.0, 0.1)  # per global crop; later crops reuse the last value
    local_blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    global_solarize_p: tuple[float, ...] = (0.0, 0.2)  # per global crop; later crops reuse the last value
    solarize_threshold: int = 128


@dataclass
class MaskingConfig:
    enabled: bool = True
    shape: str = "block"  # "block" (BEiT-style) or "rand"
    ratio: tuple[float, ...] = (0.0, 0.3)  # one of these is chosen per crop ...
    ratio_var: tuple[float, ...] = (0.0, 0.2)  # ... and drawn from U(ratio - var, ratio + var)
    aspect_min: float = 0.3  # block aspect ratio range is (aspect_min, 1 / aspect_min)
    start_epoch: int = 0  # no masking before this epoch


@dataclass
class LossConfig:
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    teacher_patch_temp: float = 0.07
    warmup_teacher_patch_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 30
    center_momentum: float = 0.9
    center_momentum_patch: float = 0.9
    lambda_cls: float = 1.0
    lambda_mim: float = 1.0
    # weight of DINOv2's KoLeo regulariser on the student's global-view backbone [CLS] (0: off, as in iBOT)
    lambda_koleo: float = 0.0


@dataclass
class OptimConfig:
    epochs: int = 800
    batch_size: int = 1024  # global batch, over all workers
    # per-worker forward size for gradient accumulation (0: whole per-worker batch; auto: the largest that keeps a
    # rank at the elastic minimum world size within train.images_per_device, pipelines/cluster_plan.py)
    micro_batch_size: int = 0
    lr: float = 5e-4  # per 256 images; the peak lr is lr * batch_size / 256
    min_lr: float = 1e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum_teacher: float = 0.996
    momentum_teacher_end: float = 1.0
    momentum_schedule: str = "cosine"  # shape of the teacher momentum schedule: cosine (paper), linear or constant
    clip_grad: float = 3.0  # per-parameter norm clip (0: off)
    freeze_last_layer: int = 1  # epochs during which the prototype layer gets no update
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    precision: str = "auto"  # "auto" (bf16 on GPU, fp32 on CPU), "bf16", "fp16" or "fp32"
    max_nonfinite_steps: int = 10  # consecutive non-finite losses before the run stops


@dataclass
class DataConfig:
    source: str = "demo"  # "demo", a folder, Parquet file(s)/folder, or a URI (s3://, gs://, file://)
    format: str = "auto"  # "auto", "folder" or "parquet"
    image_column: str = "image"
    label_column: str = "label"
    # the labelled split the online k-NN, its baselines and the closing verdict are measured on (pipelines/
    # eval_split.py): "auto" = the demo's test split for the demo, a held-out split of a labelled source (kept out of
    # training), none for an unlabelled one; or a labelled source ("demo": the demo's test split); null: no k-NN
    eval_source: Optional[str] = "auto"
    eval_train_source: Optional[str] = None  # labelled k-NN memory bank (default: the labelled training source)
    eval_max_images: int = 2000  # each split (memory bank, queries) at most this many images
    eval_holdout_fraction: float = 0.1  # share of a labelled source held out for the k-NN (eval_source: auto)
    actors: tuple[int, int] = (1, 4)  # autoscaling CPU actor pool (min, max) for decode + augment (auto: the CPU nodes)
    actor_resource: Optional[str] = None  # custom resource the actors need (node pinning; auto-set on clusters)
    cpus_per_actor: float = 1.0
    actor_batch_size: int = 16  # images per actor call and per Data block (auto: about 2 MiB of crops per block)
    prefetch_batches: int = 2
    local_shuffle_buffer_size: int = 0  # rows; 0 disables the per-worker local shuffle
    max_image_pixels: int = 89_478_485  # decompression-bomb limit (PIL's default)
    # unreadable share of the listed files that the training stream's data epochs allow for from the start; the
    # fraction the run has measured is used once higher (pipelines/ingest.py stream_epochs)
    expected_bad_fraction: float = 0.0
    # Ray Data's scheduling loop (in the training stream's coordinator) spins while its output is backpressured;
    # at most one loop step per this many ms (0: Ray's own loop). pipelines/ingest.py SchedulingLoopPacer
    executor_min_step_ms: float = 20.0
    seed: int = 0


@dataclass
class TrainConfig:
    num_workers: tuple[int, int] = (1, 1)  # (min, max); min < max makes the run elastic (auto: the GPUs the cluster
    # has or can launch, pipelines/cluster_plan.py)
    use_gpu: str = "auto"  # "auto", "true" or "false"
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    worker_resource: Optional[str] = None  # custom resource every training worker needs one unit of (node pinning)
    checkpoint_every_steps: int = 500  # plus one at every epoch end
    # scheduled checkpoints (every checkpoint_every_steps, epoch ends) at least this far apart in time, so tiny
    # epochs do not checkpoint every few seconds; the last, just-in-time (preemption) and stop-on-collapse ones always
    checkpoint_min_interval_s: float = 60.0
    keep_checkpoints: int = 3
    max_failures: int = -1  # worker/node failures (not preemptions) before the run fails; -1: unlimited
    max_preemption_failures: int = -1
    max_repeated_errors: int = 3  # the same worker exception ending this many attempts without progress: end (0: off)
    worker_start_timeout_s: int = 30
    images_per_device: int = 0  # images one forward pass may hold on a device (0: estimated on GPU, no limit on CPU)
    # torch.compile the backbone and the head MLP in place, names kept: auto, true or false (auto: on CUDA, not on a
    # CPU, where no gain is measured; ibot_ray/step.py compile_model)
    compile: str = "auto"
    elastic_resize_interval_s: float = 60.0
    log_every_steps: int = 10
    knn_every_epochs: int = 1  # online k-NN on data.eval_source (0: off)
    driver_resource: Optional[str] = None  # custom resource the driver/trainer must run on (e.g. "TRAIN_DRIVER")
    stop_on_collapse: bool = False  # end the run (after a checkpoint) when a collapse is detected (ibot_ray/health.py)
    check_preemption: bool = True  # poll Ray Train's preemption info at each log step; checkpoint just in time
    seed: int = 0
    # Experiment trackers rank 0 writes every metrics row to, besides logs/metrics.jsonl (pipelines/metrics.py):
    # any of LOGGERS; mlflow and wandb need their extras (pip install "ibot-ray[mlflow]" / "ibot-ray[wandb]")
    loggers: tuple[str, ...] = ("tensorboard",)
    mlflow_tracking_uri: Optional[str] = None  # None: a SQLite store in the run's logs folder (logs/mlflow.db)
    mlflow_experiment: str = "ibot-ray"
    wandb_project: str = "ibot-ray"
    wandb_entity: Optional[str] = None  # None: the W&B account's default entity
    wandb_mode: str = "auto"  # online, offline (no network: files under logs/wandb), or auto: WANDB_MODE, else online


@dataclass
class EvalConfig:
    knn_k: int = 20
    knn_temperature: float = 0.07
    image_size: int = 224  # resize shorter side to size / 0.875, then center crop to this size


@dataclass
class IBOTConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    # ---- conversion -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        def conv(v):
            if is_dataclass(v):
                return {f.name: conv(getattr(v, f.name)) for f in fields(v)}
            if isinstance(v, tuple):
                return [conv(x) for x in v]
            return v

        return conv(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: Union[str, Path]) -> None:
        Path(path).write_text(self.to_yaml())

    @classmethod
    def from_dict(cls, d: dict, *, validate: bool = True) -> IBOTConfig:
        cfg = cls()
        merge_into(cfg, d or {})
        if validate:
            cfg.validate()
        return cfg

    # ---- derived values ----------------------------------------------------------------------
    @property
    def patch_size(self) -> int:
        if self.model.patch_size:
            return int(self.model.patch_size)
        return timm_patch_size(self.model.arch)

    def grid(self, crop_size: int) -> tuple[int, int]:
        p = self.patch_size
        return crop_size // p, crop_size // p

    @property
    def elastic(self) -> bool:
        if self.train.num_workers == AUTO:
            raise ConfigError("train.num_workers: 'auto' is sized to the cluster when the run starts "
                              "(pipelines/cluster_plan.py)")
        lo, hi = self.train.num_workers
        return lo < hi

    def validate(self) -> IBOTConfig:
        validate(self)
        return self


# ---- merging and overrides -------------------------------------------------------------------


def _coerce(value: Any, tp: Any, name: str) -> Any:
    origin = get_origin(tp)
    args = get_args(tp)
    if origin is Union:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], name)
    if origin is tuple:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",")]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], name) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{name}: expected {len(args)} values, got {list(value)!r}")
        return tuple(_coerce(v, a, name) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                pass
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{name}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            if isinstance(value, bool):
                return str(value).lower()
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return value
    return value


def merge_into(obj: Any, d: dict, prefix: str = "") -> None:
    """Merge a nested dict into a config dataclass, type-checking every value."""
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {d!r}")
    hints = get_type_hints(type(obj))
    known = {f.name for f in fields(obj)}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if key not in known:
            raise ConfigError(f"{name}: unknown field (known: {', '.join(sorted(known))})")
        current = getattr(obj, key)
        if is_dataclass(current):
            merge_into(current, value, prefix=f"{name}.")
        elif name in AUTO_FIELDS + CLUSTER_AUTO_FIELDS and isinstance(value, str) and value.strip().lower() == AUTO:
            setattr(obj, key, AUTO)
        elif isinstance(value, str) and value.strip().lower() == AUTO \
                and str not in (hints[key], *get_args(hints[key])):
            raise ConfigError(f"{name}: 'auto' is only allowed for {', '.join(AUTO_FIELDS + CLUSTER_AUTO_FIELDS)}")
        else:
            setattr(obj, key, _coerce(value, hints[key], name))


def apply_overrides(cfg: IBOTConfig, overrides: list[str]) -> IBOTConfig:
    """Apply ``section.field=value`` strings (values parsed as YAML scalars or lists)."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.field=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, (int, float, bool)) and not isinstance(value, str):
            pass
        if value is None and raw.strip().lower() not in ("null", "none", "~"):
            value = raw
        nested: Any = value
        for p in reversed(parts):
            nested = {p: nested}
        merge_into(cfg, nested)
    return cfg


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_config(
    path_or_preset: Optional[str] = None, overrides: Optional[list[str]] = None, *, validate: bool = True
) -> IBOTConfig:
    """Resolve defaults <- preset name or YAML file <- overrides, then validate."""
    cfg = IBOTConfig()
    if path_or_preset:
        p = Path(path_or_preset)
        if not p.suffix and (PRESET_DIR / f"{path_or_preset}.yaml").exists():
            p = PRESET_DIR / f"{path_or_preset}.yaml"
        if not p.exists():
            raise ConfigError(
                f"config: {path_or_preset!r} is neither a YAML file nor a preset ({', '.join(preset_names())})"
            )
        try:
            d = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config: {p} is not valid YAML: {e}") from None
        base = d.pop("preset", None) if isinstance(d, dict) else None
        if base:
            cfg = load_config(base, validate=False)
        merge_into(cfg, d)
    apply_overrides(cfg, overrides or [])
    if validate:
        cfg.validate()
    return cfg


# ---- validation --------------------------------------------------------------------------------


def timm_patch_size(arch: str) -> int:
    import re

    m = re.search(r"patch(\d+)", arch)
    if m:
        return int(m.group(1))
    import timm

    if not timm.list_models(arch):
        raise ConfigError(f"model.arch: {arch!r} is not a timm model")
    try:
        model = timm.create_model(arch, pretrained=False, num_classes=0)
        p = model.patch_embed.patch_size
        return int(p[0] if isinstance(p, (tuple, list)) else p)
    except Exception as e:  # pragma: no cover - reached only for exotic names
        raise ConfigError(f"model.arch: cannot determine the patch size of {arch!r}: {e}") from None


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{name}: {msg}")


def validate(cfg: IBOTConfig) -> None:
    m, h, c, k, lo, o, d, t = cfg.model, cfg.head, cfg.crops, cfg.masking, cfg.loss, cfg.optim, cfg.data, cfg.train

    _check(m.arch.startswith(("vit_", "deit", "eva", "vit")), "model.arch", f"{m.arch!r} is not a Vision Transformer")
    _check(m.patch_size is None or m.patch_size > 0, "model.patch_size", "must be positive")
    _check(m.depth is None or m.depth > 0, "model.depth", "must be positive")
    _check(m.embed_dim is None or m.embed_dim > 0, "model.embed_dim", "must be positive")
    _check(m.num_heads is None or m.num_heads > 0, "model.num_heads", "must be positive")
    _check(m.stem in ("patch", "conv"), "model.stem", f"must be 'patch' or 'conv', got {m.stem!r}")
    _check(not (m.embed_dim and m.num_heads) or m.embed_dim % m.num_heads == 0, "model.embed_dim",
           f"{m.embed_dim} is not divisible by model.num_heads {m.num_heads}")
    _check(0 <= m.drop_path_rate < 1, "model.drop_path_rate", "must be in [0, 1)")

    for n in ("out_dim", "patch_out_dim", "hidden_dim", "bottleneck_dim"):
        _check(getattr(h, n) > 0, f"head.{n}", "must be positive")
    _check(h.nlayers >= 1, "head.nlayers", "must be at least 1")

    _check(c.global_crops_number >= 2, "crops.global_crops_number", "iBOT needs at least 2 global crops")
    _check(c.local_crops_number >= 0, "crops.local_crops_number", "must be >= 0")
    _check(c.local_crops_size <= c.global_crops_size, "crops.local_crops_size",
           f"local crop ({c.local_crops_size}) larger than global crop ({c.global_crops_size})")
    for n in ("global_crops_scale", "local_crops_scale"):
        a, b = getattr(c, n)
        _check(0 < a <= b <= 1, f"crops.{n}", f"must satisfy 0 < min <= max <= 1, got {(a, b)}")
    _check(0 < c.crop_ratio[0] <= c.crop_ratio[1], "crops.crop_ratio", "must satisfy 0 < min <= max")
    for n in ("flip_p", "color_jitter_p", "grayscale_p", "local_blur_p"):
        _check(0 <= getattr(c, n) <= 1, f"crops.{n}", "must be a probability in [0, 1]")
    for n in ("global_blur_p", "global_solarize_p"):
        v = getattr(c, n)
        _check(len(v) >= 1 and all(0 <= x <= 1 for x in v), f"crops.{n}", "must be probabilities in [0, 1]")
    for n in ("brightness", "contrast", "saturation"):
        _check(getattr(c, n) >= 0, f"crops.{n}", "must be >= 0")
    _check(0 <= c.hue <= 0.5, "crops.hue", "must be in [0, 0.5]")
    _check(c.blur_sigma == AUTO or 0 < c.blur_sigma[0] <= c.blur_sigma[1], "crops.blur_sigma",
           "must satisfy 0 < min <= max")
    _check(0 <= c.solarize_threshold <= 256, "crops.solarize_threshold", "must be in [0, 256]")

    _check(k.shape in ("block", "rand"), "masking.shape", f"must be 'block' or 'rand', got {k.shape!r}")
    _check(len(k.ratio) >= 1, "masking.ratio", "needs at least one value")
    for r in k.ratio:
        _check(0 <= r < 1, "masking.ratio", f"{r} is outside [0, 1)")
    _check(len(k.ratio_var) == len(k.ratio), "masking.ratio_var", "needs one variance per ratio")
    for r, v in zip(k.ratio, k.ratio_var):
        _check(0 <= r < 1, "masking.ratio", f"{r} is outside [0, 1)")
        _check(v >= 0 and 0 <= r - v and r + v < 1, "masking.ratio_var",
               f"ratio {r} +- {v} leaves [0, 1)")
    _check(0 < k.aspect_min <= 1, "masking.aspect_min", "must be in (0, 1]")
    _check(k.start_epoch >= 0, "masking.start_epoch", "must be >= 0")

    for n in ("student_temp", "teacher_temp", "warmup_teacher_temp", "teacher_patch_temp", "warmup_teacher_patch_temp"):
        _check(getattr(lo, n) > 0, f"loss.{n}", f"temperature must be positive, got {getattr(lo, n)}")
    _check(lo.warmup_teacher_temp_epochs == AUTO or lo.warmup_teacher_temp_epochs >= 0,
           "loss.warmup_teacher_temp_epochs", "must be >= 0")
    for n in ("center_momentum", "center_momentum_patch"):
        _check(0 <= getattr(lo, n) < 1, f"loss.{n}", "must be in [0, 1)")
    _check(lo.lambda_cls >= 0 and lo.lambda_mim >= 0, "loss.lambda_cls", "loss weights must be >= 0")
    _check(lo.lambda_koleo >= 0, "loss.lambda_koleo", f"must be >= 0, got {lo.lambda_koleo}")

    _check(o.epochs >= 1, "optim.epochs", "must be >= 1")
    _check(o.batch_size >= 1, "optim.batch_size", "must be >= 1")
    if t.num_workers != AUTO:
        wmin, wmax = t.num_workers
        _check(1 <= wmin <= wmax, "train.num_workers", f"must satisfy 1 <= min <= max, got {(wmin, wmax)}")
        _check(o.batch_size >= wmax, "optim.batch_size",
               f"global batch {o.batch_size} is smaller than the maximum number of workers {wmax}")
    _check(o.micro_batch_size == AUTO or o.micro_batch_size >= 0, "optim.micro_batch_size", "must be >= 0")
    _check(o.lr > 0 and math.isfinite(o.lr), "optim.lr", "must be positive")
    _check(0 <= o.min_lr <= o.lr * o.batch_size / 256, "optim.min_lr", "must be in [0, peak lr]")
    _check(o.warmup_epochs == AUTO or 0 <= o.warmup_epochs <= o.epochs, "optim.warmup_epochs",
           "must be in [0, epochs]")
    _check(o.weight_decay >= 0 and o.weight_decay_end >= 0, "optim.weight_decay", "must be >= 0")
    m0 = o.momentum_teacher_end if o.momentum_teacher == AUTO else o.momentum_teacher
    _check(0 <= m0 <= o.momentum_teacher_end <= 1, "optim.momentum_teacher", "must satisfy 0 <= start <= end <= 1")
    _check(o.momentum_schedule in ("cosine", "linear", "constant"), "optim.momentum_schedule",
           f"must be cosine, linear or constant, got {o.momentum_schedule!r}")
    _check(o.clip_grad >= 0, "optim.clip_grad", "must be >= 0")
    _check(o.freeze_last_layer == AUTO or o.freeze_last_layer >= 0, "optim.freeze_last_layer", "must be >= 0")
    _check(all(0 <= b < 1 for b in o.betas), "optim.betas", "must be in [0, 1)")
    _check(o.precision in ("auto", "bf16", "fp16", "fp32"), "optim.precision", "must be auto, bf16, fp16 or fp32")
    _check(o.max_nonfinite_steps >= 1, "optim.max_nonfinite_steps", "must be >= 1")

    _check(d.format in ("auto", "folder", "parquet"), "data.format", "must be auto, folder or parquet")
    _check(bool(d.source), "data.source", "must not be empty")
    _check(d.actors == AUTO or 1 <= d.actors[0] <= d.actors[1], "data.actors",
           f"must satisfy 1 <= min <= max, got {d.actors}")
    _check(d.cpus_per_actor > 0, "data.cpus_per_actor", "must be positive")
    _check(d.actor_batch_size == AUTO or d.actor_batch_size >= 1, "data.actor_batch_size", "must be >= 1")
    _check(d.prefetch_batches >= 0, "data.prefetch_batches", "must be >= 0")
    _check(d.local_shuffle_buffer_size >= 0, "data.local_shuffle_buffer_size", "must be >= 0")
    _check(0 <= d.executor_min_step_ms <= 1000, "data.executor_min_step_ms", "must be in [0, 1000]")
    _check(d.max_image_pixels > 0, "data.max_image_pixels", "must be positive")
    _check(0 <= d.expected_bad_fraction <= MAX_BAD_FRACTION, "data.expected_bad_fraction",
           f"must be in [0, {MAX_BAD_FRACTION}]")
    _check(d.eval_max_images >= 1, "data.eval_max_images", "must be >= 1")
    _check(0 < d.eval_holdout_fraction <= 0.5, "data.eval_holdout_fraction", "must be in (0, 0.5]")

    _check(t.use_gpu in ("auto", "true", "false"), "train.use_gpu", "must be auto, true or false")
    _check(t.cpus_per_worker >= 0 and t.gpus_per_worker >= 0, "train.cpus_per_worker", "must be >= 0")
    _check(t.checkpoint_every_steps >= 1, "train.checkpoint_every_steps", "must be >= 1")
    _check(t.checkpoint_min_interval_s >= 0, "train.checkpoint_min_interval_s", "must be >= 0")
    _check(t.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
    _check(t.max_failures >= -1, "train.max_failures", "must be >= -1")
    _check(t.max_preemption_failures >= -1, "train.max_preemption_failures", "must be >= -1")
    _check(t.max_repeated_errors >= 0, "train.max_repeated_errors", "must be >= 0")
    _check(t.worker_start_timeout_s >= 1, "train.worker_start_timeout_s", "must be >= 1")
    _check(t.images_per_device >= 0, "train.images_per_device", "must be >= 0")
    _check(t.compile in ("auto", "true", "false"), "train.compile", f"must be auto, true or false, got {t.compile!r}")
    _check(t.log_every_steps >= 1, "train.log_every_steps", "must be >= 1")
    _check(t.knn_every_epochs >= 0, "train.knn_every_epochs", "must be >= 0")
    for name in t.loggers:
        _check(name in LOGGERS, "train.loggers", f"unknown logger {name!r} (known: {', '.join(LOGGERS)})")
        missing = [mod for mod in LOGGERS[name][0] if importlib.util.find_spec(mod) is None]
        _check(not missing, "train.loggers", f"{name} needs {', '.join(missing)}, which is not installed: "
               f'pip install "ibot-ray[{LOGGERS[name][1]}]" (from a checkout: pip install ".[{LOGGERS[name][1]}]")')
    _check(len(set(t.loggers)) == len(t.loggers), "train.loggers", f"names a logger twice: {list(t.loggers)}")
    _check(t.wandb_mode in ("auto", "online", "offline"), "train.wandb_mode",
           f"must be auto, online or offline, got {t.wandb_mode!r}")

    e = cfg.eval
    _check(e.knn_k >= 1, "eval.knn_k", "must be >= 1")
    _check(e.knn_temperature > 0, "eval.knn_temperature", "temperature must be positive")

    # last: the model's own checks import timm (about 4 s), so that a wrong value anywhere else is reported without
    # waiting for it; the patch size (read from timm for an arch without "patchN" in its name), then what it divides
    import timm

    _check(bool(timm.list_models(m.arch)), "model.arch", f"{m.arch!r} is not a timm model")
    p = cfg.patch_size
    if m.stem == "conv":
        from ibot_ray.conv_stem import conv_stem_widths

        try:
            conv_stem_widths(p, 1)
        except ValueError as err:
            raise ConfigError(f"model.stem: conv: {err}") from None
    _check(c.global_crops_size >= p, "crops.global_crops_size", f"must be at least the patch size {p}")
    _check(c.global_crops_size % p == 0, "crops.global_crops_size", f"must be a multiple of the patch size {p}")
    _check(c.local_crops_size % p == 0 and c.local_crops_size >= p, "crops.local_crops_size",
           f"must be a positive multiple of the patch size {p}")
    _check(e.image_size >= p and e.image_size % p == 0, "eval.image_size", f"must be a multiple of the patch size {p}")


def get_field(cfg: IBOTConfig, dotted: str) -> Any:
    """The value of ``section.field``."""
    section, name = dotted.split(".")
    return getattr(getattr(cfg, section), name)


def set_field(cfg: IBOTConfig, dotted: str, value: Any) -> None:
    """Set ``section.field`` (no type check; :func:`apply_overrides` is the checked way)."""
    section, name = dotted.split(".")
    setattr(getattr(cfg, section), name, value)


def unresolved_auto(cfg: IBOTConfig) -> list[str]:
    """The fields still ``auto`` (ibot_ray/recipe.py derives them when the run starts)."""
    return [f for f in AUTO_FIELDS if isinstance(get_field(cfg, f), str) and get_field(cfg, f) == AUTO]


def replace(cfg: IBOTConfig, **sections: dict) -> IBOTConfig:
    """A copy of ``cfg`` with some section fields changed, e.g. ``replace(cfg, optim={"epochs": 2})``."""
    new = IBOTConfig.from_dict(cfg.to_dict(), validate=False)
    merge_into(new, sections)
    return new


__all__ = [
    "AUTO",
    "AUTO_FIELDS",
    "MAX_BAD_FRACTION",
    "CLUSTER_AUTO_FIELDS",
    "LOGGERS",
    "ConfigError",
    "IBOTConfig",
    "ModelConfig",
    "HeadConfig",
    "CropsConfig",
    "MaskingConfig",
    "LossConfig",
    "OptimConfig",
    "DataConfig",
    "TrainConfig",
    "EvalConfig",
    "load_config",
    "apply_overrides",
    "get_field",
    "set_field",
    "unresolved_auto",
    "merge_into",
    "preset_names",
    "replace",
]
