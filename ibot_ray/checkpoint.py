"""Training checkpoints: atomic writes, safe (``weights_only``) loads and the complete resumable state.

A checkpoint is one ``torch.save`` file holding a plain dict with a format marker. Everything in it must be loadable
with ``torch.load(weights_only=True)`` so that resuming never executes arbitrary pickled code: tensors, numbers,
strings, bytes, ``None`` and lists/tuples/dicts/sets of those. The resolved run config is therefore stored as a YAML
string, and RNG states as tensors and ints.

Unlike the reference implementation (which saves no RNG state and resumes only at epoch boundaries, with non-strict
loads that merely print missing keys), :func:`training_state` captures the RNG streams and arbitrary ``extra`` counters
(e.g. the position inside the data epoch), and :func:`restore_training_state` loads everything strictly. A
distributed loop whose ranks need distinct streams can instead derive them with :func:`seed_stream` (the Ray worker
seeds every step from ``(train.seed, rank, step)``), which no saved state is needed to reproduce.
"""

from __future__ import annotations

import collections
import errno
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
import yaml
from torch import nn

FORMAT_KEY = "ibot_ray_checkpoint"
FORMAT_VERSION = 1

PathLike = Union[str, Path]

# Leaf types that torch.load(weights_only=True) reconstructs without extra allow-listing.
_SAFE_LEAVES = (str, bytes, bytearray, int, float, complex, bool, type(None), torch.Size, torch.dtype, torch.device)
_SAFE_CONTAINERS = (list, tuple, set, dict, collections.OrderedDict)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written, read or restored; the message names the file or the offending entry."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint file does not exist (also catchable as ``FileNotFoundError``)."""


class CheckpointMismatchError(CheckpointError):
    """A readable checkpoint that does not fit what it is restored into (another model, optimiser or config)."""


class CheckpointCorruptError(CheckpointError):
    """The checkpoint file is truncated, corrupt, foreign or of a newer format: reading it again cannot help."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (I/O error, full disk); ``errno`` is the OS error's, when there was one."""

    def __init__(self, message: str, errno: Optional[int] = None) -> None:
        super().__init__(message)
        self.errno = errno

    def __reduce__(self):
        return (self.__class__, (str(self), self.errno))


# ---- validation --------------------------------------------------------------------------------------------------


def _check_weights_only_safe(obj: Any, root: str = "state") -> None:
    """Raise CheckpointError naming the first entry ``torch.load(weights_only=True)`` could not rebuild.

    The walk is iterative (no recursion limit of its own) and never touches tensor data, so it is cheap even for
    multi-GB states. Tensor subclasses other than ``nn.Parameter`` are rejected: they need allow-listed globals.
    """
    stack: list[tuple[Any, str]] = [(obj, root)]
    seen: set[int] = set()
    while stack:
        value, where = stack.pop()
        kind = type(value)
        if kind in (torch.Tensor, nn.Parameter) or kind in _SAFE_LEAVES:
            continue
        if kind not in _SAFE_CONTAINERS:
            raise CheckpointError(
                f"{where} has type {kind.__module__}.{kind.__qualname__}, which torch.load(weights_only=True) cannot "
                "load; store tensors, numbers, strings or lists/dicts of them (e.g. a config as a YAML string)"
            )
        if id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, dict):
            for key, item in value.items():
                if type(key) not in (str, int, float, bool, type(None), tuple):
                    raise CheckpointError(f"{where} has a key of type {type(key).__qualname__}: {key!r}")
                stack.append((item, f"{where}[{key!r}]"))
        else:
            stack.extend((item, f"{where}[{i}]") for i, item in enumerate(value))


# ---- file I/O ----------------------------------------------------------------------------------------------------


def _fsync_dir(directory: Path) -> None:
    """Persist a rename on POSIX file systems (best effort: not every platform can open a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path: PathLike, state: dict) -> None:
    """Write ``state`` to ``path`` atomically.

    The state is first checked to be ``weights_only``-loadable (so a bad entry fails here, not at resume time), then
    serialised to a temporary file in the same directory, flushed, fsynced and moved over ``path`` with
    ``os.replace``. A reader therefore sees either the old file or the complete new one; if anything fails the old
    file is untouched and the temporary file is removed. The format marker is added when ``state`` lacks it.
    """
    path = Path(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}: state must be a dict, got {type(state).__qualname__}")
    if FORMAT_KEY not in state:
        state = {FORMAT_KEY: FORMAT_VERSION, **state}
    _check_weights_only_safe(state)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _write_error(path, e) from e
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp creates 0600; checkpoints are meant to be shared
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, Exception):
            raise _write_error(path, e) from e
        raise
    _fsync_dir(path.parent)


def _write_error(path: Path, e: Exception) -> CheckpointWriteError:
    code = getattr(e, "errno", None)
    why = f"no space left on the device of {path.parent}" if code == errno.ENOSPC else f"{type(e).__name__}: {e}"
    return CheckpointWriteError(f"could not write checkpoint {path} ({why}); any previous file there is unchanged",
                                errno=code)


def load_checkpoint(path: PathLike, *, map_location: Any = "cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` with ``torch.load(weights_only=True)``.

    Raises CheckpointError (naming the file) for a missing, truncated, corrupt or foreign file: anything that is not
    a dict carrying our format marker, or that needs unsafe pickle globals, or has a newer format version.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"checkpoint {path} does not exist or is not a file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ValueError, ... for bad files
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointCorruptError(
            f"checkpoint {path} is truncated, corrupt or not a safe torch file ({type(e).__name__}: {first_line})"
        ) from e
    if not isinstance(state, dict) or FORMAT_KEY not in state:
        what = f"a dict with keys {sorted(map(str, state))[:8]}" if isinstance(state, dict) else type(state).__name__
        raise CheckpointCorruptError(
            f"checkpoint {path} is not an ibot_ray checkpoint (no {FORMAT_KEY!r} marker; got {what})")
    version = state[FORMAT_KEY]
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise CheckpointCorruptError(
            f"checkpoint {path} has format version {version!r}; this code reads 1..{FORMAT_VERSION}")
    return state


# ---- RNG ---------------------------------------------------------------------------------------------------------


def rng_state() -> dict:
    """Python ``random``, NumPy global, torch CPU (and every visible CUDA device) RNG states, weights_only-safe."""
    py_version, py_internal, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    return {
        "python": {"version": int(py_version), "state": torch.tensor(py_internal, dtype=torch.int64),
                   "gauss_next": py_gauss},
        "numpy": {"kind": str(np_kind), "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def seed_stream(seed: int, *keys: int) -> None:
    """Seed Python ``random``, NumPy's global RNG and torch (CPU and every CUDA device) with a stream derived from
    ``seed`` and ``keys``: distinct key tuples (e.g. ``(rank, step)``) get independent streams, the same tuple the
    same stream, in any process. Seeding each step from ``(rank, step)`` makes a step's randomness independent of
    restarts, so a resumed run needs no saved RNG state to continue exactly as an uninterrupted one."""
    words = np.random.SeedSequence([int(seed) % 2**64, *(int(k) % 2**64 for k in keys)]).generate_state(2)
    full = (int(words[0]) << 32) | int(words[1])
    random.seed(full)
    np.random.seed(int(words[0]))
    torch.manual_seed(full)  # also every CUDA device


def set_rng_state(state: dict) -> None:
    """Restore the states captured by :func:`rng_state` exactly (sections absent from ``state`` are left alone).

    CUDA states are restored for ``min(saved, visible)`` devices; a CPU-only process ignores them.
    """
    try:
        if "python" in state:
            py = state["python"]
            internal = tuple(int(v) for v in py["state"].tolist())
            random.setstate((int(py["version"]), internal, py["gauss_next"]))
        if "numpy" in state:
            n = state["numpy"]
            keys = n["keys"].numpy().astype(np.uint32)
            np.random.set_state((n["kind"], keys, int(n["pos"]), int(n["has_gauss"]), float(n["cached_gaussian"])))
        if "torch" in state:
            torch.set_rng_state(state["torch"].cpu())
        if state.get("cuda") is not None and torch.cuda.is_available():
            for i, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(s.cpu(), i)
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        raise CheckpointError(f"invalid RNG state ({type(e).__name__}: {e})") from e


# ---- the complete training state ---------------------------------------------------------------------------------


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel / DataParallel (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while True:
        if isinstance(model, wrappers):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _config_to_yaml(config: Any) -> str:
    if isinstance(config, str):
        return config
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    if not isinstance(config, dict):
        raise CheckpointError(f"config must be a dict (or have .to_dict()), got {type(config).__qualname__}")
    try:
        return yaml.safe_dump(config, sort_keys=False)
    except yaml.YAMLError as e:
        raise CheckpointError(f"config cannot be stored as YAML: {e}") from e


def training_state(
    *,
    student: nn.Module,
    teacher: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss: nn.Module,
    scaler: Optional[Any] = None,
    epoch: int,
    step: int,
    config: Any,
    extra: Optional[dict] = None,
) -> dict:
    """Everything needed to resume a run exactly.

    Keys: the format marker, ``student``/``teacher`` state dicts (wrappers stripped, so keys never start with
    ``module.``), ``optimizer``, ``scaler`` (``None`` without one), ``loss`` (its buffers: the centers), ``epoch``,
    ``step``, ``config`` (YAML text of the resolved config), ``rng`` (:func:`rng_state`) and ``extra``.

    The tensors are the live ones (no copy): save the result before the next optimizer step.
    """
    state = {
        FORMAT_KEY: FORMAT_VERSION,
        "student": unwrap_model(student).state_dict(),
        "teacher": unwrap_model(teacher).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "loss": unwrap_model(loss).state_dict(),
        "epoch": int(epoch),
        "step": int(step),
        "config": _config_to_yaml(config),
        "rng": rng_state(),
        "extra": dict(extra or {}),
    }
    _check_weights_only_safe(state["extra"], root="extra")
    return state


_REQUIRED = ("student", "teacher", "optimizer", "loss", "epoch", "step", "config")


def restore_training_state(
    state: dict,
    *,
    student: nn.Module,
    teacher: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss: nn.Module,
    scaler: Optional[Any] = None,
    restore_rng: bool = True,
) -> dict:
    """Load a :func:`training_state` back into live objects (strict for modules) and return the bookkeeping.

    Returns ``{"epoch", "step", "config" (dict), "extra"}``. A scaler state is loaded only when both the checkpoint
    and the caller have one (resuming an fp16 run in bf16/fp32, or the reverse, simply drops it).
    """
    if not isinstance(state, dict) or FORMAT_KEY not in state:
        raise CheckpointMismatchError("state is not an ibot_ray training state (no format marker)")
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise CheckpointMismatchError(f"training state lacks {missing}")
    for name, module in (("student", student), ("teacher", teacher), ("loss", loss)):
        try:
            unwrap_model(module).load_state_dict(state[name], strict=True)
        except (RuntimeError, KeyError, TypeError) as e:
            raise CheckpointMismatchError(f"cannot restore {name}: {e}") from e
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError, RuntimeError, TypeError) as e:
        raise CheckpointMismatchError(f"cannot restore optimizer: {e}") from e
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    if restore_rng and state.get("rng") is not None:
        set_rng_state(state["rng"])
    config = state["config"]
    if isinstance(config, str):
        config = yaml.safe_load(config) or {}
    return {"epoch": int(state["epoch"]), "step": int(state["step"]), "config": config,
            "extra": state.get("extra") or {}}
