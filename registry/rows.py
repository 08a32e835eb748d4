"""Database rows as the plain data of :mod:`registry.matching`, and row filters."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

from .matching import ModelInfo, TargetEntry, TargetKey, VersionInfo
from .models import ModelAlias, PlanTarget, PlanVersion

T = TypeVar("T")


def model_info(row: ModelAlias) -> ModelInfo:
    """The model alias of a row."""
    return _fields_of(row, ModelInfo)


def target_key(row: PlanTarget) -> TargetKey:
    """The matching key of a plan target row."""
    return _fields_of(row, TargetKey)


def version_info(row: PlanVersion) -> VersionInfo:
    """The plain data of a plan version row."""
    return _fields_of(row, VersionInfo)


def target_entry(target: PlanTarget) -> TargetEntry:
    """A target row with its versions and aliases (both loaded with it)."""
    return TargetEntry(
        key=target_key(target),
        versions=tuple(version_info(v) for v in target.versions),
        aliases={a.name: a.plan_version.version for a in target.aliases},
    )


def _fields_of(row: Any, kind: type[T]) -> T:
    """The dataclass ``kind`` of the row's columns of the same names."""
    return kind(**{f.name: getattr(row, f.name) for f in fields(kind)})  # type: ignore[arg-type]


def equals(column: Any, value: Any) -> Any:
    """``column = value`` that also matches NULL to None."""
    return column.is_(None) if value is None else column == value
