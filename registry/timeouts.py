"""Bounds on waiting for the database and the object store (see docs/registry.md).

Each is read from the environment when a connection is made:

- ``INVARDIFF_DB_TIMEOUT`` (seconds, default 30): connect timeout (at most 10 s), statement,
  lock and idle-in-transaction timeouts on PostgreSQL, SQLite's busy timeout, and the
  client-side deadline of every database transaction (a server that accepts and never
  answers is cut off after it).
- ``INVARDIFF_S3_TIMEOUT`` (seconds, default 10): connect and read timeout of each S3 request.
- ``INVARDIFF_S3_ATTEMPTS`` (default 2): attempts per S3 request (1 = no retry).
- ``INVARDIFF_LEASE_TTL`` (seconds, default 600): how long a publish's claim on an object
  (and gc's) protects it; a crashed command's claims expire after it.
"""

from __future__ import annotations

import math
import os

from .errors import InvalidInput


def _seconds(name: str, default: float, minimum: float = 0.001, maximum: float = 86400) -> float:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and minimum <= value <= maximum):
        raise InvalidInput(
            f"{name}={text!r}: expected a number between {minimum:g} and {maximum:g}"
        )
    return value


def db_timeout() -> float:
    """``INVARDIFF_DB_TIMEOUT``: the bound on one database wait, in seconds."""
    return _seconds("INVARDIFF_DB_TIMEOUT", 30.0)


def s3_timeout() -> float:
    """``INVARDIFF_S3_TIMEOUT``: connect and read timeout of one S3 request, in seconds."""
    return _seconds("INVARDIFF_S3_TIMEOUT", 10.0)


def s3_attempts() -> int:
    """``INVARDIFF_S3_ATTEMPTS``: total attempts of one S3 request."""
    return int(_seconds("INVARDIFF_S3_ATTEMPTS", 2, minimum=1, maximum=10))


def lease_ttl() -> float:
    """``INVARDIFF_LEASE_TTL``: lifetime of a publish's or gc's claim on an object, seconds."""
    return _seconds("INVARDIFF_LEASE_TTL", 600.0, minimum=1)
