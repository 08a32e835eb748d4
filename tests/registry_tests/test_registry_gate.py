"""What the registry serves: plans below their quality gate, revoked plans, and plans of an
alias's previous revision. On real SQLite and PostgreSQL, through the database and through
the read-only store index; the driver's re-judging of a finished job runs without Ray (a job
that already succeeded is answered from its row)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner
from registry_helpers import FLUX_PLANS, FLUX_SOURCE, cli_env, digits_plan, publish_digits

from registry import jobs
from registry.cli import main
from registry.client import fetch_plan
from registry.config import Config
from registry.errors import NOT_FOUND, InvalidInput, NotFound
from registry.matching import FAILED_GATE, READY, REVOKED, Query, Resolution
from registry.service import BUILTIN_MODELS
from workers.driver import PlanRevoked, RunOptions, publish_under_gate, submit
from workers.request import build_request

DIT = next(m for m in BUILTIN_MODELS if m.name == "digits-dit")
QUERY = Query(model="digits-dit", resolution=Resolution.parse("16"), guidance=1.25)


def served(config: Config, query: Query = QUERY) -> dict[str, int | None]:
    """The version each read path answers (None: not found), with no client cache."""
    answers = {}
    for path, use_index in (("database", False), ("index", True)):
        try:
            result = fetch_plan(
                query, replace(config, ref_ttl=0), refresh=True, use_index=use_index
            )
            answers[path] = result.version
        except NotFound:
            answers[path] = None
    return answers


def store_only(config: Config) -> Config:
    """A read-only client: the store and no database (it resolves through the index)."""
    return replace(config, database_url=None)


# ---- a plan below its gate -------------------------------------------------------------------
def test_a_plan_below_its_gate_is_recorded_and_never_served(registry, config, tmp_path) -> None:
    ready = publish_digits(registry, tmp_path, 1.25)
    below = publish_digits(registry, tmp_path, 1.25, status=FAILED_GATE, torch="1.13.0")
    assert (ready.version.version, below.version.version) == (1, 2)
    assert below.version.status == FAILED_GATE
    assert served(config) == {"database": 1, "index": 1}  # v2 is newer but never `latest`
    only_below = publish_digits(registry, tmp_path, 2.0, status=FAILED_GATE)
    guided = replace(QUERY, guidance=2.0)
    assert served(config, guided) == {"database": None, "index": None}
    with pytest.raises(NotFound):
        fetch_plan(guided, store_only(config))
    index = registry.store.get("index/digits-dit.json").decode()
    assert below.version.sha256 not in index and only_below.version.sha256 not in index
    with pytest.raises(InvalidInput, match="only ready plans can be promoted"):
        registry.promote(below.version.sha256, "production")
    # Published again with the same bytes: the existing version, still below its gate.
    again = publish_digits(registry, tmp_path, 1.25, torch="1.13.0")
    assert not again.created and again.version.status == FAILED_GATE
    rows = {
        r["version"]: r for r in registry.versions("digits-dit") if r["target"]["guidance"] == 1.25
    }
    assert rows[1]["latest"] and not rows[2]["latest"] and rows[2]["status"] == FAILED_GATE
    assert registry.check_indexes()["failures"] == []
    with pytest.raises(InvalidInput, match="ready or failed_gate"):
        publish_digits(registry, tmp_path, 1.5, status=REVOKED)

    env = cli_env(config)
    runner = CliRunner(env=env)
    listed = runner.invoke(main, ["list", "--model", "digits-dit"])
    assert listed.exit_code == 0, listed.stderr
    line = next(x for x in listed.stdout.splitlines() if below.version.sha256[:12] in x)
    assert "FAILED-GATE" in line and "latest" not in line
    shown = runner.invoke(main, ["show", below.version.sha256[:12]])
    assert ["status:", "FAILED-GATE"] in [line.split() for line in shown.stdout.splitlines()]
    data = json.loads(runner.invoke(main, ["show", below.version.sha256[:12], "--json"]).stdout)
    assert data["status"] == FAILED_GATE and not data["latest"]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_driver_publishes_a_plan_below_its_gate_as_failed_gate(registry, config, tmp_path):
    request = build_request(DIT, trajectories=2, validate=2, repeats=1)
    validation = {"metrics": {"measured_speedup": 2.0, "psnr_db": 20.0, "samples": 2}}
    below = digits_plan(tmp_path, request.guidance).read_bytes()
    published, _, metrics = publish_under_gate(
        registry, request, below, validation, RunOptions(min_psnr=30.0, promote="production")
    )
    assert published.version.status == FAILED_GATE and not metrics["gate"]["passed"]
    assert metrics["psnr_db"] == 20.0 and "PSNR 20.0 dB < 30.0 dB" in metrics["gate"]["reasons"]
    query = replace(QUERY, guidance=request.guidance)
    assert served(config, query) == {"database": None, "index": None}
    passing = digits_plan(tmp_path, request.guidance, torch="1.13.0").read_bytes()
    published, _, _ = publish_under_gate(
        registry, request, passing, validation, RunOptions(min_psnr=10.0)
    )
    assert published.version.status == READY and published.version.version == 2
    assert served(config, query) == {"database": 2, "index": 2}


# ---- the driver re-judges a finished job (no Ray: answered from its row) ----------------------
def finished_job(registry, tmp_path: Path, status: str, psnr: float):
    """A succeeded calibration job whose plan was published with ``status`` and validated."""
    request = build_request(DIT, trajectories=2, validate=2, repeats=1)
    published = publish_digits(registry, tmp_path, request.guidance, status=status)
    sha256 = published.version.sha256
    measured = {"measured_speedup": 2.0, "psnr_db": psnr}
    target_id, metrics = jobs.add_version_metrics(
        registry, sha256, published.target.key_hash, measured
    )
    jobs.claim(registry, request.job_key, "digits-dit", request.to_json(), "test", 30)
    stored = {"version": published.version.version, "sha256": sha256, "metrics": metrics,
              "target": published.target.to_json(), "workers": []}  # fmt: skip
    jobs.finish(registry, request.job_key, "test", stored, {}, {}, target_id)
    return request, sha256


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_rerun_admits_a_plan_only_through_a_gate_it_passes(registry, config, tmp_path) -> None:
    request, sha256 = finished_job(registry, tmp_path, FAILED_GATE, psnr=30.0)
    query = replace(QUERY, guidance=request.guidance)
    assert served(config, query) == {"database": None, "index": None}
    plain = submit(registry, request, RunOptions(promote="production"))
    assert not plain.created and not plain.gate["passed"] and plain.promoted is None
    assert "FAILED-GATE" in plain.gate["reasons"][0] and plain.plan_status == FAILED_GATE
    stricter = submit(registry, request, RunOptions(min_psnr=40.0, promote="production"))
    assert not stricter.gate["passed"] and registry.show(sha256)["status"] == FAILED_GATE
    passed = submit(registry, request, RunOptions(min_psnr=25.0, promote="production"))
    assert passed.gate["passed"] and passed.promoted == "production"
    assert passed.plan_status == READY and registry.show(sha256)["lineage"]["admitted"]["gate"]
    assert served(config, query) == {"database": 1, "index": 1}
    # A gate admits, it never withdraws: a stricter rerun leaves the served plan served.
    again = submit(registry, request, RunOptions(min_psnr=40.0))
    assert not again.gate["passed"] and registry.show(sha256)["status"] == READY


# ---- revoked plans -----------------------------------------------------------------------------
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_revoked_result_is_not_an_answer(registry, config, tmp_path) -> None:
    request, sha256 = finished_job(registry, tmp_path, READY, psnr=30.0)
    assert submit(registry, request, RunOptions()).sha256 == sha256
    registry.revoke(sha256)
    with pytest.raises(PlanRevoked, match="was revoked") as caught:
        submit(registry, request, RunOptions())
    assert caught.value.exit_code == NOT_FOUND
    runner = CliRunner(env=cli_env(config))
    again = runner.invoke(main, ["calibrate", "digits-dit", "16", "--trajectories", "2", "--json"])
    assert again.exit_code == NOT_FOUND
    assert "was revoked" in again.stderr.strip().splitlines()[-1]
    assert [j.status for j in jobs.list_jobs(registry)] == ["succeeded"]  # nothing recomputed


# ---- an alias moved to a new revision ------------------------------------------------------
def test_models_update_changes_only_what_it_is_given(registry, config) -> None:
    runner = CliRunner(env=cli_env(config))
    source = "hf://org/some-checkpoint"  # names no architecture
    added = runner.invoke(main, ["models", "add", "sd", source, "--arch", "flux", "--revision",
                                 "r1", "--pipeline", "MyFlux", "--resolution", "512x768",
                                 "--dtype", "float16", "--guidance", "5", "--json"])  # fmt: skip
    assert added.exit_code == 0, added.stderr
    before = json.loads(added.stdout)
    moved = runner.invoke(main, ["models", "add", "sd", source, "--revision", "r2", "--update",
                                 "--json"])  # fmt: skip
    assert moved.exit_code == 0, moved.stderr
    assert json.loads(moved.stdout) == {**before, "revision": "r2"}
    steps = runner.invoke(main, ["models", "add", "sd", source, "--steps", "20", "--update",
                                 "--json"])  # fmt: skip
    assert json.loads(steps.stdout) == {**before, "revision": "r2", "steps": 20}
    unknown = runner.invoke(main, ["models", "add", "new", source])
    assert unknown.exit_code == 2 and "pass --arch" in unknown.stderr


def fetch_json(runner: CliRunner, *args: str) -> tuple[int, dict | None, str]:
    done = runner.invoke(main, ["fetch", "flux-dev", "1024", "--refresh", "--json", *args])
    return done.exit_code, json.loads(done.stdout) if done.exit_code == 0 else None, done.stderr


def test_an_alias_keeps_serving_the_previous_revision_until_promoted(registry, config) -> None:
    old = registry.publish(FLUX_PLANS[0], "flux-dev", Resolution.parse("1024"))
    registry.promote(old.version.sha256, "production")
    registry.add_model("flux-dev", FLUX_SOURCE, "r2", None, {}, update=True)
    runner, reader = CliRunner(env=cli_env(config)), CliRunner(env=cli_env(store_only(config)))
    for client in (runner, reader):  # the database, and the read-only store index
        code, data, err = fetch_json(client, "--alias", "production")
        assert code == 0, err
        assert (data["sha256"], data["target"]["revision"]) == (old.version.sha256, "0123abc")
        assert data["stale"] and data["stale_reasons"] == ["revision_changed"]
        assert data["model_revision"] == "r2" and "serving revision 0123abc" in err
        code, _, err = fetch_json(client)  # `latest` is the new revision's: none yet
        assert code == NOT_FOUND and "no plans are published for flux-dev" in err
    # A plan for r2 below its gate, then one published but not promoted: production stays.
    below = registry.publish(FLUX_PLANS[1], "flux-dev", Resolution.parse("1024"),
                             status=FAILED_GATE)  # fmt: skip
    new = registry.publish(FLUX_PLANS[2], "flux-dev", Resolution.parse("1024"))
    assert below.target.revision == new.target.revision == "r2"
    for client in (runner, reader):
        assert fetch_json(client, "--alias", "production")[1]["sha256"] == old.version.sha256
        assert fetch_json(client)[1]["sha256"] == new.version.sha256  # latest: r2's ready plan
    # Promoted: production is the new revision's, fresh.
    registry.promote(new.version.sha256, "production")
    for client in (runner, reader):
        code, data, _ = fetch_json(client, "--alias", "production")
        assert (data["sha256"], data["stale"], data["stale_reasons"]) == (new.version.sha256,
                                                                        False, [])  # fmt: skip
    # Back to r1: its own alias, fresh; a revoked old plan is not a fallback.
    registry.add_model("flux-dev", FLUX_SOURCE, "0123abc", None, {}, update=True)
    assert not fetch_json(runner, "--alias", "production")[1]["stale"]
    registry.add_model("flux-dev", FLUX_SOURCE, "r3", None, {}, update=True)
    assert fetch_json(reader, "--alias", "production")[1]["sha256"] == new.version.sha256
    registry.revoke(new.version.sha256)
    for client in (runner, reader):
        assert fetch_json(client, "--alias", "production")[1]["sha256"] == old.version.sha256
    assert registry.check_indexes()["failures"] == []


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_recalibrate_promotes_only_through_a_gate(config) -> None:
    runner = CliRunner(env=cli_env(config))
    for args in (["--due"], ["--job", "abcdef12"]):
        done = runner.invoke(main, ["recalibrate", *args, "--promote", "production"])
        assert done.exit_code == 2 and "give --min-psnr and/or --min-speedup" in done.stderr
    from workers.schedule import job_entrypoint

    line = job_entrypoint("ab" * 32, 2, "production", {"min_psnr": 30, "min_speedup": None})
    assert line.endswith("--promote production --min-psnr 30.0 --json")


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_target_whose_plans_are_revoked_is_due(registry, config, tmp_path) -> None:
    request, sha256 = finished_job(registry, tmp_path, READY, psnr=30.0)
    runner = CliRunner(env=cli_env(config))

    def dry(*args: str) -> list[dict]:
        done = runner.invoke(main, ["recalibrate", "--due", "--dry-run", "--json", *args])
        assert done.exit_code == 0, done.stderr
        return json.loads(done.stdout)["due"]

    assert dry() == [] and dry("--max-age", "1") == []
    registry.revoke(sha256)
    for entries in (dry(), dry("--max-age", "0")):
        (entry,) = entries
        assert entry["reasons"] == ["revoked"] and entry["action"] == "would_submit"
        assert entry["plan"]["sha256"] == sha256 and entry["plan"]["status"] == REVOKED
        assert entry["details"]["revoked"]["at"] and entry["job_key"] != request.job_key
