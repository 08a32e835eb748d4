"""Input validation at the registry's boundary, shared by the CLI, the service and Python callers.

Everything a user, a plan file or the environment hands the registry passes through here
before anything is written, so SQLite and PostgreSQL see the same, already valid values and a
bad value is :class:`~registry.errors.InvalidInput` (exit 2) on both. Pure Python (no database
or S3 code): the fetch path imports it.

Limits (documented in docs/registry.md):

- names (model aliases, version aliases): ``[a-z0-9][a-z0-9._-]{0,63}``, the whole string;
- text fields: non-empty, no control or invisible formatting characters (NUL, newline, the
  bidi overrides such as U+202E, zero-width characters: Unicode categories Cc, Cf, Cs, Zl,
  Zp), at most :data:`TEXT_LIMITS` characters (the database column sizes);
- steps 1..:data:`MAX_STEPS`, resolution sides 1..:data:`MAX_SIDE`, finite guidance;
- plan files: regular files of at most :data:`MAX_PLAN_BYTES`, JSON nested at most
  :data:`MAX_JSON_DEPTH` deep, finite numbers only.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import unicodedata
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import InvalidInput

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}", re.ASCII)
MAX_SIDE = 16384
MAX_STEPS = 10_000
MAX_GUIDANCE = 1e6
MAX_PLAN_BYTES = 16 * 1024 * 1024
MAX_JSON_DEPTH = 64
MAX_MIN_AGE = timedelta(days=3650)
MAX_PRESIGN_SECONDS = 7 * 24 * 3600  # the S3 limit for a presigned URL
TEXT_LIMITS = {
    "source": 512,
    "revision": 128,
    "pipeline": 128,
    "scheduler": 128,
    "scheduler_config_hash": 64,
    "dtype": 16,
}
_CONTROL = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")
# Unicode categories refused in text fields: controls (C0, C1), formatting characters (the
# bidi overrides and isolates U+202A-U+202E, U+2066-U+2069, zero-width ones), surrogates,
# line and paragraph separators.
_INVISIBLE = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", re.ASCII)


def check_name(name: Any, what: str) -> str:
    """A model or alias name: lower-case letters, digits, ``._-``, at most 64 characters."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise InvalidInput(
            f"invalid {what} name {shown(name)}: use 1-64 lower-case letters, digits, '.', '_', '-'"
        )
    return name


def check_text(value: Any, what: str, limit: int | None = None) -> str:
    """A non-empty string of at most ``limit`` characters without control characters."""
    limit = limit or TEXT_LIMITS[what]
    if not isinstance(value, str):
        raise InvalidInput(f"{what} must be a string, got {shown(value)}")
    if not value.strip():
        raise InvalidInput(f"{what} must not be empty")
    if len(value) > limit:
        raise InvalidInput(f"{what} is {len(value)} characters long; at most {limit} are allowed")
    if any(unicodedata.category(c) in _INVISIBLE for c in value):
        raise InvalidInput(
            f"{what} {shown(value)} contains a control character or an invisible formatting character "
            "(NUL, newline, a right-to-left override, ...)"
        )
    return value


def check_optional_text(value: Any, what: str) -> str | None:
    return None if value is None else check_text(value, what)


def check_int(value: Any, what: str, low: int, high: int) -> int:
    """An integer in ``[low, high]``; an integral float (``1024.0``) becomes the int."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{what} must be an integer, got {shown(value)}")
    if not low <= value <= high:
        raise InvalidInput(f"{what} must be between {low} and {high}, got {shown(value)}")
    return value


def check_number(value: Any, what: str) -> float | None:
    """A finite number (or None) as a float; ``-0.0`` becomes ``0.0`` so equal values hash equal."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInput(f"{what} must be a number, got {shown(value)}")
    too_big = isinstance(value, int) and abs(value) > MAX_GUIDANCE  # float() could overflow
    number = math.inf if too_big else float(value)
    if not math.isfinite(number) or abs(number) > MAX_GUIDANCE:
        raise InvalidInput(
            f"{what} must be a finite number of at most {MAX_GUIDANCE:g} in magnitude, "
            f"got {shown(value)}"
        )
    return number + 0.0  # -0.0 + 0.0 == 0.0


def check_settings(values: dict[str, Any]) -> dict[str, Any]:
    """Canonical pipeline settings (the fields shared by model aliases and plan targets).

    Text fields are checked against :data:`TEXT_LIMITS`; ``steps``, ``height`` and ``width``
    become ints; ``guidance`` a finite float. Absent keys stay absent.
    """
    out = dict(values)
    for name in ("source", "revision", "pipeline", "scheduler", "scheduler_config_hash", "dtype"):
        if name in out:
            out[name] = check_optional_text(out[name], name)
    if out.get("steps") is not None:
        out["steps"] = check_int(out["steps"], "steps", 1, MAX_STEPS)
    for side in ("height", "width"):
        if out.get(side) is not None:
            out[side] = check_int(out[side], side, 1, MAX_SIDE)
    if "guidance" in out:
        out["guidance"] = check_number(out["guidance"], "guidance")
    return out


def check_target(values: dict[str, Any]) -> dict[str, Any]:
    """The fields of a plan target, canonical: equal targets give equal values (and key hash)."""
    out = check_settings(values)
    for name in ("source", "steps", "height", "width"):
        if out.get(name) is None:
            raise InvalidInput(f"the plan target needs {name}")
    return out


def check_plan_ref(ref: Any) -> str:
    """A plan reference: 6 to 64 hex digits of a sha256, optionally ``sha256:``-prefixed."""
    text = ref.lower().removeprefix("sha256:") if isinstance(ref, str) else ""
    if not re.fullmatch(r"[0-9a-f]{6,64}", text):
        raise InvalidInput(
            f"plan reference {shown(ref)}: give at least 6 hex digits of its sha256 (at most 64)"
        )
    return text


def check_min_age(min_age: timedelta, what: str = "--min-age") -> timedelta:
    """A gc age guard between 0 and :data:`MAX_MIN_AGE`."""
    if not isinstance(min_age, timedelta) or not timedelta(0) <= min_age <= MAX_MIN_AGE:
        limit = int(MAX_MIN_AGE.total_seconds())
        raise InvalidInput(f"{what} must be between 0 and {limit} seconds, got {min_age}")
    return min_age


# ---- plan files and other input files ----------------------------------------------------
def read_plan_file(path: Path, limit: int = MAX_PLAN_BYTES) -> bytes:
    """The bytes of a plan file: a regular file of at most ``limit`` bytes (see
    :func:`read_regular_file`)."""
    return read_regular_file(path, limit, "plan")


def read_regular_file(path: Path, limit: int, what: str) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (``what`` names it in errors).

    Opened without blocking (a FIFO would wait for a writer) and never read past the limit,
    so ``/dev/zero``, a FIFO or a huge file is refused at once.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise InvalidInput(f"cannot read {what} {path}: it does not exist") from None
    except OSError as exc:
        raise InvalidInput(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InvalidInput(f"{what} {path} is not a regular file")
        if info.st_size > limit:
            raise InvalidInput(f"{what} {path} is {info.st_size} bytes; the limit is {limit} bytes")
        chunks, size = [], 0
        while size <= limit and (chunk := os.read(fd, min(1 << 20, limit + 1 - size))):
            chunks.append(chunk)
            size += len(chunk)
        data = b"".join(chunks)
    except OSError as exc:
        raise InvalidInput(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise InvalidInput(f"{what} {path} is over the limit of {limit} bytes")
    return data


def parse_json(data: bytes, where: str) -> Any:
    """Parse JSON with finite numbers only, nested at most :data:`MAX_JSON_DEPTH` deep."""
    try:
        document = json.loads(data, parse_constant=_no_constant)
    except RecursionError:
        raise InvalidInput(f"{where}: JSON nested too deeply") from None
    except InvalidInput as exc:
        raise InvalidInput(f"{where}: {exc}") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError, int digit limit
        raise InvalidInput(f"{where}: not valid JSON: {exc}") from None
    check_json_value(document, where)
    return document


def check_json_value(document: Any, where: str) -> Any:
    """Refuse non-finite floats and nesting deeper than :data:`MAX_JSON_DEPTH` (iteratively)."""
    pending = [(document, 1)]
    while pending:
        value, depth = pending.pop()
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidInput(f"{where}: non-finite number {value}")
        if isinstance(value, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise InvalidInput(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
            children = value.values() if isinstance(value, dict) else value
            pending.extend((child, depth + 1) for child in children)
    return document


def _no_constant(name: str) -> Any:
    raise InvalidInput(f"non-finite number {name} (JSON has no NaN or Infinity)")


# ---- configuration ------------------------------------------------------------------------
def check_store_url(url: str) -> str:
    """An ``s3://`` store URL must name a valid bucket (S3 rules) and a clean prefix."""
    if not url.startswith("s3://"):
        return url
    bucket, _, prefix = url[len("s3://") :].partition("/")
    if not bucket:
        raise InvalidInput(
            f"store URL {mask_secrets(url)!r} names no bucket (expected s3://bucket/prefix)"
        )
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise InvalidInput(
            f"store URL {mask_secrets(url)!r}: invalid bucket name; use 3-63 lower-case letters, "
            "digits, '.' and '-', starting and ending with a letter or digit"
        )
    if len(prefix) > 512 or _CONTROL.search(prefix):
        raise InvalidInput(
            "store URL: the prefix must be at most 512 characters without control characters"
        )
    return url


def check_endpoint_url(url: str | None) -> str | None:
    """An S3 endpoint: ``http(s)://host[:port][/path]`` with a port in 1..65535."""
    if url is None:
        return None
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        parts, port = None, None
    if (
        parts is None
        or parts.scheme not in ("http", "https")
        or not parts.hostname
        or (port is not None and not 1 <= port <= 65535)
        or _CONTROL.search(url)
    ):
        raise InvalidInput(
            f"INVARDIFF_S3_ENDPOINT_URL {mask_secrets(url)!r} is not an http(s)://host[:port] URL"
        )
    return url


# ---- secrets ------------------------------------------------------------------------------
_USERINFO_PASSWORD = re.compile(r"(?<=:)[^:@/\s'\"]+(?=@)")
_QUERY_PASSWORD = re.compile(r"(?i)(password=)[^&\s'\"]+")
_AUTHORITY = re.compile(r"^[A-Za-z][\w+.-]*:/*(?P<userinfo>[^\s]*)@")


def url_secrets(url: str | None) -> list[str]:
    """The passwords written in a (possibly malformed) URL, longest first."""
    if not url:
        return []
    found = [m.group(0)[len("password=") :] for m in _QUERY_PASSWORD.finditer(url)]
    match = _AUTHORITY.match(url)
    if match:
        userinfo = match.group("userinfo")
        for candidate in (userinfo, userinfo.split("@")[0]):
            if ":" in candidate:
                found.append(candidate.split(":", 1)[1])
    return sorted({s for s in found if s}, key=len, reverse=True)


def mask_secrets(text: str, secrets: list[str] | tuple[str, ...] = ()) -> str:
    """``text`` with every known secret and every URL password (``:pw@``, ``password=``) masked."""
    for secret in secrets:
        if len(secret) >= 3:  # shorter ones would mask ordinary words; the patterns catch them
            text = text.replace(secret, "***")
    text = _QUERY_PASSWORD.sub(r"\1***", text)
    return _USERINFO_PASSWORD.sub("***", text)


def shown(value: Any, limit: int = 40) -> str:
    """A short, one-line repr for messages (long input is cut)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
