"""The client trusts no server: a reply that does not describe what was asked for is refused
before a byte is written, and nothing can be written outside the output folder."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from cli.client import Registry
from registry.core.errors import ChecksumMismatch, InvalidPath
from registry.core.manifest import FileEntry, manifest_digest

CONFIG = b'{"peft_type": "LORA"}'


def version_reply(files: list[dict[str, Any]], **overrides: Any) -> dict[str, Any]:
    entries = [FileEntry(f["path"], f["size"], f["sha256"]) for f in files]
    reply = {
        "adapter": "team/a",
        "number": 1,
        "digest": manifest_digest(entries),
        "base_model_id": None,
        "base_model_revision": None,
        "peft_type": "LORA",
        "task_type": None,
        "r": 4,
        "lora_alpha": 8,
        "target_modules": None,
        "use_dora": False,
        "use_rslora": False,
        "adapter_config": {},
        "metrics": {},
        "labels": {},
        "lineage": {},
        "description": None,
        "size": sum(f["size"] for f in files),
        "file_count": len(files),
        "created_at": "2026-11-22T00:00:00Z",
        "created_by": None,
        "files": files,
    }
    reply.update(overrides)
    return reply


def hostile_registry(reply: dict[str, Any], tmp_path: Path) -> Registry:
    """A client whose server answers `reply` to the version lookup and CONFIG to any blob."""

    def answer(request: httpx.Request) -> httpx.Response:
        if "/versions/" in request.url.path:
            return httpx.Response(200, content=json.dumps(reply).encode())
        return httpx.Response(200, content=CONFIG)

    registry = Registry("http://hostile.invalid", cache_dir=tmp_path / "cache")
    registry.http = httpx.Client(
        base_url=registry.url, transport=httpx.MockTransport(answer), follow_redirects=True
    )
    return registry


def blob_file(path: str) -> dict[str, Any]:
    sha = hashlib.sha256(CONFIG).hexdigest()
    return {"path": path, "size": len(CONFIG), "sha256": sha, "url": f"/api/v1/blobs/sha256:{sha}"}


@pytest.mark.parametrize("path", ["../escaped.json", "/tmp/escaped.json", "a/../../escaped.json"])
def test_paths_escaping_the_output_folder_are_refused(tmp_path: Path, path: str) -> None:
    registry = hostile_registry(version_reply([blob_file(path)]), tmp_path)
    with pytest.raises(InvalidPath):
        registry.pull("team/a@1", tmp_path / "out" / "inner")
    assert not (tmp_path / "out" / "escaped.json").exists()
    assert not (tmp_path / "escaped.json").exists()


def test_a_digest_that_is_not_a_hash_cannot_reach_the_cache_paths(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    file = {**blob_file("adapter_config.json"), "sha256": "../../../victim.txt"}
    registry = hostile_registry(version_reply([file]), tmp_path)
    with pytest.raises(InvalidPath):
        registry.pull("team/a@1", tmp_path / "out")
    assert victim.read_text() == "keep me"


@pytest.mark.parametrize(
    ("ref", "overrides"),
    [
        ("team/a@1", {"digest": "sha256:" + "0" * 64}),
        ("team/a@1", {"adapter": "other/b"}),
        ("team/a@1", {"number": 2}),
        ("team/a@sha256:" + "1" * 64, {}),
    ],
    ids=["digest-not-of-files", "other-adapter", "other-number", "other-digest"],
)
def test_replies_that_do_not_match_the_request_are_refused(
    tmp_path: Path, ref: str, overrides: dict[str, Any]
) -> None:
    registry = hostile_registry(
        version_reply([blob_file("adapter_config.json")], **overrides), tmp_path
    )
    with pytest.raises(ChecksumMismatch):
        registry.pull(ref, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_honest_reply_is_written(tmp_path: Path) -> None:
    registry = hostile_registry(version_reply([blob_file("adapter_config.json")]), tmp_path)
    result = registry.pull("team/a@1", tmp_path / "out")
    assert (tmp_path / "out" / "adapter_config.json").read_bytes() == CONFIG
    assert result.downloaded_bytes == len(CONFIG)


def test_downloaded_bytes_that_do_not_hash_to_their_sha256_are_refused(tmp_path: Path) -> None:
    reply = version_reply([blob_file("adapter_config.json")])

    def answer(request: httpx.Request) -> httpx.Response:
        if "/versions/" in request.url.path:
            return httpx.Response(200, content=json.dumps(reply).encode())
        return httpx.Response(200, content=b"X" * len(CONFIG))  # right size, wrong bytes

    registry = Registry("http://hostile.invalid", cache_dir=tmp_path / "cache")
    registry.http = httpx.Client(
        base_url=registry.url, transport=httpx.MockTransport(answer), follow_redirects=True
    )
    with pytest.raises(ChecksumMismatch):
        registry.pull("team/a@1", tmp_path / "out")
    assert not (tmp_path / "out" / "adapter_config.json").exists()
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
