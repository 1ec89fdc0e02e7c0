"""Garbage collection of unreferenced blobs: what it deletes, what it keeps (the files of
versions, stored bases and merged artifacts), and that pushes running at the same time never lose
a referenced blob (SQLite + folder, PostgreSQL + S3)."""

from __future__ import annotations

import hashlib
import shutil
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx

from cli.client import Registry
from registry.core.errors import BlobMissing, RegistryError, Unavailable
from registry.core.jobs import JobResult
from registry.core.manifest import FileEntry
from registry.core.schemas import FileSpec
from tests.conftest import RunningServer, unique, unique_name


def unique_copy(source: Path, to: Path) -> Path:
    """The adapter plus a file of its own, so every copy brings a blob nobody else has."""
    shutil.copytree(source, to)
    (to / "notes.txt").write_text(uuid.uuid4().hex)
    return to


def blob_exists(server: RunningServer, sha256: str) -> bool:
    response = httpx.get(f"{server.url}/api/v1/blobs/sha256:{sha256}", follow_redirects=True)
    return response.status_code == 200 and hashlib.sha256(response.content).hexdigest() == sha256


def upload_without_commit(client: Registry, data: bytes) -> str:
    """An abandoned upload: the blob is stored and recorded, nothing ever refers to it."""
    sha = hashlib.sha256(data).hexdigest()
    files = {"files": [{"path": "config.json", "size": len(data), "sha256": sha}]}
    (item,) = client._json("POST", "/api/v1/bases/uploads", json=files)["missing"]
    target = client.http if item["url"].startswith("/") else client.raw
    assert target.request("PUT", item["url"], content=data, headers=item["headers"]).is_success
    # A direct upload to S3 is recorded when the next plan or commit adopts it.
    assert client._json("POST", "/api/v1/bases/uploads", json=files)["missing"] == []
    return sha


def test_gc_deletes_only_unreferenced_blobs(
    client: Registry,
    server: RunningServer,
    adapter_dir: Callable[..., Path],
    base_dir: Callable[..., Path],
    tmp_path: Path,
) -> None:
    kept = client.push(unique_copy(adapter_dir("llama"), tmp_path / "kept"), unique_name())
    base = client.add_base(f"{unique_name()}@v1", base_dir("bert"), upload=True).base
    orphan = upload_without_commit(client, uuid.uuid4().hex.encode())
    assert blob_exists(server, orphan)

    assert client.gc(older_than_s=3600).deleted == 0  # too recent
    absurd = httpx.post(f"{server.url}/api/v1/blobs/gc", json={"older_than_s": 10**12})
    assert absurd.status_code == 422
    dry = client.gc(older_than_s=0, dry_run=True)
    assert dry.deleted >= 1 and blob_exists(server, orphan)
    done = client.gc(older_than_s=0)
    assert done.deleted >= 1 and not blob_exists(server, orphan)
    for file in [*(kept.version.files or []), *(base.files or [])]:
        assert blob_exists(server, file.sha256), file.path
    assert client.gc(older_than_s=0).deleted == 0
    assert client.audit(action="gc").items


def merge_by_hand(client: Registry, ref: str, folder: Path) -> list[FileEntry]:
    """Play the worker for a merge of `ref` into the registry: claim the job, upload an output of
    fresh bytes (no version or base has them), finish. Returns the artifact's files."""
    job = client.request_merge(ref)
    try:
        claim = client.claim_job("gc-test-worker", device="cpu")
        # The shared servers run no worker, and nothing else leaves merges queued on them.
        assert claim is not None and claim.job.id == job.id, claim
        folder.mkdir(parents=True)
        entries = []
        for path in ("model.safetensors", "config.json"):
            data = uuid.uuid4().bytes * 64
            (folder / path).write_bytes(data)
            entries.append(FileEntry(path, len(data), hashlib.sha256(data).hexdigest()))
        client.upload_merged(job.id, folder, entries, worker="gc-test-worker")
        files = [FileSpec(path=e.path, size=e.size, sha256=e.sha256) for e in entries]
        result = JobResult(location="registry", files=files, size=sum(e.size for e in entries))
        done = client.finish_job(job.id, "gc-test-worker", "succeeded", result=result)
        assert done.status == "succeeded" and done.result and done.result.artifact, done
    finally:
        if client.job(job.id).status in ("queued", "running"):
            client.cancel_job(job.id)
    return entries


def test_gc_keeps_blobs_that_only_a_merged_artifact_references(
    client: Registry,
    server: RunningServer,
    adapter_dir: Callable[..., Path],
    base_dir: Callable[..., Path],
    tmp_path: Path,
) -> None:
    base = f"{unique('org')}/tiny@v1"
    client.add_base(base, base_dir("llama"))  # registered, not stored: it brings no blobs
    name = unique_name()
    client.push(adapter_dir("llama"), name, base=base)
    merged = merge_by_hand(client, f"{name}@1", tmp_path / "merged")
    orphan = upload_without_commit(client, uuid.uuid4().hex.encode())

    done = client.gc(older_than_s=0)
    assert done.deleted >= 1 and not blob_exists(server, orphan)  # gc did collect
    for entry in merged:
        assert blob_exists(server, entry.sha256), entry.path


def test_gc_during_pushes_loses_no_referenced_blob(
    client: Registry,
    server: RunningServer,
    adapter_dir: Callable[..., Path],
    tmp_path: Path,
) -> None:
    source = adapter_dir("gpt2")
    folders = [unique_copy(source, tmp_path / f"a{i}") for i in range(8)]
    name = unique_name()
    errors: list[BaseException] = []
    stop = threading.Event()

    def push(folder: Path) -> None:
        with Registry(server.url, cache_dir=tmp_path / "c") as own:
            for _ in range(20):  # a push whose fresh blobs gc took uploads them again
                try:
                    own.push(folder, name)
                    return
                except (BlobMissing, Unavailable):  # what a client retries
                    continue
                except RegistryError as exc:
                    errors.append(exc)
                    return

    def collect() -> None:
        # No grace period (older_than 0): every unreferenced blob is fair game at once.
        with Registry(server.url) as own:
            while not stop.is_set():
                own.gc(older_than_s=0)
                stop.wait(0.02)

    collector = threading.Thread(target=collect)
    collector.start()
    pushers = [threading.Thread(target=push, args=(f,)) for f in folders]
    for thread in pushers:
        thread.start()
    for thread in pushers:
        thread.join()
    stop.set()
    collector.join()
    assert errors == []
    versions = client.versions(name, limit=50).items
    assert versions  # pushes got through while gc ran
    for version in versions:
        for file in client.get(f"{name}@{version.number}").files or []:
            assert blob_exists(server, file.sha256), (version.number, file.path)
