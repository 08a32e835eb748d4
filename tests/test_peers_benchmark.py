"""The peers benchmark at a tiny size: output shape, exact fidelity and FLOP accounting."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import peer_methods as pm
from benchmarks.measures import RecordingMeasure
from benchmarks.peers import Entry, count_block_flops, main, pareto
from invardiff import all_compute_plan
from invardiff.cli import builtin_settings, calibration_calls
from invardiff.models import load_builtin
from invardiff.schedules import every_k_plan


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("peers")
    argv = ["--models", "digits-flux", "--families", "full", "every-k", "--every-k", "3", "--samples", "2", "--batch", "2",
            "--repeats", "1", "--threads", "1", "--out", str(out), "--img-dir", str(out)]  # fmt: skip
    assert main(argv) == 0
    return json.loads((out / "peers.json").read_text()), out


def test_output_shape_and_files(result):
    data, out = result
    assert set(data) == {"meta", "models"}
    assert list(data["models"]) == ["digits-flux"]
    for name, model in data["models"].items():
        assert (out / f"peers-{name}.png").stat().st_size > 0
        families = [row["family"] for row in model["methods"]]
        assert families == ["full compute", "every-k"]
        for row in model["methods"]:
            assert row["status"] == "ok"
            assert len(row["seconds"]) == len(row["cpu_seconds"]) == 1
            assert row["speedup"] > 0 and row["cpu_speedup"] > 0
            assert 0 < row["flop_fraction"] <= 1
            assert 0 <= row["accuracy"] <= 1 and row["frechet"] >= 0
            assert {"pareto_speedup", "pareto_cpu_speedup", "pareto_flop_speedup"} <= set(row)
    assert "| every-k | k=3 |" in (out / "peers.md").read_text()


def test_full_compute_reproduces_the_reference_exactly(result):
    for model in result[0]["models"].values():
        full = model["methods"][0]
        assert full["identical"] and full["psnr_db"] is None and full["ssim"] == 1.0
        assert full["flop_fraction"] == 1.0
        assert not model["methods"][1]["identical"]  # real reuse changes pixels


def test_every_k_executes_exactly_its_computed_steps(result):
    row = result[0]["models"]["digits-flux"]["methods"][1]
    computed = 10  # steps 0, 3, ..., 27 of 28
    assert row["plan"]["step_gate"] == ".RR" * 9 + "."
    assert row["flop_fraction"] == pytest.approx(computed / 28, abs=1e-6)  # measured FLOPs
    assert row["plan"]["executed_fraction"] == pytest.approx(computed / 28, abs=1e-6)
    assert 25 < row["psnr_db"] < 80


def _entry(method: pm.Method, name: str, arch: str) -> tuple[Entry, pm.ModelSetup]:
    steps, guidance = builtin_settings(name)
    setup = pm.ModelSetup(name, arch, steps, guidance, calibration_calls(name, 1))
    entry = Entry(method, pipe=load_builtin(name))
    entry.plan = method.install(entry.pipe, setup)
    return entry, setup


def test_every_k_block_flops_on_dit():
    """DiT blocks also hold the adaLN embedding: a skipped step still skips all block work."""
    full, setup = _entry(pm.full_compute(), "digits-dit", "dit")
    every_4, _ = _entry(
        pm.plan_method("every-k", "k=4", lambda t: every_k_plan(t, 4)), "digits-dit", "dit"
    )
    _, full_flops = count_block_flops(full, [5], setup, 1)
    _, flops = count_block_flops(every_4, [5], setup, 1)
    assert flops / full_flops == pytest.approx(14 / 50, abs=1e-9)  # steps 0, 4, ..., 48 and 49
    assert every_4.plan.summary().executed_fraction == pytest.approx(14 / 50, abs=1e-6)


def test_first_block_cache_state_is_reset_between_generations():
    """Two generations under FirstBlockCache give the same images (context and reset set up)."""
    entry, setup = _entry(pm.first_block_cache(0.2), "digits-flux", "flux")
    first, flops_first = count_block_flops(entry, [3, 7], setup, 2)
    second, flops_second = count_block_flops(entry, [3, 7], setup, 2)
    assert np.array_equal(first, second) and flops_first == flops_second


def test_pareto_front():
    points = [(1.0, 50.0), (2.0, 40.0), (1.5, 39.0), (2.0, 40.0), (3.0, 30.0), (0.9, 60.0)]
    assert pareto(points) == [True, True, False, True, True, True]


def test_shared_measure_answers_a_plan_measured_before_from_memory():
    """Budget points share their held-out measures (peer_methods.budget_measures): a plan
    measured for one target is not measured again, yet every plan is answered, in order, with
    its own figures, and the search sees one ``done()`` per plan."""
    template = all_compute_plan("dit", 10, {"attn": 2, "mlp": 2})
    plans = [every_k_plan(template, k) for k in (2, 3, 4)]
    measured: list[str] = []

    def measure(batch, done):
        measured.extend(p.sha256 for p in batch)
        return [[float(p.summary().ideal_speedup)] for p in batch]

    shared, finished = RecordingMeasure(measure), []
    first = shared([plans[0], plans[1]], lambda: finished.append(1))
    second = shared([plans[2], plans[1], plans[2]], lambda: finished.append(2))
    expected = [[p.summary().ideal_speedup] for p in plans]
    assert first == expected[:2] and second == [expected[2], expected[1], expected[2]]
    assert measured == [p.sha256 for p in plans]  # each plan once
    assert finished == [1, 1, 2, 2, 2]
    assert [len(batch) for batch, _ in shared.calls] == [2, 3]


def test_invardiff_sweep_options():
    """--targets replaces the budget sweep; --no-reference-rules leaves the reference rules out."""
    from benchmarks.peers import INVARDIFF_SWEEP, TARGET_SPEEDUPS, methods

    settings = [m.setting for m in methods("dit", {"invardiff"}, [], (1.3, 3.23), reference_rules=False)]
    assert settings == ["all-compute plan (hook overhead)", "target 1.3x", "target 3.23x"]
    every = methods("flux", {"invardiff"}, [])
    assert len(every) == 1 + len(INVARDIFF_SWEEP["flux"]) + len(TARGET_SPEEDUPS)
    assert every[-1].setting == f"target {TARGET_SPEEDUPS[-1]:g}x"
