"""Database rows as the plain data of :mod:`registry.matching`, and row filters."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from .matching import ModelInfo, TargetEntry, TargetKey, VersionInfo
from .models import ModelAlias, PlanTarget, PlanVersion


def model_info(row: ModelAlias) -> ModelInfo:
    """The model alias of a row."""
    return ModelInfo(**{f.name: getattr(row, f.name) for f in fields(ModelInfo)})


def target_key(row: PlanTarget) -> TargetKey:
    """The matching key of a plan target row."""
    return TargetKey(**{name: getattr(row, name) for name in TargetKey.__dataclass_fields__})


def version_info(row: PlanVersion) -> VersionInfo:
    """The plain data of a plan version row."""
    return VersionInfo(
        version=row.version,
        sha256=row.sha256,
        size=row.size,
        object_key=row.object_key,
        status=row.status,
        format_version=row.format_version,
    )


def target_entry(target: PlanTarget) -> TargetEntry:
    """A target row with its versions and aliases (both loaded with it)."""
    return TargetEntry(
        key=target_key(target),
        versions=tuple(version_info(v) for v in target.versions),
        aliases={a.name: a.plan_version.version for a in target.aliases},
    )


def equals(column: Any, value: Any) -> Any:
    """``column = value`` that also matches NULL to None."""
    return column.is_(None) if value is None else column == value
