"""Fetching plans: resolve a query, download into the local cache, verify, return the path.

Resolution goes through the database when one is configured, else through the index
objects published in the store (read access to the store is all a client needs). A cache
hit needs neither: this module imports no database or S3 code until a miss.

A query's cached answer (its ref) is used for ``Config.ref_ttl`` seconds (``INVARDIFF_REF_TTL``,
default 600); after that the query is resolved again, so an alias move or a new ``latest``
reaches clients within the TTL. When the registry cannot be reached then, the expired answer
is used (offline), marked ``stale``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cache import Cache
from .config import Config
from .errors import NotFound, Unreachable
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
    record = None if refresh else cache.lookup(identity)
    age = time.time() - record.get("resolved_at", 0) if record else None
    cached = age is not None and 0 <= age < config.ref_ttl
    stale = False
    if not cached:
        try:
            fresh = _download(query, config, cache, use_index)
        except Unreachable:
            if record is None:
                raise
            cached = stale = True  # offline: the expired answer is better than none
        else:
            record = {**fresh, "resolved_at": time.time()}
            cache.put_ref(identity, record)
    cache_path = cache.blob_path(record["sha256"])
    path = cache_path
    if dest is not None:
        target = record["target"]
        name = f"{record['model']}_{target['width']}x{target['height']}_{target['steps']}steps_v{record['version']}.json"
        path = Path(dest) / name
        atomic_write(path, cache_path.read_bytes(), f"destination {path}")
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
        stale=stale,
    )


def _download(query: Query, config: Config, cache: Cache, use_index: bool) -> dict[str, Any]:
    from .store import BlobRef, get_blob, open_store

    if use_index or not config.database_url:
        store = open_store(config.store_url, config.s3_endpoint_url)
        resolved = StoreIndex(store).resolve(query)
    else:
        from .service import Registry

        registry = Registry.open(config)
        store = registry.store
        resolved = registry.resolve(query)
    version = resolved.version
    if cache.valid_blob(version.sha256, version.size) is None:
        ref = BlobRef(version.object_key, version.sha256, version.size)
        cache.put_blob(get_blob(store, ref), version.sha256)
    return {
        "sha256": version.sha256,
        "size": version.size,
        "version": version.version,
        "match": resolved.match,
        "selected_by": resolved.selected_by,
        "model": resolved.model.name,
        "target": resolved.target.to_json(),
    }


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
