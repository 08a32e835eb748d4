"""Object store: one small interface, a local directory and S3 (AWS, MinIO, SeaweedFS).

Plans are stored content-addressed and write-once under :func:`blob_key`; every read
through :func:`get_blob` checks the sha256 and size recorded in SQL (or in the index).
Index objects (``index/<model>.json``) are the only objects that are overwritten.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlparse

from .errors import IntegrityFailure, InvalidInput, NotFound, Unreachable
from .faults import crash_point
from .timeouts import s3_attempts, s3_timeout

TEMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class ObjectInfo:
    """A listed object."""

    key: str
    size: int
    modified: datetime


@dataclass(frozen=True)
class BlobRef:
    """Where a content-addressed blob lives and what it must hash to."""

    key: str
    sha256: str
    size: int


class ObjectStore(ABC):
    """Minimal object store; keys are ``/``-separated relative names."""

    url: str

    @abstractmethod
    def check_writable(self) -> None:
        """Raise :class:`Unreachable` unless writes can be expected to succeed.

        Writers call it before changing the database, so that an unreachable store fails the
        command before anything is committed (the index write comes after the commit).
        """

    @abstractmethod
    def put_new(self, key: str, data: bytes, sha256: str) -> bool:
        """Write ``data`` unless ``key`` exists (write-once); True when this call wrote it."""

    @abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Write or replace ``key`` atomically (indexes, and the repair of a damaged blob)."""

    @abstractmethod
    def get(self, key: str) -> bytes:
        """The object's bytes; :class:`NotFound` when missing."""

    @abstractmethod
    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Objects whose key starts with ``prefix``."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key`` (missing is fine)."""

    def presign(self, key: str, expires: int) -> str:
        """A time-limited GET URL for ``key`` (S3 only)."""
        raise InvalidInput(f"presigned URLs need an S3 store, not {self.url}")

    def remove_temporaries(self, cutoff: datetime, dry_run: bool) -> list[ObjectInfo]:
        """Temporary files of killed writers last modified before ``cutoff``, removed.

        Only a local store has them (an S3 ``PutObject`` is all or nothing).
        """
        return []


class MissingObject(IntegrityFailure):
    """An object the registry records is not in the store (exit 4, like a corrupt one)."""


def blob_key(sha256: str) -> str:
    """The object key of a plan: derived from its sha256."""
    return f"plans/sha256/{sha256[:2]}/{sha256}.json"


def blob_ref(data: bytes) -> BlobRef:
    """Where ``data`` is stored content-addressed, and what it must hash to."""
    sha256 = hashlib.sha256(data).hexdigest()
    return BlobRef(key=blob_key(sha256), sha256=sha256, size=len(data))


def put_blob(store: ObjectStore, data: bytes) -> BlobRef:
    """Store ``data`` write-once at its :func:`blob_key`; return its reference.

    A copy already there is read back and checked: a damaged one (wrong sha256 or size) is
    replaced, so that a publish never registers a version over corrupt bytes.
    """
    ref = blob_ref(data)
    sha256 = ref.sha256
    for _ in range(3):
        try:
            existing = store.get(ref.key)
        except NotFound:
            if store.put_new(ref.key, data, sha256):
                return ref
            continue  # written concurrently: check that copy
        if not intact(existing, sha256, ref.size):
            store.put(ref.key, data)  # repair
        return ref
    raise Unreachable(f"store {store.url}: {ref.key} kept appearing and disappearing")


def intact(data: bytes, sha256: str, size: int) -> bool:
    """Whether ``data`` has the expected size and sha256."""
    return len(data) == size and hashlib.sha256(data).hexdigest() == sha256


def verify_bytes(data: bytes, sha256: str, size: int, where: str) -> bytes:
    """Return ``data`` if it is :func:`intact`, else raise IntegrityFailure."""
    if not intact(data, sha256, size):
        actual = hashlib.sha256(data).hexdigest()
        raise IntegrityFailure(
            f"integrity check failed for {where}: expected sha256 {sha256[:16]}... ({size} bytes), "
            f"got {actual[:16]}... ({len(data)} bytes)"
        )
    return data


def get_blob(store: ObjectStore, ref: BlobRef) -> bytes:
    """Read a blob and check its sha256 and size; a missing one is :class:`MissingObject`."""
    try:
        data = store.get(ref.key)
    except NotFound:
        raise MissingObject(
            f"plan {ref.sha256[:12]} is recorded but its object {ref.key} is missing "
            f"from store {store.url}"
        ) from None
    return verify_bytes(data, ref.sha256, ref.size, f"{store.url}/{ref.key}")


def _file_mode() -> int:
    """0666 less the process umask: what ``open()`` would give a new file."""
    try:  # Linux: read it without changing it (os.umask would, for every thread)
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def write_temp(path: Path, data: bytes, where: str) -> Path:
    """Write ``data`` to a new temporary file beside ``path`` and return its name.

    Any OSError (missing directory, permission, disk full) removes the temporary file and
    becomes :class:`Unreachable` naming ``where``.
    """
    temp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=TEMP_PREFIX)
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), _file_mode())  # mkstemp makes 0600: respect the umask
            handle.write(data)
        return Path(temp)
    except OSError as exc:
        if temp is not None:
            Path(temp).unlink(missing_ok=True)
        raise Unreachable(f"cannot write to {where}: {exc.strerror or exc}") from None


def atomic_write(path: Path, data: bytes, where: str | None = None) -> None:
    """Write ``path`` through a temporary file renamed into place (readers never see a part).

    A failure leaves no temporary file behind and raises :class:`Unreachable`.
    """
    where = where or str(path)
    temp = write_temp(path, data, where)
    try:
        os.replace(temp, path)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        raise Unreachable(f"cannot write to {where}: {exc.strerror or exc}") from None


def open_store(url: str, s3_endpoint_url: str | None = None) -> ObjectStore:
    """The store for ``url``: ``s3://bucket/prefix``, ``file:///dir`` or a directory path."""
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise InvalidInput(f"store URL {url!r} names no bucket (expected s3://bucket/prefix)")
        return S3Store(parsed.netloc, parsed.path.strip("/"), s3_endpoint_url)
    if parsed.scheme == "file":
        return LocalStore(Path(parsed.path))
    if parsed.scheme and len(parsed.scheme) > 1:  # one letter: a Windows drive
        raise InvalidInput(f"unsupported store URL {url!r} (use s3://bucket/prefix or a directory)")
    return LocalStore(Path(url))


class LocalStore(ObjectStore):
    """A directory; write-once by hard-linking a complete temporary file into place."""

    def __init__(self, root: Path) -> None:
        self.root = root.expanduser().resolve()
        self.url = str(self.root)

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if not key or any(p in ("", ".", "..") or p.startswith(".") for p in parts):
            raise InvalidInput(f"invalid object key {key!r}")
        return self.root.joinpath(*parts)

    def _unwritable(self, exc: OSError) -> Unreachable:
        return Unreachable(f"cannot write to store {self.url}: {exc.strerror or exc}")

    def check_writable(self) -> None:
        # The root, or the nearest existing folder above it, must be a writable directory.
        existing = self.root
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise self._unwritable(NotADirectoryError(20, os.strerror(20)))
        if not os.access(existing, os.W_OK | os.X_OK):
            raise self._unwritable(PermissionError(13, os.strerror(13)))

    def put_new(self, key: str, data: bytes, sha256: str) -> bool:
        path = self._path(key)
        if path.exists():
            return False
        temp = write_temp(path, data, f"store {self.url}")
        crash_point("store.temp")
        try:
            os.link(temp, path)
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            raise self._unwritable(exc) from None
        finally:
            temp.unlink(missing_ok=True)

    def put(self, key: str, data: bytes) -> None:
        atomic_write(self._path(key), data, f"store {self.url}")

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"no object {key} in store {self.url}") from None
        except OSError as exc:
            raise Unreachable(f"cannot read {key} from store {self.url}: {exc.strerror}") from None

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        if not self.root.is_dir():
            return
        for directory, _, names in os.walk(self.root):
            for name in sorted(names):
                if name.startswith("."):
                    continue
                path = Path(directory) / name
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    stat = path.stat()
                    yield ObjectInfo(
                        key, stat.st_size, datetime.fromtimestamp(stat.st_mtime, timezone.utc)
                    )

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def remove_temporaries(self, cutoff: datetime, dry_run: bool) -> list[ObjectInfo]:
        removed = []
        if not self.root.is_dir():
            return removed
        for path in self.root.rglob(f"{TEMP_PREFIX}*"):
            try:
                stat = path.stat()
                modified = datetime.fromtimestamp(stat.st_mtime, timezone.utc)
                if path.is_file() and modified <= cutoff:
                    if not dry_run:
                        path.unlink()
                    key = path.relative_to(self.root).as_posix()
                    removed.append(ObjectInfo(key, stat.st_size, modified))
            except FileNotFoundError:  # renamed into place or removed meanwhile
                continue
            except OSError as exc:
                raise self._unwritable(exc) from None
        return removed


class _Precondition(Exception):
    """A conditional S3 write did not apply (412: exists; 409: concurrent write)."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class S3Store(ObjectStore):
    """An S3 bucket and prefix through boto3 (any endpoint)."""

    def __init__(self, bucket: str, prefix: str, endpoint_url: str | None) -> None:
        import boto3
        from botocore.config import Config as BotoConfig

        self.bucket = bucket
        self.prefix = f"{prefix}/" if prefix else ""
        self.url = f"s3://{bucket}/{prefix}".rstrip("/")
        timeout = s3_timeout()
        boto_config = BotoConfig(
            connect_timeout=timeout,
            read_timeout=timeout,
            retries={"total_max_attempts": s3_attempts(), "mode": "standard"},
        )
        self.client = boto3.client("s3", endpoint_url=endpoint_url, config=boto_config)

    def _call(self, operation: str, key: str, **kwargs):
        """Run one S3 call, mapping failures onto registry errors."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self.client, operation)(Bucket=self.bucket, **kwargs)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise NotFound(f"no object {key} in store {self.url}") from None
            if code == "AccessDenied" and operation == "get_object" and key.startswith("index/"):
                # Without s3:ListBucket, S3 answers 403 instead of 404 for a missing key: a
                # read-only client cannot tell the two apart, and a missing index is common.
                raise NotFound(f"no readable object {key} in store {self.url}") from None
            if code == "BadDigest":
                raise IntegrityFailure(
                    f"store {self.url} rejected {key}: checksum mismatch in upload"
                ) from None
            if status in (409, 412):
                raise _Precondition(status) from None
            message = exc.response.get("Error", {}).get("Message", "")
            raise Unreachable(
                f"store {self.url} refused {operation} {key}: {code} {message}".strip()
            ) from None
        except BotoCoreError as exc:
            raise Unreachable(f"cannot reach store {self.url}: {exc}") from None

    def check_writable(self) -> None:
        try:
            self._call("head_bucket", "")
        except NotFound:
            raise Unreachable(f"store {self.url}: bucket {self.bucket} does not exist") from None

    def put_new(self, key: str, data: bytes, sha256: str) -> bool:
        for attempt in range(3):
            try:
                self._put_object(key, data, sha256, IfNoneMatch="*")
                return True
            except _Precondition as exc:
                if exc.status == 412:  # already there: write-once satisfied
                    return False
                time.sleep(0.2 * (attempt + 1))  # 409: a concurrent conditional write; retry
        raise Unreachable(f"store {self.url}: concurrent writes to {key} kept conflicting")

    def put(self, key: str, data: bytes) -> None:
        sha256 = hashlib.sha256(data).hexdigest()
        self._put_object(key, data, sha256, ContentType="application/json")

    def _put_object(self, key: str, data: bytes, sha256: str, **options: str) -> None:
        """``put_object`` with the SHA-256 checksum the server verifies on receipt."""
        from base64 import b64encode

        checksum = b64encode(bytes.fromhex(sha256)).decode()
        self._call(
            "put_object", key, Key=self.prefix + key, Body=data, ChecksumSHA256=checksum, **options
        )

    def get(self, key: str) -> bytes:
        from botocore.exceptions import BotoCoreError

        body = self._call("get_object", key, Key=self.prefix + key)["Body"]
        try:
            return body.read()
        except BotoCoreError as exc:
            raise Unreachable(f"cannot read {key} from store {self.url}: {exc}") from None

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        token: dict[str, str] = {}
        while True:
            page = self._call("list_objects_v2", prefix, Prefix=self.prefix + prefix, **token)
            for item in page.get("Contents", []):
                yield ObjectInfo(
                    item["Key"][len(self.prefix) :], int(item["Size"]), item["LastModified"]
                )
            if not page.get("IsTruncated"):
                return
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def delete(self, key: str) -> None:
        self._call("delete_object", key, Key=self.prefix + key)

    def presign(self, key: str, expires: int) -> str:
        return self.client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self.prefix + key},
            ExpiresIn=expires,
        )
