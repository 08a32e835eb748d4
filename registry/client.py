"""Fetching plans: resolve a query, download into the local cache, verify, return the path.

Resolution goes through the database when one is configured, else through the index
objects published in the store (read access to the store is all a client needs). A cache
hit needs neither: this module imports no database or S3 code until a miss.

A query's cached answer (its ref) is used for ``Config.ref_ttl`` seconds (``INVARDIFF_REF_TTL``,
default 600); after that the query is resolved again, so an alias move or a new ``latest``
reaches clients within the TTL. When the registry cannot be reached then, the expired answer
is used (offline), marked ``stale``. An alias answered by an earlier revision's plan (the
model alias moved to a revision with no promoted plan yet; rule 6 of :mod:`registry.matching`)
is marked ``stale`` too: ``stale_reasons`` says which (``offline``, ``revision_changed``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cache import Cache
from .config import Config
from .errors import IntegrityFailure, NotFound, Unreachable
from .matching import (
    LATEST,
    Query,
    Resolution,
    Resolved,
    resolve,
)
from .store import atomic_write

if TYPE_CHECKING:
    from invardiff import CachePlan

    from .store import ObjectStore


@dataclass(frozen=True)
class FetchResult:
    """Where a fetched plan is and how it was chosen."""

    path: Path
    cache_path: Path
    sha256: str
    size: int
    version: int
    match: str
    selected_by: str
    model: str
    target: dict[str, Any]
    requested: str
    cached: bool
    stale: bool = False
    stale_reasons: tuple[str, ...] = ()
    model_revision: str | None = None  # the alias's revision (the target's when it is served)

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "cache_path": str(self.cache_path),
            "sha256": self.sha256,
            "size": self.size,
            "version": self.version,
            "match": self.match,
            "selected_by": self.selected_by,
            "model": self.model,
            "requested": self.requested,
            "resolution": f"{self.target['width']}x{self.target['height']}",
            "target": self.target,
            "cached": self.cached,
            "stale": self.stale,
            "stale_reasons": list(self.stale_reasons),
            "model_revision": self.model_revision,
        }


class StoreIndex:
    """Resolves queries from ``index/<model>.json`` objects: store read access only."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    def resolve(self, query: Query) -> Resolved:
        from .index import decode_index, index_key

        key = index_key(query.model)
        try:
            data = self.store.get(key)
        except NotFound:
            try:
                names = sorted(
                    o.key[len("index/") : -len(".json")] for o in self.store.list("index/")
                )
                known = f"models in {self.store.url}: {', '.join(names) or 'none'}"
            except Unreachable:  # read-only credentials may not allow listing
                known = f"no readable index for it in {self.store.url} (listing models was refused)"
            raise NotFound(f"unknown model {query.model!r}; {known}") from None
        model, entries = decode_index(data, f"{self.store.url}/{key}")
        return resolve(model, query, entries)


def fetch_plan(
    query: Query,
    config: Config | None = None,
    refresh: bool = False,
    use_index: bool = False,
    dest: Path | None = None,
) -> FetchResult:
    """Resolve ``query`` and make its plan available locally (see the module doc)."""
    config = config or Config.from_env()
    cache = Cache(config.cache_dir)
    identity = {"store": config.store_url, "query": query.to_json()}
    found = None if refresh else cache.lookup(identity)
    if found is not None and answer_problem(*found, query) is not None:
        found = None  # an inconsistent ref is a cache miss
    record, data = found or (None, b"")
    resolved_at = record.get("resolved_at") if record else None
    cached = _is_number(resolved_at) and 0 <= time.time() - resolved_at < config.ref_ttl
    offline = False
    if not cached:
        try:
            fresh, data = _download(query, config, cache, use_index)
        except Unreachable:
            if record is None:
                raise
            cached = offline = True  # offline: the expired answer is better than none
        else:
            record = {**fresh, "resolved_at": time.time()}
            cache.put_ref(identity, record)
    cache_path = cache.blob_path(record["sha256"])
    path = cache_path
    if dest is not None:
        target = json.loads(data)["target"]  # checked by answer_problem: ints, and the query's
        name = (
            f"{query.model}_{target['width']}x{target['height']}_{target['steps']}steps"
            f"_v{record['version']}.json"
        )
        path = Path(dest) / name
        atomic_write(path, data, f"destination {path}")
    return FetchResult(
        path=path,
        cache_path=cache_path,
        sha256=record["sha256"],
        size=record["size"],
        version=record["version"],
        match=record["match"],
        selected_by=record["selected_by"],
        model=record["model"],
        target=record["target"],
        requested=str(query.resolution),
        cached=cached,
        stale=bool(reasons := _stale_reasons(record, offline)),
        stale_reasons=reasons,
        model_revision=record.get("model_revision", record["target"].get("revision")),
    )


def _stale_reasons(record: dict[str, Any], offline: bool) -> tuple[str, ...]:
    reasons = ("offline",) if offline else ()
    if record.get("stale_reason") == "revision_changed":
        reasons += ("revision_changed",)
    return reasons


def _is_int(value: Any, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def answer_problem(record: Any, data: bytes, query: Query) -> str | None:
    """What is wrong with an answer (a cache ref, or a resolution from an index) to ``query``.

    ``data`` are the plan bytes ``record`` names, already checked against its sha256 and
    size. The answer must be well formed, be for the queried model, alias and settings, and
    describe the plan's own target: so an edited ref or index cannot serve another plan or
    put a crafted name into a path. None when consistent.
    """
    if not isinstance(record, dict) or not isinstance(record.get("target"), dict):
        return "malformed answer"
    target = record["target"]
    if record.get("model") != query.model:
        return f"answer is for model {record.get('model')!r}, not {query.model!r}"
    if not _is_int(record.get("version"), 1) or record.get("match") not in ("exact", "nearest"):
        return "malformed version or match"
    expected = "latest" if query.alias == LATEST else f"alias:{query.alias}"
    if record.get("selected_by") != expected:
        return f"answer was selected by {record.get('selected_by')!r}, not {expected!r}"
    try:
        document = json.loads(data)
        plan, steps = document["target"], document["steps"]
        own = {**{k: plan.get(k) for k in _PLAN_FIELDS}, "steps": steps}
    except (ValueError, TypeError, KeyError, AttributeError):
        return "the plan does not record its target"
    if {k: target.get(k) for k in own} != own:
        return "answer and plan disagree on the target"
    if not all(_is_int(own[k], 1) for k in ("steps", "width", "height")):
        return "the plan's steps and resolution are not positive integers"
    source = target.get("source")
    if not isinstance(source, str) or plan.get("model_id") not in (
        source,
        source.removeprefix("hf://"),
        query.model,
    ):
        return "answer and plan disagree on the checkpoint"
    wanted = {k: getattr(query, k) for k in _QUERY_FIELDS if getattr(query, k) is not None}
    if any(target.get(k) != v for k, v in wanted.items()):
        return "the plan does not have the queried settings"
    exact = Resolution(width=own["width"], height=own["height"]) == query.resolution
    if not exact and (record["match"] == "exact" or not query.allow_nearest):
        return "the plan is not for the queried resolution"
    return None


_PLAN_FIELDS = (
    "revision", "pipeline", "scheduler", "scheduler_config_hash", "height", "width", "guidance",
    "dtype",
)  # fmt: skip
_QUERY_FIELDS = ("steps", "scheduler", "pipeline", "scheduler_config_hash", "guidance", "dtype")


def _download(
    query: Query, config: Config, cache: Cache, use_index: bool
) -> tuple[dict[str, Any], bytes]:
    """Resolve ``query``, download (or find in the cache) and check the plan; answer and bytes."""
    from .store import BlobRef, blob_key, get_blob, open_store

    if use_index or not config.database_url:
        store = open_store(config.store_url, config.s3_endpoint_url)
        resolved = StoreIndex(store).resolve(query)
    else:
        from .reading import Reader

        reader = Reader.open(config)
        store = reader.store
        resolved = reader.resolve(query)
    version = resolved.version
    where = f"the answer from {store.url}"
    if not (isinstance(version.sha256, str) and version.object_key == blob_key(version.sha256)):
        raise IntegrityFailure(f"{where} names object {version.object_key!r} for its sha256")
    data = cache.read_blob(version.sha256, version.size)
    if data is None:
        data = get_blob(store, BlobRef(version.object_key, version.sha256, version.size))
    record = {
        "sha256": version.sha256,
        "size": version.size,
        "version": version.version,
        "match": resolved.match,
        "selected_by": resolved.selected_by,
        "model": resolved.model.name,
        "target": resolved.target.to_json(),
        "stale_reason": resolved.stale_reason,
        "model_revision": resolved.model.revision,
    }
    problem = answer_problem(record, data, query)
    if problem is not None:
        raise IntegrityFailure(f"{where} does not match the plan it names: {problem}")
    cache.put_blob(data, version.sha256)
    return record, data


def fetch(
    model: str,
    resolution: int | str,
    steps: int | None = None,
    scheduler: str | None = None,
    alias: str = LATEST,
    allow_nearest: bool = False,
    refresh: bool = False,
    config: Config | None = None,
) -> CachePlan:
    """Fetch the plan for ``model`` at ``resolution`` (``1024`` or ``"1024x768"``) as a CachePlan.

    Same rules as ``invardiff-registry fetch``; raises :class:`registry.errors.RegistryError`
    subclasses (``NotFound``, ``IntegrityFailure``, ...) on failure.
    """
    from invardiff import CachePlan

    query = Query(
        model=model,
        resolution=Resolution.parse(str(resolution)),
        steps=steps,
        scheduler=scheduler,
        alias=alias,
        allow_nearest=allow_nearest,
    )
    return CachePlan.from_bytes(fetch_plan(query, config, refresh=refresh).path.read_bytes())
