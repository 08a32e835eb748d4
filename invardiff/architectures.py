"""What each supported architecture looks like to a cache plan.

A plan names module kinds (``attn``, ``mlp``, ...); this module says, per architecture, which
diffusers layer list and attribute each kind lives on, how the transformer is called with the
timestep, and how much work each module does (for the plan's FLOP-weighted summary).
"""

from __future__ import annotations

from dataclasses import dataclass

ARCHITECTURES = ("dit", "flux")


@dataclass(frozen=True)
class ModuleKind:
    """One reusable module kind: ``getattr(transformer, layers)[l].<attribute>``."""

    name: str
    layers: str
    attribute: str


MODULE_KINDS: dict[str, tuple[ModuleKind, ...]] = {
    "dit": (
        ModuleKind("attn", "transformer_blocks", "attn1"),
        ModuleKind("mlp", "transformer_blocks", "ff"),
    ),
    "flux": (
        # `attn` and `context_attn` are the two halves of one joint attention call.
        ModuleKind("attn", "transformer_blocks", "attn"),
        ModuleKind("context_attn", "transformer_blocks", "attn"),
        ModuleKind("ff", "transformer_blocks", "ff"),
        ModuleKind("context_ff", "transformer_blocks", "ff_context"),
        ModuleKind("single_attn", "single_transformer_blocks", "attn"),
        # `mlp` is act_mlp(proj_mlp(x)); proj_out always runs.
        ModuleKind("single_mlp", "single_transformer_blocks", "proj_mlp"),
    ),
}

# The order in which a block calls its reusable modules (FLUX single blocks run the MLP before
# the attention; the joint attention is one call for `attn` and `context_attn`).
CALL_ORDER: dict[str, tuple[str, ...]] = {
    "dit": ("attn", "mlp"),
    "flux": ("attn", "ff", "context_ff", "single_mlp", "single_attn"),
}

# The transformer is called with scheduler timestep * scale (FluxPipeline divides by 1000).
TIMESTEP_SCALE = {"dit": 1.0, "flux": 1e-3}


def module_kinds(arch: str) -> tuple[str, ...]:
    """Names of the module kinds of ``arch``, in plan order."""
    if arch not in MODULE_KINDS:
        raise ValueError(f"unknown architecture {arch!r} (known: {', '.join(ARCHITECTURES)})")
    return tuple(kind.name for kind in MODULE_KINDS[arch])


def layer_lists(arch: str) -> tuple[str, ...]:
    """The transformer's block lists for ``arch``, in execution order."""
    seen: list[str] = []
    for kind in MODULE_KINDS[arch]:
        if kind.layers not in seen:
            seen.append(kind.layers)
    return tuple(seen)


def detect_architecture(transformer) -> str:
    """``"dit"`` or ``"flux"`` for a diffusers transformer, from its block lists."""
    if hasattr(transformer, "single_transformer_blocks") and hasattr(transformer, "transformer_blocks"):
        return "flux"
    blocks = getattr(transformer, "transformer_blocks", None)
    if blocks is not None and len(blocks) and hasattr(blocks[0], "attn1") and hasattr(blocks[0], "ff"):
        return "dit"
    raise ValueError(
        f"{type(transformer).__name__} is not a supported transformer "
        "(expected DiTTransformer2DModel-like or FluxTransformer2DModel-like blocks)"
    )


@dataclass(frozen=True)
class Geometry:
    """Sizes that set module costs: hidden width and token counts per sample."""

    dim: int
    tokens: int
    context_tokens: int = 0
    mlp_ratio: float = 4.0

    def to_json(self) -> dict:
        return {
            "dim": self.dim,
            "tokens": self.tokens,
            "context_tokens": self.context_tokens,
            "mlp_ratio": self.mlp_ratio,
        }

    @classmethod
    def from_json(cls, data: dict) -> Geometry:
        return cls(
            dim=int(data["dim"]),
            tokens=int(data["tokens"]),
            context_tokens=int(data.get("context_tokens", 0)),
            mlp_ratio=float(data.get("mlp_ratio", 4.0)),
        )


# Geometry of the checkpoints the reference plans were calibrated for.
REFERENCE_GEOMETRY = {
    "dit": Geometry(dim=1152, tokens=256),  # DiT-XL/2 at 256x256: 32x32 latent, patch 2
    "flux": Geometry(dim=3072, tokens=4096, context_tokens=512),  # FLUX.1-dev at 1024x1024
}


def module_flops(arch: str, geometry: Geometry) -> dict[str, float]:
    """Multiply-add FLOPs per sample of one call of each module kind (one layer).

    Includes ``"block_fixed"``: work inside a block that runs unless the whole step is
    skipped (FLUX single blocks' ``proj_out``); norms and adaLN are negligible and left out.
    """
    d, n, c, r = geometry.dim, geometry.tokens, geometry.context_tokens, geometry.mlp_ratio
    if arch == "dit":
        return {"attn": 8 * n * d * d + 4 * n * n * d, "mlp": 4 * r * n * d * d, "block_fixed": 0.0}
    total = n + c
    joint_core = 4 * total * total * d  # QK^T and AV over the joint sequence
    return {
        "attn": 8 * n * d * d + joint_core * n / total,
        "context_attn": 8 * c * d * d + joint_core * c / total,
        "ff": 4 * r * n * d * d,
        "context_ff": 4 * r * c * d * d,
        "single_attn": 6 * total * d * d + joint_core,
        "single_mlp": 2 * r * total * d * d,
        "block_fixed": 2 * (1 + r) * total * d * d,
    }


def module_output_elements(arch: str, geometry: Geometry) -> dict[str, int]:
    """Elements per sample of each module kind's cached output (and of ``"hidden"``: H)."""
    d, n, c, r = geometry.dim, geometry.tokens, geometry.context_tokens, geometry.mlp_ratio
    if arch == "dit":
        return {"attn": n * d, "mlp": n * d, "hidden": n * d}
    return {
        "attn": n * d,
        "context_attn": c * d,
        "ff": n * d,
        "context_ff": c * d,
        "single_attn": (n + c) * d,
        "single_mlp": int((n + c) * d * r),
        "hidden": n * d,
    }
