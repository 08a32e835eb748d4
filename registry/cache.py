"""The local client cache (Hugging Face style): blobs by sha256, refs by query.

Layout under ``INVARDIFF_CACHE_DIR``::

    blobs/sha256/<sha256>.json   plan bytes, checked against their name on every use
    refs/<query-key>.json        which blob (and version, match) answered a query

A hit is a ref whose blob exists and still hashes right: no database, no store, no network.
Refs and blobs are untrusted input: a malformed ref is a miss, and the client checks a ref
against the plan bytes it names (:func:`registry.client.answer_problem`).
Refs are kept until ``fetch --refresh`` re-resolves the query. Downloads are verified
before they are written, so a failed check leaves nothing in the cache. Files are written to a
temporary name and renamed into place, so concurrent fetches never see partial files.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from .matching import canonical
from .store import atomic_write, intact

SHA256 = re.compile(r"[0-9a-f]{64}")


class Cache:
    """A cache directory (created on first write)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def blob_path(self, sha256: str) -> Path:
        return self.root / "blobs" / "sha256" / f"{sha256}.json"

    def ref_path(self, identity: dict[str, Any]) -> Path:
        """The ref file of a query; ``identity`` is the registry and the full query."""
        digest = hashlib.sha256(canonical(identity)).hexdigest()
        return self.root / "refs" / f"{digest}.json"

    def read_blob(self, sha256: str, size: int) -> bytes | None:
        """The blob's bytes if it is present and intact.

        A damaged blob is left alone: the download that follows replaces it atomically, and
        deleting it here could remove an intact blob another process just renamed into place.
        """
        if not (isinstance(sha256, str) and SHA256.fullmatch(sha256)):
            return None  # never a path from a malformed ref
        try:
            data = self.blob_path(sha256).read_bytes()
        except OSError:
            return None
        return data if intact(data, sha256, size) else None

    def valid_blob(self, sha256: str, size: int) -> Path | None:
        """The blob's path if it is present and intact."""
        return self.blob_path(sha256) if self.read_blob(sha256, size) is not None else None

    def lookup(self, identity: dict[str, Any]) -> tuple[dict[str, Any], bytes] | None:
        """The recorded answer for a query and its blob's bytes, when intact (any age)."""
        try:
            record = json.loads(self.ref_path(identity).read_bytes())
            data = self.read_blob(record["sha256"], record["size"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return (record, data) if data is not None else None

    def put_blob(self, data: bytes, sha256: str) -> Path:
        """Store verified bytes (see :func:`registry.store.get_blob`) under their sha256."""
        path = self.blob_path(sha256)
        atomic_write(path, data, f"cache {path}")
        return path

    def put_ref(self, identity: dict[str, Any], record: dict[str, Any]) -> None:
        path = self.ref_path(identity)
        atomic_write(path, json.dumps(record, sort_keys=True).encode(), f"cache {path}")
