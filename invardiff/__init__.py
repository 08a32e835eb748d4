"""InvarDiff: calibrated, plan-driven reuse of module outputs in diffusion transformers.

``import invardiff`` stays light (numpy only): the plan format loads without torch, so
registry clients start fast. The torch parts (calibration, cached execution) load on first use.
"""

from importlib import import_module
from typing import Any

from .architectures import Geometry
from .official import load_plan
from .plan import CachePlan, PlanError, PlanSummary, PlanTarget, all_compute_plan

__version__ = "0.1.0"

_LAZY = {
    "calibrate": "calibration",
    "CalibrationParams": "calibration",
    "TrajectoryStats": "calibration",
    "enable_cache": "runtime",
    "disable_cache": "runtime",
    "cached": "runtime",
    "PlanCache": "runtime",
    "StepMatchError": "stepping",
    "PlanMismatchError": "checks",
    "PlanMismatchWarning": "checks",
}

__all__ = [
    "CachePlan",
    "Geometry",
    "PlanError",
    "PlanSummary",
    "PlanTarget",
    "all_compute_plan",
    "load_plan",
]
__all__ += list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'invardiff' has no attribute {name!r}")
