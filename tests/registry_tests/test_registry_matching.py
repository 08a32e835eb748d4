"""The pure resolution rules (no database, no store)."""

from __future__ import annotations

import pytest

from registry.errors import InvalidInput, NotFound
from registry.matching import (
    ModelInfo,
    Query,
    Resolution,
    TargetEntry,
    TargetKey,
    VersionInfo,
    resolve,
)

MODEL = ModelInfo(
    name="flux-dev",
    source="hf://org/flux",
    revision="abc",
    arch="flux",
    pipeline="FluxPipeline",
    scheduler="Euler",
    steps=28,
    height=1024,
    width=1024,
    guidance=3.5,
    dtype="bfloat16",
)


def entry(width=1024, height=1024, steps=28, versions=(1,), aliases=None, **fields) -> TargetEntry:
    values = {
        "source": MODEL.source,
        "revision": MODEL.revision,
        "pipeline": "FluxPipeline",
        "scheduler": "Euler",
        "scheduler_config_hash": None,
        "guidance": 3.5,
        "dtype": "bfloat16",
    }
    values.update(fields)
    key = TargetKey(steps=steps, height=height, width=width, **values)
    stored = tuple(VersionInfo(v, f"{v:064x}", 10, f"k{v}") for v in versions)
    return TargetEntry(key, stored, aliases or {})


def query(resolution="1024", **kwargs) -> Query:
    return Query(model=MODEL.name, resolution=Resolution.parse(resolution), **kwargs)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1024", (1024, 1024)),
        ("1024x768", (1024, 768)),
        (" 512X256 ", (512, 256)),
        ("16", (16, 16)),
    ],
)
def test_resolution_parse(text, expected):
    parsed = Resolution.parse(text)
    assert (parsed.width, parsed.height) == expected


@pytest.mark.parametrize(
    "text", ["", "x", "1024x", "-5", "0", "10.5", "1024x768x2", "abc", "99999", "1e3"]
)
def test_resolution_rejects_malformed(text):
    with pytest.raises(InvalidInput):
        Resolution.parse(text)


def test_query_rejects_bad_steps_and_alias():
    with pytest.raises(InvalidInput):
        query(steps=-1)
    with pytest.raises(InvalidInput):
        query(alias="Not An Alias")


def test_exact_match_defaults_steps_and_scheduler_from_model():
    entries = [entry(steps=50), entry(versions=(1, 2)), entry(scheduler="DDIM")]
    resolved = resolve(MODEL, query(), entries)
    assert (resolved.match, resolved.version.version, resolved.target.steps) == ("exact", 2, 28)
    assert resolved.target.scheduler == "Euler"
    assert resolve(MODEL, query(steps=50), entries).target.steps == 50
    assert resolve(MODEL, query(scheduler="DDIM"), entries).target.scheduler == "DDIM"


def test_other_checkpoint_revision_never_matches():
    with pytest.raises(NotFound, match="no plans are published"):
        resolve(MODEL, query(), [entry(revision="other")])


def test_latest_skips_versions_that_are_not_ready():
    e = entry(versions=(1, 2))
    revoked = TargetEntry(
        e.key, (e.versions[0], VersionInfo(2, "f" * 64, 1, "k", status="revoked"))
    )
    assert resolve(MODEL, query(), [revoked]).version.version == 1


def test_nearest_only_when_allowed_and_said_so():
    entries = [entry(512, 512), entry(2048, 2048), entry(1024, 768)]
    with pytest.raises(NotFound, match="--allow-nearest") as info:
        resolve(MODEL, query("1024"), entries)
    assert "512x512" in str(info.value) and "1024x768" in str(info.value)  # lists what exists
    resolved = resolve(MODEL, query("1024", allow_nearest=True), entries)
    assert resolved.match == "nearest"
    assert resolved.target.resolution == Resolution(2048, 2048)  # equal distance: the larger
    assert resolve(MODEL, query("1024x768"), entries).match == "exact"


def test_nearest_needs_same_aspect_ratio_and_bounded_scale():
    with pytest.raises(NotFound):
        resolve(MODEL, query("1024", allow_nearest=True), [entry(1024, 768)])
    with pytest.raises(NotFound):
        resolve(MODEL, query("1024", allow_nearest=True), [entry(256, 256)])  # 4x away
    assert resolve(MODEL, query("768", allow_nearest=True), [entry(512, 512)]).match == "nearest"


def test_open_fields_prefer_model_defaults_and_explicit_fields_filter():
    entries = [entry(dtype="float16"), entry(dtype="bfloat16", versions=(1, 2, 3))]
    assert resolve(MODEL, query(), entries).target.dtype == "bfloat16"
    assert resolve(MODEL, query(dtype="float16"), entries).target.dtype == "float16"
    with pytest.raises(NotFound):
        resolve(MODEL, query(dtype="float64"), entries)


def test_ambiguous_targets_are_an_error_listing_them():
    entries = [entry(dtype="float16"), entry(dtype="float32")]
    with pytest.raises(NotFound, match="several plans") as info:
        resolve(MODEL, query(), entries)
    assert "float16" in str(info.value) and "float32" in str(info.value)


def test_alias_selects_its_version_or_lists_aliases():
    entries = [entry(versions=(1, 2, 3), aliases={"production": 2})]
    resolved = resolve(MODEL, query(alias="production"), entries)
    assert (resolved.version.version, resolved.selected_by) == (2, "alias:production")
    assert resolve(MODEL, query(), entries).selected_by == "latest"
    with pytest.raises(NotFound, match="production"):
        resolve(MODEL, query(alias="staging"), entries)


def test_target_key_hash_is_stable_and_distinguishes_fields():
    a, b = entry().key, entry(guidance=4.0).key
    assert a.key_hash == entry().key.key_hash
    assert a.key_hash != b.key_hash
    assert TargetEntry.from_json(entry(aliases={"p": 1}).to_json()) == entry(aliases={"p": 1})
