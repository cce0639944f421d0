"""The Python API: what the ``ibot-ray`` command runs, as functions for notebooks and scripts.

    import ibot_ray

    run = ibot_ray.pretrain(data="photos/", config="demo", storage="runs", name="photos", optim={"epochs": 4})
    print(run.health, run.knn, run.export)
    report = ibot_ray.evaluate(run, train="labelled/train", val="labelled/val")
    model = ibot_ray.load_backbone(run.export)  # a timm VisionTransformer

* :func:`pretrain` is the run ``ibot-ray pretrain`` makes (``pipelines.pretrain.run_pretrain``, the same function the
  command calls): the same config resolution, console, checkpoints, resume by storage + name, and outputs.
* :func:`evaluate` returns the report ``ibot-ray eval --json`` writes (``pipelines/evaluate.py``).
* :func:`load_backbone` returns the timm model of an export or of a checkpoint's teacher.

Config overrides are keyword arguments, one per config section, each a dict of that section's fields
(``optim={"epochs": 4, "lr": 0.01}``, as :func:`ibot_ray.config.replace` takes them), or dotted keys
(``**{"optim.epochs": 4}``). :func:`pretrain`'s ``data`` is the training source or, as a dict, the data section. They
apply on top of ``config`` exactly as ``--set section.field=value`` does; an unknown section or field is a
:class:`~ibot_ray.config.ConfigError` naming it, raised before Ray starts.

Ray and the pipelines are imported inside the functions, so ``import ibot_ray`` stays plain PyTorch + timm.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Union

from ibot_ray.config import ConfigError, IBOTConfig

PathLike = Union[str, Path]


@dataclass
class PretrainRun:
    """What :func:`pretrain` returns: where the run's outputs are, its final metrics and its health verdict."""

    name: str
    path: str  # the run folder, <storage>/<name>
    checkpoint: Optional[str]  # the latest checkpoint folder (state.pt + config.yaml)
    export: Optional[str]  # the teacher backbone, .safetensors (load_backbone reads it)
    logs: str  # metrics.jsonl (or, on remote storage, metrics/part-*.jsonl), tensorboard/, mlflow.db, wandb/
    steps: int  # optimiser steps trained
    metrics: dict  # the last reported metrics: loss, cls, mim, lr, health metrics, the last online k-NN, ...
    health: str  # "healthy: no collapse detected (...)" or "collapsed: <conditions>" (ibot_ray/health.py)
    knn: Optional[dict]  # k-NN top-1 (%) on knn_split: teacher, teacher_top5, random_init, raw_pixels
    knn_split: Optional[str] = None  # the split every k-NN figure was measured on (None: no labelled split)
    bad_images: int = 0  # distinct unreadable files skipped
    wall_s: float = 0.0
    details: Any = field(default=None, repr=False)  # pipelines.pretrain.PretrainResult, everything the driver saw


def _override_strings(overrides: dict[str, Any]) -> list[str]:
    """``section={field: value}`` / ``"section.field": value`` keyword arguments -> ``section.field=value`` strings
    (values as JSON, which the config loader reads as YAML)."""
    sections = [f.name for f in fields(IBOTConfig)]
    out = []
    for key, value in overrides.items():
        if "." in key:
            out.append(f"{key}={json.dumps(value)}")
            continue
        if key not in sections:
            raise ConfigError(f"{key}: not a config section (sections: {', '.join(sections)}); pass a section's "
                              "fields as a dict, e.g. optim={'epochs': 4}, or a dotted key, **{'optim.epochs': 4}")
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a dict of the section's fields, e.g. optim={{'epochs': 4}}, "
                              f"got {value!r}")
        out += [f"{key}.{name}={json.dumps(list(v) if isinstance(v, tuple) else v)}" for name, v in value.items()]
    return out


def _cli_default(command: str, option: str) -> Any:
    """The default of ``ibot-ray COMMAND --OPTION``: the API runs what the command runs without the option."""
    from ibot_ray.cli import build_parser

    return getattr(build_parser().parse_args([command]), option)


def pretrain(data: Union[PathLike, dict, None] = None, config: Optional[str] = None, *,
             storage: Optional[PathLike] = None, name: Optional[str] = None, address: Optional[str] = None,
             verbose: bool = False, takeover: bool = False, **overrides: Any) -> PretrainRun:
    """Pretrain (or resume) a run, as ``ibot-ray pretrain`` does, and return where everything went.

    ``data``: a folder, Parquet file/folder, ``s3://``/``gs://`` URI or ``"demo"`` (``--data``; default: the
    config's ``data.source``), or the whole data section as a dict (``{"source": ..., "eval_source": ...}``).
    ``config``: a preset name or YAML file (``--config``; default: as the command, a preset chosen for the data, or
    ``demo`` without data). ``storage`` and ``name``: ``--storage`` (default ``./ibot_runs``) and ``--name``
    (default: the data's folder or file name, ``demo`` for the demo); the same pair resumes the run. ``address``: a
    Ray cluster (default: ``RAY_ADDRESS``, else a local Ray). ``verbose``: Ray's own logs on the console.
    ``takeover``: ``--takeover``, take over a run whose driver is gone (one driver per run: pipelines/run_lease.py).
    ``**overrides``: config fields, ``optim={"epochs": 4}``.

    Raises :class:`~ibot_ray.config.ConfigError` for a bad setting (before Ray starts), and what the command reports
    as a failed run: ``pipelines.failures.FatalTrainingError`` (an error every restart would raise again) or Ray
    Train's ``TrainingFailedError``."""
    from ibot_ray.health import verdict
    from pipelines.pretrain import run_pretrain

    if isinstance(data, dict):  # the data section's fields, its source among them
        overrides = {"data": data, **overrides}
        data = None
    if config is None:
        config = _cli_default("pretrain", "config")
    result = run_pretrain(config, _override_strings(overrides), data=None if data is None else str(data),
                          storage=None if storage is None else str(storage), name=name, address=address,
                          verbose=verbose, takeover=takeover)
    run_path = str(result.run_path).rstrip("/")
    knn = None
    if result.knn_after is not None:
        knn = {"teacher": result.knn_after["knn_top1"], "teacher_top5": result.knn_after.get("knn_top5")}
        if result.knn_before is not None:
            knn["random_init"] = result.knn_before["knn_top1"]
        if result.knn_pixels is not None:
            knn["raw_pixels"] = result.knn_pixels["knn_top1"]
    return PretrainRun(name=run_path.rsplit("/", 1)[-1], path=run_path, checkpoint=result.checkpoint_path,
                       export=result.export_path, logs=f"{run_path}/logs", steps=result.steps,
                       metrics=result.metrics, health=verdict(result.metrics), knn=knn, knn_split=result.knn_split,
                       bad_images=int((result.bad_images or {}).get("count", 0)), wall_s=result.wall_s,
                       details=result)


def _model_path(model: Union[PathLike, PretrainRun]) -> str:
    if isinstance(model, PretrainRun):
        if model.checkpoint is None:
            raise ValueError(f"run {model.name} has no checkpoint")
        return model.checkpoint
    return str(model)


def evaluate(model: Union[PathLike, PretrainRun], *, train: str, val: str, config: Optional[str] = None,
             device: str = "auto", max_images: Optional[int] = None, linear: bool = True, baselines: bool = True,
             **overrides: Any) -> dict:
    """What ``ibot-ray eval MODEL --train TRAIN --val VAL --json OUT`` writes to OUT, as a dict.

    ``model``: a :class:`PretrainRun`, a run folder (its latest checkpoint), a checkpoint folder or ``state.pt``, an
    exported ``.safetensors`` backbone, or a timm model name (random init, never downloaded). ``train`` / ``val``:
    labelled splits (class folders or Parquet with a label column; ``"demo"``: the shipped sample). The report has
    ``knn``, ``linear``, ``pixel_knn``, ``random_init_knn`` (top-1 / top-5 in %) and ``gains`` (points);
    docs/evaluating.md says what each measures. ``config`` and ``**overrides`` as for ``ibot-ray eval``: a checkpoint
    is evaluated with its own config, the overrides on top."""
    from pipelines.evaluate import evaluate as run_eval
    from pipelines.evaluate import load_model

    if max_images is not None and max_images < 1:
        raise ValueError("max_images must be >= 1")
    loaded = load_model(_model_path(model), config=config, overrides=_override_strings(overrides))
    return run_eval(loaded, train, val, device=device, max_images=max_images, linear=linear, baselines=baselines)


def load_backbone(path: Union[PathLike, PretrainRun]):
    """The timm VisionTransformer (no classifier head: ``model(x)`` gives the [CLS] feature) of an exported
    ``.safetensors`` backbone (``ibot-ray export``, a run's ``export/``), or the teacher of a checkpoint: a run
    folder (its latest ``step_*``), a checkpoint folder or a ``state.pt``. A backbone with the convolutional stem
    (``model.stem: conv``) comes back with it. For a :class:`PretrainRun`: its export, else its last checkpoint."""
    from ibot_ray.export import load_exported
    from pipelines.evaluate import load_model

    spec = (path.export or path.checkpoint) if isinstance(path, PretrainRun) else str(path)
    if spec is None:
        raise ValueError(f"run {path.name} has neither an export nor a checkpoint")
    if str(spec).endswith(".safetensors"):
        return load_exported(spec)
    return load_model(str(spec)).backbone.vit


__all__ = ["PretrainRun", "evaluate", "load_backbone", "pretrain"]
