"""Object stores: the same contract for a directory, moto and a real SeaweedFS server."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from registry.errors import IntegrityFailure, InvalidInput, NotFound, Unreachable
from registry.store import BlobRef, LocalStore, S3Store, blob_key, get_blob, open_store, put_blob


@pytest.fixture(params=["local", "moto", "seaweed"])
def store(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "local":
        return open_store(str(tmp_path / "store"))
    if request.param == "moto":
        return open_store(request.getfixturevalue("moto_s3"))
    url = request.getfixturevalue("seaweed_store")
    return open_store(url, request.getfixturevalue("seaweed").endpoint)


def test_open_store_by_url(tmp_path: Path):
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    assert isinstance(open_store(f"file://{tmp_path}"), LocalStore)
    s3 = open_store("s3://bucket/some/prefix", "http://127.0.0.1:1")
    assert isinstance(s3, S3Store) and (s3.bucket, s3.prefix) == ("bucket", "some/prefix/")
    for bad in ("s3:///nobucket", "ftp://host/x"):
        with pytest.raises(InvalidInput):
            open_store(bad)


def test_blobs_are_content_addressed_write_once_and_checked(store):
    data = b'{"plan": 1}'
    ref = put_blob(store, data)
    assert ref == BlobRef(
        blob_key(hashlib.sha256(data).hexdigest()), hashlib.sha256(data).hexdigest(), len(data)
    )
    assert ref.key.startswith(f"plans/sha256/{ref.sha256[:2]}/")
    assert store.put_new(ref.key, b"other bytes", ref.sha256) is False  # already there: kept
    assert get_blob(store, ref) == data
    assert [o.key for o in store.list("plans/")] == [ref.key]
    with pytest.raises(NotFound):
        store.get("plans/sha256/00/missing.json")
    store.put("index/m.json", b"1")
    store.put("index/m.json", b"2")  # index objects are replaced
    assert store.get("index/m.json") == b"2"
    store.delete(ref.key)
    assert [o.key for o in store.list("plans/")] == []


def test_tampered_blob_is_refused(store):
    ref = put_blob(store, b"original")
    store.put(ref.key, b"tampered")
    with pytest.raises(IntegrityFailure, match="integrity check failed"):
        get_blob(store, ref)
    store.put(ref.key, b"original+")  # same prefix, other size
    with pytest.raises(IntegrityFailure):
        get_blob(store, ref)


def test_seaweed_rejects_a_wrong_checksum_on_upload(seaweed, seaweed_store):
    store = open_store(seaweed_store, seaweed.endpoint)
    with pytest.raises(IntegrityFailure, match="checksum mismatch"):
        store.put_new("plans/x.json", b"payload", hashlib.sha256(b"other").hexdigest())
    assert list(store.list("plans/")) == []


def test_presigned_url_downloads_the_object(seaweed, seaweed_store):
    import urllib.request

    store = open_store(seaweed_store, seaweed.endpoint)
    ref = put_blob(store, b"presigned")
    with urllib.request.urlopen(store.presign(ref.key, 60), timeout=10) as response:
        assert response.read() == b"presigned"
    with pytest.raises(InvalidInput):
        LocalStore(Path("/tmp")).presign("k", 1)


def test_unreachable_s3_endpoint_is_one_clear_error():
    store = open_store("s3://bucket/p", "http://127.0.0.1:9")
    with pytest.raises(Unreachable, match="cannot reach store s3://bucket/p"):
        store.get("index/x.json")


def test_local_store_refuses_escaping_keys(tmp_path: Path):
    store = LocalStore(tmp_path)
    for key in ("../x", "a/../../x", "", ".hidden/x"):
        with pytest.raises(InvalidInput):
            store.put(key, b"")


def test_check_writable(store):
    store.check_writable()  # local, moto and SeaweedFS stores that accept writes


def test_check_writable_reports_unwritable_stores(tmp_path: Path, moto_s3):
    LocalStore(tmp_path / "new" / "deeper").check_writable()  # creatable, and not created
    assert not (tmp_path / "new").exists()
    (tmp_path / "a-file").write_text("x")
    for root in (tmp_path / "a-file", tmp_path / "a-file" / "sub"):
        with pytest.raises(Unreachable, match="cannot write to store"):
            LocalStore(root).check_writable()
    with pytest.raises(Unreachable, match="bucket no-such-bucket does not exist"):
        open_store("s3://no-such-bucket/p").check_writable()
