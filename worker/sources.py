"""Where the merge engine reads a base checkpoint from: ranged reads into caller-owned buffers.

A `Source` lists its files with their sizes and fills a buffer with `length` bytes at an
offset, so the engine reads one tensor at a time and never maps or loads a whole shard.
`FolderSource` reads a local folder (a checkpoint, a pulled registry base or a Hugging Face
snapshot in the huggingface_hub cache); `S3Source` issues ranged GETs against an S3 prefix.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

from registry.core.errors import InvalidBase, Unavailable

# Files a base folder may hold that are never copied into a merged checkpoint: other weight
# formats (pickles run code when loaded) and the base's own model card.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".msgpack", ".h5")


class Source(Protocol):
    """A base checkpoint's files, read by ranges."""

    def files(self) -> dict[str, int]:
        """Relative posix path -> size in bytes, for every file of the checkpoint."""
        ...

    def read_into(self, path: str, start: int, buffer: memoryview) -> None:
        """Fill `buffer` with the bytes of `path` from `start` (all of them, or raise)."""
        ...

    def describe(self) -> str:
        """Where the checkpoint is, for messages."""
        ...


class FolderSource:
    """A checkpoint folder on local disk, read with positional reads (no mmap, no page-in of
    whole shards: peak memory stays the engine's own buffers)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise InvalidBase(f"{self.root} is not a directory")

    def files(self) -> dict[str, int]:
        return {
            path.relative_to(self.root).as_posix(): path.stat().st_size
            for path in sorted(self.root.rglob("*"))
            if path.is_file() and not path.relative_to(self.root).as_posix().startswith(".")
        }

    def read_into(self, path: str, start: int, buffer: memoryview) -> None:
        fd = os.open(self.root / path, os.O_RDONLY)
        try:
            done = 0
            while done < len(buffer):
                count = os.preadv(fd, [buffer[done:]], start + done)
                if count == 0:
                    raise InvalidBase(f"{path} ended early: the checkpoint is truncated", path=path)
                done += count
        finally:
            os.close(fd)

    def describe(self) -> str:
        return str(self.root)


class S3Source:
    """Every object under s3://bucket/prefix, read with ranged GETs (credentials and endpoint
    from the standard AWS_* environment, as boto3 reads them)."""

    def __init__(self, bucket: str, prefix: str, client: Any | None = None) -> None:
        if client is None:
            from worker.s3 import s3_client

            client = s3_client()
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self._files: dict[str, int] | None = None

    def files(self) -> dict[str, int]:
        if self._files is None:
            found: dict[str, int] = {}
            try:
                pages = self.client.get_paginator("list_objects_v2").paginate(
                    Bucket=self.bucket, Prefix=self.prefix
                )
                for page in pages:
                    for item in page.get("Contents", []):
                        found[item["Key"][len(self.prefix) :]] = int(item["Size"])
            except Exception as exc:
                raise Unavailable(f"cannot list {self.describe()}: {exc}") from exc
            if not found:
                raise InvalidBase(f"{self.describe()} holds no files")
            self._files = dict(sorted(found.items()))
        return self._files

    def read_into(self, path: str, start: int, buffer: memoryview) -> None:
        if not len(buffer):
            return
        end = start + len(buffer) - 1
        try:
            body = self.client.get_object(
                Bucket=self.bucket, Key=self.prefix + path, Range=f"bytes={start}-{end}"
            )["Body"]
            done = 0
            while done < len(buffer):
                chunk = body.read(min(8 << 20, len(buffer) - done))
                if not chunk:
                    raise InvalidBase(f"{path} ended early on S3", path=path)
                buffer[done : done + len(chunk)] = chunk
                done += len(chunk)
        except InvalidBase:
            raise
        except Exception as exc:
            raise Unavailable(f"cannot read {self.describe()}/{path}: {exc}") from exc

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")


def read_bytes(source: Source, path: str) -> bytes:
    """A whole (small) file of a source."""
    buffer = bytearray(source.files()[path])
    source.read_into(path, 0, memoryview(buffer))
    return bytes(buffer)
