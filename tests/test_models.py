"""Tiny random-weight builders and the trained built-in digits models."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch
from diffusers import DiTPipeline

from invardiff.models import (
    BUILTIN_MODELS,
    DigitsFluxPipeline,
    load_builtin,
    tiny_dit_pipeline,
    tiny_dit_transformer,
    tiny_flux_pipeline,
    tiny_flux_transformer,
)
from invardiff.models.digits import (
    FLUX_DEV_SCHEDULER,
    VARIANTS,
    WEIGHTS_DIR,
    quality_labels,
    sample,
)


def _flux_forward(model, batch: int = 2, tokens: int = 16, context: int = 4):
    gen = torch.Generator().manual_seed(0)
    cfg = model.config
    return model(
        hidden_states=torch.randn(batch, tokens, cfg.in_channels, generator=gen),
        encoder_hidden_states=torch.randn(batch, context, cfg.joint_attention_dim, generator=gen),
        pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=gen),
        timestep=torch.full((batch,), 0.5),
        img_ids=torch.zeros(tokens, 3),
        txt_ids=torch.zeros(context, 3),
        guidance=None,
        return_dict=False,
    )[0]


def test_tiny_dit_transformer_official_depth_is_deterministic():
    a, b = tiny_dit_transformer(num_layers=28, seed=3), tiny_dit_transformer(num_layers=28, seed=3)
    assert len(a.transformer_blocks) == 28 and not a.training
    assert next(a.parameters()).dtype == torch.float32
    x = torch.randn(2, 4, 8, 8)
    kwargs = {"timestep": torch.tensor([10, 500]), "class_labels": torch.tensor([1, 1000])}
    with torch.no_grad():
        out = a(x, **kwargs).sample
        assert out.shape == x.shape
        assert torch.equal(out, b(x, **kwargs).sample)


def test_tiny_flux_transformer_official_depth_is_deterministic():
    a, b = tiny_flux_transformer(19, 38, seed=1), tiny_flux_transformer(19, 38, seed=1)
    assert (len(a.transformer_blocks), len(a.single_transformer_blocks)) == (19, 38)
    with torch.no_grad():
        out = _flux_forward(a)
        assert out.shape == (2, 16, 16)
        assert torch.equal(out, _flux_forward(b))
        assert not torch.equal(out, _flux_forward(tiny_flux_transformer(19, 38, seed=2)))


def test_builders_leave_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_dit_transformer()
    assert torch.equal(torch.rand(3), expected)


def test_tiny_dit_pipeline_runs_offline_and_deterministically():
    def run():
        pipe = tiny_dit_pipeline(num_layers=2, seed=0)
        return pipe(
            class_labels=[1, 7],
            num_inference_steps=4,
            guidance_scale=1.5,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images

    a = run()
    assert a.shape == (2, 8, 8, 3) and a.dtype == np.float32
    assert 0.0 <= a.min() and a.max() <= 1.0
    np.testing.assert_array_equal(a, run())


def test_tiny_flux_pipeline_runs_offline_and_deterministically():
    pytest.importorskip("transformers")

    def run():
        pipe = tiny_flux_pipeline(num_double=1, num_single=2, seed=0)
        return pipe(
            prompt="a b",
            height=32,
            width=32,
            num_inference_steps=4,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images

    a = run()
    assert a.shape == (1, 32, 32, 3)
    assert 0.0 <= a.min() and a.max() <= 1.0
    np.testing.assert_array_equal(a, run())


# ---------------------------------------------------------------------------------------------
# Built-in digits models (committed weights; nothing here trains)
# Quality floors of the issue (accuracy at least, Frechet distance at most), checked at the
# guidance scale of the figures in docs/models.md.
FLOORS = {"digits-flux": (0.95, 10.0), "digits-dit": (0.75, 40.0)}


@pytest.fixture(scope="module")
def builtin():
    return {name: load_builtin(name) for name in BUILTIN_MODELS}


def _generate(pipe, labels, seed=0, guidance=1.0, steps=None):
    kwargs = {} if steps is None else {"num_inference_steps": steps}
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        class_labels=labels,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        **kwargs,
    ).images


def test_weights_are_committed_and_small():
    files = sorted(WEIGHTS_DIR.glob("*.safetensors"))
    names = {f.stem for f in files}
    assert {"digits-dit", "digits-flux", "digits-classifier"} <= names
    assert sum(f.stat().st_size for f in files) < 5 * 2**20
    assert all(f.with_suffix(".json").exists() for f in files)


def test_load_builtin_offline(builtin, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in BUILTIN_MODELS:
        pipe = load_builtin(name)
        assert not pipe.transformer.training
        assert next(pipe.transformer.parameters()).dtype == torch.float32
    assert isinstance(builtin["digits-dit"], DiTPipeline)
    assert isinstance(builtin["digits-flux"], DigitsFluxPipeline)
    assert builtin["digits-dit"].transformer.config.num_embeds_ada_norm == 1000
    with pytest.raises(KeyError):
        load_builtin("digits-unet")


@pytest.mark.parametrize("name", list(BUILTIN_MODELS))
def test_builtin_output_shape_range_and_determinism(builtin, name):
    pipe = builtin[name]
    a = _generate(pipe, [3, 1, 4], seed=5, guidance=1.5, steps=6)
    assert a.shape == (3, 16, 16, 1) and a.dtype == np.float32
    assert 0.0 <= a.min() and a.max() <= 1.0
    np.testing.assert_array_equal(a, _generate(pipe, [3, 1, 4], seed=5, guidance=1.5, steps=6))
    assert not np.array_equal(a, _generate(pipe, [3, 1, 4], seed=6, guidance=1.5, steps=6))
    assert not np.array_equal(a, _generate(pipe, [3, 1, 4], seed=5, guidance=1.0, steps=6))


def test_flux_pipeline_calls_like_flux_pipeline(builtin):
    pipe = builtin["digits-flux"]
    calls, starts = [], []

    def record(module, args, kwargs):
        calls.append(kwargs)

    original = pipe.scheduler.set_timesteps
    pipe.scheduler.set_timesteps = lambda *a, **k: (starts.append(1), original(*a, **k))[1]
    handle = pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        _generate(pipe, [0, 9], guidance=2.0, steps=5)
    finally:
        handle.remove()
        del pipe.scheduler.set_timesteps
    assert len(starts) == 1 and len(calls) == 5
    first = calls[0]
    assert first["hidden_states"].shape == (4, 64, 4)  # cond + uncond in one call
    assert first["guidance"] is None and first["return_dict"] is False
    assert first["timestep"].shape == (4,) and float(first["timestep"][0]) == pytest.approx(1.0)
    assert first["encoder_hidden_states"].shape[0] == 4
    assert first["img_ids"].shape == (64, 3) and first["pooled_projections"].shape[0] == 4
    assert all(0 < float(c["timestep"][0]) <= 1 for c in calls)


def test_protocol_step_counts_are_defaults():
    assert (
        inspect.signature(DigitsFluxPipeline.__call__).parameters["num_inference_steps"].default
        == 28
    )
    assert BUILTIN_MODELS["digits-dit"]["num_inference_steps"] == 50


@pytest.mark.slow
@pytest.mark.parametrize("name", [name for name in BUILTIN_MODELS if name not in VARIANTS])  # variants: docs/models.md
def test_quality_floor(builtin, name):
    pytest.importorskip("sklearn")
    from invardiff.metrics import accuracy, frechet_distance

    min_accuracy, max_frechet = FLOORS[name]
    labels = quality_labels(20)
    images = sample(builtin[name], labels, BUILTIN_MODELS[name]["guidance_scale"])
    assert accuracy(images, labels) >= min_accuracy
    assert frechet_distance(images) <= max_frechet


def test_weights_json_records_training():
    for name in set(BUILTIN_MODELS) - set(VARIANTS):
        meta = json.loads((WEIGHTS_DIR / f"{name}.json").read_text())
        assert meta["architecture"] == BUILTIN_MODELS[name]["architecture"]
        assert meta["training"]["steps"] > 0 and meta["training"]["seed"] == 0
    assert (WEIGHTS_DIR / "digits-classifier.json").exists()


def test_the_shifted_variant_is_digits_flux_on_flux_dev_s_dynamically_shifted_schedule(builtin):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    flux, shifted = builtin["digits-flux"], builtin["digits-flux-shifted"]
    assert isinstance(shifted, DigitsFluxPipeline)
    assert {k: shifted.scheduler.config[k] for k in FLUX_DEV_SCHEDULER} == FLUX_DEV_SCHEDULER
    weights, shifted_weights = flux.transformer.state_dict(), shifted.transformer.state_dict()
    assert all(torch.equal(weights[k], shifted_weights[k]) for k in weights)  # no retraining
    _generate(shifted, [5], steps=28)
    sigmas = shifted.scheduler.sigmas[:-1].double().numpy()
    # FluxPipeline's shift for 64 image tokens: sigma' = e^mu / (e^mu + 1/sigma - 1)
    mu = calculate_shift(64, 256, 4096, 0.5, 1.15)
    grid = np.linspace(1.0, 1 / 28, 28)
    np.testing.assert_allclose(sigmas, np.exp(mu) / (np.exp(mu) + 1 / grid - 1), rtol=1e-6)
    steps = -np.diff(shifted.scheduler.timesteps.double().numpy())
    assert steps.max() > 2 * steps.min()  # really non-uniform (digits-flux: all equal)
    _generate(flux, [5], steps=28)
    np.testing.assert_allclose(-np.diff(flux.scheduler.timesteps.double().numpy()), 1000 / 28, rtol=1e-4)
    assert not np.array_equal(_generate(flux, [5], steps=8), _generate(shifted, [5], steps=8))


def test_the_fleet_loads_the_shifted_variant_as_a_builtin_source():
    from registry.matching import ModelInfo, Resolution
    from workers.pipelines import check_resolution, checkpoint_path, load_pipeline

    source = "builtin://digits-flux-shifted"
    assert checkpoint_path(source, None) is None
    model = ModelInfo(name="digits-flux-shifted", source=source, arch="flux", revision=None)
    check_resolution(model, Resolution(width=16, height=16))
    pipe = load_pipeline(source, None, None, "cpu")
    assert pipe.scheduler.config.use_dynamic_shifting and not pipe.transformer.training
