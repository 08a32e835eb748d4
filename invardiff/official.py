"""Reading and writing the reference implementation's cache-book files.

The reference ships DiT-XL/2 (DDIM, 50 steps) and FLUX.1-dev (FlowMatchEuler, 28 steps)
plans as JSON "cache books" with ``true`` meaning reuse. They carry no target, so the
target is the checkpoint they were published for, overridable by the caller.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from .architectures import REFERENCE_GEOMETRY
from .plan import CachePlan, PlanError, PlanTarget

REFERENCE_TARGETS = {
    "dit": PlanTarget(
        model_id="facebook/DiT-XL-2-256",
        pipeline="DiTPipeline",
        scheduler="DDIMScheduler",
        steps=50,
        height=256,
        width=256,
        guidance=4.0,
    ),
    "flux": PlanTarget(
        model_id="black-forest-labs/FLUX.1-dev",
        pipeline="FluxPipeline",
        scheduler="FlowMatchEulerDiscreteScheduler",
        steps=28,
        height=1024,
        width=1024,
        guidance=3.5,
        dtype="bfloat16",
    ),
}

PIXELS_PER_TOKEN = 16  # VAE factor 8 x patch 2 in DiT-XL/2 and FLUX.1 alike

_DIT_BOOKS = {"attn": "msa_cache_book", "mlp": "mlp_cache_book"}
_FLUX_DOUBLE = {"attn": "attn", "context_attn": "context_attn", "ff": "ff", "context_ff": "context_ff"}
_FLUX_SINGLE = {"single_attn": "attn", "single_mlp": "mlp"}

# File-name fields of the reference: stp50_n0.0_sth0.61_msa0.2_mlp0.2 / ..._th0.7_attn0.68_ff0_...
_NAME_FIELDS = {
    "stp": "steps",
    "n": "nonskip",
    "th": "q_step",
    "sth": "q_step",
    "msa": "q_attn",
    "mlp": "q_mlp",
    "attn": "q_attn",
    "ff": "q_ff",
    "ctxff": "q_context_ff",
    "sattn": "q_single_attn",
    "smlp": "q_single_mlp",
}


def is_official(document: Any) -> bool:
    """Whether a parsed JSON document is a reference cache book."""
    return isinstance(document, dict) and "step_cache_book" in document


def from_official(document: dict, name: str = "", **target_overrides: Any) -> CachePlan:
    """Convert a reference cache book into a :class:`CachePlan`."""
    try:
        gate = _matrix(document["step_cache_book"], "step_cache_book", ndim=1)
        if "msa_cache_book" in document:
            arch = "dit"
            modules = {k: _matrix(document[v], v) for k, v in _DIT_BOOKS.items()}
            extras: dict[str, Any] = {}
        elif "transformer_cache_book" in document:
            arch = "flux"
            double = document["transformer_cache_book"]
            single = document["single_transformer_cache_book"]
            modules = {k: _matrix(double[v], f"transformer_cache_book.{v}") for k, v in _FLUX_DOUBLE.items()}
            modules.update(
                {k: _matrix(single[v], f"single_transformer_cache_book.{v}") for k, v in _FLUX_SINGLE.items()}
            )
            extras = {}
            ip = double.get("ip_attn")
            if ip is not None and not np.array_equal(_matrix(ip, "ip_attn"), modules["attn"]):
                extras["ip_attn"] = ip  # kept only when it does not mirror attn
        else:
            raise PlanError("reference cache book has neither msa_cache_book (DiT) nor transformer_cache_book (FLUX)")
    except KeyError as exc:
        raise PlanError(f"reference cache book: missing {exc.args[0]!r}") from None
    target = replace(REFERENCE_TARGETS[arch], steps=int(gate.shape[0]), **target_overrides)
    geometry = REFERENCE_GEOMETRY[arch]
    if target.height and target.width:  # both reference models: 16 pixels per token side
        geometry = replace(geometry, tokens=(target.height // PIXELS_PER_TOKEN) * (target.width // PIXELS_PER_TOKEN))
    calibration = {"source": "reference", "params": _params_from_name(name)} if name else {"source": "reference"}
    return CachePlan(
        arch=arch,
        step_gate=gate,
        modules=modules,
        target=target,
        geometry=geometry,
        calibration=calibration,
        extras=extras,
    )


def to_official(plan: CachePlan) -> dict:
    """The reference cache-book document for ``plan`` (key order as the reference writes it)."""
    gate = [bool(v) for v in plan.step_gate]

    def book(kind: str) -> list[list[bool]]:
        return plan.modules[kind].tolist()

    if plan.arch == "dit":
        return {"step_cache_book": gate, **{v: book(k) for k, v in _DIT_BOOKS.items()}}
    double = {v: book(k) for k, v in _FLUX_DOUBLE.items()}
    double["ip_attn"] = plan.extras.get("ip_attn", book("attn"))
    single = {v: book(k) for k, v in _FLUX_SINGLE.items()}
    return {"step_cache_book": gate, "transformer_cache_book": double, "single_transformer_cache_book": single}


def load_plan(path: str | Path, **target_overrides: Any) -> CachePlan:
    """Read a plan file: this library's format or a reference cache book.

    ``target_overrides`` set target fields of an imported reference plan (e.g.
    ``model_id``, ``revision``, ``dtype``); they are refused for native plans, whose target
    is part of their identity.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PlanError(f"cannot read plan {path}: {exc.strerror}") from None
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PlanError(f"{path}: not valid JSON: {exc}") from None
    try:
        if is_official(document):
            return from_official(document, name=path.stem, **target_overrides)
        if target_overrides:
            raise PlanError("target overrides apply only to imported reference plans")
        return CachePlan.from_json(document)
    except PlanError as exc:
        raise PlanError(f"{path}: {exc}") from None


def _matrix(value: Any, where: str, ndim: int = 2) -> np.ndarray:
    array = np.asarray(value, dtype=object)
    if array.ndim != ndim or array.size == 0 or not all(isinstance(v, bool) for v in array.ravel()):
        shape = "list of booleans" if ndim == 1 else "list of equal-length lists of booleans"
        raise PlanError(f"{where}: must be a non-empty {shape}")
    return array.astype(bool)


def _params_from_name(name: str) -> dict[str, float]:
    params: dict[str, float] = {}
    for token in name.split("_"):
        match = re.fullmatch(r"([a-z]+)([0-9.]+)", token)
        if match and match.group(1) in _NAME_FIELDS:
            value = float(match.group(2))
            params[_NAME_FIELDS[match.group(1)]] = int(value) if match.group(1) == "stp" else value
    return params
