"""Where the registry lives: database, object store and local cache.

Precedence: explicit argument (CLI flag) > environment variable > default.

- ``INVARDIFF_HOME`` (default ``~/.invardiff``): the embedded registry, a SQLite file
  ``registry.db`` and a local object store ``store/``, and the client cache ``cache/``.
- ``INVARDIFF_DATABASE_URL``: a SQLAlchemy URL (``postgresql+psycopg://...``).
- ``INVARDIFF_STORE_URL``: ``s3://bucket/prefix``, ``file:///dir`` or a directory path.
- ``INVARDIFF_S3_ENDPOINT_URL``: S3 endpoint (MinIO, SeaweedFS); otherwise boto3's own
  resolution (``AWS_ENDPOINT_URL``, region, credentials chain).
- ``INVARDIFF_CACHE_DIR`` (default ``$INVARDIFF_HOME/cache``): the client cache of fetched plans.
- ``INVARDIFF_REF_TTL`` (seconds, default 600): how long a cached answer to a fetch query is
  used without asking the registry again (see :func:`registry.client.fetch_plan`).

With ``INVARDIFF_STORE_URL`` set and no ``INVARDIFF_DATABASE_URL``, there is no database:
the registry is read-only and resolves through the index objects published in the store.
A database other than SQLite needs ``INVARDIFF_STORE_URL``: the default store is a folder on
this host, which other hosts sharing the database would not see.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InvalidInput
from .validation import check_endpoint_url, check_store_url

DEFAULT_REF_TTL = 600.0


@dataclass(frozen=True)
class Config:
    """Resolved locations. ``database_url`` is ``None`` for a store-only (read-only) client."""

    database_url: str | None = field(repr=False)  # may hold a password
    store_url: str
    cache_dir: Path
    s3_endpoint_url: str | None = field(default=None, repr=False)
    ref_ttl: float = DEFAULT_REF_TTL

    def __post_init__(self) -> None:
        check_store_url(self.store_url)
        check_endpoint_url(self.s3_endpoint_url)

    @classmethod
    def from_env(
        cls,
        database_url: str | None = None,
        store_url: str | None = None,
        cache_dir: str | Path | None = None,
        env: dict[str, str] | None = None,
    ) -> Config:
        """Resolve each location from the arguments, then the environment, then defaults."""
        env = os.environ if env is None else env
        home = Path(env.get("INVARDIFF_HOME") or Path.home() / ".invardiff").expanduser()
        store_url = store_url or env.get("INVARDIFF_STORE_URL")
        database_url = database_url or env.get("INVARDIFF_DATABASE_URL")
        if not store_url and _shared_database(database_url):
            raise InvalidInput(
                "a shared database needs a shared object store: set INVARDIFF_STORE_URL "
                "(or --store-url) to s3://bucket/prefix, or to a directory to keep plans on this host"
            )
        if not store_url:
            store_url = str(home / "store")
            database_url = database_url or f"sqlite:///{home / 'registry.db'}"
        cache_dir = cache_dir or env.get("INVARDIFF_CACHE_DIR") or home / "cache"
        return cls(
            database_url=database_url,
            store_url=store_url,
            cache_dir=Path(cache_dir).expanduser(),
            s3_endpoint_url=env.get("INVARDIFF_S3_ENDPOINT_URL") or None,
            ref_ttl=_ttl(env.get("INVARDIFF_REF_TTL")),
        )


def _shared_database(url: str | None) -> bool:
    """Whether ``url`` names a database server (anything but SQLite); malformed: not decided here."""
    scheme, found, _ = (url or "").partition("://")
    return bool(found) and scheme.split("+")[0].lower() != "sqlite"


def _ttl(text: str | None) -> float:
    if not text:
        return DEFAULT_REF_TTL
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise InvalidInput(f"INVARDIFF_REF_TTL={text!r}: expected a number of seconds >= 0")
    return value
