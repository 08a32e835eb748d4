"""Nested JSON-like data as text for people: one ``key: value`` line per field, nested
mappings indented under their key. Commands print this by default and JSON with ``--json``."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any


def render(data: Mapping[str, Any], indent: int = 0) -> str:
    """``data`` as indented lines: values aligned per level, ``None`` and empty values as
    ``none``, lists of scalars on one line, lists of mappings as numbered items."""
    pad = "  " * indent
    width = max((len(str(key)) for key in data), default=0) + 1
    lines = []
    for key, value in data.items():
        label = f"{pad}{str(key) + ':':<{width}}"
        if isinstance(value, Mapping) and value:
            lines += [f"{pad}{key}:", render(value, indent + 1)]
        elif isinstance(value, (list, tuple)) and any(isinstance(v, Mapping) for v in value):
            lines.append(f"{pad}{key}:")
            for number, item in enumerate(value, 1):
                nested = item if isinstance(item, Mapping) else {"value": item}
                lines += [f"{pad}  [{number}]", render(nested, indent + 2)]
        else:
            lines.append(f"{label} {scalar(value)}")
    return "\n".join(lines)


def scalar(value: Any) -> str:
    """A leaf value as text: strings bare, lists comma-separated, the rest as JSON."""
    if value is None or value == {} or value == [] or value == ():
        return "none"
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return ", ".join(scalar(v) for v in value)
    return json.dumps(value, default=str)
