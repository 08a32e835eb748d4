"""InvarDiff: calibrated, plan-driven reuse of module outputs in diffusion transformers."""

from .architectures import Geometry
from .official import load_plan
from .plan import CachePlan, PlanError, PlanSummary, PlanTarget, all_compute_plan

__all__ = [
    "CachePlan",
    "Geometry",
    "PlanError",
    "PlanSummary",
    "PlanTarget",
    "all_compute_plan",
    "load_plan",
]
__version__ = "0.1.0"
