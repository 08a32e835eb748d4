"""The published index: ``index/<model>.json`` in the store, for clients without a database.

One document per model alias: the alias itself and every target of its checkpoint with
versions (sha256, size, object key) and aliases. Written canonically after every change, so
the same registry state always gives the same bytes.
"""

from __future__ import annotations

import json

from .errors import IntegrityFailure
from .matching import ModelInfo, TargetEntry, canonical

INDEX_FORMAT = "invardiff.registry-index"
INDEX_FORMAT_VERSION = 1


def index_key(model: str) -> str:
    """The object key of a model's index."""
    return f"index/{model}.json"


def encode_index(model: ModelInfo, entries: list[TargetEntry]) -> bytes:
    """The canonical index document of ``model``."""
    document = {
        "format": INDEX_FORMAT,
        "format_version": INDEX_FORMAT_VERSION,
        "model": model.to_json(),
        "targets": [e.to_json() for e in entries],
    }
    return canonical(document)


def decode_index(data: bytes, where: str) -> tuple[ModelInfo, list[TargetEntry]]:
    """Parse an index document; a malformed one is an integrity failure."""
    try:
        document = json.loads(data)
        if (
            document.get("format") != INDEX_FORMAT
            or document.get("format_version") != INDEX_FORMAT_VERSION
        ):
            raise ValueError("not a registry index of a supported version")
        return ModelInfo.from_json(document["model"]), [
            TargetEntry.from_json(t) for t in document["targets"]
        ]
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise IntegrityFailure(f"index {where} is unreadable: {exc}") from None
