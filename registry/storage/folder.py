"""Folder store: blobs under a local directory (the embedded default, `file://./.lora-reg/objects`).

Writes go to `tmp/` in the same directory tree, are hashed while written, fsynced, and renamed
into place, so a reader never sees a partial blob even if the server is killed mid-write.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from registry.core.errors import BlobNotFound, ChecksumMismatch, StorageUnavailable
from registry.storage.base import ObjectStore

CHUNK = 1024 * 1024


class FolderStore(ObjectStore):
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.tmp = self.root / "tmp"

    def path(self, sha256: str) -> Path:
        return self.root / self.key(sha256)

    def check(self) -> None:
        try:
            self.tmp.mkdir(parents=True, exist_ok=True)
            probe = self.tmp / f"readyz-{uuid.uuid4().hex}"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as exc:
            raise StorageUnavailable(f"folder store {self.root} is not writable: {exc}") from exc

    def blob_size(self, sha256: str) -> int | None:
        try:
            return self.path(sha256).stat().st_size
        except FileNotFoundError:
            return None

    def verify_blob(self, sha256: str, size: int) -> bool:
        # Only verified bytes are ever renamed into place, so presence with the right size is
        # proof enough here; re-hashing gigabytes on every push would be wasted work.
        return self.blob_size(sha256) == size

    def put_blob(self, sha256: str, size: int, stream: BinaryIO) -> None:
        temp = self.tmp / f"{sha256}.{uuid.uuid4().hex}"
        digest = hashlib.sha256()
        written = 0
        try:
            self.tmp.mkdir(parents=True, exist_ok=True)
            with open(temp, "wb") as handle:
                while chunk := stream.read(CHUNK):
                    written += len(chunk)
                    if written > size:
                        break
                    digest.update(chunk)
                    handle.write(chunk)
                handle.flush()
                os.fsync(handle.fileno())
            if written != size or digest.hexdigest() != sha256:
                raise ChecksumMismatch(
                    f"upload of sha256:{sha256} does not match: expected {size} bytes with that "
                    f"digest, got {written if written <= size else f'over {size}'} bytes"
                    + ("" if written != size else f" hashing to sha256:{digest.hexdigest()}"),
                    sha256=sha256,
                )
            final = self.path(sha256)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(temp, final)
            _fsync_dir(final.parent)
        except OSError as exc:
            raise StorageUnavailable(f"cannot write to folder store {self.root}: {exc}") from exc
        finally:
            with contextlib.suppress(OSError):
                temp.unlink(missing_ok=True)

    def delete_blob(self, sha256: str) -> None:
        try:
            self.path(sha256).unlink(missing_ok=True)
        except OSError as exc:
            raise StorageUnavailable(f"cannot delete from folder store {self.root}: {exc}") from exc

    def read_range(self, sha256: str, start: int, length: int) -> bytes:
        try:
            with open(self.path(sha256), "rb") as handle:
                handle.seek(start)
                return handle.read(length)
        except FileNotFoundError:
            raise BlobNotFound(f"blob sha256:{sha256} is not in the store") from None

    def iter_blob(self, sha256: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        try:
            handle = open(self.path(sha256), "rb")  # noqa: SIM115  (closed by the generator)
        except FileNotFoundError:
            raise BlobNotFound(f"blob sha256:{sha256} is not in the store") from None
        with handle:
            while chunk := handle.read(chunk_size):
                yield chunk


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
