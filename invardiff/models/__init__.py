"""Built-in models: tiny random-weight builders for wiring tests."""

from .tiny import (
    flux_rope_axes,
    tiny_dit_pipeline,
    tiny_dit_transformer,
    tiny_flux_pipeline,
    tiny_flux_transformer,
)

__all__ = [
    "flux_rope_axes",
    "tiny_dit_pipeline",
    "tiny_dit_transformer",
    "tiny_flux_pipeline",
    "tiny_flux_transformer",
]
