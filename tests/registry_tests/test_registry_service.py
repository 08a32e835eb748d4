"""Registry operations against real SQLite and PostgreSQL (same tests for both)."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
from registry_helpers import DIT_PLANS, FLUX_PLANS, FLUX_SOURCE, make_registry
from sqlalchemy import select
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError

from invardiff import PlanTarget, all_compute_plan, load_plan
from registry import fetch
from registry.client import StoreIndex, fetch_plan
from registry.errors import Conflict, InvalidInput, NotFound
from registry.index import index_key
from registry.matching import Query, Resolution
from registry.models import PlanAlias, PlanVersion
from registry.service import Registry
from registry.store import put_blob


def native_flux(tmp_path: Path, name: str = "native.json", **target) -> Path:
    """A native plan for flux-dev's checkpoint, from a reference book."""
    plan = load_plan(FLUX_PLANS[0], model_id="black-forest-labs/FLUX.1-dev", revision="0123abc")
    plan = replace(plan, target=replace(plan.target, **target))
    return plan.save(tmp_path / name)


def digits_plan(tmp_path: Path) -> Path:
    target = PlanTarget(
        model_id="digits-dit",
        pipeline="DiTPipeline",
        scheduler="DDIMScheduler",
        steps=50,
        height=16,
        width=16,
    )
    return all_compute_plan("dit", 50, {"attn": 8, "mlp": 8}, target=target).save(
        tmp_path / "digits.json"
    )


def test_init_registers_builtins_once(registry: Registry):
    names = [m.name for m in registry.models()]
    assert names == ["digits-dit", "digits-flux", "digits-flux-shifted", "flux-dev"]
    assert registry.init()["models_added"] == []
    dit = registry.model("digits-dit")
    assert (dit.arch, dit.source, dit.scheduler, dit.steps, dit.width) == (
        "dit",
        "builtin://digits-dit",
        "DDIMScheduler",
        50,
        16,
    )
    assert registry.model("digits-flux").scheduler == "FlowMatchEulerDiscreteScheduler"


def test_models_add_is_idempotent_and_refuses_silent_changes(registry: Registry):
    flux = registry.model("flux-dev")
    assert (flux.revision, flux.pipeline, flux.steps, flux.guidance, flux.dtype) == (
        "0123abc",
        "FluxPipeline",
        28,
        3.5,
        "bfloat16",
    )
    assert registry.add_model("flux-dev", FLUX_SOURCE, "0123abc", "flux", {}) == flux
    with pytest.raises(Conflict, match="--update"):
        registry.add_model("flux-dev", FLUX_SOURCE, "fff", "flux", {})
    moved = registry.add_model("flux-dev", FLUX_SOURCE, "fff", "flux", {"steps": 50}, update=True)
    assert registry.model("flux-dev") == moved and moved.steps == 50
    with pytest.raises(InvalidInput):
        registry.add_model("Bad Name", FLUX_SOURCE, None, "flux", {})
    for value in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(InvalidInput, match="finite"):
            registry.add_model("flux-nan", FLUX_SOURCE, None, "flux", {"guidance": value})
    with pytest.raises(NotFound):
        registry.model("flux-nan")
    with pytest.raises(NotFound, match="known models: digits-dit, digits-flux, digits-flux-shifted, flux-dev"):
        registry.model("nope")


def test_publishing_reference_plans_and_their_versions(registry: Registry, tmp_path: Path):
    results = [registry.publish(p, "flux-dev", Resolution.parse("1024")) for p in FLUX_PLANS]
    assert [r.version.version for r in results] == [1, 2, 3, 4]
    assert all(r.created for r in results)
    assert len({r.target for r in results}) == 1
    expected = load_plan(FLUX_PLANS[0], model_id="black-forest-labs/FLUX.1-dev", revision="0123abc")
    assert results[0].version.sha256 == expected.sha256  # the converted plan's canonical bytes
    again = registry.publish(FLUX_PLANS[0], "flux-dev", Resolution.parse("1024"), steps=28)
    assert (again.created, again.version.version) == (False, 1)
    at_512 = registry.publish(FLUX_PLANS[0], "flux-dev", Resolution.parse("512"))
    assert (at_512.target.height, at_512.version.version) == (512, 1)
    registry.add_model("dit-xl", "hf://facebook/DiT-XL-2-256", "rev1", "dit", {})
    dit = [registry.publish(p, "dit-xl", Resolution.parse("256"), steps=50) for p in DIT_PLANS]
    assert [d.version.version for d in dit] == [1, 2]
    rows = registry.versions()
    assert len(rows) == 7
    latest = [r for r in rows if r["models"] == ["flux-dev"] and r["latest"]]
    assert sorted(r["resolution"] for r in latest) == ["1024x1024", "512x512"]
    shown = registry.show(results[1].version.sha256[:10])
    assert shown["version"] == 2 and shown["lineage"]["imported"] is True
    assert shown["metrics"]["ideal_speedup"] > 1 and shown["models"] == ["flux-dev"]


def test_publish_validates_against_model_and_plan(registry: Registry, tmp_path: Path):
    r1024 = Resolution.parse("1024")
    cases = {
        "is a dit plan": (DIT_PLANS[0], "flux-dev", r1024, None),
        "does not match the plan's 28 steps": (FLUX_PLANS[0], "flux-dev", r1024, 50),
        "does not match the plan's 1024x1024": (
            native_flux(tmp_path),
            "flux-dev",
            Resolution.parse("512"),
            None,
        ),
        "was calibrated for": (
            native_flux(tmp_path, "other.json", model_id="someone/else"),
            "flux-dev",
            r1024,
            None,
        ),
        "is for revision": (
            native_flux(tmp_path, "rev.json", revision="zzz"),
            "flux-dev",
            r1024,
            None,
        ),
        "records no checkpoint revision but model flux-dev is pinned to 0123abc": (
            native_flux(tmp_path, "norev.json", revision=None),
            "flux-dev",
            r1024,
            None,
        ),
        "records no resolution": (
            native_flux(tmp_path, "nores.json", height=None, width=None),
            "flux-dev",
            r1024,
            None,
        ),
        "not valid JSON": (tmp_path / "bad.json", "flux-dev", r1024, None),
        "cannot read plan": (tmp_path / "missing.json", "flux-dev", r1024, None),
    }
    (tmp_path / "bad.json").write_text("{not json")
    for message, (path, model, resolution, steps) in cases.items():
        with pytest.raises(InvalidInput, match=message):
            registry.publish(path, model, resolution, steps)
    with pytest.raises(NotFound):
        registry.publish(FLUX_PLANS[0], "unknown", r1024)
    assert registry.versions() == []
    assert [o.key for o in registry.store.list("plans/")] == []


def test_native_plans_keep_their_bytes_and_digits_models_work(registry: Registry, tmp_path: Path):
    path = native_flux(tmp_path)
    result = registry.publish(path, "flux-dev", Resolution.parse("1024"))
    assert registry.store.get(result.version.object_key) == path.read_bytes()
    digits = registry.publish(digits_plan(tmp_path), "digits-dit", Resolution.parse("16"), steps=50)
    resolved = registry.resolve(Query(model="digits-dit", resolution=Resolution.parse("16")))
    assert resolved.version.sha256 == digits.version.sha256 and resolved.match == "exact"


def test_resolve_latest_alias_and_nearest(registry: Registry):
    for path in FLUX_PLANS[:3]:
        registry.publish(path, "flux-dev", Resolution.parse("1024"))
    query = Query(model="flux-dev", resolution=Resolution.parse("1024"))
    assert registry.resolve(query).version.version == 3
    second = registry.versions()[1]["sha256"]
    registry.promote(second, "production")
    pinned = registry.resolve(replace(query, alias="production"))
    assert (pinned.version.version, pinned.selected_by) == (2, "alias:production")
    with pytest.raises(NotFound, match="--allow-nearest"):
        registry.resolve(replace(query, resolution=Resolution.parse("768")))
    nearest = registry.resolve(
        replace(query, resolution=Resolution.parse("768"), allow_nearest=True)
    )
    assert (nearest.match, nearest.target.width) == ("nearest", 1024)
    with pytest.raises(NotFound, match="published: 1024x1024"):
        registry.resolve(replace(query, steps=50))


def test_promote_uses_optimistic_locking(registry: Registry):
    shas = [
        registry.publish(p, "flux-dev", Resolution.parse("1024")).version.sha256
        for p in FLUX_PLANS[:3]
    ]
    first = registry.promote(shas[0], "production", expect=0)
    assert (first["lock_version"], first["previous_version"]) == (1, None)
    moved = registry.promote(shas[1], "production", expect=1)
    assert (moved["lock_version"], moved["previous_version"], moved["version"]) == (2, 1, 2)
    with pytest.raises(Conflict, match="moved since you read it"):
        registry.promote(shas[2], "production", expect=1)  # stale read
    with pytest.raises(Conflict):
        registry.promote(shas[2], "staging", expect=3)  # does not exist yet: 0 expected
    with pytest.raises(InvalidInput, match="computed"):
        registry.promote(shas[2], "latest")
    with pytest.raises(NotFound):
        registry.promote("abcdef12", "production")
    assert registry.show(shas[1])["aliases"] == {"production": 2}


def test_a_stale_orm_write_is_rejected_by_the_lock_version(registry: Registry):
    shas = [
        registry.publish(p, "flux-dev", Resolution.parse("1024")).version.sha256
        for p in FLUX_PLANS[:3]
    ]
    registry.promote(shas[0], "production")
    version_ids = {}
    with Session(registry.engine) as session:
        for row in session.scalars(select(PlanVersion)):
            version_ids[row.sha256] = row.id
    stale = Session(registry.engine, expire_on_commit=False)
    alias = stale.scalars(select(PlanAlias)).one()  # read at lock version 1
    stale.commit()  # end the read transaction; the object keeps its stale state
    registry.promote(shas[1], "production")  # someone else moves it (lock version 2)
    alias.version_id = version_ids[shas[2]]
    with pytest.raises(StaleDataError):
        stale.commit()
    stale.close()
    assert registry.show(shas[1])["aliases"] == {"production": 2}


def test_index_lets_store_only_clients_resolve_the_same(registry: Registry, config, tmp_path: Path):
    for path in FLUX_PLANS:
        registry.publish(path, "flux-dev", Resolution.parse("1024"))
    registry.promote(registry.versions()[0]["sha256"], "production")
    index = json.loads(registry.store.get(index_key("flux-dev")))
    assert index["format"] == "invardiff.registry-index" and len(index["targets"]) == 1
    assert index["targets"][0]["aliases"] == {"production": 1}
    store_only = replace(config, database_url=None, cache_dir=tmp_path / "client-cache")
    for alias in ("latest", "production"):
        query = Query(model="flux-dev", resolution=Resolution.parse("1024"), alias=alias)
        assert StoreIndex(registry.store).resolve(query) == registry.resolve(query)
        result = fetch_plan(query, store_only)
        assert result.sha256 == registry.resolve(query).version.sha256 and not result.cached
    with pytest.raises(NotFound, match="digits-dit, digits-flux, digits-flux-shifted, flux-dev"):
        StoreIndex(registry.store).resolve(Query(model="nope", resolution=Resolution.parse("16")))


def test_python_client_returns_a_cache_plan(registry: Registry, config):
    registry.publish(FLUX_PLANS[2], "flux-dev", Resolution.parse("1024"))
    plan = fetch("flux-dev", 1024, config=config)  # registry.fetch
    assert plan.sha256 == registry.versions()[0]["sha256"]
    assert (
        plan.target.model_id == "black-forest-labs/FLUX.1-dev" and plan.target.revision == "0123abc"
    )


def test_verify_and_gc(registry: Registry):
    result = registry.publish(FLUX_PLANS[0], "flux-dev", Resolution.parse("1024"))
    registry.store.put_new("plans/sha256/00/orphan.json", b"orphan", "0" * 64)
    assert registry.verify() == {"checked": 1, "ok": 1, "indexes_checked": 4, "failures": []}
    assert (
        registry.gc(timedelta(hours=1))["deleted"] == []
    )  # too young: may be an in-flight publish
    dry = registry.gc(timedelta(0), dry_run=True)
    assert dry["deleted"] == ["plans/sha256/00/orphan.json"]
    assert registry.gc(timedelta(0))["deleted"] == ["plans/sha256/00/orphan.json"]
    assert [o.key for o in registry.store.list("plans/")] == [result.version.object_key]
    registry.store.put(result.version.object_key, b"tampered")
    report = registry.verify()
    assert report["ok"] == 0 and report["failures"][0]["problem"] == "corrupt"
    registry.store.delete(result.version.object_key)
    assert registry.verify()["failures"][0]["problem"] == "missing"


def test_a_publish_lease_protects_its_object_from_gc(registry: Registry):
    """An object a publish has leased (written, not yet committed) is not gc's to delete."""
    from registry import leases

    data = load_plan(
        FLUX_PLANS[0], model_id="black-forest-labs/FLUX.1-dev", revision="0123abc"
    ).to_bytes()
    orphan = put_blob(registry.store, data)  # e.g. left by a publish that failed to commit
    assert registry.gc(timedelta(0), dry_run=True)["deleted"] == [orphan.key]
    lease = leases.begin_publish(registry.session, orphan.key)  # what a new publish does first
    assert registry.gc(timedelta(0))["deleted"] == []
    leases.release(registry.session, lease)
    assert registry.publish(FLUX_PLANS[0], "flux-dev", Resolution.parse("1024")).created
    assert registry.gc(timedelta(0))["deleted"] == []
    assert registry.verify()["failures"] == []


@pytest.mark.parametrize("store_kind", ["local", "seaweed"])
def test_gc_rechecks_each_object_before_deleting_it(store_kind, config, request):
    """A publish that commits while gc runs keeps its object (gc re-reads the references)."""
    if store_kind == "seaweed":
        seaweed = request.getfixturevalue("seaweed")
        config = replace(
            config,
            store_url=request.getfixturevalue("seaweed_store"),
            s3_endpoint_url=seaweed.endpoint,
        )
    registry = make_registry(config)
    data = load_plan(
        FLUX_PLANS[0], model_id="black-forest-labs/FLUX.1-dev", revision="0123abc"
    ).to_bytes()
    orphan = put_blob(registry.store, data)
    listing = registry.store.list

    def list_then_publish(prefix):
        objects = list(listing(prefix))  # gc has read the references and listed the objects
        registry.publish(FLUX_PLANS[0], "flux-dev", Resolution.parse("1024"))  # commits now
        return iter(objects)

    registry.store.list = list_then_publish
    assert registry.gc(timedelta(0))["deleted"] == []
    registry.store.list = listing
    assert registry.verify() == {"checked": 1, "ok": 1, "indexes_checked": 4, "failures": []}
    assert [o.key for o in registry.store.list("plans/")] == [orphan.key]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_read_only_s3_credentials_see_a_refused_index_as_not_found(
    config, moto_s3, tmp_path: Path, monkeypatch
):
    """moto with IAM checks on: SeaweedFS answers 404 (not 403) for missing keys even to a
    read-only identity, so AWS's 403-without-ListBucket behaviour is reproduced by a policy
    that grants GetObject on the existing objects only."""
    import boto3
    from click.testing import CliRunner
    from moto.core import enable_iam_authentication

    from registry.cli import main

    config = replace(config, store_url=moto_s3)
    registry = make_registry(config)
    registry.publish(FLUX_PLANS[0], "flux-dev", Resolution.parse("1024"))
    bucket, prefix = moto_s3.removeprefix("s3://").split("/", 1)
    allowed = [f"arn:aws:s3:::{bucket}/{prefix}/{k}" for k in ("plans/*", "index/flux-dev.json")]
    policy = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:GetObject", "Resource": allowed}],
    }
    iam = boto3.client("iam", region_name="us-east-1")
    iam.create_user(UserName="reader")
    iam.put_user_policy(UserName="reader", PolicyName="get", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="reader")["AccessKey"]
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # it caches the credentials it read
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    monkeypatch.setenv("INVARDIFF_STORE_URL", moto_s3)
    monkeypatch.setenv("INVARDIFF_CACHE_DIR", str(tmp_path / "reader-cache"))
    runner = CliRunner()
    with enable_iam_authentication():
        found = runner.invoke(main, ["fetch", "flux-dev", "1024", "--json"])
        assert found.exit_code == 0, found.stderr
        missing = runner.invoke(main, ["fetch", "nobody", "1024"])
        monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOBODY")  # unknown key: still refused
        wrong = runner.invoke(main, ["fetch", "digits-dit", "16", "--refresh"])
    assert missing.exit_code == 3, missing.stderr  # was 5: "refused get_object ... AccessDenied"
    assert (
        "unknown model 'nobody'" in missing.stderr
        and "listing models was refused" in missing.stderr
    )
    assert len(missing.stderr.strip().splitlines()) == 1
    assert wrong.exit_code == 5 and "InvalidAccessKeyId" in wrong.stderr, wrong.stderr
