"""A plan refuses a setup it was not calibrated for (naming the field, the plan's value and the
run's), unless the field is explicitly allowed; calibration records every target field."""

from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from support import official_plan_files

from invardiff import (
    Geometry,
    PlanError,
    PlanMismatchError,
    PlanMismatchWarning,
    all_compute_plan,
    cached,
    calibrate,
    enable_cache,
    load_plan,
)
from invardiff.calibration import describe_target
from invardiff.checks import scheduler_config_hash

STEPS = 6


@pytest.fixture(scope="module")
def dit_pipe(tiny):
    return tiny.tiny_dit_pipeline(num_layers=2)


@pytest.fixture(scope="module")
def dit_plan(dit_pipe):
    """Calibrated without passing guidance or resolution: the pipeline's defaults are recorded."""
    return calibrate(dit_pipe, [{"class_labels": [1], "num_inference_steps": STEPS, "seed": 0}])


def generate(pipe, **kwargs):
    args = {"class_labels": [3], "num_inference_steps": STEPS, "generator": torch.Generator().manual_seed(0),
            "output_type": "np"}
    return pipe(**{**args, **kwargs}).images


def test_calibration_records_every_target_field_with_pipeline_defaults(dit_pipe, dit_plan, tiny):
    target = dit_plan.target
    assert target.guidance == 4.0  # DiTPipeline's default guidance_scale, not passed by the calls
    assert (target.height, target.width, target.dtype, target.steps) == (8, 8, "float32", STEPS)
    assert target.scheduler == "DDIMScheduler" and target.pipeline == "DiTPipeline"
    assert target.scheduler_config_hash == scheduler_config_hash(dit_pipe.scheduler)
    assert len(target.timesteps) == STEPS and dit_plan.geometry.tokens == 16
    flux = tiny.tiny_flux_pipeline(num_double=1, num_single=1)
    flux_target = describe_target(flux, [{"num_inference_steps": 4}], [1.0, 0.75, 0.5, 0.25])
    assert (flux_target.guidance, flux_target.height, flux_target.width) == (3.5, 256, 256)  # FluxPipeline's


def test_guidance_other_than_calibrated_is_refused_and_can_be_allowed_once(dit_pipe, dit_plan):
    refused = r"guidance: the plan was calibrated for guidance 4, this run uses guidance 7; .* allow_mismatch=\{'guidance'\}"
    with cached(dit_pipe, dit_plan):
        generate(dit_pipe)  # the default guidance, as calibrated
        with pytest.raises(PlanMismatchError, match=refused):
            generate(dit_pipe, guidance_scale=7.0)
    with cached(dit_pipe, dit_plan, allow_mismatch={"guidance"}), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        generate(dit_pipe, guidance_scale=7.0)
        generate(dit_pipe, guidance_scale=7.0)
    said = [w for w in caught if issubclass(w.category, PlanMismatchWarning)]
    assert len(said) == 1 and "guidance 7 (allowed by allow_mismatch)" in str(said[0].message)
    with pytest.raises(ValueError, match="allow_mismatch: unknown field.* colour"):
        enable_cache(dit_pipe, dit_plan, allow_mismatch={"colour"})


def test_dtype_is_checked_at_attach_time_and_each_generation(dit_pipe, dit_plan, tiny):
    transformer = tiny.tiny_dit_transformer(num_layers=2).double()
    with pytest.raises(PlanMismatchError, match="dtype: the plan was calibrated for float32, this run uses float64"):
        enable_cache(transformer, dit_plan)
    with cached(dit_pipe, dit_plan):
        dit_pipe.transformer.double()
        try:
            with pytest.raises(PlanMismatchError, match="dtype: .* float32, this run uses float64"):
                generate(dit_pipe)
        finally:
            dit_pipe.transformer.float()


def test_scheduler_class_and_config_are_checked(dit_pipe, dit_plan):
    original = dit_pipe.scheduler
    try:
        dit_pipe.scheduler = DPMSolverMultistepScheduler.from_config(original.config)
        with pytest.raises(PlanMismatchError, match="scheduler: the plan was calibrated for DDIMScheduler, this run "
                                                    "uses DPMSolverMultistepScheduler"):  # fmt: skip
            enable_cache(dit_pipe, dit_plan)
        dit_pipe.scheduler = DDIMScheduler.from_config(original.config, timestep_spacing="trailing")
        planned, now = dit_plan.target.scheduler_config_hash[:12], scheduler_config_hash(dit_pipe.scheduler)[:12]
        with pytest.raises(PlanMismatchError, match=f"scheduler_config_hash: .* for {planned}, this run uses {now}"):
            enable_cache(dit_pipe, dit_plan)
        # allowed, the other schedule is still refused: steps are matched by timestep, never guessed
        allowed = cached(dit_pipe, dit_plan, allow_mismatch={"scheduler_config_hash"})
        with pytest.warns(PlanMismatchWarning), allowed, pytest.raises(PlanError, match="schedule differs"):
            generate(dit_pipe, guidance_scale=4.0)
    finally:
        dit_pipe.scheduler = original


def test_imported_reference_plan_checks_what_it_records(dit_pipe):
    reference = load_plan(official_plan_files("dit")[0])
    assert reference.target.scheduler_config_hash is None and reference.target.timesteps is None
    plan = replace(reference, step_gate=np.zeros(STEPS, bool), modules={k: np.zeros((STEPS, 2), bool) for k in
                   reference.modules}, target=replace(reference.target, steps=STEPS))  # fmt: skip
    original = dit_pipe.scheduler
    try:
        dit_pipe.scheduler = DPMSolverMultistepScheduler.from_config(original.config)
        with pytest.raises(PlanMismatchError, match="scheduler: .*DDIMScheduler"):  # its class is recorded
            enable_cache(dit_pipe, plan)
        dit_pipe.scheduler = DDIMScheduler.from_config(original.config, timestep_spacing="trailing")
        refused = r"resolution: the plan was calibrated for 256x256 \(256 image tokens per sample\), this run uses 16"
        # its scheduler config is not recorded (not checked); DiT-XL/2's resolution is, and refused
        with cached(dit_pipe, plan), pytest.raises(PlanMismatchError, match=refused):
            generate(dit_pipe)
    finally:
        dit_pipe.scheduler = original
    assert load_plan(official_plan_files("flux")[0], height=512, width=512).geometry.tokens == 1024


def test_replacing_the_scheduler_after_enable_is_refused(dit_pipe, dit_plan):
    original = dit_pipe.scheduler
    with cached(dit_pipe, dit_plan):
        dit_pipe.scheduler = DDIMScheduler.from_config(original.config)
        try:
            with pytest.raises(PlanError, match="scheduler was replaced after enable_cache"):
                generate(dit_pipe)
        finally:
            dit_pipe.scheduler = original


def test_flux_resolution_and_guidance_input_are_checked_per_generation(tiny):
    transformer = tiny.tiny_flux_transformer(num_double=1, num_single=1, guidance_embeds=True)
    layers = {"attn": 1, "context_attn": 1, "ff": 1, "context_ff": 1, "single_attn": 1, "single_mlp": 1}
    schedule = (1.0, 0.75, 0.5, 0.25)
    plan = all_compute_plan("flux", 4, layers, geometry=Geometry(dim=32, tokens=16, context_tokens=4))
    plan = replace(plan, target=replace(plan.target, timesteps=schedule, height=16, width=16, guidance=3.5))

    def call(tokens, guidance, t=1.0):
        return transformer(hidden_states=torch.randn(1, tokens, 16), encoder_hidden_states=torch.randn(1, 4, 32),
                           pooled_projections=torch.randn(1, 32), timestep=torch.tensor([t]),
                           guidance=torch.tensor([guidance]), img_ids=torch.zeros(tokens, 3),
                           txt_ids=torch.zeros(4, 3))  # fmt: skip

    with cached(transformer, plan):
        with pytest.raises(PlanMismatchError, match=r"resolution: the plan was calibrated for 16x16 \(16 image "
                                                    "tokens per sample\\), this run uses 64 image tokens"):  # fmt: skip
            call(64, 3.5)
        with pytest.raises(PlanMismatchError, match="guidance: .* guidance 3.5, this run uses guidance 5"):
            call(16, 5.0)
        call(16, 3.5)  # the calibrated setup runs; later steps are not re-checked
        call(16, 3.5, t=0.75)
