"""The storage interface every backend implements (see `registry.storage`)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import BinaryIO

from registry.core.errors import StoreUploadMode
from registry.core.manifest import blob_key
from registry.core.schemas import CompletedPart, UploadInstruction


class ObjectStore(ABC):
    """Content-addressed blob storage.

    Implementations must never make a blob visible under its final key unless its bytes hash to
    its sha256; callers rely on that to skip re-uploads of blobs that already exist. (For direct
    single PUTs to S3 that guarantee is S3's: the presigned URL is signed with the sha256, and
    `verify_blob` checks the checksum S3 recorded, or hashes the object when there is none.)
    """

    @abstractmethod
    def check(self) -> None:
        """Raise `StorageUnavailable` if the store cannot be reached or written."""

    @abstractmethod
    def blob_size(self, sha256: str) -> int | None:
        """Size of the stored blob, or None when absent."""

    @abstractmethod
    def verify_blob(self, sha256: str, size: int) -> bool:
        """True when the blob is stored whole with this size and sha256."""

    @abstractmethod
    def put_blob(self, sha256: str, size: int, stream: BinaryIO) -> None:
        """Store a blob from a stream, verifying size and sha256 before it becomes visible.

        Raises `ChecksumMismatch` (and stores nothing) when the bytes do not match.
        """

    @abstractmethod
    def delete_blob(self, sha256: str) -> None:
        """Delete a blob (garbage collection only); absent blobs are fine."""

    @abstractmethod
    def read_range(self, sha256: str, start: int, length: int) -> bytes:
        """`length` bytes of a blob from `start` (fewer at the end of the blob)."""

    @abstractmethod
    def iter_blob(self, sha256: str, chunk_size: int = 1024 * 1024) -> Iterator[bytes]:
        """Stream a blob's bytes."""

    def read_blob(self, sha256: str, size: int) -> bytes:
        return self.read_range(sha256, 0, size)

    # Direct transfers (S3). The proxy store answers None and the API serves the bytes itself.

    def upload_instruction(
        self, sha256: str, size: int, *, multipart_threshold: int, part_size: int
    ) -> UploadInstruction | None:
        return None

    def complete_multipart(
        self, sha256: str, size: int, upload_id: str, key: str, parts: list[CompletedPart]
    ) -> None:
        raise StoreUploadMode()

    def download_url(self, sha256: str) -> str | None:
        return None

    @staticmethod
    def key(sha256: str) -> str:
        return blob_key(sha256)
