"""The built-in models' table: what each one is and how it samples (light: no torch, no diffusers).

The one owner of the built-ins' identities: :mod:`invardiff.models` loads them, the registry
registers them (``invardiff-registry init``), the fleet and ``invardiff calibrate`` sample them.
"""

from __future__ import annotations

IMAGE_SIZE = 16  # every built-in generates 16x16 grey images
QUALITY_GUIDANCE = {"digits-dit": 1.25, "digits-flux": 1.1}

_DIT = {"architecture": "dit", "pipeline": "DiTPipeline", "scheduler": "DDIMScheduler"}
_FLUX = {
    "architecture": "flux",
    "pipeline": "DigitsFluxPipeline",
    "scheduler": "FlowMatchEulerDiscreteScheduler",
}
_SHAPE = {"height": IMAGE_SIZE, "width": IMAGE_SIZE, "dtype": "float32"}

# Each built-in model: its architecture, pipeline class, sampling protocol, image shape, and
# the guidance scale of its documented quality figures.
BUILTIN_MODELS: dict[str, dict[str, object]] = {
    "digits-dit": {
        **_DIT,
        **_SHAPE,
        "num_inference_steps": 50,
        "guidance_scale": QUALITY_GUIDANCE["digits-dit"],
    },
    "digits-flux": {
        **_FLUX,
        **_SHAPE,
        "num_inference_steps": 28,
        "guidance_scale": QUALITY_GUIDANCE["digits-flux"],
    },
    "digits-flux-shifted": {  # digits-flux's weights on FLUX.1-dev's shifted schedule
        **_FLUX,
        **_SHAPE,
        "num_inference_steps": 28,
        "guidance_scale": QUALITY_GUIDANCE["digits-flux"],
    },
}
