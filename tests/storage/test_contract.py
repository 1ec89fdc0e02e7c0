"""The storage contract (docs/architecture.md §5), run against both backends.

Every test taking `store` runs on a `FolderStore` in a temp dir and on an `S3Store` against the
session's real SeaweedFS (a fresh bucket, prefix `reg`). Direct transfers (presigned URLs,
multipart) are S3-only; atomic writes on disk and unwritable directories are folder-only.
"""

from __future__ import annotations

import hashlib
import io
import random
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import boto3
import httpx
import pytest
from botocore.config import Config

from registry.core.errors import BlobNotFound, ChecksumMismatch, StorageUnavailable
from registry.core.schemas import CompletedPart, UploadInstruction
from registry.storage.base import ObjectStore
from registry.storage.folder import FolderStore
from registry.storage.s3 import S3Store
from tests.conftest import make_bucket
from tests.support.seaweed import SeaweedServer, s3_client

MIB = 1024 * 1024
# Crosses the folder store's 1 MiB write chunks and ends mid-chunk.
SIZE = 2 * MIB + 123


def make_blob(size: int = SIZE, seed: int = 0) -> tuple[bytes, str]:
    data = random.Random(seed).randbytes(size)
    return data, hashlib.sha256(data).hexdigest()


def expected_key(sha256: str) -> str:
    return f"blobs/sha256/{sha256[:2]}/{sha256}"


def stored_objects(store: ObjectStore) -> list[str]:
    """Every file (folder, temp files included) or object (S3) the store holds, relative to its
    root or prefix, listed independently of the store's own code."""
    if isinstance(store, FolderStore):
        return sorted(
            p.relative_to(store.root).as_posix() for p in store.root.rglob("*") if p.is_file()
        )
    assert isinstance(store, S3Store)
    client = s3_client(store.client.meta.endpoint_url)
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=store.bucket, Prefix=f"{store.prefix}/"
    ):
        keys.extend(
            item["Key"].removeprefix(f"{store.prefix}/") for item in page.get("Contents", [])
        )
    return sorted(keys)


def instruction_for(store: S3Store, sha: str, size: int) -> UploadInstruction:
    """What the registry would hand a client for this blob, with S3's smallest part size."""
    return store.upload_instruction(sha, size, multipart_threshold=5 * MIB, part_size=5 * MIB)


@pytest.fixture(params=["folder", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "folder":
        return FolderStore(tmp_path / "objects")
    seaweed: SeaweedServer = request.getfixturevalue("seaweed")
    request.getfixturevalue("s3_env")
    return S3Store(bucket=make_bucket(seaweed.endpoint), prefix="reg")


@pytest.fixture
def s3_store(seaweed: SeaweedServer, s3_env: dict[str, str]) -> S3Store:
    return S3Store(bucket=make_bucket(seaweed.endpoint), prefix="reg")


@pytest.fixture
def folder_store(tmp_path: Path) -> FolderStore:
    return FolderStore(tmp_path / "objects")


@pytest.fixture
def stored(store: ObjectStore) -> tuple[bytes, str]:
    """A blob already put into `store`."""
    data, sha = make_blob()
    store.put_blob(sha, len(data), io.BytesIO(data))
    return data, sha


# --- round trip ---------------------------------------------------------------------------------


def test_put_blob_then_blob_size_is_its_size(store: ObjectStore, stored: tuple[bytes, str]) -> None:
    data, sha = stored
    assert store.blob_size(sha) == len(data)


def test_put_blob_then_verify_blob_is_true(store: ObjectStore, stored: tuple[bytes, str]) -> None:
    data, sha = stored
    assert store.verify_blob(sha, len(data)) is True


def test_verify_blob_is_false_for_a_wrong_size(
    store: ObjectStore, stored: tuple[bytes, str]
) -> None:
    data, sha = stored
    assert store.verify_blob(sha, len(data) + 1) is False
    assert store.verify_blob(sha, len(data) - 1) is False


def test_verify_blob_is_false_for_an_absent_blob(store: ObjectStore) -> None:
    data, sha = make_blob()
    assert store.verify_blob(sha, len(data)) is False


def test_blob_size_is_none_for_an_absent_blob(store: ObjectStore) -> None:
    _, sha = make_blob()
    assert store.blob_size(sha) is None


def test_read_blob_returns_the_exact_bytes(store: ObjectStore, stored: tuple[bytes, str]) -> None:
    data, sha = stored
    assert store.read_blob(sha, len(data)) == data


def test_iter_blob_returns_the_exact_bytes(store: ObjectStore, stored: tuple[bytes, str]) -> None:
    data, sha = stored
    assert b"".join(store.iter_blob(sha)) == data


def test_iter_blob_yields_chunks_of_at_most_chunk_size(
    store: ObjectStore, stored: tuple[bytes, str]
) -> None:
    data, sha = stored
    chunks = list(store.iter_blob(sha, chunk_size=100_000))
    assert b"".join(chunks) == data
    assert max(len(chunk) for chunk in chunks) <= 100_000


@pytest.mark.parametrize(
    ("start", "length"),
    [(0, 10), (MIB - 5, 10), (SIZE // 2, 4096), (SIZE - 10, 10)],
    ids=["start", "across-a-chunk-boundary", "middle", "end"],
)
def test_read_range_returns_the_exact_bytes(
    store: ObjectStore, stored: tuple[bytes, str], start: int, length: int
) -> None:
    data, sha = stored
    assert store.read_range(sha, start, length) == data[start : start + length]


def test_read_range_running_past_the_end_returns_the_bytes_up_to_the_end(
    store: ObjectStore, stored: tuple[bytes, str]
) -> None:
    data, sha = stored
    assert store.read_range(sha, len(data) - 3, 100) == data[-3:]


@pytest.mark.parametrize("start", [SIZE, SIZE + 5], ids=["at-the-end", "beyond-the-end"])
def test_read_range_starting_past_the_end_returns_no_bytes(
    store: ObjectStore, stored: tuple[bytes, str], start: int
) -> None:
    _, sha = stored
    assert store.read_range(sha, start, 10) == b""


def test_an_empty_blob_round_trips(store: ObjectStore) -> None:
    data, sha = make_blob(0)
    store.put_blob(sha, 0, io.BytesIO(data))
    assert store.blob_size(sha) == 0
    assert store.verify_blob(sha, 0) is True
    assert store.read_blob(sha, 0) == b""
    assert b"".join(store.iter_blob(sha)) == b""


def test_put_blob_twice_with_the_same_content_is_harmless(
    store: ObjectStore, stored: tuple[bytes, str]
) -> None:
    data, sha = stored
    store.put_blob(sha, len(data), io.BytesIO(data))
    assert store.verify_blob(sha, len(data)) is True
    assert store.read_blob(sha, len(data)) == data
    assert stored_objects(store) == [expected_key(sha)]


# --- refused uploads ----------------------------------------------------------------------------


def _wrong_bytes(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0xFF])


@pytest.mark.parametrize(
    "mangle",
    [_wrong_bytes, lambda data: data[:-1], lambda data: data + b"x"],
    ids=["other-bytes-same-size", "shorter", "longer"],
)
def test_put_blob_of_mismatching_bytes_raises_and_stores_nothing(
    store: ObjectStore, mangle: Callable[[bytes], bytes]
) -> None:
    data, sha = make_blob()
    with pytest.raises(ChecksumMismatch):
        store.put_blob(sha, len(data), io.BytesIO(mangle(data)))
    assert store.blob_size(sha) is None
    # Nothing left behind anywhere: no temp file in the folder's tmp/, no object in S3.
    assert stored_objects(store) == []


def test_a_refused_put_blob_leaves_an_existing_blob_intact(
    store: ObjectStore, stored: tuple[bytes, str]
) -> None:
    data, sha = stored
    with pytest.raises(ChecksumMismatch):
        store.put_blob(sha, len(data), io.BytesIO(_wrong_bytes(data)))
    assert store.verify_blob(sha, len(data)) is True
    assert store.read_blob(sha, len(data)) == data
    assert stored_objects(store) == [expected_key(sha)]


class _WatchedStream(io.BytesIO):
    """A stream that records, at every read, whether the blob is already visible."""

    def __init__(self, data: bytes, store: ObjectStore, sha256: str) -> None:
        super().__init__(data)
        self.store = store
        self.sha256 = sha256
        self.visible_during_reads: list[bool] = []

    def read(self, size: int | None = -1, /) -> bytes:
        self.visible_during_reads.append(self.store.blob_size(self.sha256) is not None)
        return super().read(size)


def test_a_blob_is_not_visible_while_being_written(store: ObjectStore) -> None:
    data, sha = make_blob()
    stream = _WatchedStream(data, store, sha)
    store.put_blob(sha, len(data), stream)
    assert stream.visible_during_reads, "put_blob never read the stream"
    assert not any(stream.visible_during_reads)
    assert store.verify_blob(sha, len(data)) is True


# --- absent blobs -------------------------------------------------------------------------------


def test_read_range_of_an_absent_blob_raises_blob_not_found(store: ObjectStore) -> None:
    _, sha = make_blob()
    with pytest.raises(BlobNotFound):
        store.read_range(sha, 0, 10)


def test_read_blob_of_an_absent_blob_raises_blob_not_found(store: ObjectStore) -> None:
    data, sha = make_blob()
    with pytest.raises(BlobNotFound):
        store.read_blob(sha, len(data))


def test_iter_blob_of_an_absent_blob_raises_blob_not_found(store: ObjectStore) -> None:
    _, sha = make_blob()
    with pytest.raises(BlobNotFound):
        list(store.iter_blob(sha))


# --- layout -------------------------------------------------------------------------------------


def test_blobs_are_stored_under_their_content_address(
    store: ObjectStore, stored: tuple[bytes, str]
) -> None:
    data, sha = stored
    assert expected_key(sha) == f"blobs/sha256/{sha[:2]}/{sha}"
    if isinstance(store, FolderStore):
        path = store.root / "blobs" / "sha256" / sha[:2] / sha
        assert path.read_bytes() == data
    else:
        assert isinstance(store, S3Store)
        client = s3_client(store.client.meta.endpoint_url)
        listed = client.list_objects_v2(Bucket=store.bucket, Prefix="reg/")
        assert [item["Key"] for item in listed.get("Contents", [])] == [
            f"reg/blobs/sha256/{sha[:2]}/{sha}"
        ]
    assert stored_objects(store) == [expected_key(sha)]


# --- check() ------------------------------------------------------------------------------------


def test_check_succeeds_on_a_working_store(store: ObjectStore) -> None:
    store.check()


def test_check_on_a_missing_bucket_raises_storage_unavailable_naming_it(
    seaweed: SeaweedServer, s3_env: dict[str, str]
) -> None:
    missing = f"test-missing-{uuid.uuid4().hex[:12]}"
    store = S3Store(bucket=missing, prefix="reg")
    with pytest.raises(StorageUnavailable, match=missing):
        store.check()


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port that refuses connections: bound (so nobody else takes it), not listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


def test_check_on_an_unreachable_endpoint_raises_storage_unavailable_quickly(
    monkeypatch: pytest.MonkeyPatch, closed_port: int
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port}")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "any")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "any")
    store = S3Store(bucket="test-unreachable", prefix="reg")
    started = time.monotonic()
    with pytest.raises(StorageUnavailable, match="unreachable"):
        store.check()
    assert time.monotonic() - started < 10


def test_check_on_a_folder_that_cannot_be_created_raises_storage_unavailable(
    tmp_path: Path,
) -> None:
    # We run as root, so chmod cannot make a directory unwritable; a path under a regular file
    # can never be created by anyone.
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    store = FolderStore(blocker / "objects")
    with pytest.raises(StorageUnavailable, match="not writable"):
        store.check()


def test_put_blob_on_a_folder_that_cannot_be_created_raises_storage_unavailable(
    tmp_path: Path,
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    store = FolderStore(blocker / "objects")
    data, sha = make_blob(100)
    with pytest.raises(StorageUnavailable):
        store.put_blob(sha, len(data), io.BytesIO(data))


# --- folder only --------------------------------------------------------------------------------


def test_folder_writes_go_to_a_temp_file_never_the_final_path(folder_store: FolderStore) -> None:
    data, sha = make_blob()
    final = folder_store.path(sha)
    seen: list[tuple[bool, list[str]]] = []

    class Stream(io.BytesIO):
        def read(self, size: int | None = -1, /) -> bytes:
            temps = sorted(p.name for p in folder_store.tmp.iterdir())
            seen.append((final.exists(), temps))
            return super().read(size)

    folder_store.put_blob(sha, len(data), Stream(data))
    assert len(seen) >= 3  # several chunks were read
    assert not any(exists for exists, _ in seen)
    # From the second read on, the bytes so far sit in exactly one temp file named after the blob.
    for _, temps in seen[1:]:
        assert len(temps) == 1 and temps[0].startswith(f"{sha}.")
    assert final.read_bytes() == data
    assert list(folder_store.tmp.iterdir()) == []


def test_folder_store_offers_no_direct_transfers(folder_store: FolderStore) -> None:
    data, sha = make_blob(100)
    assert (
        folder_store.upload_instruction(sha, len(data), multipart_threshold=MIB, part_size=MIB)
        is None
    )
    assert folder_store.download_url(sha) is None


# --- S3 only: presigned transfers ---------------------------------------------------------------


def test_presigned_single_put_of_the_right_bytes_stores_the_blob(s3_store: S3Store) -> None:
    data, sha = make_blob()
    instruction = instruction_for(s3_store, sha, len(data))
    assert instruction.kind == "single" and instruction.url
    response = httpx.put(instruction.url, content=data, headers=instruction.headers)
    assert response.status_code == 200, response.text
    assert s3_store.verify_blob(sha, len(data)) is True
    assert s3_store.read_blob(sha, len(data)) == data


@pytest.mark.parametrize("corrupt", [False, True], ids=["right-bytes", "wrong-bytes"])
def test_large_proxied_uploads_are_streamed_and_verified_before_publishing(
    s3_store: S3Store, corrupt: bool
) -> None:
    s3_store.proxy_single_put_limit = 1 * MIB  # stream anything larger, like a 64 MiB+ blob
    data, sha = make_blob(3 * MIB + 5)
    sent = _wrong_bytes(data) if corrupt else data
    if corrupt:
        with pytest.raises(ChecksumMismatch):
            s3_store.put_blob(sha, len(data), io.BytesIO(sent))
        assert stored_objects(s3_store) == []
    else:
        s3_store.put_blob(sha, len(data), io.BytesIO(sent))
        assert s3_store.read_blob(sha, len(data)) == data
        assert stored_objects(s3_store) == [expected_key(sha)]


def test_presigned_urls_are_signed_for_the_public_endpoint(
    seaweed: SeaweedServer, s3_store: S3Store
) -> None:
    """Behind containers or private networks clients reach S3 at another address."""
    public = seaweed.endpoint.replace("127.0.0.1", "localhost")
    store = S3Store(s3_store.bucket, "reg", public_endpoint=public)
    data, sha = make_blob()
    instruction = instruction_for(store, sha, len(data))
    assert instruction.url and instruction.url.startswith(public + "/")
    response = httpx.put(instruction.url, content=data, headers=instruction.headers)
    assert response.status_code == 200, response.text
    assert store.download_url(sha).startswith(public + "/")
    assert httpx.get(store.download_url(sha)).content == data


def test_presigned_single_put_of_wrong_bytes_is_refused_by_s3(s3_store: S3Store) -> None:
    data, sha = make_blob()
    instruction = instruction_for(s3_store, sha, len(data))
    assert instruction.url
    response = httpx.put(instruction.url, content=_wrong_bytes(data), headers=instruction.headers)
    assert response.status_code == 400, response.text
    assert s3_store.blob_size(sha) is None
    assert stored_objects(s3_store) == []


MULTIPART_SIZE = 11 * MIB + 7


def _upload_parts(instruction: UploadInstruction, data: bytes) -> list[CompletedPart]:
    completed = []
    for part in instruction.parts:
        response = httpx.put(part.url, content=data[part.offset : part.offset + part.size])
        assert response.status_code == 200, response.text
        completed.append(CompletedPart(part_number=part.part_number, etag=response.headers["ETag"]))
    return completed


def test_multipart_upload_then_complete_publishes_the_blob(s3_store: S3Store) -> None:
    data, sha = make_blob(MULTIPART_SIZE)
    instruction = instruction_for(s3_store, sha, len(data))
    assert instruction.kind == "multipart"
    assert [(p.part_number, p.offset, p.size) for p in instruction.parts] == [
        (1, 0, 5 * MIB),
        (2, 5 * MIB, 5 * MIB),
        (3, 10 * MIB, MIB + 7),
    ]
    assert instruction.upload_id and instruction.key
    assert instruction.key == f"reg/{expected_key(sha)}"
    parts = _upload_parts(instruction, data)
    assert s3_store.blob_size(sha) is None  # not visible before completion

    s3_store.complete_multipart(sha, len(data), instruction.upload_id, instruction.key, parts)

    assert s3_store.verify_blob(sha, len(data)) is True
    assert s3_store.read_blob(sha, len(data)) == data
    # Nothing left under reg/uploads/: only the blob itself.
    assert stored_objects(s3_store) == [expected_key(sha)]


def test_a_retried_multipart_completion_succeeds(s3_store: S3Store) -> None:
    """A client whose first completion answer was lost calls again: that is not an error."""
    data, sha = make_blob(MULTIPART_SIZE)
    instruction = instruction_for(s3_store, sha, len(data))
    assert instruction.upload_id and instruction.key
    parts = _upload_parts(instruction, data)
    for _ in range(2):
        s3_store.complete_multipart(sha, len(data), instruction.upload_id, instruction.key, parts)
    assert s3_store.read_blob(sha, len(data)) == data
    assert stored_objects(s3_store) == [expected_key(sha)]


def test_multipart_upload_of_wrong_bytes_raises_and_leaves_nothing(s3_store: S3Store) -> None:
    data, sha = make_blob(MULTIPART_SIZE)
    instruction = instruction_for(s3_store, sha, len(data))
    assert instruction.upload_id and instruction.key
    parts = _upload_parts(instruction, _wrong_bytes(data))
    with pytest.raises(ChecksumMismatch):
        s3_store.complete_multipart(sha, len(data), instruction.upload_id, instruction.key, parts)
    assert s3_store.blob_size(sha) is None
    assert stored_objects(s3_store) == []


@pytest.mark.parametrize(
    "bad_key",
    [
        "reg/uploads/{sha}",
        "other/blobs/sha256/{sha2}/{sha}",
        "reg/blobs/sha256/{other2}/{other}",
        "reg/blobs/sha256/{sha2}/../{sha2}/{sha}",
    ],
    ids=["elsewhere", "other-prefix", "other-sha", "dot-dot"],
)
def test_complete_multipart_refuses_a_key_that_is_not_the_content_address(
    s3_store: S3Store, bad_key: str
) -> None:
    data, sha = make_blob(MULTIPART_SIZE)
    _, other = make_blob(100, seed=1)
    instruction = instruction_for(s3_store, sha, len(data))
    assert instruction.upload_id and instruction.key
    key = bad_key.format(sha=sha, sha2=sha[:2], other=other, other2=other[:2])
    with pytest.raises(ChecksumMismatch, match="does not belong"):
        s3_store.complete_multipart(sha, len(data), instruction.upload_id, key, [])
    assert s3_store.blob_size(sha) is None


def test_completion_never_replaces_an_existing_object(s3_store: S3Store) -> None:
    """Two uploads of one blob: the second completion finds the first and succeeds without
    writing; an unverified object in the way is verified, not overwritten."""
    data, sha = make_blob(MULTIPART_SIZE)
    first = instruction_for(s3_store, sha, len(data))
    second = instruction_for(s3_store, sha, len(data))
    assert first.upload_id and first.key and second.upload_id and second.key
    first_parts = _upload_parts(first, data)
    second_parts = _upload_parts(second, data)
    s3_store.complete_multipart(sha, len(data), first.upload_id, first.key, first_parts)
    s3_store.complete_multipart(sha, len(data), second.upload_id, second.key, second_parts)
    assert s3_store.read_blob(sha, len(data)) == data
    assert stored_objects(s3_store) == [expected_key(sha)]


def test_verification_removes_bytes_that_do_not_match_their_address(s3_store: S3Store) -> None:
    """E.g. a server killed between completing a multipart upload and hashing it."""
    data, sha = make_blob()
    raw = s3_client(s3_store.client.meta.endpoint_url)
    raw.put_object(Bucket=s3_store.bucket, Key=f"reg/{expected_key(sha)}", Body=_wrong_bytes(data))
    assert s3_store.verify_blob(sha, len(data)) is False
    assert stored_objects(s3_store) == []
    s3_store.put_blob(sha, len(data), io.BytesIO(data))
    assert s3_store.verify_blob(sha, len(data)) is True


def test_download_url_can_be_read_with_a_plain_get(s3_store: S3Store) -> None:
    data, sha = make_blob()
    s3_store.put_blob(sha, len(data), io.BytesIO(data))
    response = httpx.get(s3_store.download_url(sha))
    assert response.status_code == 200
    assert response.content == data


# --- S3 only: objects written behind the store's back -------------------------------------------


def _raw_put(store: S3Store, sha256: str, body: bytes) -> None:
    """put_object with no checksum at all (as another tool, or a copy, would leave it)."""
    client = boto3.client(
        "s3",
        endpoint_url=store.client.meta.endpoint_url,
        aws_access_key_id="any",
        aws_secret_access_key="any",
        region_name="us-east-1",
        config=Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
        ),
    )
    client.put_object(Bucket=store.bucket, Key=store.blob_object_key(sha256), Body=body)


def test_verify_blob_hashes_an_object_stored_without_a_checksum(s3_store: S3Store) -> None:
    data, sha = make_blob()
    _raw_put(s3_store, sha, data)
    assert s3_store.verify_blob(sha, len(data)) is True


def test_verify_blob_is_false_for_wrong_bytes_stored_without_a_checksum(
    s3_store: S3Store,
) -> None:
    data, sha = make_blob()
    _raw_put(s3_store, sha, _wrong_bytes(data))
    assert s3_store.blob_size(sha) == len(data)
    assert s3_store.verify_blob(sha, len(data)) is False
