"""Search spaces over iBOT's temperatures and momentum schedules, read from YAML and checked against the config.

A space file maps dotted config fields to distributions, either at the top level or under ``parameters:``::

    description: teacher temperature x teacher momentum      # optional
    parameters:
      loss.teacher_temp:      {type: uniform, low: 0.02, high: 0.07}
      optim.momentum_teacher: {type: choice, values: [0.99, 0.996, 0.999, 0.9995]}
      loss.warmup_teacher_temp_epochs: {type: randint, low: 0, high: 30}   # both ends included

Entry types: ``uniform`` / ``loguniform`` (``low``, ``high``, optional quantum ``q``; float fields), ``randint``
(``low``, ``high``, both inclusive; integer fields), ``choice`` (random pick from ``values``) and ``grid`` (every value,
each grid combination is one trial per ``--trials`` sample). Only the fields in :data:`SWEEPABLE` may be swept.

Every entry is checked when the file is loaded, before any cluster resource is requested: its keys and types, a
non-empty range, and each extreme value (``low``, ``high``, every listed value) set into the base config and run
through the config's own :func:`~ibot_ray.config.validate`. A bad entry raises :class:`SpaceError` naming the file and
the entry. Constraints between two swept fields (``optim.momentum_teacher <= optim.momentum_teacher_end``) can only be
checked per sampled trial: such a trial fails with the config's error, and the sweep goes on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union, get_type_hints

import yaml

from ibot_ray.config import ConfigError, IBOTConfig, merge_into

SPACE_DIR = Path(__file__).parent / "spaces"

#: Config fields a space may sweep, with what they control: the method's temperatures and momentums, and the recipe
#: levers that decide whether a short run on small data learns (head size, crops, masking, lr). Fields that change
#: the number of steps per epoch (the batch size, the epochs) are left out on purpose: ASHA compares trials at the
#: same step.
SWEEPABLE: dict[str, str] = {
    "loss.teacher_temp": "teacher [CLS] temperature after warm-up",
    "loss.teacher_patch_temp": "teacher patch temperature after warm-up",
    "loss.warmup_teacher_temp": "teacher [CLS] temperature at epoch 0",
    "loss.warmup_teacher_patch_temp": "teacher patch temperature at epoch 0",
    "loss.warmup_teacher_temp_epochs": "epochs of the linear teacher-temperature warm-up",
    "loss.student_temp": "student temperature",
    "loss.center_momentum": "EMA momentum of the [CLS] center",
    "loss.center_momentum_patch": "EMA momentum of the patch center",
    "optim.momentum_teacher": "teacher EMA momentum at step 0 (cosine schedule start)",
    "optim.momentum_teacher_end": "teacher EMA momentum at the last step (cosine schedule end)",
    "optim.momentum_schedule": "shape of the teacher momentum schedule: cosine, linear or constant",
    "optim.lr": "peak learning rate per 256 images",
    "optim.weight_decay": "weight decay at step 0 (cosine schedule start)",
    "head.out_dim": "K, the number of [CLS] prototypes",
    "head.patch_out_dim": "the number of patch prototypes (with shared_head false)",
    "head.norm_last_layer": "freeze the prototype norms (weight norm g = 1)",
    "crops.local_crops_number": "local crops per image",
    "crops.global_crops_scale": "area range of the global crops, e.g. [0.5, 1.0]",
    "crops.local_crops_scale": "area range of the local crops",
    "masking.ratio": "masking ratios, one drawn per crop, e.g. [0.0, 0.3]",
    "loss.lambda_mim": "weight of the masked-image-modelling loss",
    "loss.lambda_koleo": "weight of the KoLeo term that spreads the student's [CLS] features (0: off)",
}

TYPES = ("uniform", "loguniform", "randint", "choice", "grid")
_KEYS = {
    "uniform": ({"low", "high"}, {"q"}),
    "loguniform": ({"low", "high"}, {"q"}),
    "randint": ({"low", "high"}, set()),
    "choice": ({"values"}, set()),
    "grid": ({"values"}, set()),
}
_TOP_LEVEL = {"description", "parameters"}


class SpaceError(ValueError):
    """A search space file or entry is invalid; the message names the file and the entry."""


def field_type(name: str) -> type:
    """The Python type (``float`` or ``int``) of the config field ``section.field``."""
    section, attr = name.split(".", 1)
    hints = get_type_hints(type(getattr(IBOTConfig(), section)))
    return hints[attr]


def _nested(name: str, value: Any) -> dict:
    out: Any = value
    for part in reversed(name.split(".")):
        out = {part: out}
    return out


def with_values(base: IBOTConfig, values: dict[str, Any], *, validate: bool = True) -> IBOTConfig:
    """A copy of ``base`` with dotted ``values`` set (type-checked by the config), validated unless told not to."""
    cfg = IBOTConfig.from_dict(base.to_dict(), validate=False)
    for name, value in values.items():
        merge_into(cfg, _nested(name, value))
    if validate:
        cfg.validate()
    return cfg


@dataclass
class ParamSpec:
    """One swept field: its distribution and the values that bound it."""

    name: str
    type: str
    low: Optional[float] = None
    high: Optional[float] = None
    q: Optional[float] = None
    values: list = field(default_factory=list)

    @property
    def log_scale(self) -> bool:
        return self.type == "loguniform"

    def extremes(self) -> list:
        """The values that bound the distribution: every listed value, or ``low`` and ``high``."""
        return list(self.values) if self.type in ("choice", "grid") else [self.low, self.high]

    def domain(self) -> Any:
        """The Ray Tune search-space object of this entry."""
        from ray import tune

        if self.type == "uniform":
            return tune.quniform(self.low, self.high, self.q) if self.q else tune.uniform(self.low, self.high)
        if self.type == "loguniform":
            return tune.qloguniform(self.low, self.high, self.q) if self.q else tune.loguniform(self.low, self.high)
        if self.type == "randint":
            return tune.randint(int(self.low), int(self.high) + 1)  # Tune's upper bound is exclusive
        if self.type == "choice":
            return tune.choice(list(self.values))
        return tune.grid_search(list(self.values))

    def to_dict(self) -> dict:
        if self.type in ("choice", "grid"):
            return {"type": self.type, "values": list(self.values)}
        d = {"type": self.type, "low": self.low, "high": self.high}
        if self.q:
            d["q"] = self.q
        return d


@dataclass
class SearchSpace:
    """A validated search space: ``params`` by dotted field name, in file order."""

    params: dict[str, ParamSpec]
    source: str = "<dict>"
    description: str = ""

    @property
    def names(self) -> list[str]:
        return list(self.params)

    @property
    def grid_only(self) -> bool:
        return all(p.type == "grid" for p in self.params.values())

    @property
    def grid_size(self) -> int:
        return math.prod(len(p.values) for p in self.params.values() if p.type == "grid")

    def param_space(self) -> dict:
        """The ``param_space`` of a Ray Tune ``Tuner``: a flat ``{dotted name: domain}``."""
        return {name: p.domain() for name, p in self.params.items()}

    def to_dict(self) -> dict:
        return {"description": self.description, "parameters": {n: p.to_dict() for n, p in self.params.items()}}

    def trial_config(self, base: IBOTConfig, values: dict[str, Any]) -> IBOTConfig:
        """The full config of one trial: ``base`` with the trial's sampled values, validated (:class:`ConfigError`)."""
        unknown = sorted(set(values) - set(self.params))
        if unknown:
            raise SpaceError(f"trial values {unknown} are not parameters of the space {self.source}")
        return with_values(base, {n: values[n] for n in self.params if n in values})


def _number(v: Any, where: str, key: str) -> float:
    if isinstance(v, str):  # YAML 1.1 reads 5e-4 (no dot) as a string
        try:
            v = int(v) if v.strip().lstrip("+-").isdigit() else float(v)
        except ValueError:
            pass
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
        raise SpaceError(f"{where}: {key} must be a finite number, got {v!r}")
    return v


def _parse_entry(name: str, entry: Any, where: str, base: IBOTConfig) -> ParamSpec:
    if name not in SWEEPABLE:
        known = ", ".join(SWEEPABLE)
        try:
            field_type(name)
            why = "is a config field that cannot be swept"
        except (ValueError, AttributeError, KeyError):
            why = "is not a config field"
        raise SpaceError(f"{where}: unknown parameter {name!r} ({why}); sweepable parameters: {known}")
    if not isinstance(entry, dict):
        raise SpaceError(f"{where}: expected a mapping like {{type: uniform, low: ..., high: ...}}, got {entry!r}")
    kind = entry.get("type")
    if kind not in TYPES:
        raise SpaceError(f"{where}: type must be one of {', '.join(TYPES)}, got {kind!r}")
    required, optional = _KEYS[kind]
    missing = sorted(required - set(entry))
    extra = sorted(set(entry) - required - optional - {"type"})
    if missing:
        raise SpaceError(f"{where}: type {kind} needs {', '.join(missing)}")
    if extra:
        raise SpaceError(f"{where}: unexpected key(s) {', '.join(extra)} for type {kind} "
                         f"(allowed: {', '.join(sorted(required | optional))})")
    ftype = field_type(name)
    spec = ParamSpec(name=name, type=kind)
    if kind in ("choice", "grid"):
        values = entry["values"]
        if not isinstance(values, list) or not values:
            raise SpaceError(f"{where}: values must be a non-empty list, got {values!r}")
        if len(set(map(repr, values))) != len(values):
            raise SpaceError(f"{where}: values contain duplicates: {values!r}")
        spec.values = list(values)
    else:
        low, high = _number(entry["low"], where, "low"), _number(entry["high"], where, "high")
        if ftype is int and kind != "randint":
            raise SpaceError(f"{where}: {name} is an integer field; use type randint, choice or grid, not {kind}")
        if kind == "randint":
            if ftype is not int:
                raise SpaceError(f"{where}: randint is for integer fields, but {name} is a {ftype.__name__}; "
                                 "use uniform or loguniform")
            if not (float(low).is_integer() and float(high).is_integer()):
                raise SpaceError(f"{where}: randint bounds must be integers, got low={low!r} high={high!r}")
            low, high = int(low), int(high)
        if not low < high:
            raise SpaceError(f"{where}: empty range: low ({low}) must be smaller than high ({high})")
        if kind == "loguniform" and low <= 0:
            raise SpaceError(f"{where}: loguniform needs low > 0, got {low}")
        if "q" in entry:
            q = _number(entry["q"], where, "q")
            if q <= 0 or q > high - low:
                raise SpaceError(f"{where}: q must be in (0, high - low], got {q}")
            spec.q = float(q)
        spec.low, spec.high = low, high
    # Each extreme alone must give a valid config (the field's own range and its relation to the other fields).
    for v in spec.extremes():
        label = f"value {v!r}" if kind in ("choice", "grid") else f"{'low' if v == spec.low else 'high'}={v!r}"
        try:
            with_values(base, {name: v})
        except ConfigError as e:
            raise SpaceError(f"{where}: {label} is invalid: {e}") from None
    if kind in ("choice", "grid"):  # store the values as the config coerced them (e.g. 1 -> 1.0 for floats)
        spec.values = [getattr(getattr(with_values(base, {name: v}, validate=False), name.split(".")[0]),
                               name.split(".")[1]) for v in spec.values]
    return spec


def parse_space(data: Any, *, base: Optional[IBOTConfig] = None, source: str = "<dict>") -> SearchSpace:
    """Validate a space given as a mapping (see the module doc) against ``base`` (default: the ViT-S/16 defaults)."""
    base = base if base is not None else IBOTConfig()
    if not isinstance(data, dict) or not data:
        raise SpaceError(f"space {source}: expected a non-empty mapping of parameters, got {data!r}")
    description = ""
    if "parameters" in data:
        extra = sorted(set(data) - _TOP_LEVEL)
        if extra:
            raise SpaceError(f"space {source}: unexpected top-level key(s) {', '.join(map(str, extra))} "
                             f"(allowed: {', '.join(sorted(_TOP_LEVEL))})")
        description = str(data.get("description") or "")
        params = data["parameters"]
        if not isinstance(params, dict) or not params:
            raise SpaceError(f"space {source}: 'parameters' must be a non-empty mapping, got {params!r}")
    else:
        description = str(data.get("description") or "")
        params = {k: v for k, v in data.items() if k != "description"}
        if not params:
            raise SpaceError(f"space {source}: no parameters")
    try:
        base.validate()
    except ConfigError as e:
        raise SpaceError(f"space {source}: the base config is invalid before any value is swept: {e}") from None
    out: dict[str, ParamSpec] = {}
    for name, entry in params.items():
        out[str(name)] = _parse_entry(str(name), entry, f"space {source}: entry {name}", base)
    return SearchSpace(params=out, source=source, description=description)


def space_names() -> list[str]:
    """Names of the spaces shipped in ``tune/spaces/``."""
    return sorted(p.stem for p in SPACE_DIR.glob("*.yaml"))


def resolve_space_path(path_or_name: Union[str, Path]) -> Path:
    """A YAML path, or the name of a shipped space (``tau_momentum``)."""
    p = Path(path_or_name)
    if p.exists():
        return p
    shipped = SPACE_DIR / f"{path_or_name}.yaml"
    if not p.suffix and shipped.exists():
        return shipped
    raise SpaceError(f"space {str(path_or_name)!r} is neither a YAML file nor a shipped space "
                     f"({', '.join(space_names())})")


def load_space(path_or_name: Union[str, Path], base: Optional[IBOTConfig] = None) -> SearchSpace:
    """Read and validate a space file (or a shipped space by name) against the base config."""
    p = resolve_space_path(path_or_name)
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise SpaceError(f"space {p}: not valid YAML: {e}") from None
    return parse_space(data, base=base, source=p.name if p.parent == SPACE_DIR else str(p))


__all__ = ["SWEEPABLE", "SPACE_DIR", "ParamSpec", "SearchSpace", "SpaceError", "field_type", "load_space",
           "parse_space", "resolve_space_path", "space_names", "with_values"]
