"""The cache plan: which module to reuse at which step, and what it was calibrated for.

A :class:`CachePlan` is data. It is stored as canonical JSON (sorted keys, no whitespace,
flags as strings of ``0``/``1`` per step) and identified by the sha256 of those bytes, so the
same plan always has the same bytes and the same identity on every machine.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .architectures import (
    ARCHITECTURES,
    CALL_ORDER,
    MODULE_KINDS,
    REFERENCE_GEOMETRY,
    Geometry,
    module_flops,
    module_kinds,
    module_output_elements,
)

FORMAT = "invardiff.cache-plan"
FORMAT_VERSION = 1

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}

# What a skipped step's H is (docs/step-reuse.md): "hold" reuses the last computed H
# unchanged; "linear" extrapolates it from the last two computed steps, first order in the
# step index; "linear-t" likewise in the timestep the transformer is called with;
# "quadratic-t" second order in it, from the last three computed steps.
STEP_REUSE = ("hold", "linear", "linear-t", "quadratic-t")
# What a module flagged reused on a computed step returns: "hold" its last computed output;
# "linear" / "linear-t" a first-order forecast from its last two computed outputs, in the
# step index / in the timestep (TaylorSeer-like).
MODULE_REUSE = ("hold", "linear", "linear-t")
# Each rule: (polynomial order, extrapolation variable).
RULES = {"hold": (0, "step"), "linear": (1, "step"), "linear-t": (1, "timestep"), "quadratic-t": (2, "timestep")}


class PlanError(ValueError):
    """A plan file or object that is malformed, inconsistent, or does not fit a model."""


@dataclass(frozen=True)
class PlanTarget:
    """The exact sampling setup a plan was calibrated for; a plan is valid only for it.

    ``timesteps`` is the schedule as the transformer is called with it (``None`` for an
    imported plan that did not record one: the pipeline scheduler's schedule is used).
    """

    model_id: str
    revision: str | None = None
    pipeline: str | None = None
    scheduler: str | None = None
    scheduler_config_hash: str | None = None
    timesteps: tuple[float, ...] | None = None
    steps: int = 0
    height: int | None = None
    width: int | None = None
    guidance: float | None = None
    dtype: str | None = None

    def __post_init__(self) -> None:
        # The one canonical form of a target (the registry publishes it unchanged, so a
        # plan's sha256 never changes): an integral float side is an int, guidance a float
        # with -0.0 as 0.0.
        for side in ("height", "width"):
            value = getattr(self, side)
            if isinstance(value, float) and value.is_integer():
                object.__setattr__(self, side, int(value))
        if isinstance(self.guidance, (int, float)) and not isinstance(self.guidance, bool):
            object.__setattr__(self, "guidance", float(self.guidance) + 0.0)

    def to_json(self) -> dict:
        data = {
            "model_id": self.model_id,
            "revision": self.revision,
            "pipeline": self.pipeline,
            "scheduler": self.scheduler,
            "scheduler_config_hash": self.scheduler_config_hash,
            "timesteps": None if self.timesteps is None else [float(t) for t in self.timesteps],
            "steps": self.steps,
            "height": self.height,
            "width": self.width,
            "guidance": None if self.guidance is None else float(self.guidance),
            "dtype": self.dtype,
        }
        return data

    @classmethod
    def from_json(cls, data: dict) -> PlanTarget:
        if not isinstance(data, dict) or not isinstance(data.get("model_id"), str):
            raise PlanError("target: must be an object with a string 'model_id'")
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise PlanError(f"target: unknown field(s) {', '.join(sorted(unknown))}")
        timesteps = data.get("timesteps")
        guidance = data.get("guidance")
        return cls(
            model_id=data["model_id"],
            revision=data.get("revision"),
            pipeline=data.get("pipeline"),
            scheduler=data.get("scheduler"),
            scheduler_config_hash=data.get("scheduler_config_hash"),
            timesteps=None if timesteps is None else tuple(float(t) for t in timesteps),
            steps=int(data.get("steps", 0)),
            height=data.get("height"),
            width=data.get("width"),
            guidance=None if guidance is None else float(guidance),
            dtype=data.get("dtype"),
        )


@dataclass(frozen=True)
class PlanSummary:
    """Figures derived from the flags and the geometry (never set by hand)."""

    executed_fraction: float  # FLOP-weighted share of block work that still runs
    ideal_speedup: float  # 1 / executed_fraction: the bound for the transformer blocks
    reused_steps: int
    peak_cache_bytes: int  # most bytes of cached outputs held at once, for ``batch`` samples
    batch: int = 1

    def to_json(self) -> dict:
        return {
            "executed_fraction": self.executed_fraction,
            "ideal_speedup": self.ideal_speedup,
            "reused_steps": self.reused_steps,
            "peak_cache_bytes": self.peak_cache_bytes,
            "batch": self.batch,
        }


@dataclass(frozen=True, eq=False)
class CachePlan:
    """A binary reuse plan: step gate ``[T]`` and one ``[T x L]`` matrix per module kind.

    ``True`` means reuse (do not compute). ``calibration`` records how the plan was made
    (parameters, trajectories' seeds and conditions, library versions); ``extras`` carries
    data kept only for faithful export (e.g. the reference ``ip_attn`` book).
    ``step_reuse`` says what a reused step's H is (:data:`STEP_REUSE`): ``"hold"`` (the
    reference rule, the default and absent from the canonical JSON) or ``"linear"``
    (extrapolated from the last two computed steps; see docs/step-reuse.md), ``"linear-t"`` or
    ``"quadratic-t"`` (the same in the timestep). ``module_reuse`` says what a module flagged
    reused on a computed step returns (:data:`MODULE_REUSE`): ``"hold"`` (its cached output;
    the default, absent from the canonical JSON) or a forecast from its computed outputs.
    """

    arch: str
    step_gate: np.ndarray
    modules: dict[str, np.ndarray]
    target: PlanTarget
    geometry: Geometry | None = None
    calibration: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    step_reuse: str = "hold"
    module_reuse: str = "hold"

    def __post_init__(self) -> None:
        gate = np.asarray(self.step_gate, dtype=bool)
        modules = {k: np.asarray(v, dtype=bool) for k, v in self.modules.items()}
        object.__setattr__(self, "step_gate", gate)
        object.__setattr__(self, "modules", modules)
        if self.target.steps == 0:
            object.__setattr__(self, "target", replace(self.target, steps=int(gate.shape[0])))
        _validate(self)
        gate.flags.writeable = False
        for value in modules.values():
            value.flags.writeable = False

    # ---- shape -------------------------------------------------------------------------
    @property
    def steps(self) -> int:
        return int(self.step_gate.shape[0])

    def layer_counts(self) -> dict[str, int]:
        """Number of layers per module kind."""
        return {kind: int(flags.shape[1]) for kind, flags in self.modules.items()}

    # ---- derived figures ---------------------------------------------------------------
    def summary(self, batch: int = 1) -> PlanSummary:
        """FLOP-weighted executed fraction, ideal speed-up and peak cache memory."""
        geometry = self.geometry or REFERENCE_GEOMETRY[self.arch]
        execute = executed_modules(self)
        flops = module_flops(self.arch, geometry)
        # block_fixed: work in FLUX single blocks that runs unless the whole step is skipped
        fixed = flops["block_fixed"] * (self.modules["single_attn"].shape[1] if self.arch == "flux" else 0)
        full = done = 0.0
        for i in range(self.steps):
            for kind, flags in execute.items():
                full += flops[kind] * flags.shape[1]
                done += flops[kind] * float(flags[i].sum())
            full += fixed
            done += 0.0 if self.step_gate[i] else fixed
        fraction = done / full if full else 1.0
        elements = module_output_elements(self.arch, geometry)
        peak = peak_cached_elements(self, elements) * self._itemsize() * batch
        return PlanSummary(
            executed_fraction=round(fraction, 6),
            ideal_speedup=round(1.0 / fraction, 6) if fraction else math.inf,
            reused_steps=int(self.step_gate.sum()),
            peak_cache_bytes=int(peak),
            batch=batch,
        )

    def peak_cache_bytes_within_steps(self, batch: int = 1) -> int:
        """Most bytes of cached outputs held at any moment, also inside a step.

        ``summary().peak_cache_bytes`` counts what is held between steps. Inside a computed
        step the runtime releases old outputs and stores new ones block by block, so for a
        moment it can hold new outputs of early layers beside old ones of later layers:
        this is the bound for the cache's share of peak memory.
        """
        geometry = self.geometry or REFERENCE_GEOMETRY[self.arch]
        elements = module_output_elements(self.arch, geometry)
        return peak_cached_elements_within_steps(self, elements) * self._itemsize() * batch

    def _itemsize(self) -> int:
        return DTYPE_BYTES.get(self.target.dtype or "float32", 4)

    # ---- canonical bytes ---------------------------------------------------------------
    def to_json(self) -> dict:
        """The plan as a JSON-compatible dict (the canonical document)."""
        document = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "arch": self.arch,
            "steps": self.steps,
            "step_gate": _bits(self.step_gate),
            "modules": {kind: [_bits(row) for row in flags] for kind, flags in self.modules.items()},
            "target": self.target.to_json(),
            "geometry": None if self.geometry is None else self.geometry.to_json(),
            "calibration": self.calibration,
            "extras": self.extras,
            "summary": self.summary().to_json(),
        }
        if self.step_reuse != "hold":  # absent for "hold": older plans keep their bytes and sha256
            document["step_reuse"] = self.step_reuse
        if self.module_reuse != "hold":  # likewise
            document["module_reuse"] = self.module_reuse
        return document

    def to_bytes(self) -> bytes:
        """Canonical JSON bytes: the same plan always gives the same bytes."""
        return canonical_json(self.to_json())

    @property
    def sha256(self) -> str:
        """Hex sha256 of the canonical bytes: the plan's identity."""
        return hashlib.sha256(self.to_bytes()).hexdigest()

    def save(self, path: str | Path) -> Path:
        """Write the canonical bytes to ``path`` (atomically) and return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(self.to_bytes())
        tmp.replace(path)
        return path

    @classmethod
    def from_bytes(cls, data: bytes) -> CachePlan:
        """Parse and validate canonical (or any equivalent) JSON bytes."""
        try:
            document = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PlanError(f"not valid JSON: {exc}") from None
        return cls.from_json(document)

    @classmethod
    def from_json(cls, document: Any) -> CachePlan:
        """Build a plan from its JSON document, rejecting malformed or inconsistent input."""
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise PlanError(f"not an invardiff cache plan (missing \"format\": \"{FORMAT}\")")
        version = document.get("format_version")
        if version != FORMAT_VERSION:
            raise PlanError(f"unsupported format_version {version!r} (this library reads {FORMAT_VERSION})")
        try:
            arch = document["arch"]
            gate = _parse_bits(document["step_gate"], "step_gate")
            raw_modules = document["modules"]
            if not isinstance(raw_modules, dict):
                raise PlanError("modules: must be an object")
            modules = {}
            for kind, rows in raw_modules.items():
                if not isinstance(rows, list):
                    raise PlanError(f"modules.{kind}: must be a list of per-step bit strings")
                modules[kind] = np.array(
                    [_parse_bits(row, f"modules.{kind}[{i}]") for i, row in enumerate(rows)], dtype=bool
                )
            geometry = document.get("geometry")
            plan = cls(
                arch=arch,
                step_gate=gate,
                modules=modules,
                target=PlanTarget.from_json(document["target"]),
                geometry=None if geometry is None else Geometry.from_json(geometry),
                calibration=document.get("calibration") or {},
                extras=document.get("extras") or {},
                step_reuse=document.get("step_reuse", "hold"),
                module_reuse=document.get("module_reuse", "hold"),
            )
        except KeyError as exc:
            raise PlanError(f"missing field {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            if isinstance(exc, PlanError):
                raise
            raise PlanError(str(exc)) from None
        if document.get("steps") != plan.steps:
            raise PlanError(f"steps is {document.get('steps')!r} but step_gate has {plan.steps} entries")
        stored = document.get("summary")
        if stored is not None and stored != plan.summary().to_json():
            raise PlanError("summary does not match the flags (file edited by hand?)")
        return plan

    @classmethod
    def load(cls, path: str | Path) -> CachePlan:
        """Read a plan file in this library's format."""
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise PlanError(f"cannot read plan {path}: {exc.strerror}") from None
        try:
            return cls.from_bytes(data)
        except PlanError as exc:
            raise PlanError(f"{path}: {exc}") from None

    def export_official(self, path: str | Path) -> Path:
        """Write this plan in the reference implementation's cache-book layout.

        Refuses (PlanError, writing nothing) a plan whose ``step_reuse`` or ``module_reuse`` is
        not ``"hold"``: the reference format cannot say it.
        """
        from .official import to_official

        if self.module_reuse != "hold":
            raise PlanError(
                f"the reference format cannot express module_reuse={self.module_reuse!r} (it always holds "
                "module outputs); export a plan with module_reuse='hold'"
            )
        path = Path(path)
        path.write_text(json.dumps(to_official(self), indent=2))
        return path

    def with_flags(self, step_gate: np.ndarray, modules: dict[str, np.ndarray]) -> CachePlan:
        """A copy with other flags (same target and provenance)."""
        return replace(self, step_gate=step_gate, modules=modules)

    def with_step_reuse(self, step_reuse: str) -> CachePlan:
        """A copy whose reused steps use another rule (:data:`STEP_REUSE`)."""
        return replace(self, step_reuse=step_reuse)

    def with_module_reuse(self, module_reuse: str) -> CachePlan:
        """A copy whose reused modules use another rule (:data:`MODULE_REUSE`)."""
        return replace(self, module_reuse=module_reuse)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CachePlan) and self.to_bytes() == other.to_bytes()

    def __hash__(self) -> int:
        return hash(self.sha256)

    def __repr__(self) -> str:
        s = self.summary()
        return (
            f"CachePlan(arch={self.arch!r}, model={self.target.model_id!r}, steps={self.steps}, "
            f"layers={self.layer_counts()}, reused_steps={s.reused_steps}, "
            f"ideal_speedup={s.ideal_speedup:.2f}x, sha256={self.sha256[:12]})"
        )


def canonical_json(document: Any) -> bytes:
    """Sorted keys, no insignificant whitespace, ASCII only."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def all_compute_plan(
    arch: str, steps: int, layers: dict[str, int], target: PlanTarget | None = None, **kwargs: Any
) -> CachePlan:
    """A plan that reuses nothing (its output must equal the uncached model's)."""
    return CachePlan(
        arch=arch,
        step_gate=np.zeros(steps, dtype=bool),
        modules={kind: np.zeros((steps, layers[kind]), dtype=bool) for kind in module_kinds(arch)},
        target=target or PlanTarget(model_id="unknown", steps=steps),
        **kwargs,
    )


def executed_modules(plan: CachePlan) -> dict[str, np.ndarray]:
    """Per module kind, ``[T x L]`` True where the module really runs.

    A skipped step runs nothing; the FLUX joint attention runs both halves unless both
    ``attn`` and ``context_attn`` are flagged.
    """
    run = {kind: ~flags for kind, flags in plan.modules.items()}
    if plan.arch == "flux":
        joint = run["attn"] | run["context_attn"]
        run["attn"] = joint
        run["context_attn"] = joint.copy()
    for flags in run.values():
        flags[plan.step_gate] = False
    return run


def hold_after(plan: CachePlan) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Which cached outputs must still be held after each step.

    ``hold[kind][i, l]`` is True when the next step after i that touches (kind, l) reuses
    it; ``hold_hidden[i]`` likewise for H (reused by skipped steps). Everything else is
    released at once, so memory holds only what the plan reuses later.
    """
    run = executed_modules(plan)
    active = ~plan.step_gate
    hold = {kind: _next_is_reuse(flags, active[:, None] & ~flags) for kind, flags in run.items()}
    hold_hidden = _next_is_reuse(active[:, None], plan.step_gate[:, None])[:, 0]
    return hold, hold_hidden


def hidden_held(plan: CachePlan) -> np.ndarray:
    """``[order + 1, T]``: row j is True where H of the j-th last computed step is held after step i.

    Under ``"hold"`` (one row) as :func:`hold_after` says. Under an extrapolating rule of order
    n, H of the last computed step is held while some later step is reused (it serves it, or
    becomes an older point of its extrapolation); the j-th last (j >= 1) while a later reused
    step comes with at most n - j computed steps in between, once j + 1 steps are computed
    (with fewer computed steps a reused step uses the highest order they allow).
    """
    _, hold_hidden = hold_after(plan)
    order = RULES[plan.step_reuse][0]
    if order == 0:
        return hold_hidden[None]
    computed = np.cumsum(~plan.step_gate)
    gap = np.full(plan.steps, np.iinfo(np.int64).max)  # computed steps until the next reused one
    upcoming = None
    for i in range(plan.steps - 1, -1, -1):
        if upcoming is not None:
            gap[i] = computed[upcoming] - computed[i]
        if plan.step_gate[i]:
            upcoming = i
    rows = [gap < np.iinfo(np.int64).max]
    rows += [(gap <= order - j) & (computed >= j + 1) for j in range(1, order + 1)]
    return np.array(rows)


def module_held(plan: CachePlan) -> dict[str, np.ndarray]:
    """Per module kind, ``[order + 1, T, L]``: row j is True where the j-th last computed output
    of (kind, l) is held after step i.

    Under ``module_reuse="hold"`` (one row) as :func:`hold_after` says. Under a first-order
    forecast the last output is also held while the module's next event is a computation
    followed by a reuse (it becomes the older point), and the one before it while the next
    event is a reuse and two outputs have been computed.
    """
    hold, _ = hold_after(plan)
    if RULES[plan.module_reuse][0] == 0:
        return {kind: flags[None] for kind, flags in hold.items()}
    active = ~plan.step_gate
    held = {}
    for kind, run in executed_modules(plan).items():
        then_reuse = _next_is_compute_then_reuse(run, active[:, None] & ~run)
        held[kind] = np.array([hold[kind] | then_reuse, hold[kind] & (np.cumsum(run, axis=0) >= 2)])
    return held


def peak_cached_elements(plan: CachePlan, elements: dict[str, int]) -> int:
    """Most cached elements (per sample) held at once between steps (:func:`module_held`,
    :func:`hidden_held`)."""
    held = module_held(plan)
    per_step = sum(flags.sum(axis=(0, 2)) * elements[kind] for kind, flags in held.items())
    per_step = per_step + hidden_held(plan).sum(axis=0) * elements["hidden"]
    return int(per_step.max())


def peak_cached_elements_within_steps(plan: CachePlan, elements: dict[str, int]) -> int:
    """Most cached elements (per sample) held at once, replaying the runtime module by module:
    a reused output is released after its last use, a new one is kept if :func:`module_held`
    says a later step uses it; H likewise at the last block (every H of :func:`hidden_held`)."""
    count = {kind: flags.sum(axis=0) for kind, flags in module_held(plan).items()}
    size = dict(elements)
    held_hidden = hidden_held(plan).sum(axis=0) * size["hidden"]
    if plan.arch == "flux":
        size["attn"] += size["context_attn"]  # one cached entry holds both halves
    lists = {kind.name: kind.layers for kind in MODULE_KINDS[plan.arch]}
    order: list[tuple[str, int]] = []
    for name in dict.fromkeys(lists.values()):  # block lists in execution order
        kinds = [kind for kind in CALL_ORDER[plan.arch] if lists[kind] == name]
        order += [(kind, layer) for layer in range(plan.modules[kinds[0]].shape[1]) for kind in kinds]
    held: dict[tuple[str, int], int] = {}
    total = peak = hidden = 0
    for i in range(plan.steps):
        if plan.step_gate[i] and hidden:
            hidden = int(held_hidden[i])
            continue
        for kind, layer in order:
            key = (kind, layer)  # computed or reused: the old outputs go, those used later stay
            total -= held.pop(key, 0)
            if count[kind][i, layer]:
                held[key] = int(count[kind][i, layer]) * size[kind]
                total += held[key]
            peak = max(peak, total + hidden)
        hidden = int(held_hidden[i])
        peak = max(peak, total + hidden)
    return int(peak)


# ---- helpers ---------------------------------------------------------------------------
def _next_is_reuse(computed: np.ndarray, reused: np.ndarray) -> np.ndarray:
    """[T x L]: the next event strictly after step i is a reuse (not a compute, not the end)."""
    result = np.zeros_like(computed)
    upcoming = np.zeros(computed.shape[1], dtype=bool)
    for i in range(computed.shape[0] - 1, -1, -1):
        result[i] = upcoming
        upcoming = np.where(reused[i], True, np.where(computed[i], False, upcoming))
    return result


def _next_is_compute_then_reuse(computed: np.ndarray, reused: np.ndarray) -> np.ndarray:
    """[T x L]: the next event strictly after step i is a compute whose next event is a reuse."""
    result = np.zeros_like(computed)
    reuse_next = np.zeros(computed.shape[1], dtype=bool)
    then_reuse = np.zeros(computed.shape[1], dtype=bool)
    for i in range(computed.shape[0] - 1, -1, -1):
        result[i] = then_reuse
        then_reuse = np.where(reused[i], False, np.where(computed[i], reuse_next, then_reuse))
        reuse_next = np.where(reused[i], True, np.where(computed[i], False, reuse_next))
    return result


def _bits(row: np.ndarray) -> str:
    return "".join("1" if v else "0" for v in np.asarray(row, dtype=bool).ravel())


def _parse_bits(value: Any, where: str) -> list[bool]:
    if not isinstance(value, str) or set(value) - {"0", "1"}:
        raise PlanError(f"{where}: must be a string of 0 and 1")
    return [c == "1" for c in value]


def _validate(plan: CachePlan) -> None:
    if plan.step_reuse not in STEP_REUSE:
        raise PlanError(f"step_reuse: unknown rule {plan.step_reuse!r} (known: {', '.join(STEP_REUSE)})")
    if plan.module_reuse not in MODULE_REUSE:
        raise PlanError(f"module_reuse: unknown rule {plan.module_reuse!r} (known: {', '.join(MODULE_REUSE)})")
    if plan.arch not in ARCHITECTURES:
        raise PlanError(f"arch: unknown architecture {plan.arch!r} (known: {', '.join(ARCHITECTURES)})")
    if plan.step_gate.ndim != 1 or plan.step_gate.shape[0] < 2:
        raise PlanError("step_gate: must hold one flag per step (at least 2 steps)")
    steps = plan.steps
    expected = module_kinds(plan.arch)
    if set(plan.modules) != set(expected):
        missing = sorted(set(expected) - set(plan.modules))
        extra = sorted(set(plan.modules) - set(expected))
        raise PlanError(
            f"modules: {plan.arch} plans need exactly {', '.join(expected)}"
            + (f"; missing {', '.join(missing)}" if missing else "")
            + (f"; unexpected {', '.join(extra)}" if extra else "")
        )
    for kind, flags in plan.modules.items():
        if flags.ndim != 2 or flags.shape[0] != steps or flags.shape[1] < 1:
            raise PlanError(f"modules.{kind}: expected {steps} rows of equal, non-zero length, got shape {flags.shape}")
    if plan.arch == "flux":
        pairs = (("attn", "context_attn", "ff", "context_ff"), ("single_attn", "single_mlp"))
    else:
        pairs = (("attn", "mlp"),)
    for group in pairs:
        counts = {plan.modules[k].shape[1] for k in group}
        if len(counts) != 1:
            raise PlanError(f"modules: {', '.join(group)} must have the same layer count, got {sorted(counts)}")
    if plan.step_gate[0]:
        raise PlanError("step_gate: step 0 can never be reused (nothing is cached yet)")
    for kind, flags in plan.modules.items():
        if flags[0].any():
            raise PlanError(f"modules.{kind}: step 0 can never reuse (nothing is cached yet)")
    if plan.target.steps != steps:
        raise PlanError(f"target.steps is {plan.target.steps} but the plan has {steps} steps")
    ts = plan.target.timesteps
    if ts is not None:
        if len(ts) != steps:
            raise PlanError(f"target.timesteps has {len(ts)} entries for {steps} steps")
        diffs = np.diff(np.asarray(ts, dtype=np.float64))
        if not (np.all(diffs < 0) or np.all(diffs > 0)):
            raise PlanError("target.timesteps must be strictly monotonic (each step matched by its timestep)")
