"""Version manifests: the list of (path, size, sha256) a version consists of, and its digest.

A version's digest is the sha256 of its canonical manifest: one `path size sha256` line per file,
sorted by path, each ending in a newline. The same files therefore always give the same digest,
whatever order they were listed or uploaded in.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import BinaryIO

from registry.core.errors import (
    InvalidPath,
    MissingFile,
    PickleRefused,
    TooManyFiles,
    VersionTooLarge,
)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
REQUIRED_FILES = (CONFIG_FILE, WEIGHTS_FILE)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
MAX_PATH_BYTES = 255
DEFAULT_MAX_FILES = 1000
DEFAULT_MAX_VERSION_BYTES = 20 * 1024**3
HASH_CHUNK = 8 * 1024 * 1024

_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, order=True)
class FileEntry:
    path: str
    size: int
    sha256: str  # 64 lower-case hex characters, no "sha256:" prefix

    @property
    def digest(self) -> str:
        return f"sha256:{self.sha256}"


def check_path(path: str) -> str:
    """Accept only relative, normalised POSIX paths of at most 255 bytes."""

    def bad(why: str) -> InvalidPath:
        return InvalidPath(f"invalid file path {path!r}: {why}", path=path)

    if not path:
        raise bad("empty path")
    if "\x00" in path:
        raise bad("contains a NUL byte")
    if any(ord(c) < 32 or ord(c) == 127 for c in path):
        raise bad("contains a control character")
    if "\\" in path:
        raise bad("contains a backslash; use '/' as the separator")
    if len(path.encode("utf-8")) > MAX_PATH_BYTES:
        raise bad(f"longer than {MAX_PATH_BYTES} bytes")
    if path.startswith("/") or re.match(r"[A-Za-z]:", path):
        raise bad("absolute paths are not allowed; use a path relative to the adapter folder")
    if any(part == ".." for part in path.split("/")):
        raise bad("'..' is not allowed")
    if posixpath.normpath(path) != path or path.startswith("./") or path == ".":
        raise bad(f"not normalised (expected {posixpath.normpath(path)!r})")
    return path


def check_sha256(value: str) -> str:
    if not _HEX64.fullmatch(value):
        raise InvalidPath(f"invalid sha256 {value!r}: expected 64 lower-case hex characters")
    return value


def check_manifest(
    files: Iterable[FileEntry],
    *,
    max_files: int = DEFAULT_MAX_FILES,
    max_bytes: int = DEFAULT_MAX_VERSION_BYTES,
    required: tuple[str, ...] = REQUIRED_FILES,
    what: str = "version",
    size_setting: str = "LORA_REG_MAX_VERSION_BYTES",
) -> list[FileEntry]:
    """Validate a manifest and return it sorted by path.

    Refuses bad paths, duplicates, pickle files, missing required files and oversize manifests;
    `what` and `size_setting` name the kind of manifest and its size limit in the messages.
    """
    entries = sorted(files)
    if len(entries) > max_files:
        hint = " Push only the adapter files (use --exclude for checkpoints and logs)."
        raise TooManyFiles(
            f"the {what} has {len(entries)} files; at most {max_files} are allowed "
            f"(LORA_REG_MAX_FILES).{hint if what == 'version' else ''}",
            count=len(entries),
            limit=max_files,
        )
    seen: set[str] = set()
    total = 0
    for entry in entries:
        check_path(entry.path)
        check_sha256(entry.sha256)
        if entry.size < 0:
            raise InvalidPath(f"negative size for {entry.path!r}", path=entry.path)
        if entry.path in seen:
            raise InvalidPath(f"duplicate file path {entry.path!r}", path=entry.path)
        seen.add(entry.path)
        if entry.path.lower().endswith(PICKLE_SUFFIXES):
            raise PickleRefused(
                f"{entry.path}: pickle files are refused because loading them can run arbitrary "
                "code. Convert weights to safetensors (PEFT: save_pretrained(..., "
                "safe_serialization=True)), or leave the file out with --exclude "
                f"'{posixpath.basename(entry.path)}'.",
                path=entry.path,
            )
        total += entry.size
    if total > max_bytes:
        raise VersionTooLarge(
            f"the {what} is {total} bytes; this server accepts at most {max_bytes} bytes "
            f"({size_setting})",
            size=total,
            limit=max_bytes,
        )
    folders = {path.rsplit("/", i)[0] for path in seen for i in range(1, path.count("/") + 1)}
    if clash := sorted(folders & seen):
        raise InvalidPath(f"{clash[0]!r} is both a file and a folder", path=clash[0])
    for path in required:
        if path not in seen:
            raise MissingFile(
                f"{path} is missing: a PEFT adapter folder needs {CONFIG_FILE} and "
                f"{WEIGHTS_FILE} at its top level (PEFT: model.save_pretrained(dir)).",
                path=path,
            )
    return entries


def canonical_manifest(files: Iterable[FileEntry]) -> bytes:
    return "".join(f"{f.path} {f.size} {f.sha256}\n" for f in sorted(files)).encode("utf-8")


def manifest_digest(files: Iterable[FileEntry]) -> str:
    """`sha256:<hex>` of the canonical manifest."""
    return "sha256:" + hashlib.sha256(canonical_manifest(files)).hexdigest()


def hash_stream(stream: BinaryIO, on_chunk: Callable[[int], None] | None = None) -> tuple[int, str]:
    """(size, sha256 hex) of everything left in a binary stream; `on_chunk` sees each length."""
    digest = hashlib.sha256()
    size = 0
    while chunk := stream.read(HASH_CHUNK):
        digest.update(chunk)
        size += len(chunk)
        if on_chunk:
            on_chunk(len(chunk))
    return size, digest.hexdigest()


def blob_key(sha256: str) -> str:
    """Where a blob lives in the object store, relative to the store's prefix."""
    return f"blobs/sha256/{sha256[:2]}/{sha256}"
