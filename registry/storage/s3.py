"""S3 store: blobs in any S3-compatible bucket (`s3://bucket/prefix`). The only boto3 user.

The endpoint and credentials come from boto3's standard chain (`AWS_ENDPOINT_URL`,
`AWS_ACCESS_KEY_ID`, instance roles...). Clients upload and download directly with presigned
URLs. A single PUT is signed with the blob's sha256 (`x-amz-checksum-sha256`), so S3 itself
refuses bytes that do not match; a multipart upload is completed at the content address only if
nothing is there yet, hashed in place by the server, and deleted if it does not match. The
registry records (and serves) a blob only after that verification.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from registry.core.errors import (
    BlobNotFound,
    ChecksumMismatch,
    Conflict,
    InvalidBase,
    StorageUnavailable,
)
from registry.core.schemas import CompletedPart, UploadInstruction, UploadPart
from registry.storage.base import ObjectStore

CHUNK = 1024 * 1024
_MISSING = {"404", "NoSuchKey", "NotFound", "NoSuchUpload"}


def b64_sha256(sha256: str) -> str:
    return base64.b64encode(bytes.fromhex(sha256)).decode("ascii")


@contextmanager
def _translated(what: str) -> Iterator[None]:
    """Turn botocore errors into registry errors, once, here."""
    try:
        yield
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in _MISSING:
            raise BlobNotFound(f"{what}: not found in the object store") from exc
        if code in ("BadDigest", "XAmzContentSHA256Mismatch", "InvalidDigest"):
            raise ChecksumMismatch(f"{what}: the bytes do not match their sha256") from exc
        raise StorageUnavailable(f"{what}: object store error {code}: {exc}") from exc
    except BotoCoreError as exc:
        raise StorageUnavailable(f"{what}: object store unreachable: {exc}") from exc


class _HashingReader(io.RawIOBase):
    """Hashes what boto3 reads from a stream, and never reads more than `limit` + 1 bytes."""

    def __init__(self, stream: BinaryIO, limit: int) -> None:
        self._stream = stream
        self._digest = hashlib.sha256()
        self._limit = limit
        self.length = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        # One byte past the limit is enough to tell "too long" in _publish_staged.
        room = self._limit + 1 - self.length
        if room <= 0:
            return b""
        data = self._stream.read(room if size < 0 else min(size, room))
        self._digest.update(data)
        self.length += len(data)
        return data

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


class S3Store(ObjectStore):
    #: Proxied uploads up to this size go in one checksummed PUT; larger ones are streamed.
    proxy_single_put_limit = 64 * 1024 * 1024

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        presign_expiry_s: int = 3600,
        public_endpoint: str | None = None,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.presign_expiry_s = presign_expiry_s
        self.client, self.presigner = make_clients(public_endpoint)

    def object_key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def blob_object_key(self, sha256: str) -> str:
        return self.object_key(self.key(sha256))

    def check(self) -> None:
        with _translated(f"bucket {self.bucket}"):
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except ClientError as exc:
                raise StorageUnavailable(
                    f"bucket {self.bucket!r} is not reachable: {exc}; create it or fix "
                    "LORA_REG_STORAGE_URL / AWS_ENDPOINT_URL / credentials"
                ) from exc

    def _head(self, sha256: str, **extra: Any) -> dict[str, Any] | None:
        with _translated(f"blob sha256:{sha256}"):
            try:
                return dict(
                    self.client.head_object(
                        Bucket=self.bucket, Key=self.blob_object_key(sha256), **extra
                    )
                )
            except ClientError as exc:
                if str(exc.response.get("Error", {}).get("Code", "")) in _MISSING:
                    return None
                raise

    def blob_size(self, sha256: str) -> int | None:
        head = self._head(sha256)
        return None if head is None else int(head["ContentLength"])

    def verify_blob(self, sha256: str, size: int) -> bool:
        head = self._head(sha256, ChecksumMode="ENABLED")
        if head is None or int(head["ContentLength"]) != size:
            return False
        stored = head.get("ChecksumSHA256")
        if stored and "-" not in stored:
            return bool(stored == b64_sha256(sha256))
        # No full-object checksum (a multipart upload, or a foreign object): hash the bytes.
        if self._hash_object(self.blob_object_key(sha256)) == (size, sha256):
            return True
        # Bytes at a content address that do not hash to it are garbage: remove them so that
        # the next upload of the real bytes can take their place.
        with _translated(f"blob sha256:{sha256}"):
            self.client.delete_object(Bucket=self.bucket, Key=self.blob_object_key(sha256))
        return False

    def _hash_object(self, key: str) -> tuple[int, str]:
        """(length, sha256 hex) of a stored object, read in chunks."""
        digest = hashlib.sha256()
        length = 0
        with _translated(f"object {key}"):
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
            try:
                for chunk in body.iter_chunks(CHUNK):
                    digest.update(chunk)
                    length += len(chunk)
            finally:
                body.close()
        return length, digest.hexdigest()

    def put_blob(self, sha256: str, size: int, stream: BinaryIO) -> None:
        """Proxied upload (clients normally upload directly with presigned URLs)."""
        if size <= self.proxy_single_put_limit:
            data = stream.read(size + 1)
            if len(data) != size or hashlib.sha256(data).hexdigest() != sha256:
                raise ChecksumMismatch(
                    f"upload of sha256:{sha256} does not match its declared size or digest",
                    sha256=sha256,
                )
            with _translated(f"blob sha256:{sha256}"):
                # S3 checks the sha256 we sign as well, so a mismatch stores nothing.
                self.client.put_object(
                    Bucket=self.bucket,
                    Key=self.blob_object_key(sha256),
                    Body=data,
                    ChecksumSHA256=b64_sha256(sha256),
                )
            return
        # Large: stream to a staging key while hashing, publish only if the bytes match.
        hashing = _HashingReader(stream, limit=size)
        key = self._staging_key(sha256)
        with _translated(f"blob sha256:{sha256}"):
            try:
                self.client.upload_fileobj(hashing, self.bucket, key)
            except BaseException:
                with contextlib.suppress(ClientError, BotoCoreError):
                    self.client.delete_object(Bucket=self.bucket, Key=key)
                raise
        self._publish_staged(key, sha256, size, sent=(hashing.length, hashing.hexdigest()))

    def delete_blob(self, sha256: str) -> None:
        with _translated(f"blob sha256:{sha256}"):
            self.client.delete_object(Bucket=self.bucket, Key=self.blob_object_key(sha256))

    def read_range(self, sha256: str, start: int, length: int) -> bytes:
        if length <= 0:
            return b""
        with _translated(f"blob sha256:{sha256}"):
            try:
                response = self.client.get_object(
                    Bucket=self.bucket,
                    Key=self.blob_object_key(sha256),
                    Range=f"bytes={start}-{start + length - 1}",
                )
            except ClientError as exc:
                # A range starting at or past the end: no bytes, like reading a file there.
                if str(exc.response.get("Error", {}).get("Code", "")) == "InvalidRange":
                    return b""
                raise
            return bytes(response["Body"].read())

    def iter_blob(self, sha256: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        with _translated(f"blob sha256:{sha256}"):
            response = self.client.get_object(Bucket=self.bucket, Key=self.blob_object_key(sha256))
            body = response["Body"]
            try:
                yield from body.iter_chunks(chunk_size)
            finally:
                body.close()

    # --- direct transfers ----------------------------------------------------------------------

    def download_url(self, sha256: str) -> str:
        with _translated(f"blob sha256:{sha256}"):
            return str(
                self.presigner.generate_presigned_url(
                    "get_object",
                    Params={"Bucket": self.bucket, "Key": self.blob_object_key(sha256)},
                    ExpiresIn=self.presign_expiry_s,
                )
            )

    def upload_instruction(
        self, sha256: str, size: int, *, multipart_threshold: int, part_size: int
    ) -> UploadInstruction:
        with _translated(f"blob sha256:{sha256}"):
            if size <= multipart_threshold:
                checksum = b64_sha256(sha256)
                url = self.presigner.generate_presigned_url(
                    "put_object",
                    Params={
                        "Bucket": self.bucket,
                        "Key": self.blob_object_key(sha256),
                        "ChecksumSHA256": checksum,
                        "ContentLength": size,
                    },
                    ExpiresIn=self.presign_expiry_s,
                )
                return UploadInstruction(
                    sha256=sha256,
                    size=size,
                    kind="single",
                    url=url,
                    headers={"x-amz-checksum-sha256": checksum},
                )
            # Parts go straight to the content address: completion is refused there if the key
            # exists, and the result is hashed in place before the registry records it.
            key = self.blob_object_key(sha256)
            upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"]
            parts = []
            for number, offset in enumerate(range(0, size, part_size), start=1):
                url = self.presigner.generate_presigned_url(
                    "upload_part",
                    Params={
                        "Bucket": self.bucket,
                        "Key": key,
                        "UploadId": upload_id,
                        "PartNumber": number,
                    },
                    ExpiresIn=self.presign_expiry_s,
                )
                parts.append(
                    UploadPart(
                        part_number=number,
                        url=url,
                        offset=offset,
                        size=min(part_size, size - offset),
                    )
                )
            return UploadInstruction(
                sha256=sha256,
                size=size,
                kind="multipart",
                upload_id=upload_id,
                key=key,
                parts=parts,
            )

    def complete_multipart(
        self, sha256: str, size: int, upload_id: str, key: str, parts: list[CompletedPart]
    ) -> None:
        """Finish a multipart upload at the blob's content address and verify it in place.

        Completion is conditional (`If-None-Match: *`): it never replaces an existing object.
        Bytes that do not hash to `sha256` are deleted before this returns, and no registry row
        points at a blob until this has returned, so nothing unverified is ever served.
        """
        if key != self.blob_object_key(sha256):
            raise ChecksumMismatch(f"multipart key {key!r} does not belong to sha256:{sha256}")
        if self.verify_blob(sha256, size):
            # Already published (e.g. a retried completion whose first answer was lost).
            self._abort(key, upload_id)
            return
        with _translated(f"multipart upload of sha256:{sha256}"):
            try:
                self.client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    IfNoneMatch="*",
                    MultipartUpload={
                        "Parts": [
                            {"PartNumber": p.part_number, "ETag": p.etag}
                            for p in sorted(parts, key=lambda p: p.part_number)
                        ]
                    },
                )
            except ClientError as exc:
                # Free the parts: a failed completion must not leave storage behind.
                self._abort(key, upload_id)
                if exc.response.get("Error", {}).get("Code") == "PreconditionFailed":
                    if self.verify_blob(sha256, size):
                        return  # a concurrent upload of the same bytes won
                    raise Conflict(
                        f"another upload of sha256:{sha256} was in progress; push again"
                    ) from exc
                raise
        length, digest = self._hash_object(key)
        if (length, digest) != (size, sha256):
            with _translated(f"blob sha256:{sha256}"):
                self.client.delete_object(Bucket=self.bucket, Key=key)
            raise ChecksumMismatch(
                f"multipart upload of sha256:{sha256} does not match: got {length} bytes hashing "
                f"to sha256:{digest}",
                sha256=sha256,
            )

    def _abort(self, key: str, upload_id: str) -> None:
        with contextlib.suppress(ClientError, BotoCoreError):
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)

    def _staging_key(self, sha256: str) -> str:
        return self.object_key(f"uploads/{uuid.uuid4().hex}/{sha256}")

    def _publish_staged(self, key: str, sha256: str, size: int, sent: tuple[int, str]) -> None:
        """Copy a staged object to its content address if `sent` (the length and sha256 of the
        bytes as they were uploaded) matches, then delete the staged object."""
        with _translated(f"upload of sha256:{sha256}"):
            try:
                if sent != (size, sha256):
                    raise ChecksumMismatch(
                        f"upload of sha256:{sha256} does not match: got {sent[0]} bytes hashing "
                        f"to sha256:{sent[1]}",
                        sha256=sha256,
                    )
                self.client.copy(
                    {"Bucket": self.bucket, "Key": key},
                    self.bucket,
                    self.blob_object_key(sha256),
                    Config=TransferConfig(multipart_threshold=5 * 1024**3),
                )
            finally:
                self.client.delete_object(Bucket=self.bucket, Key=key)


def make_clients(public_endpoint: str | None = None) -> tuple[Any, Any]:
    """(client, presigner) for the configured endpoint; the presigner signs for the address
    clients use when that differs from the server's (`LORA_REG_S3_PUBLIC_ENDPOINT`)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    config = Config(
        signature_version="s3v4",
        # Custom endpoints (SeaweedFS, MinIO...) rarely resolve bucket sub-domains.
        s3={"addressing_style": "path" if endpoint or public_endpoint else "auto"},
        retries={"max_attempts": 5, "mode": "standard"},
        connect_timeout=5,
        read_timeout=60,
        # Checksums are chosen explicitly (sha256) where they matter; no SDK defaults.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    client = boto3.client("s3", endpoint_url=endpoint, region_name=region, config=config)
    # Presigned URLs are signed for the host clients use; signing is local, no I/O.
    presigner = (
        boto3.client("s3", endpoint_url=public_endpoint, region_name=region, config=config)
        if public_endpoint
        else client
    )
    return client, presigner


class S3Folder:
    """Read-only view of the objects under `s3://bucket/prefix/` (a base checkpoint), for
    listing and ranged reads; counts the bytes it reads."""

    max_objects = 10_000

    def __init__(self, url: str) -> None:
        # Split, not urlparse: '?' and '#' are key characters here, and the caller checked this
        # very text (bucket, then everything after the first '/') against its allow-list.
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        if not url.startswith("s3://") or not bucket:
            raise InvalidBase(f"{url!r} is not an s3://bucket/prefix URL")
        self.url = url
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client, _ = make_clients()
        self.bytes_read = 0

    def _key(self, path: str) -> str:
        return f"{self.prefix}/{path}" if self.prefix else path

    def files(self) -> dict[str, int]:
        found: dict[str, int] = {}
        start = f"{self.prefix}/" if self.prefix else ""
        with _translated(self.url):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=start
            )
            try:
                for page in pages:
                    for item in page.get("Contents", []):
                        found[item["Key"][len(start) :]] = int(item["Size"])
                    if len(found) > self.max_objects:
                        raise InvalidBase(
                            f"{self.url} holds more than {self.max_objects} objects; point "
                            "--from at the folder of one checkpoint"
                        )
            except ClientError as exc:
                # A wrong name, not an outage: retrying (what 503 tells clients) cannot help.
                if exc.response.get("Error", {}).get("Code") == "NoSuchBucket":
                    raise InvalidBase(
                        f"{self.url}: bucket {self.bucket!r} does not exist; check the name in "
                        "--from",
                        source=self.url,
                    ) from exc
                raise
        if not found:
            raise InvalidBase(f"{self.url} holds no objects; upload the checkpoint there first")
        return found

    def read(self, path: str, start: int, length: int) -> bytes:
        if length <= 0:
            return b""
        with _translated(f"{self.url}/{path}"):
            response = self.client.get_object(
                Bucket=self.bucket, Key=self._key(path), Range=f"bytes={start}-{start + length - 1}"
            )
            data = bytes(response["Body"].read())
        self.bytes_read += len(data)
        return data
