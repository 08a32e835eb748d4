"""Model aliases as data: the built-ins, checkpoint ids and a new alias's defaults (light:
no SQLAlchemy, no torch; the Ray actors and the read path import it)."""

from __future__ import annotations

from typing import Any

from invardiff.architectures import ARCHITECTURES
from invardiff.builtins import BUILTIN_MODELS as ENGINE_BUILTINS
from invardiff.official import REFERENCE_TARGETS

from .errors import InvalidInput
from .matching import ModelInfo
from .validation import check_settings

# A model alias's pipeline settings (besides its checkpoint: source, revision, arch).
MODEL_FIELDS = (
    "pipeline",
    "scheduler",
    "scheduler_config_hash",
    "steps",
    "height",
    "width",
    "guidance",
    "dtype",
)

# A plan target's own settings; its steps are the plan's (the length of its step gate).
TARGET_SETTINGS = tuple(name for name in MODEL_FIELDS if name != "steps")

BUILTIN_MODELS = tuple(
    ModelInfo(
        name=name,
        source=f"builtin://{name}",
        revision=None,
        arch=str(spec["architecture"]),
        pipeline=str(spec["pipeline"]),
        scheduler=str(spec["scheduler"]),
        steps=int(spec["num_inference_steps"]),  # type: ignore[call-overload]
        height=int(spec["height"]),  # type: ignore[call-overload]
        width=int(spec["width"]),  # type: ignore[call-overload]
        dtype=str(spec["dtype"]),
    )
    for name, spec in ENGINE_BUILTINS.items()
)


def checkpoint_id(source: str) -> str:
    """The id a pipeline loads: ``hf://org/name`` -> ``org/name``; other sources unchanged."""
    return source.removeprefix("hf://")


def guess_arch(source: str) -> str | None:
    """The architecture ``source`` names (``dit`` or ``flux``), None unless exactly one."""
    found = [arch for arch in ARCHITECTURES if arch in source.lower()]
    return found[0] if len(found) == 1 else None


def arch_defaults(arch: str) -> dict[str, Any]:
    """Default pipeline settings of a new model alias: those of the reference checkpoints."""
    target = REFERENCE_TARGETS[arch]
    return {name: getattr(target, name) for name in MODEL_FIELDS}


def new_model_info(
    name: str,
    source: str,
    revision: str | None,
    arch: str | None,
    given: dict[str, Any],
    current: ModelInfo | None,
    update: bool,
) -> ModelInfo:
    """The validated alias ``Registry.add_model`` writes (see there for what ``update`` keeps)."""
    if update and current is not None:
        arch = arch or current.arch
        kept = {n: getattr(current, n) for n in MODEL_FIELDS}
        base = kept if arch == current.arch else arch_defaults(arch)
        revision = current.revision if revision is None else revision
    else:
        arch = arch or guess_arch(source)
        if arch is None:
            raise InvalidInput(
                "cannot tell the architecture from SOURCE: pass --arch dit or --arch flux"
            )
        base = arch_defaults(arch)
    values = check_settings({"source": source, "revision": revision, **base, **given})
    return ModelInfo(name=name, arch=arch, **values)
