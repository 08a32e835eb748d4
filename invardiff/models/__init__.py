"""Built-in models: trained digits pipelines (``load_builtin``) and tiny random-weight builders.

``load_builtin(name)`` returns a diffusers ``DiffusionPipeline`` loaded offline from the
committed weights, called as ``pipe(class_labels=[...], num_inference_steps=T,
guidance_scale=g, generator=..., output_type="np").images``; images are float32 in [0, 1] of
shape (N, 16, 16, 1) (one grey channel).
"""

from __future__ import annotations

from diffusers import DiffusionPipeline

from ..builtins import BUILTIN_MODELS
from .digits import DigitsFluxPipeline, load_pipeline
from .tiny import (
    flux_rope_axes,
    tiny_dit_pipeline,
    tiny_dit_transformer,
    tiny_flux_pipeline,
    tiny_flux_transformer,
)


def load_builtin(name: str) -> DiffusionPipeline:
    """The built-in pipeline ``name`` (see ``BUILTIN_MODELS``), float32, eval mode, on the CPU.

    ``digits-dit`` is a diffusers ``DiTPipeline`` (classes 0-9, null class 1000, default
    ``guidance_scale`` 4.0 as in diffusers: pass it explicitly); ``digits-flux`` is a
    :class:`~invardiff.models.digits.DigitsFluxPipeline` (default 28 steps, guidance 1.0);
    ``digits-flux-shifted`` the same weights with FLUX.1-dev's dynamically shifted scheduler.
    Each call builds a fresh pipeline.
    """
    if name not in BUILTIN_MODELS:
        raise KeyError(f"unknown built-in model {name!r} (known: {', '.join(BUILTIN_MODELS)})")
    return load_pipeline(name)


__all__ = [
    "BUILTIN_MODELS",
    "DigitsFluxPipeline",
    "flux_rope_axes",
    "load_builtin",
    "tiny_dit_pipeline",
    "tiny_dit_transformer",
    "tiny_flux_pipeline",
    "tiny_flux_transformer",
]
