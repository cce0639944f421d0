"""What a finished (or interrupted) sweep produced: a results table, its CSV, the best trial's config and a plot.

Each trial row says what was swept, what the objective was at the trial's last evaluation, how far the trial got
(Tune iterations = worker reports, optimiser step out of the run's total) and how it ended:

* ``completed``: the Train run reached its last step;
* ``stopped``: ASHA stopped it early (the scheduler's own record, kept in the sweep's ``asha_state.yaml``);
* ``error``: the trial failed (bad combination of values, a Train failure past its budget, ...);
* ``unfinished``: the sweep was interrupted before the trial ended; re-running the sweep resumes it.

The best trial is the best objective among completed trials (a trial stopped at an early rung is compared with
the others there, not with their final values); when no trial completed, among all trials with an objective.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ibot_ray.config import IBOTConfig

STATUSES = ("completed", "stopped", "error", "unfinished")


@dataclass
class TrialRow:
    trial_id: str
    status: str
    params: dict[str, Any]
    objective: Optional[float] = None  # the objective at the trial's last report that carried it
    objective_step: Optional[int] = None  # the optimiser step of that report
    iterations: int = 0  # Tune training_iteration reached (one per worker report)
    step: int = 0  # last optimiser step reported
    total_steps: Optional[int] = None  # steps of a full run
    stopped_at_step: Optional[int] = None  # ASHA's stop decision, when it stopped the trial
    error: str = ""
    path: str = ""
    extra: dict = field(default_factory=dict)

    def as_dict(self, names: list[str], objective: str) -> dict:
        d: dict[str, Any] = {"trial_id": self.trial_id, "status": self.status}
        d.update({n: self.params.get(n) for n in names})
        d.update({objective: self.objective, "objective_step": self.objective_step, "iterations": self.iterations,
                  "step": self.step, "total_steps": self.total_steps, "stopped_early": self.status == "stopped",
                  "stopped_at_step": self.stopped_at_step, "error": self.error})
        return d


def _finite(v: Any) -> Optional[float]:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _label(v: Any) -> str:
    """A categorical parameter value as an axis label: ``(0.5, 1.0)``, ``True``, ``cosine``."""
    return str(tuple(v)) if isinstance(v, (list, tuple)) else str(v)


def category_labels(values: list[Any]) -> Optional[list[str]]:
    """The x-axis categories of a swept parameter, or None for a numeric one: tuples (crop scales), booleans and
    strings get one tick each, in sorted order; numbers keep a real axis."""
    values = [v for v in values if v is not None]
    if not any(isinstance(v, (bool, str, list, tuple)) for v in values):
        return None
    return sorted({_label(v) for v in values})


def _rows_of(result: Any) -> list[dict]:
    """The reported results of one Tune trial, oldest first."""
    df = getattr(result, "metrics_dataframe", None)
    if df is not None and len(df):
        return df.to_dict("records")
    return [result.metrics] if result.metrics else []


def trial_row(result: Any, *, names: list[str], objective: str, early_stopped: dict[str, int],
              tune_status: Optional[dict[str, str]] = None) -> TrialRow:
    """One :class:`TrialRow` from a Tune ``Result``, ASHA's record of the trials it stopped and, when known,
    Tune's own status of each trial (a TERMINATED trial short of its last step was stopped, not interrupted)."""
    path = str(result.path or "")
    metrics = dict(result.metrics or {})
    trial_id = str(metrics.get("trial_id") or Path(path).name)
    rows = _rows_of(result)
    obj, obj_step = None, None
    for r in rows:
        v = _finite(r.get(objective))
        if v is not None:
            obj, obj_step = v, int(_finite(r.get("step")) or 0)
    last = rows[-1] if rows else metrics
    step = int(_finite(last.get("step")) or 0)
    total = _finite(last.get("total_steps"))
    total = int(total) if total is not None else None
    iters = int(_finite(last.get("training_iteration")) or 0)
    params = {n: (result.config or {}).get(n) for n in names}
    if result.error is not None:
        status, err = "error", f"{type(result.error).__name__}: {str(result.error).strip().splitlines()[-1][:300]}"
    elif total is not None and step >= total:
        status, err = "completed", ""
    elif trial_id in early_stopped or (tune_status or {}).get(trial_id) == "TERMINATED":
        status, err = "stopped", ""
    else:
        status, err = "unfinished", ""
    return TrialRow(trial_id=trial_id, status=status, params=params, objective=obj, objective_step=obj_step,
                    iterations=iters, step=step, total_steps=total, stopped_at_step=early_stopped.get(trial_id),
                    error=err, path=path)


def best_row(rows: list[TrialRow], mode: str) -> Optional[TrialRow]:
    """The best completed trial by objective (``mode`` max or min); else the best trial with an objective."""
    sign = 1.0 if mode == "max" else -1.0
    for pool in ([r for r in rows if r.status == "completed"], rows):
        scored = [r for r in pool if r.objective is not None]
        if scored:
            return max(scored, key=lambda r: sign * r.objective)
    return None


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def format_table(rows: list[TrialRow], names: list[str], objective: str, *, best: Optional[TrialRow] = None) -> str:
    """A plain-text table, one line per trial (the best one marked with ``*``)."""
    header = ["", "trial", "status", *names, objective, "at step", "iters", "step/total", "note"]
    lines = []
    for r in rows:
        note = r.error if r.status == "error" else (
            f"ASHA stop at step {r.stopped_at_step}" if r.status == "stopped" else "")
        lines.append(["*" if best is not None and r.trial_id == best.trial_id else "", r.trial_id, r.status,
                      *[_fmt(r.params.get(n)) for n in names], _fmt(r.objective), _fmt(r.objective_step),
                      str(r.iterations), f"{r.step}/{_fmt(r.total_steps)}", note])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    out = ["  ".join(str(x).ljust(w) for x, w in zip(header, widths)).rstrip()]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in lines]
    return "\n".join(out)


def write_csv(rows: list[TrialRow], names: list[str], objective: str, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dicts = [r.as_dict(names, objective) for r in rows]
    fields = list(dicts[0]) if dicts else ["trial_id", "status", *names, objective]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for d in dicts:
            w.writerow({k: ("" if v is None else v) for k, v in d.items()})
    return path


def write_best_config(cfg: IBOTConfig, path: Path, *, header: str = "") -> Path:
    """The full resolved config of the best trial, ready for ``ibot-ray pretrain --config PATH``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    comment = "".join(f"# {line}\n" for line in header.splitlines()) if header else ""
    path.write_text(comment + cfg.to_yaml())
    return path


def plot_objective(rows: list[TrialRow], names: list[str], objective: str, mode: str, path: Path, *,
                   log_scale: Optional[dict[str, bool]] = None, title: str = "") -> Path:
    """One panel per swept parameter: the objective of each trial against the parameter's value (PNG, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = max(1, len(names))
    cols = min(3, n)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    styles = {"completed": ("tab:blue", "o"), "stopped": ("tab:orange", "x"), "unfinished": ("tab:gray", "s")}
    best = best_row(rows, mode)
    for i, name in enumerate(names):
        ax = axes[i // cols][i % cols]
        labels = category_labels([r.params.get(name) for r in rows])

        def x_of(v, labels=labels):
            if labels is not None:
                return labels.index(_label(v)) if v is not None else None
            return _finite(v)

        for status, (color, marker) in styles.items():
            pts = [(x_of(r.params.get(name)), r.objective) for r in rows
                   if r.status == status and r.objective is not None and x_of(r.params.get(name)) is not None]
            if pts:
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], c=color, marker=marker, label=status)
        if best is not None and x_of(best.params.get(name)) is not None:
            ax.scatter([x_of(best.params[name])], [best.objective], s=160, facecolors="none", edgecolors="tab:red",
                       label="best")
        if labels is not None:
            ax.set_xticks(range(len(labels)), labels, fontsize=8)
            ax.set_xlim(-0.5, len(labels) - 0.5)
        elif (log_scale or {}).get(name):
            ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel(f"{objective} ({mode})")
        ax.grid(alpha=0.3)
        if i == 0 and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for j in range(len(names), nrows * cols):
        axes[j // cols][j % cols].axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


__all__ = ["STATUSES", "TrialRow", "best_row", "format_table", "plot_objective", "trial_row", "write_best_config",
           "write_csv"]
