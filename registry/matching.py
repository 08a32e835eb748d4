"""Resolution rules: which stored plan answers ``fetch MODEL RESOLUTION [--steps N] ...``.

Pure functions over plain data, shared by the database resolver and the store index
resolver, so both answer every query the same way. The rules (see docs/registry.md):

1. The model alias gives the checkpoint: ``source`` and ``revision`` must match exactly.
2. ``steps`` and ``scheduler`` must match exactly; they default to the model's defaults.
3. ``pipeline``, ``scheduler_config_hash``, ``guidance`` and ``dtype`` must match exactly
   when given; when left open, targets agreeing with the model's defaults are preferred.
4. Resolution is exact, or with ``allow_nearest`` the closest one of the same aspect ratio
   within a factor :data:`MAX_NEAREST_SCALE` per side (ties go to the larger).
5. Within the target, ``latest`` is the highest ready version; any other alias name is
   looked up in the target's aliases. Only ready versions are served (a revoked one, or one
   below its quality gate, ``failed_gate``, never is): targets without a ready version are not
   candidates, and an alias on a version that is not ready is not found.
6. An alias (not ``latest``) that the model's revision cannot answer is answered by the same
   alias of an earlier revision of the same checkpoint source: the revision of the newest
   matching target holding the alias on a ready version. The answer is marked
   ``stale_reason = "revision_changed"``: the alias moved to a revision with no promoted plan
   yet, and keeps serving the plan promoted before until one is promoted for the new revision.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from .errors import InvalidInput, NotFound
from .validation import (
    MAX_SIDE,
    MAX_STEPS,
    check_int,
    check_name,
    check_number,
    check_text,
    shown,
)

MAX_NEAREST_SCALE = 2.0
LATEST = "latest"
READY = "ready"
REVOKED = "revoked"
FAILED_GATE = "failed_gate"  # below its quality gate at publish: recorded, never served
_RESOLUTION = re.compile(r"[ \t]*([0-9]{1,9})[ \t]*(?:[xX][ \t]*([0-9]{1,9})[ \t]*)?", re.ASCII)
_OPEN_FIELDS = ("pipeline", "scheduler_config_hash", "guidance", "dtype")


def canonical(document: Any) -> bytes:
    """Sorted keys, no whitespace: the bytes hashed for keys and written for indexes.

    Same rules as ``invardiff.plan.canonical_json``, repeated so that the fetch path does not
    import invardiff (and numpy).
    """
    return json.dumps(document, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


@dataclass(frozen=True, order=True)
class Resolution:
    """Image size in pixels; written ``WIDTHxHEIGHT``, or one number for a square."""

    width: int
    height: int

    @classmethod
    def parse(cls, text: str) -> Resolution:
        """Parse ``1024`` (square) or ``1024x768`` (width x height)."""
        match = _RESOLUTION.fullmatch(str(text))
        if not match:
            raise InvalidInput(
                f"malformed resolution {shown(text)}: expected e.g. 1024 or 1024x768"
            )
        width = int(match.group(1))
        height = int(match.group(2) or width)
        for side in (width, height):
            if not 1 <= side <= MAX_SIDE:
                raise InvalidInput(
                    f"resolution {shown(text)}: each side must be between 1 and {MAX_SIDE}"
                )
        return cls(width=width, height=height)

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


@dataclass(frozen=True)
class ModelInfo:
    """A model alias: the checkpoint it names and its default pipeline settings."""

    name: str
    source: str
    revision: str | None
    arch: str
    pipeline: str | None = None
    scheduler: str | None = None
    scheduler_config_hash: str | None = None
    steps: int | None = None
    height: int | None = None
    width: int | None = None
    guidance: float | None = None
    dtype: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """``name: source@revision (arch; pipeline, scheduler, N steps, WxH)``."""
        revision = f"@{self.revision}" if self.revision else ""
        return (
            f"{self.name}: {self.source}{revision} ({self.arch}; {self.pipeline}, "
            f"{self.scheduler}, {self.steps} steps, {self.width}x{self.height})"
        )

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelInfo:
        return cls(**{f.name: data.get(f.name) for f in fields(cls)})


@dataclass(frozen=True)
class TargetKey:
    """The matching key of a plan target (one checkpoint, one exact sampling setup)."""

    source: str
    revision: str | None
    pipeline: str | None
    scheduler: str | None
    scheduler_config_hash: str | None
    steps: int
    height: int
    width: int
    guidance: float | None
    dtype: str | None

    @property
    def resolution(self) -> Resolution:
        return Resolution(width=self.width, height=self.height)

    @property
    def key_hash(self) -> str:
        """sha256 of the canonical key: the database's unique natural key for targets."""
        return hashlib.sha256(canonical(self.to_json())).hexdigest()

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["guidance"] = None if self.guidance is None else float(self.guidance)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TargetKey:
        return cls(**{f.name: data.get(f.name) for f in fields(cls)})

    def describe(self) -> str:
        """One short human line: ``1024x1024, 28 steps, FlowMatchEuler..., guidance 3.5``."""
        parts = [str(self.resolution), f"{self.steps} steps", self.scheduler or "any scheduler"]
        if self.guidance is not None:
            parts.append(f"guidance {self.guidance:g}")
        if self.dtype:
            parts.append(self.dtype)
        return ", ".join(parts)


@dataclass(frozen=True)
class VersionInfo:
    """One stored plan version of a target."""

    version: int
    sha256: str
    size: int
    object_key: str
    status: str = READY
    format_version: int = 1

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VersionInfo:
        return cls(**{f.name: data[f.name] for f in fields(cls)})


@dataclass(frozen=True)
class TargetEntry:
    """A target with its versions and aliases (``alias name -> version``)."""

    key: TargetKey
    versions: tuple[VersionInfo, ...]
    aliases: dict[str, int] = field(default_factory=dict)

    def latest(self) -> VersionInfo | None:
        """Highest ready version (``latest`` is computed, never stored)."""
        ready = [v for v in self.versions if v.status == READY]
        return max(ready, key=lambda v: v.version) if ready else None

    def aliased(self) -> TargetEntry | None:
        """This entry with only the ready versions an alias points at; None if there is none.

        What the store index keeps of an earlier revision's targets (rule 6)."""
        servable = self.servable()
        if servable is None or not servable.aliases:
            return None
        numbers = set(servable.aliases.values())
        versions = tuple(v for v in servable.versions if v.version in numbers)
        return TargetEntry(key=self.key, versions=versions, aliases=servable.aliases)

    def servable(self) -> TargetEntry | None:
        """This entry with only its ready versions and the aliases on them; None if none is ready.

        What the store index publishes: a revoked version is never served, also not to older
        clients that do not know the status.
        """
        ready = tuple(v for v in self.versions if v.status == READY)
        if not ready:
            return None
        numbers = {v.version for v in ready}
        aliases = {name: n for name, n in self.aliases.items() if n in numbers}
        return TargetEntry(key=self.key, versions=ready, aliases=aliases)

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.key.to_json(),
            "versions": [v.to_json() for v in sorted(self.versions, key=lambda v: v.version)],
            "aliases": dict(sorted(self.aliases.items())),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TargetEntry:
        return cls(
            key=TargetKey.from_json(data["target"]),
            versions=tuple(VersionInfo.from_json(v) for v in data["versions"]),
            aliases={str(k): int(v) for k, v in data.get("aliases", {}).items()},
        )


@dataclass(frozen=True)
class Query:
    """What a client asks for; ``None`` fields are open (see the module rules)."""

    model: str
    resolution: Resolution
    steps: int | None = None
    scheduler: str | None = None
    pipeline: str | None = None
    scheduler_config_hash: str | None = None
    guidance: float | None = None
    dtype: str | None = None
    alias: str = LATEST
    allow_nearest: bool = False

    def __post_init__(self) -> None:
        check_name(self.model, "model")  # it becomes an object key: index/<model>.json
        if not isinstance(self.resolution, Resolution):
            raise InvalidInput(f"resolution must be a Resolution, got {self.resolution!r}")
        for side in (self.resolution.width, self.resolution.height):
            check_int(side, "resolution", 1, MAX_SIDE)
        check_number(self.guidance, "guidance")
        if self.steps is not None:
            check_int(self.steps, "steps", 1, MAX_STEPS)
        for name in ("scheduler", "pipeline", "scheduler_config_hash", "dtype"):
            if getattr(self, name) is not None:
                check_text(getattr(self, name), name)
        if self.alias != LATEST:
            check_name(self.alias, "alias")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["resolution"] = str(self.resolution)
        return data


@dataclass(frozen=True)
class Resolved:
    """The answer to a query: which target and version, and how the resolution matched."""

    model: ModelInfo
    target: TargetKey
    version: VersionInfo
    match: str  # "exact" or "nearest"
    selected_by: str  # "latest" or "alias:<name>"
    stale_reason: str | None = None  # "revision_changed": an earlier revision's plan (rule 6)


def resolve(model: ModelInfo, query: Query, entries: list[TargetEntry]) -> Resolved:
    """Apply the module's rules; raise :class:`NotFound` listing what exists otherwise.

    ``entries`` may hold targets of any revision of the model's source (rule 6 uses them).
    """
    try:
        return _resolve_at(model, model.revision, query, entries)
    except NotFound:
        if query.alias == LATEST:
            raise
        for revision in _earlier_revisions(model, entries):
            try:
                found = _resolve_at(model, revision, query, entries)
            except NotFound:
                continue
            return replace(found, stale_reason="revision_changed")
        raise


def _earlier_revisions(model: ModelInfo, entries: list[TargetEntry]) -> list[str | None]:
    """The source's other revisions, the one of the newest target (last in ``entries``) first."""
    order: list[str | None] = []
    for entry in reversed(entries):
        revision = entry.key.revision
        if (
            entry.key.source == model.source
            and revision != model.revision
            and revision not in order
        ):
            order.append(revision)
    return order


def _resolve_at(
    model: ModelInfo, revision: str | None, query: Query, entries: list[TargetEntry]
) -> Resolved:
    """Rules 1-5 for the targets of ``model``'s source at ``revision``."""
    scheduler = query.scheduler or model.scheduler
    steps = query.steps or model.steps
    wanted = {
        "pipeline": query.pipeline,
        "scheduler_config_hash": query.scheduler_config_hash,
        "guidance": query.guidance,
        "dtype": query.dtype,
    }
    candidates = [
        e
        for e in entries
        if e.latest() is not None  # a target whose versions are all revoked serves nothing
        and e.key.source == model.source
        and e.key.revision == revision
        and (steps is None or e.key.steps == steps)
        and (scheduler is None or e.key.scheduler == scheduler)
        and all(value is None or getattr(e.key, name) == value for name, value in wanted.items())
    ]
    exact = [e for e in candidates if e.key.resolution == query.resolution]
    match = "exact"
    if not exact and query.allow_nearest:
        exact = _nearest(candidates, query.resolution)
        match = "nearest"
    if not exact:
        asked = f"{query.resolution}, {steps or 'any'} steps, {scheduler or 'any scheduler'}"
        hint = "" if query.allow_nearest else " (--allow-nearest accepts the same aspect ratio)"
        raise NotFound(f"no plan for {model.name} at {asked}{hint}; {_existing(model, entries)}")
    entry = _prefer_defaults(model, exact, wanted, query)
    return Resolved(
        model, entry.key, _select_version(model, entry, query.alias), match, _selector(query.alias)
    )


def _nearest(candidates: list[TargetEntry], wanted: Resolution) -> list[TargetEntry]:
    def distance(e: TargetEntry) -> float:
        return abs(math.log2(e.key.height / wanted.height))

    same_ratio = [
        e
        for e in candidates
        if e.key.height * wanted.width == e.key.width * wanted.height
        and distance(e) <= math.log2(MAX_NEAREST_SCALE) + 1e-12
    ]
    if not same_ratio:
        return []
    best = min(same_ratio, key=lambda e: (distance(e), -e.key.height)).key.resolution
    return [e for e in same_ratio if e.key.resolution == best]


def _prefer_defaults(
    model: ModelInfo, entries: list[TargetEntry], wanted: dict[str, Any], query: Query
) -> TargetEntry:
    open_fields = [name for name in _OPEN_FIELDS if wanted[name] is None]

    def agreement(e: TargetEntry) -> int:
        return sum(getattr(e.key, name) == getattr(model, name) for name in open_fields)

    best = max(agreement(e) for e in entries)
    top = [e for e in entries if agreement(e) == best]
    if len(top) > 1:
        listed = "; ".join(_describe_full(e.key) for e in top)
        raise NotFound(
            f"several plans for {model.name} match {query.resolution} and none is the model's default: "
            f"{listed}; narrow with --pipeline/--guidance/--dtype/--scheduler-config-hash"
        )
    return top[0]


def _select_version(model: ModelInfo, entry: TargetEntry, alias: str) -> VersionInfo:
    if alias == LATEST:
        latest = entry.latest()
        if latest is None:
            raise NotFound(f"no ready version for {model.name} at {entry.key.describe()}")
        return latest
    if alias not in entry.aliases:
        known = ", ".join([LATEST, *sorted(entry.aliases)])
        raise NotFound(
            f"no alias {alias!r} for {model.name} at {entry.key.describe()}; aliases: {known}"
        )
    number = entry.aliases[alias]
    version = next(v for v in entry.versions if v.version == number)
    if version.status != READY:
        raise NotFound(
            f"alias {alias!r} of {model.name} at {entry.key.describe()} points at v{number}, "
            f"which is {version.status}; promote another version"
        )
    return version


def _selector(alias: str) -> str:
    return LATEST if alias == LATEST else f"alias:{alias}"


def _describe_full(key: TargetKey) -> str:
    extra = [
        f"{name}={getattr(key, name)}" for name in _OPEN_FIELDS if getattr(key, name) is not None
    ]
    return key.describe() + (f" [{', '.join(extra)}]" if extra else "")


def _existing(model: ModelInfo, entries: list[TargetEntry]) -> str:
    mine = [e for e in entries if e.key.source == model.source and e.key.revision == model.revision]
    if not mine:
        revision = f"@{model.revision}" if model.revision else ""
        return f"no plans are published for {model.name} ({model.source}{revision})"
    listed = sorted({e.key.describe() for e in mine})
    return "published: " + "; ".join(listed)
