"""Tiny random-weight diffusers models and pipelines for wiring, shape and determinism tests.

Everything is built from configs in memory (no files, no hub), in float32 (torch's default
dtype) and ``eval()`` mode, as a deterministic function of ``seed``: construction runs under a
forked, seeded torch RNG, so the caller's global RNG state is left untouched. Random weights
are unfit for quality claims; use the trained built-in models (``load_builtin``) for those.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
)

if TYPE_CHECKING:  # importing FluxPipeline imports transformers (the ``text`` extra)
    from diffusers import FluxPipeline

__all__ = [
    "flux_rope_axes",
    "tiny_dit_pipeline",
    "tiny_dit_transformer",
    "tiny_flux_pipeline",
    "tiny_flux_transformer",
]

_LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)]


def _heads(width: int, num_heads: int) -> int:
    if width % num_heads:
        raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
    return width // num_heads


def flux_rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Split ``head_dim`` into three even RoPE axes summing to it (FLUX uses 16, 56, 56 of 128)."""
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"FLUX head_dim must be even and at least 6, got {head_dim}")
    first = max(2, (head_dim // 8) * 2)
    second = ((head_dim - first) // 4) * 2
    return first, second, head_dim - first - second


def _seeded(seed: int, build):
    """Run ``build()`` under a forked RNG seeded with ``seed``; return the model in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    return model.eval()


def tiny_dit_transformer(
    num_layers: int = 2,
    width: int = 32,
    sample_size: int = 8,
    in_channels: int = 4,
    seed: int = 0,
    num_heads: int = 2,
    num_classes: int = 1000,
) -> DiTTransformer2DModel:
    """A DiT (``ada_norm_zero``, patch 2) with ``num_layers`` blocks of hidden size ``width``.

    ``num_classes`` is ``num_embeds_ada_norm``; the class table has one extra row, the null
    class ``num_classes`` (``DiTPipeline`` hard-codes 1000 for classifier-free guidance).
    """
    head_dim = _heads(width, num_heads)
    return _seeded(
        seed,
        lambda: DiTTransformer2DModel(
            num_attention_heads=num_heads,
            attention_head_dim=head_dim,
            in_channels=in_channels,
            out_channels=in_channels,
            num_layers=num_layers,
            sample_size=sample_size,
            patch_size=2,
            num_embeds_ada_norm=num_classes,
            norm_type="ada_norm_zero",
        ),
    )


def tiny_flux_transformer(
    num_double: int = 1,
    num_single: int = 2,
    width: int = 32,
    seed: int = 0,
    in_channels: int = 16,
    num_heads: int = 2,
    joint_attention_dim: int = 32,
    pooled_projection_dim: int = 32,
    guidance_embeds: bool = False,
) -> FluxTransformer2DModel:
    """A FLUX transformer with ``num_double`` double-stream and ``num_single`` single blocks.

    ``in_channels`` counts packed channels (4 x latent channels for 2x2 packing); the RoPE axes
    come from :func:`flux_rope_axes`. FLUX.1 itself is 19 double + 38 single blocks.
    """
    head_dim = _heads(width, num_heads)
    return _seeded(
        seed,
        lambda: FluxTransformer2DModel(
            patch_size=1,
            in_channels=in_channels,
            num_layers=num_double,
            num_single_layers=num_single,
            attention_head_dim=head_dim,
            num_attention_heads=num_heads,
            joint_attention_dim=joint_attention_dim,
            pooled_projection_dim=pooled_projection_dim,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=flux_rope_axes(head_dim),
        ),
    )


def _tiny_vae(latent_channels: int, blocks: int, seed: int, shift_factor: float | None):
    return _seeded(
        seed,
        lambda: AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * blocks,
            up_block_types=("UpDecoderBlock2D",) * blocks,
            block_out_channels=(8,) * blocks,
            layers_per_block=1,
            latent_channels=latent_channels,
            norm_num_groups=4,
            sample_size=32,
            scaling_factor=1.0,
            shift_factor=shift_factor,
        ),
    )


def tiny_dit_pipeline(num_layers: int = 2, seed: int = 0, width: int = 32) -> DiTPipeline:
    """A ``DiTPipeline``: tiny DiT on 4x8x8 latents, a one-block ``AutoencoderKL``, DDIM.

    Images come out at 8x8x3 (the VAE does not upsample). Classes are 0-999, 1000 is null.
    """
    transformer = tiny_dit_transformer(num_layers=num_layers, width=width, seed=seed)
    vae = _tiny_vae(latent_channels=4, blocks=1, seed=seed + 1, shift_factor=None)
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", clip_sample=False, set_alpha_to_one=False
    )
    return DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler)


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in _LETTERS:
        vocab[letter] = len(vocab)
        vocab[letter + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _t5_tokenizer():
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + letter, -1.0) for letter in _LETTERS]
    pieces += [(letter, -1.5) for letter in _LETTERS]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def tiny_flux_pipeline(
    num_double: int = 1, num_single: int = 2, seed: int = 0, width: int = 32
) -> FluxPipeline:
    """A ``FluxPipeline`` with tiny CLIP and T5 encoders and in-memory letter tokenizers.

    Needs ``transformers`` (the ``text`` extra). The VAE has 4 latent channels and scale factor
    2, so height and width must be multiples of 4; 32x32 images give 64 image tokens. Pass a
    small ``max_sequence_length`` (e.g. 8) to keep the T5 context short.
    """
    from diffusers import FluxPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    text_dim = 32
    clip = _seeded(
        seed + 2,
        lambda: CLIPTextModel(
            CLIPTextConfig(
                vocab_size=2 + 2 * len(_LETTERS),
                hidden_size=text_dim,
                intermediate_size=2 * text_dim,
                num_hidden_layers=1,
                num_attention_heads=2,
                max_position_embeddings=77,
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=1,
                projection_dim=text_dim,
            )
        ),
    )
    t5 = _seeded(
        seed + 3,
        lambda: T5EncoderModel(
            T5Config(
                vocab_size=4 + 2 * len(_LETTERS),
                d_model=text_dim,
                d_kv=16,
                d_ff=2 * text_dim,
                num_layers=1,
                num_heads=2,
                relative_attention_num_buckets=8,
                pad_token_id=0,
                eos_token_id=1,
                decoder_start_token_id=0,
            )
        ),
    )
    transformer = tiny_flux_transformer(
        num_double=num_double,
        num_single=num_single,
        width=width,
        seed=seed,
        in_channels=16,
        joint_attention_dim=text_dim,
        pooled_projection_dim=text_dim,
    )
    vae = _tiny_vae(latent_channels=4, blocks=2, seed=seed + 1, shift_factor=0.0)
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=clip,
        tokenizer=_clip_tokenizer(),
        text_encoder_2=t5,
        tokenizer_2=_t5_tokenizer(),
        transformer=transformer,
    )
