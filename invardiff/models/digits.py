"""The built-in digits models: architectures, pipelines and offline loading of committed weights.

Both models work in pixel space on 16x16 one-channel digits scaled to [-1, 1] (scikit-learn's
8x8 ``load_digits`` upsampled bilinearly, see :func:`invardiff.metrics.load_digits_16`).
Pipelines return images in [0, 1] of shape (N, 16, 16, C) with **C = 1** (grey level, ink = 1).

- ``digits-dit``: ``DiTTransformer2DModel`` (patch 2, 64 tokens) in diffusers' own
  ``DiTPipeline`` with an identity "VAE"; DDPM epsilon objective, sampled with DDIM (50 steps).
  Classes 0-9 are the digits, 1000 is the null class (``DiTPipeline`` hard-codes it for CFG).
- ``digits-flux``: ``FluxTransformer2DModel`` on 2x2-packed pixels (64 tokens of 4 channels)
  in :class:`DigitsFluxPipeline`; flow matching, sampled with ``FlowMatchEulerDiscreteScheduler``
  (28 steps). Each class (and the null class 10) has fixed random "prompt" embeddings.
- ``digits-flux-shifted``: the ``digits-flux`` weights sampled with FLUX.1-dev's scheduler
  settings (:data:`FLUX_DEV_SCHEDULER`: dynamic shifting by the image sequence length, as
  diffusers' ``FluxPipeline`` computes it), a non-uniform schedule; no retraining.

Weights are stored as ``weights/<name>.safetensors`` (float16, loaded as float32) next to
``weights/<name>.json`` (architecture, scheduler and training record).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    DiTPipeline,
    DiTTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    ModelMixin,
)
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from safetensors.torch import load_file, save_file

from ..builtins import IMAGE_SIZE

WEIGHTS_DIR = Path(__file__).with_name("weights")
NUM_CLASSES = 10
DIT_NULL_CLASS = 1000
FLUX_NULL_CLASS = NUM_CLASSES

# Architectures of the committed models (see docs/models.md for the measurements behind them).
DIT_CONFIG: dict[str, Any] = {
    "num_attention_heads": 4,
    "attention_head_dim": 16,
    "in_channels": 1,
    "out_channels": 1,
    "num_layers": 8,
    "sample_size": IMAGE_SIZE,
    "patch_size": 2,
    "num_embeds_ada_norm": DIT_NULL_CLASS,
    "norm_type": "ada_norm_zero",
}
DIT_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "epsilon",
    "clip_sample": True,
    "set_alpha_to_one": False,
}
FLUX_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 4,
    "num_layers": 2,
    "num_single_layers": 6,
    "attention_head_dim": 16,
    "num_attention_heads": 4,
    "joint_attention_dim": 64,
    "pooled_projection_dim": 64,
    "guidance_embeds": False,
    "axes_dims_rope": (4, 6, 6),
}
FLUX_CONTEXT_TOKENS = 4
# Guidance scale of the documented quality figures, the quality tests and the sample grids.
FLUX_SCHEDULER: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 1.0}
# FLUX.1-dev's scheduler config (its scheduler/scheduler_config.json): with dynamic shifting the
# shift is exp(mu), mu linear in the image sequence length (``shift`` is then unused).
FLUX_DEV_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
# Built-in variants: (the committed weights they use, the scheduler config they sample with).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {"digits-flux-shifted": ("digits-flux", FLUX_DEV_SCHEDULER)}


class IdentityVAE(ModelMixin, ConfigMixin):
    """Pixel-space stand-in for a VAE: ``decode`` returns its input (``scaling_factor`` 1)."""

    @register_to_config
    def __init__(self, scaling_factor: float = 1.0):
        super().__init__()
        # One buffer so that diffusers can read the module's device and dtype.
        self.register_buffer("anchor", torch.zeros(()), persistent=False)

    def decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple:
        return DecoderOutput(sample=z) if return_dict else (z,)


class ClassEmbeddings(ModelMixin, ConfigMixin):
    """Fixed per-class "prompt" embeddings for FLUX: a context sequence and a pooled vector.

    Rows 0-9 are the digits, row 10 the null class used for classifier-free guidance. The
    tables are random (seeded), rounded to float16 values so the float16 weight file holds them
    exactly, and never trained: the transformer learns to read them.
    """

    @register_to_config
    def __init__(
        self,
        num_classes: int = NUM_CLASSES + 1,
        context_tokens: int = FLUX_CONTEXT_TOKENS,
        context_dim: int = 64,
        pooled_dim: int = 64,
        seed: int = 0,
    ):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        context = torch.randn(num_classes, context_tokens, context_dim, generator=gen)
        pooled = torch.randn(num_classes, pooled_dim, generator=gen)
        self.register_buffer("context", context.half().float())
        self.register_buffer("pooled", pooled.half().float())

    def forward(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(encoder_hidden_states, pooled_projections)`` for integer ``labels``."""
        return self.context[labels], self.pooled[labels]


def pack(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, H/2 * W/2, 4C): FLUX's 2x2 packing."""
    n, c, h, w = images.shape
    x = images.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack`."""
    n, _, ch = tokens.shape
    x = tokens.view(n, height // 2, width // 2, ch // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(n, ch // 4, height, width)


def image_ids(height: int, width: int) -> torch.Tensor:
    """FLUX positional ids (row, column) of the packed tokens, as ``FluxPipeline`` builds them."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] += torch.arange(height // 2)[:, None]
    ids[..., 2] += torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3)


def flux_sigmas(num_inference_steps: int) -> np.ndarray:
    """The FLUX.1 sampling grid: sigmas ``linspace(1, 1/T, T)`` (then 0 is appended)."""
    return np.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps)



def image_seq_shift(seq_len: int, config: Any) -> float:
    """FLUX.1-dev's dynamic shift ``mu`` for ``seq_len`` image tokens: linear in the sequence
    length between ``base_shift`` at ``base_image_seq_len`` and ``max_shift`` at
    ``max_image_seq_len`` (what diffusers' FluxPipeline passes its scheduler; computed here so
    that importing the built-ins does not import the FLUX pipeline and its text stack)."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base, top = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    slope = (top - base) / (max_len - base_len)
    intercept = base - slope * base_len
    return seq_len * slope + intercept

def flux_velocity(
    transformer: torch.nn.Module,
    latents: torch.Tensor,
    timestep: torch.Tensor,
    context: torch.Tensor,
    pooled: torch.Tensor,
    txt_ids: torch.Tensor,
    img_ids: torch.Tensor,
) -> torch.Tensor:
    """The digits FLUX transformer's velocity at ``timestep`` (in [0, 1]; no guidance embedding)."""
    return transformer(
        hidden_states=latents,
        timestep=timestep,
        guidance=None,
        pooled_projections=pooled,
        encoder_hidden_states=context,
        txt_ids=txt_ids,
        img_ids=img_ids,
        return_dict=False,
    )[0]


class DigitsFluxPipeline(DiffusionPipeline):
    """Class-conditional FLUX sampler for 16x16 digits in pixel space (C = 1).

    Called like ``DiTPipeline``. Runs ``FlowMatchEulerDiscreteScheduler`` on the FLUX.1 sigma grid
    (shifted by ``mu`` from the image sequence length, as ``FluxPipeline`` does, when the
    scheduler uses dynamic shifting), calls the transformer with ``FluxPipeline``'s keyword arguments (``timestep = t / 1000``), and
    batches classifier-free guidance (``guidance_scale > 1``) into one transformer call per step:
    conditional rows first, then the null class.
    """

    resolution = IMAGE_SIZE  # images are always 16x16 (recorded in calibrated plans' targets)

    def __init__(
        self,
        transformer: FluxTransformer2DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        class_embeddings: ClassEmbeddings,
    ):
        super().__init__()
        self.register_modules(
            transformer=transformer, scheduler=scheduler, class_embeddings=class_embeddings
        )

    def shift(self, latents: torch.Tensor) -> dict[str, float]:
        """``{"mu": ...}`` for a dynamically shifting scheduler (FluxPipeline's), else ``{}``."""
        config = self.scheduler.config
        if not config.get("use_dynamic_shifting", False):
            return {}
        return {"mu": image_seq_shift(latents.shape[1], config)}

    @torch.no_grad()
    def __call__(
        self,
        class_labels: list[int],
        num_inference_steps: int = 28,
        guidance_scale: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "np",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Sample one image per entry of ``class_labels`` (digits 0-9).

        ``output_type`` is ``"np"`` ((N, 16, 16, 1) float32 in [0, 1]), ``"pt"`` ((N, 1, 16, 16))
        or ``"pil"``; ``guidance_scale > 1`` turns on classifier-free guidance.
        """
        device = self._execution_device
        dtype = self.transformer.dtype
        labels = torch.as_tensor(class_labels, device=device).reshape(-1)
        n = len(labels)
        cfg = guidance_scale > 1
        if cfg:
            labels = torch.cat([labels, torch.full_like(labels, FLUX_NULL_CLASS)])
        context, pooled = self.class_embeddings(labels)
        context, pooled = context.to(dtype), pooled.to(dtype)
        txt_ids = torch.zeros(context.shape[1], 3, device=device, dtype=dtype)
        img_ids = image_ids(IMAGE_SIZE, IMAGE_SIZE).to(device=device, dtype=dtype)

        channels = self.transformer.config.in_channels // 4
        noise = randn_tensor(
            (n, channels, IMAGE_SIZE, IMAGE_SIZE), generator=generator, device=device, dtype=dtype
        )
        latents = pack(noise)
        self.scheduler.set_timesteps(sigmas=flux_sigmas(num_inference_steps), device=device, **self.shift(latents))
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = torch.cat([latents, latents]) if cfg else latents
            timestep = t.expand(model_input.shape[0]).to(dtype) / 1000
            pred = flux_velocity(self.transformer, model_input, timestep, context, pooled, txt_ids, img_ids)
            if cfg:
                cond, uncond = pred.chunk(2)
                pred = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(pred, t, latents, return_dict=False)[0]

        images = (unpack(latents, IMAGE_SIZE, IMAGE_SIZE) / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            images = images.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)


def build_dit(
    transformer: dict[str, Any] | None = None,
    scheduler: dict[str, Any] | None = None,
    seed: int = 0,
) -> DiTPipeline:
    """A ``digits-dit`` pipeline with freshly initialised (seeded) weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DiTTransformer2DModel(**(transformer or DIT_CONFIG))
    return DiTPipeline(
        transformer=model.eval(),
        vae=IdentityVAE(),
        scheduler=DDIMScheduler(**(scheduler or DIT_SCHEDULER)),
        id2label={i: str(i) for i in range(NUM_CLASSES)},
    )


def build_flux(
    transformer: dict[str, Any] | None = None,
    scheduler: dict[str, Any] | None = None,
    seed: int = 0,
) -> DigitsFluxPipeline:
    """A ``digits-flux`` pipeline with freshly initialised (seeded) weights."""
    config = transformer or FLUX_CONFIG
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FluxTransformer2DModel(**config)
    embeddings = ClassEmbeddings(
        context_dim=config["joint_attention_dim"], pooled_dim=config["pooled_projection_dim"]
    )
    return DigitsFluxPipeline(
        transformer=model.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(**(scheduler or FLUX_SCHEDULER)),
        class_embeddings=embeddings.eval(),
    )


BUILDERS = {"dit": build_dit, "flux": build_flux}


def _trained_modules(pipe: DiffusionPipeline) -> dict[str, torch.nn.Module]:
    modules = {"transformer": pipe.transformer}
    if isinstance(pipe, DigitsFluxPipeline):
        modules["class_embeddings"] = pipe.class_embeddings
    return modules


def _public(config) -> dict[str, Any]:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def save_weights(pipe: DiffusionPipeline, name: str, record: dict[str, Any], out: Path) -> Path:
    """Write ``<out>/<name>.safetensors`` (float16) and ``<out>/<name>.json``; return the former.

    The JSON holds the transformer and scheduler configs (what :func:`load_pipeline` builds
    from) and the training ``record``.
    """
    out.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"{prefix}.{key}": value.detach().to(torch.float16).contiguous()
        for prefix, module in _trained_modules(pipe).items()
        for key, value in module.state_dict().items()
    }
    path = out / f"{name}.safetensors"
    save_file(tensors, str(path))
    meta = {
        "name": name,
        "architecture": "flux" if isinstance(pipe, DigitsFluxPipeline) else "dit",
        "transformer": _public(pipe.transformer.config),
        "scheduler": _public(pipe.scheduler.config),
        "training": record,
    }
    (out / f"{name}.json").write_text(json.dumps(meta, indent=2, default=list) + "\n")
    return path


def load_pipeline(name: str, weights_dir: Path = WEIGHTS_DIR) -> DiffusionPipeline:
    """Build ``name`` from ``<weights_dir>/<name>.json`` and load its float16 weights as float32
    (a :data:`VARIANTS` entry: its weights, with its scheduler config)."""
    weights, scheduler = VARIANTS.get(name, (name, None))
    meta = json.loads((weights_dir / f"{weights}.json").read_text())
    pipe = BUILDERS[meta["architecture"]](meta["transformer"], scheduler or meta["scheduler"])
    tensors = load_file(str(weights_dir / f"{weights}.safetensors"))
    for prefix, module in _trained_modules(pipe).items():
        state = {
            key[len(prefix) + 1 :]: value.float()
            for key, value in tensors.items()
            if key.startswith(prefix + ".")
        }
        module.load_state_dict(state, strict=True)
    return pipe


def sample(
    pipe: DiffusionPipeline,
    class_labels: list[int],
    guidance_scale: float,
    num_inference_steps: int | None = None,
    seed: int = 0,
    batch_size: int = 100,
) -> np.ndarray:
    """Images for ``class_labels`` in batches; batch ``i`` uses generator seed ``seed + i``.

    ``num_inference_steps`` defaults to the model's protocol (DiT 50, FLUX 28).
    """
    steps = num_inference_steps or (28 if isinstance(pipe, DigitsFluxPipeline) else 50)
    pipe.set_progress_bar_config(disable=True)
    batches = [class_labels[i : i + batch_size] for i in range(0, len(class_labels), batch_size)]
    return np.concatenate(
        [
            pipe(
                class_labels=labels,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                generator=torch.Generator().manual_seed(seed + i),
                output_type="np",
            ).images
            for i, labels in enumerate(batches)
        ]
    )


def quality_labels(per_class: int = 20) -> list[int]:
    """The fixed labels of the quality check: ``per_class`` of each digit, interleaved."""
    return [i % NUM_CLASSES for i in range(per_class * NUM_CLASSES)]


def quality(
    pipe: DiffusionPipeline, guidance_scale: float, per_class: int = 20, classifier=None
) -> dict[str, float]:
    """Classifier accuracy and Frechet distance of :func:`sample` on :func:`quality_labels`.

    ``classifier`` defaults to the committed :class:`invardiff.metrics.DigitsClassifier`.
    """
    from ..metrics import accuracy, frechet_distance

    labels = quality_labels(per_class)
    images = sample(pipe, labels, guidance_scale)
    return {
        "accuracy": accuracy(images, labels, classifier),
        "frechet": frechet_distance(images, classifier=classifier),
    }


def save_grid(
    pipe: DiffusionPipeline, path: Path, guidance_scale: float, columns: int = 10, scale: int = 4
) -> np.ndarray:
    """Save a PNG grid: row ``d`` holds ``columns`` samples of digit ``d`` (seed 0, one batch).

    Each 16x16 sample is enlarged ``scale`` times (nearest) with a 2-pixel gap; returns the
    grid as a uint8 array.
    """
    from PIL import Image

    labels = [row for row in range(NUM_CLASSES) for _ in range(columns)]
    images = sample(pipe, labels, guidance_scale, batch_size=len(labels))[..., 0]
    cell, gap = IMAGE_SIZE * scale, 2
    grid = np.full(
        (NUM_CLASSES * (cell + gap) + gap, columns * (cell + gap) + gap), 255, dtype=np.uint8
    )
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        tile = np.kron(image, np.ones((scale, scale)))
        y, x = gap + r * (cell + gap), gap + c * (cell + gap)
        grid[y : y + cell, x : x + cell] = np.round(255 * (1 - tile)).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return grid
