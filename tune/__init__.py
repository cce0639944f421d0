"""Ray Tune sweeps of iBOT's temperatures and momentum schedules (``ibot-ray tune``; docs/sweeps.md).

* :mod:`tune.space`: search spaces as YAML (``tune/spaces/*.yaml``), validated against the config;
* :mod:`tune.sweep`: :func:`run_sweep`, one Ray Train run per Tune trial, ASHA early stopping, resumable state;
* :mod:`tune.report`: the results table, CSV, best trial's config and the objective-vs-parameter plot.

Ray is imported only when a sweep runs.
"""

from tune.space import SWEEPABLE, SearchSpace, SpaceError, load_space, parse_space
from tune.sweep import PBT_UNSUPPORTED, SweepError, SweepResult, run_sweep

__all__ = ["PBT_UNSUPPORTED", "SWEEPABLE", "SearchSpace", "SpaceError", "SweepError", "SweepResult", "load_space",
           "parse_space", "run_sweep"]
