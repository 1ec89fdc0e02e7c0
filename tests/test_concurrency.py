"""Concurrent pushes on SQLite and PostgreSQL: versions 1..n without gaps, none lost or doubled."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from cli.client import PushResult, Registry
from tests.conftest import RunningServer, copy_adapter, unique_name


def variants(source: Path, root: Path, count: int) -> list[Path]:
    """`count` adapters with different content (the same weights, a different model card)."""
    folders = []
    for index in range(count):
        folder = copy_adapter(source, root / f"v{index}")
        (folder / "README.md").write_text(f"variant {index} of {root.name}\n")
        folders.append(folder)
    return folders


def push_all(
    server: RunningServer, tmp_path: Path, name: str, folders: list[Path]
) -> list[PushResult]:
    def push(folder: Path) -> PushResult:
        with Registry(server.url, cache_dir=tmp_path / "cache") as client:
            return client.push(folder, name)

    with ThreadPoolExecutor(len(folders)) as pool:
        return list(pool.map(push, folders))


def test_sixteen_concurrent_pushes_get_versions_one_to_sixteen(
    server: RunningServer, client: Registry, adapter_dir, tmp_path: Path
) -> None:
    name = unique_name()
    folders = variants(adapter_dir("llama"), tmp_path, 16)
    results = push_all(server, tmp_path, name, folders)

    assert all(result.created for result in results)
    assert sorted(result.version.number for result in results) == list(range(1, 17))
    listed = client.versions(name, sort="number", limit=100)
    assert [v.number for v in listed.items] == list(range(1, 17))
    assert {v.digest for v in listed.items} == {r.version.digest for r in results}
    assert len({v.digest for v in listed.items}) == 16


def test_concurrent_pushes_of_identical_content_give_one_version(
    server: RunningServer, client: Registry, adapter_dir, tmp_path: Path
) -> None:
    name = unique_name()
    (folder,) = variants(adapter_dir("llama"), tmp_path, 1)
    results = push_all(server, tmp_path, name, [folder, folder])

    assert sorted(result.created for result in results) == [False, True]
    assert {result.version.number for result in results} == {1}
    assert client.versions(name).total == 1


def test_reads_are_answered_while_an_upload_is_in_flight(server: RunningServer) -> None:
    """A slow client uploading through the API holds no database lock that readers wait for.

    The upload sends half its bytes, then waits until a listing has been answered; if the listing
    queued behind the upload, neither could finish and the listing would time out.
    """
    data = os.urandom(4 * 1024 * 1024)
    digest = hashlib.sha256(data).hexdigest()
    listed = threading.Event()

    def body() -> Iterator[bytes]:
        yield data[: len(data) // 2]
        assert listed.wait(60)
        yield data[len(data) // 2 :]

    def upload() -> int:
        response = httpx.put(
            f"{server.url}/api/v1/blobs/sha256:{digest}",
            content=body(),
            headers={"Content-Length": str(len(data))},
            timeout=90,
        )
        return response.status_code

    with ThreadPoolExecutor(1) as pool:
        uploading = pool.submit(upload)
        try:
            listing = httpx.get(f"{server.url}/api/v1/adapters", params={"limit": 1}, timeout=20)
            version = httpx.get(f"{server.url}/api/v1/adapters/a/b/versions/1", timeout=20)
        finally:
            listed.set()
        assert listing.status_code == 200
        assert version.status_code == 404
        assert uploading.result() == 204
