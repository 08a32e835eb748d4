"""Trajectory statistics as stored shards: each object carries its own checksum and request key.

A shard is the engine's ``TrajectoryStats`` safetensors bytes with one more metadata entry,
``invardiff.shard``: the job key, phase and trajectory index it was computed for, and the
sha256 and size of its tensor data. :func:`check` refuses bytes that are truncated, altered,
or another shard's (swapped in the store), so the driver recomputes them instead of merging
them; the engine reads a sealed shard like any statistics (extra metadata is ignored).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

SHARD_META = "invardiff.shard"
_HEADER_LIMIT = 100_000_000  # safetensors' own bound on a header's size


class DamagedShard(ValueError):
    """A stored shard that is not the intact statistics of its job, phase and index."""


def _split(data: bytes) -> tuple[dict[str, Any], bytes]:
    if len(data) < 8:
        raise DamagedShard(f"{len(data)} bytes: truncated before the header")
    size = int.from_bytes(data[:8], "little")
    if size > min(_HEADER_LIMIT, len(data) - 8):
        raise DamagedShard(f"{len(data)} bytes: truncated inside the header")
    try:
        header = json.loads(data[8 : 8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise DamagedShard("unreadable header") from None
    if not isinstance(header, dict):
        raise DamagedShard("unreadable header")
    return header, data[8 + size :]


def seal(stats: bytes, job_key: str, phase: int, index: int) -> bytes:
    """``stats`` (``TrajectoryStats.to_bytes()``) with the shard's identity and checksum."""
    header, body = _split(stats)
    record = {
        "job_key": job_key,
        "phase": phase,
        "index": index,
        "sha256": hashlib.sha256(body).hexdigest(),
        "size": len(body),
    }
    header["__metadata__"] = {**header.get("__metadata__", {}), SHARD_META: json.dumps(record)}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors aligns the data on 8 bytes
    return len(text).to_bytes(8, "little") + text + body


def check(data: bytes, job_key: str, phase: int, index: int) -> None:
    """Raise :class:`DamagedShard` unless ``data`` is the intact shard ``phase``/``index`` of
    job ``job_key`` (the message says what is wrong)."""
    header, body = _split(data)
    try:
        record = json.loads(header["__metadata__"][SHARD_META])
    except (KeyError, TypeError, json.JSONDecodeError):
        raise DamagedShard("no shard record (not written by this fleet version)") from None
    where = (record.get("job_key"), record.get("phase"), record.get("index"))
    if where != (job_key, phase, index):
        raise DamagedShard(
            f"holds shard phase-{where[1]}/{where[2]} of job {str(where[0])[:12]}, "
            f"not phase-{phase}/{index} of job {job_key[:12]}"
        )
    if len(body) != record.get("size"):
        raise DamagedShard(f"tensor data is {len(body)} bytes, not {record.get('size')}: truncated")
    if hashlib.sha256(body).hexdigest() != record.get("sha256"):
        raise DamagedShard("tensor data fails its sha256")
