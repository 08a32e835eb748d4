"""The InvarDiff plan registry: publish, promote and fetch cache plans.

``registry.fetch("flux-dev", 1024)`` returns the matching :class:`invardiff.CachePlan`,
with the same resolution rules and local cache as ``invardiff-registry fetch``.
"""

from .client import fetch, fetch_plan
from .config import Config
from .errors import RegistryError

__all__ = ["Config", "RegistryError", "fetch", "fetch_plan"]
