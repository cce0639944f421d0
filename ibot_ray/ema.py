"""Exponential moving average of the student into the teacher, paired by parameter name."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / DataParallel, torch.compile


def _strip(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _WRAPPER_PREFIXES:
            if name.startswith(p):
                name, changed = name[len(p):], True
    return name


class TeacherEMA:
    """``teacher = m * teacher + (1 - m) * student`` over the parameters the two share by name.

    The pairing is done once, here: parameters only one side has (the student's ``mask_token``, a student
    ``last_layer2`` when the teacher's patch prototypes are shared) are skipped, as in iBOT. The student may be
    wrapped (DDP's ``module.``, ``torch.compile``'s ``_orig_mod.`` prefixes are removed before matching).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module) -> None:
        s_params = {}
        for name, p in student.named_parameters():
            key = _strip(name)
            if key in s_params:
                raise ValueError(f"student parameter name {key!r} is ambiguous after removing wrapper prefixes")
            s_params[key] = p
        self.names: list[str] = []
        self._student: list[torch.Tensor] = []
        self._teacher: list[torch.Tensor] = []
        for name, t in teacher.named_parameters():
            s = s_params.get(_strip(name))
            if s is None:
                continue
            if s.shape != t.shape:
                raise ValueError(f"EMA pair {name!r}: student shape {tuple(s.shape)} != teacher {tuple(t.shape)}")
            self.names.append(_strip(name))
            self._student.append(s)
            self._teacher.append(t)
        if not self.names:
            raise ValueError("student and teacher share no parameter names; nothing to average")

    @torch.no_grad()
    def update(self, momentum: float, apply: Optional[torch.Tensor] = None) -> None:
        """One EMA step with teacher momentum ``momentum`` in [0, 1].

        ``apply``: a bool device tensor; where it is False the teacher stays as it is (a skipped step). The decision
        then stays on the device: m and 1 - m are picked there, and the update is three multi-tensor kernels on a GPU
        (teacher * m, student * (1 - m), their sum), a lerp per tensor on a CPU (equal up to rounding)."""
        m = float(momentum)
        if not 0.0 <= m <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        if m == 1.0:
            return
        teacher = [t.data for t in self._teacher]
        student = [s.data.to(dtype=t.dtype, device=t.device) for s, t in zip(self._student, teacher)]
        if apply is None:
            torch._foreach_mul_(teacher, m)
            torch._foreach_add_(teacher, student, alpha=1.0 - m)
            return
        take = torch.where(apply, 1.0 - m, 0.0).to(teacher[0].dtype)
        if teacher[0].is_cuda:  # multi-tensor kernels: three launches for all the parameters
            torch._foreach_mul_(teacher, torch.where(apply, m, 1.0).to(teacher[0].dtype))
            torch._foreach_add_(teacher, torch._foreach_mul(student, take))
        else:  # a CPU loops over the tensors anyway: one pass over each, nothing allocated (t + take * (s - t))
            torch._foreach_lerp_(teacher, student, [take] * len(teacher))


__all__ = ["TeacherEMA"]
