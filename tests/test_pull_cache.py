"""The pull cache (`cli.cache`): verified when filled, trusted afterwards only while its stamp
matches, placed by link or copy; a cache file changed behind its back is hashed again and fetched
again. Real pulls against the real server, on every backend.

"Reads nothing" is measured as the bytes this process read (`rchar` in /proc/self/io, every
thread included), against a file of several MiB that a re-hash would read whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

from cli.cache import BlobCache, Stamp
from cli.client import PARTIAL_SUFFIX, Registry
from cli.progress import NoProgress
from registry.core.schemas import VersionFileOut
from tests.conftest import RunningServer, copy_adapter, unique_name
from tests.support.files import tree_digest

BIG = "big.safetensors.txt"
BIG_SIZE = 8 * 1024 * 1024
MiB = 1024 * 1024


def bytes_read() -> int:
    """Bytes this process has read so far through read-like system calls (all threads)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@contextmanager
def counting() -> Iterator[list[int]]:
    """Yields a list that holds, after the block, the bytes read inside it."""
    box: list[int] = []
    before = bytes_read()
    yield box
    box.append(bytes_read() - before)


@contextmanager
def writable(path: Path) -> Iterator[None]:
    """Let the test write a read-only file (needed when not root), then restore its mode, so
    only the write itself can give the change away."""
    mode = path.stat().st_mode
    path.chmod(0o644)
    yield
    path.chmod(mode & 0o7777)


@pytest.fixture
def pushed(client: Registry, adapter_dir: Callable[..., Path], tmp_path: Path) -> tuple[str, Path]:
    """(name, folder) of a pushed version with a big file besides the adapter's."""
    folder = copy_adapter(adapter_dir("llama"), tmp_path / "adapter")
    (folder / BIG).write_bytes(os.urandom(BIG_SIZE))
    name = unique_name()
    client.push(folder, name)
    return name, folder


def big_file(client: Registry, name: str) -> VersionFileOut:
    return next(f for f in client.get(name).files or [] if f.path == BIG)


def cached_blob(client: Registry, sha256: str) -> Path:
    """Where the cache keeps a blob (the documented layout)."""
    return client.cache_dir / "blobs" / "sha256" / sha256[:2] / sha256


def blob(client: Registry, name: str) -> Path:
    return cached_blob(client, big_file(client, name).sha256)


def test_a_warm_pull_reads_no_cached_byte_and_links_the_read_only_blobs(
    client: Registry, pushed: tuple[str, Path], tmp_path: Path
) -> None:
    name, folder = pushed
    cold = client.pull(name, tmp_path / "a")
    with counting() as read:
        warm = client.pull(name, tmp_path / "b")
    assert cold.downloaded_bytes == cold.version.size
    assert warm.downloaded_bytes == 0 and warm.cached_bytes == warm.version.size
    assert read[0] < MiB, f"a warm pull read {read[0]} bytes"
    assert tree_digest(tmp_path / "b") == tree_digest(folder)
    for file in warm.version.files or []:
        pulled = (tmp_path / "b" / file.path).stat()
        cached = cached_blob(client, file.sha256).stat()
        assert cached.st_mode & 0o777 == 0o444
        if (pulled.st_dev, pulled.st_ino) == (cached.st_dev, cached.st_ino):
            continue  # a hard link (ext4, tmpfs...): the read-only blob itself
        assert pulled.st_nlink == 1  # a reflink (btrfs, XFS...), a file of its own


def test_a_cached_blob_edited_in_place_with_its_size_kept_is_fetched_again(
    client: Registry, pushed: tuple[str, Path], tmp_path: Path
) -> None:
    name, folder = pushed
    client.pull(name, tmp_path / "a")
    cached = blob(client, name)
    with writable(cached), open(cached, "r+b") as handle:  # at once: within the same clock tick
        handle.seek(BIG_SIZE // 2)
        handle.write(b"edited")
    repaired = client.pull(name, tmp_path / "b")
    assert repaired.downloaded_bytes == BIG_SIZE
    assert tree_digest(tmp_path / "b") == tree_digest(folder)
    assert tree_digest(cached.parent)[cached.name] == cached.name


def test_a_truncated_cached_blob_is_fetched_again(
    client: Registry, pushed: tuple[str, Path], tmp_path: Path
) -> None:
    name, folder = pushed
    client.pull(name, tmp_path / "a")
    cached = blob(client, name)
    with writable(cached):
        os.truncate(cached, BIG_SIZE // 3)
    repaired = client.pull(name, tmp_path / "b")
    assert repaired.downloaded_bytes == BIG_SIZE
    assert tree_digest(tmp_path / "b") == tree_digest(folder)


def test_a_cached_blob_replaced_by_other_bytes_with_its_size_mode_and_mtime_is_fetched_again(
    client: Registry, pushed: tuple[str, Path], tmp_path: Path
) -> None:
    name, folder = pushed
    client.pull(name, tmp_path / "a")
    cached = blob(client, name)
    impostor = tmp_path / "impostor"
    impostor.write_bytes(os.urandom(BIG_SIZE))
    impostor.chmod(0o444)
    before = cached.stat()
    os.utime(impostor, ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(impostor, cached)  # only the inode differs now
    repaired = client.pull(name, tmp_path / "b")
    assert repaired.downloaded_bytes == BIG_SIZE
    assert tree_digest(tmp_path / "b") == tree_digest(folder)


def test_a_cached_blob_replaced_by_the_same_bytes_is_hashed_once_then_trusted_again(
    client: Registry, pushed: tuple[str, Path], tmp_path: Path
) -> None:
    name, folder = pushed
    client.pull(name, tmp_path / "a")
    cached = blob(client, name)
    copy = tmp_path / "copy"
    shutil.copyfile(cached, copy)
    os.replace(copy, cached)
    with counting() as rehashed:
        again = client.pull(name, tmp_path / "b")
    with counting() as trusted:
        client.pull(name, tmp_path / "c")
    assert again.downloaded_bytes == 0
    assert rehashed[0] >= BIG_SIZE > MiB > trusted[0]
    assert cached.stat().st_mode & 0o777 == 0o444
    assert tree_digest(tmp_path / "c") == tree_digest(folder)


def test_a_cache_without_stamps_is_verified_on_first_use_then_trusted(
    client: Registry, pushed: tuple[str, Path], tmp_path: Path
) -> None:
    """A cache an older client filled: writable blobs, no stamps."""
    name, folder = pushed
    client.pull(name, tmp_path / "a")
    shutil.rmtree(client.cache_dir / "stamps", ignore_errors=True)
    for path in (client.cache_dir / "blobs").rglob("*"):
        if path.is_file():
            path.chmod(0o644)
    with counting() as first:
        verified = client.pull(name, tmp_path / "b")
    with counting() as second:
        client.pull(name, tmp_path / "c")
    assert verified.downloaded_bytes == 0
    assert first[0] >= BIG_SIZE > MiB > second[0]
    assert tree_digest(tmp_path / "c") == tree_digest(folder)


def test_an_edit_through_a_hard_linked_pulled_file_is_caught_by_the_next_pull(
    client: Registry, pushed: tuple[str, Path], tmp_path: Path
) -> None:
    name, folder = pushed
    client.pull(name, tmp_path / "a")
    pulled = tmp_path / "a" / BIG
    linked = pulled.stat().st_ino == blob(client, name).stat().st_ino  # else a reflink
    with writable(pulled), open(pulled, "r+b") as handle:  # the cache's inode, when linked
        handle.write(b"edited")
    again = client.pull(name, tmp_path / "b")
    assert again.downloaded_bytes == (BIG_SIZE if linked else 0)
    assert tree_digest(tmp_path / "b") == tree_digest(folder)


def test_without_hard_links_pulled_files_are_copies_of_their_own(
    server: RunningServer, pushed: tuple[str, Path], tmp_path: Path
) -> None:
    name, folder = pushed
    cache = tmp_path / "cache"
    env = {"LORA_REG_CACHE_DIR": str(cache), "LORA_REG_PULL_HARDLINKS": "0"}
    out = tmp_path / "copies"
    pulled = server.cli("pull", name, "-o", str(out), "--json", env=env)
    assert pulled.returncode == 0, pulled.stderr
    assert tree_digest(out) == tree_digest(folder)
    with Registry(server.url, server.token, cache_dir=cache) as registry:
        cached = blob(registry, name)
        copy = out / BIG
        assert copy.stat().st_ino != cached.stat().st_ino and copy.stat().st_nlink == 1
        copy.write_bytes(b"mine now")  # writable, and the cache does not see it
        with counting() as read:
            warm = registry.pull(name, tmp_path / "linked")  # hard links again
    assert warm.downloaded_bytes == 0 and read[0] < MiB


def test_pulled_onto_another_file_system_files_are_copies(
    client: Registry, pushed: tuple[str, Path]
) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == client.cache_dir.parent.stat().st_dev:
        pytest.skip("no second file system at /dev/shm")
    name, folder = pushed
    out = shm / f"lora-reg-test-{os.getpid()}-{name.replace('/', '-')}"
    try:
        cold = client.pull(name, out)
        warm = client.pull(name, out)  # copied from the cache again over the same files
        assert cold.downloaded_bytes == cold.version.size and warm.downloaded_bytes == 0
        assert tree_digest(out) == tree_digest(folder)
        copy, cached = (out / BIG).stat(), blob(client, name).stat()
        assert copy.st_nlink == 1 and cached.st_nlink == 1 and copy.st_mode & 0o200
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _pull(url: str, token: str | None, cache: str, name: str, out: str) -> tuple[int, int]:
    with Registry(url, token, cache_dir=cache) as registry:
        result = registry.pull(name, out)
    return result.downloaded_bytes, result.cached_bytes


def test_processes_sharing_a_cache_pull_cold_and_warm_at_once(
    server: RunningServer, pushed: tuple[str, Path], tmp_path: Path
) -> None:
    name, folder = pushed
    cache = tmp_path / "shared"
    with ProcessPoolExecutor(4) as pool:
        for round_ in ("cold", "warm"):
            outs = [tmp_path / f"{round_}-{index}" for index in range(4)]
            futures = [
                pool.submit(_pull, server.url, server.token, str(cache), name, str(out))
                for out in outs
            ]
            results = [future.result() for future in futures]
            assert len({sum(result) for result in results}) == 1  # every file, once
            if round_ == "warm":
                assert all(downloaded == 0 for downloaded, _ in results)
            for out in outs:
                assert tree_digest(out) == tree_digest(folder)
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(PARTIAL_SUFFIX)]


# --- several processes on one cache: what keeps their stamps valid -------------------------------


def _filled(cache: BlobCache, data: bytes) -> tuple[str, Stamp]:
    """Download `data` into `cache` as a pull does; the blob's digest and stamp."""
    sha256 = hashlib.sha256(data).hexdigest()
    with cache.fill(sha256, len(data), "blob") as writer:
        writer.write(data)
    assert writer.stamp is not None
    return sha256, writer.stamp


def test_hashing_a_blob_sealed_before_leaves_it_as_it_was(tmp_path: Path) -> None:
    """A process without a valid stamp hashes the blob: it must not seal it again, which would
    move its mtime and make every other process's stamp of it stale."""
    cache = BlobCache(tmp_path / "cache")
    data = os.urandom(4096)
    sha256, stamp = _filled(cache, data)
    cache.stamp_path(sha256).unlink()
    assert cache.place(sha256, len(data), tmp_path / "out", NoProgress())
    assert Stamp.of(os.lstat(cache.blob(sha256))) == stamp
    assert json.loads(cache.stamp_path(sha256).read_text())["mtime_ns"] == stamp.mtime_ns
    assert (tmp_path / "out").read_bytes() == data


def test_a_download_that_finishes_second_keeps_the_blob_already_verified(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path / "cache")
    data = os.urandom(4096)
    sha256, first = _filled(cache, data)
    _, second = _filled(cache, data)  # another process's download of the same blob
    assert second == first
    assert Stamp.of(os.lstat(cache.blob(sha256))) == first
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(PARTIAL_SUFFIX)]


def test_a_download_still_replaces_a_damaged_blob(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path / "cache")
    data = os.urandom(4096)
    sha256, first = _filled(cache, data)
    damaged = cache.blob(sha256)
    damaged.chmod(0o644)
    damaged.write_bytes(b"x" * len(data))
    _, second = _filled(cache, data)
    assert second != first
    assert damaged.read_bytes() == data
