"""`BlobCache`: the client's content-addressed cache of verified blobs, and how a pull places them.

`cli.client.Registry` pulls (`pull`, `pull_artifact`, `pull_base`, and through them the vLLM
plugin's digest folders) through it. Layout under the cache folder (`LORA_REG_CACHE_DIR`, default
`~/.cache/lora-reg`), modelled on the Hugging Face cache's `blobs/`:

    blobs/sha256/<2 hex>/<64 hex>    the bytes, read-only (0444)
    stamps/sha256/<2 hex>/<64 hex>   JSON: device, inode, size, mtime_ns and mode of that blob
                                     file when its bytes were last hashed and found right

Trust: a blob is hashed when it is filled (while it downloads) and again whenever its stamp is
missing or no longer matches the file (`lstat`); while it matches, its bytes are used without
being read. Sealing a verified blob sets its mtime one second in the past, so any later write
moves it (even one within the same clock tick as the download), a truncation changes the size
and a replacement the inode: an edited, truncated or replaced blob is hashed again, and fetched
again when it is wrong. ctime is left out on purpose: linking a blob into a pulled folder, or
deleting such a folder, changes it, and each would cost a re-hash. Not caught: an edit whose
author then restores the mtime and mode by hand.

Placement (`put`): under a temporary name in the destination folder, then renamed, so nothing
half-written is ever visible; the first of these the file systems allow:

1. a reflink (`FICLONE`, btrfs, XFS...): a copy-on-write clone, a file of its own;
2. a hard link to the read-only blob (same file system, unless `hardlinks=False`): no byte moves,
   but the pulled file *is* the cache file, so an edit through it (root ignores the read-only
   mode) edits the cache and every folder linked to it. The stamp catches it and the cache
   fetches the blob again; the other folders keep the edit;
3. a kernel copy (`copy_file_range`, else `sendfile`), fsynced.

Several processes may share one cache: blobs and stamps are written under temporary names and
renamed, a stamp only ever describes a file whose bytes were hashed, and a stamp another process
made stale costs a re-hash, never a wrong byte. To keep stamps from going stale, a download that
finishes after another process's keeps the blob already verified, and a blob sealed before is
stamped as it is when it is hashed again (sealing it anew would move its mtime). Imports only
the standard library and `cli`'s progress protocol and `registry.core`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import stat
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

from cli.progress import Progress
from registry.core.errors import ChecksumMismatch, InvalidInput
from registry.core.manifest import hash_stream

PARTIAL_SUFFIX = ".lora-reg-partial"  # temporary files: "." + name + random + this
HARDLINKS_ENV = "LORA_REG_PULL_HARDLINKS"  # "0": never hard-link pulled files to the cache
FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)
READ_ONLY = 0o444
SECOND_NS = 1_000_000_000
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Stamp:
    """What `lstat` said of a blob file whose bytes were found right."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    mode: int

    @classmethod
    def of(cls, status: os.stat_result) -> Stamp:
        return cls(status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_mode)


class BlobWriter:
    """Receives a blob's bytes during `BlobCache.fill`, hashing them on the way."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        self.received = 0
        self.digest = hashlib.sha256()
        self.stamp: Stamp | None = None  # set once the blob is verified and in place

    def write(self, chunk: bytes) -> None:
        self.digest.update(chunk)
        self.handle.write(chunk)
        self.received += len(chunk)


def default_hardlinks() -> bool:
    return os.environ.get(HARDLINKS_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


class BlobCache:
    """Verified blobs by sha256 under `root`; see the module docstring for what is trusted."""

    def __init__(self, root: Path, *, hardlinks: bool = True) -> None:
        self.root = root
        self.hardlinks = hardlinks

    def blob(self, sha256: str) -> Path:
        return self.root / "blobs" / "sha256" / _checked(sha256)[:2] / sha256

    def stamp_path(self, sha256: str) -> Path:
        return self.root / "stamps" / "sha256" / _checked(sha256)[:2] / sha256

    # --- placing -------------------------------------------------------------------------------

    def place(self, sha256: str, size: int, destination: Path, progress: Progress) -> bool:
        """Put the cached bytes of blob `sha256` at `destination`, atomically; False when the
        cache does not hold them (absent, or wrong once hashed): download them with `fill`.

        A blob whose stamp matches is placed without reading it (`progress` advances by `size`
        at once); any other is hashed first (`progress` sees each chunk).
        """
        stamp = self._read_stamp(sha256)
        if stamp is not None and stamp.size == size and self.put(sha256, stamp, destination):
            progress.advance(size)
            return True
        stamp = self._verify(sha256, size, progress)
        if stamp is None:
            return False
        if self.put(sha256, stamp, destination):
            return True
        progress.advance(-size)  # replaced by another process since: the caller downloads
        return False

    def put(self, sha256: str, stamp: Stamp, destination: Path) -> bool:
        """Place the blob at `destination` if its file is still the one `stamp` describes (else
        False, leaving nothing behind): reflink, else hard link, else kernel copy."""
        blob = self.blob(sha256)
        partial = _partial(destination)
        try:
            try:
                source = os.open(blob, os.O_RDONLY | os.O_NOFOLLOW)
            except OSError:
                return False
            try:
                if Stamp.of(os.fstat(source)) != stamp:
                    return False
                if not _clone(source, partial):
                    if self.hardlinks and _link(blob, partial):
                        # The name may lead to another file by now: check what was linked.
                        if Stamp.of(os.lstat(partial)) != stamp:
                            return False
                        os.replace(partial, destination)
                        return True
                    _copy(source, partial, stamp.size)
                if Stamp.of(os.fstat(source)) != stamp:  # written to while it was copied
                    return False
            finally:
                os.close(source)
            os.replace(partial, destination)
            return True
        finally:
            partial.unlink(missing_ok=True)

    # --- filling and verifying -----------------------------------------------------------------

    @contextlib.contextmanager
    def fill(self, sha256: str, size: int, label: str) -> Iterator[BlobWriter]:
        """A writer for blob `sha256`'s bytes. On a clean exit they must be `size` bytes hashing
        to `sha256` (else `ChecksumMismatch`, naming `label`, and nothing is kept); then the blob
        is sealed, renamed into place (replacing a damaged one) and stamped: `writer.stamp`. A
        verified blob another process put there meanwhile is kept instead, with its stamp."""
        blob = self.blob(sha256)
        blob.parent.mkdir(parents=True, exist_ok=True)
        partial = _partial(blob)
        try:
            with open(partial, "xb") as handle:
                writer = BlobWriter(handle)
                yield writer
                received, digest = writer.received, writer.digest.hexdigest()
                if received != size or digest != sha256:
                    raise ChecksumMismatch(
                        f"{label}: downloaded {received} bytes hashing to sha256:{digest}, "
                        f"expected {size} bytes with sha256:{sha256}; the stored blob is damaged"
                    )
                handle.flush()  # before sealing: a later write would move the mtime again
                stamp = _seal(handle.fileno())
            kept = self._verified(sha256)
            if kept is not None:  # another process filled it meanwhile: keep theirs, whose stamp
                writer.stamp = kept  # its other readers hold, and drop these same bytes
                return
            os.replace(partial, blob)
            self._write_stamp(sha256, stamp)
            writer.stamp = stamp
        finally:
            partial.unlink(missing_ok=True)

    def _verify(self, sha256: str, size: int, progress: Progress) -> Stamp | None:
        """Hash the cached blob; when its bytes are right (and did not change meanwhile), seal
        and stamp it. None when it is absent, wrong, or not ours to seal."""
        try:
            handle = open(self.blob(sha256), "rb", opener=_no_follow)  # noqa: SIM115
        except OSError:
            return None
        read = 0

        def advance(amount: int) -> None:
            nonlocal read
            read += amount
            progress.advance(amount)

        with handle:
            before = Stamp.of(os.fstat(handle.fileno()))
            if not stat.S_ISREG(before.mode) or before.size != size:
                return None
            started = time.time_ns()
            hashed = hash_stream(handle, advance)
            try:
                if hashed == (size, sha256) and Stamp.of(os.fstat(handle.fileno())) == before:
                    # Sealed already (by whoever verified it before): sealing it again would move
                    # its mtime and make every other process's stamp of it stale.
                    sealed = _sealed(before, started)
                    stamp = before if sealed else _seal(handle.fileno())
                    self._write_stamp(sha256, stamp)
                    return stamp
            except OSError:  # another user's file we may not chmod: fetch our own
                pass
        progress.advance(-read)
        return None

    def _verified(self, sha256: str) -> Stamp | None:
        """The stamp of the cached blob when it is still the file its stamp describes."""
        stamp = self._read_stamp(sha256)
        try:
            return (
                stamp
                if stamp is not None and Stamp.of(os.lstat(self.blob(sha256))) == stamp
                else None
            )
        except OSError:
            return None

    def _read_stamp(self, sha256: str) -> Stamp | None:
        try:
            return Stamp(**json.loads(self.stamp_path(sha256).read_text()))
        except (OSError, ValueError, TypeError):
            return None  # none yet (or a cache older than stamps), or unreadable: hash again

    def _write_stamp(self, sha256: str, stamp: Stamp) -> None:
        path = self.stamp_path(sha256)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = _partial(path)
        try:
            partial.write_text(json.dumps(asdict(stamp)))
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)


def _checked(sha256: str) -> str:
    if not _SHA256.fullmatch(sha256):
        raise InvalidInput(f"invalid sha256 {sha256!r}: expected 64 lowercase hex digits")
    return sha256


def _partial(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}{PARTIAL_SUFFIX}")


def _no_follow(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW)


def _seal(fd: int) -> Stamp:
    """Make a verified file read-only, set its mtime one second before now (so that any later
    write moves it), flush it to disk; its stamp."""
    os.fchmod(fd, READ_ONLY)
    now = time.time_ns()
    os.utime(fd, ns=(now, now - SECOND_NS))
    os.fsync(fd)
    return Stamp.of(os.fstat(fd))


def _sealed(status: Stamp, started_ns: int) -> bool:
    """Whether a file is read-only with an mtime at least a second before `started_ns`: then any
    write from that moment on moves its mtime, as `_seal` ensures."""
    return stat.S_IMODE(status.mode) == READ_ONLY and status.mtime_ns <= started_ns - SECOND_NS


def _clone(source: int, partial: Path) -> bool:
    """Reflink `source` to the new file `partial`; False (and no file) where the file system
    cannot (ext4, tmpfs, another file system...)."""
    target = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        fcntl.ioctl(target, FICLONE, source)
        os.fsync(target)
        return True
    except OSError:
        partial.unlink(missing_ok=True)
        return False
    finally:
        os.close(target)


def _link(blob: Path, partial: Path) -> bool:
    """Hard-link the blob to `partial`; False where that is refused (another file system, a file
    system without hard links, the blob's link count at its limit)."""
    try:
        os.link(blob, partial, follow_symlinks=False)
        return True
    except OSError:
        return False


def _copy(source: int, partial: Path, size: int) -> None:
    """Copy `size` bytes of `source` to the new file `partial` inside the kernel, and fsync it:
    `copy_file_range` (which some file systems turn into a clone or a server-side copy), else
    `sendfile` (across file systems on kernels that refuse it). Stops early if `source` shrank."""
    target = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        offset, ranged = 0, hasattr(os, "copy_file_range")
        while offset < size:
            if ranged:
                try:
                    moved = os.copy_file_range(source, target, size - offset, offset, offset)
                except OSError:
                    ranged = False
                    os.lseek(target, offset, os.SEEK_SET)
                    continue
            else:
                moved = os.sendfile(target, source, offset, size - offset)
            if moved == 0:
                break
            offset += moved
        os.fsync(target)
    finally:
        os.close(target)
