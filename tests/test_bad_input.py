"""Bad input: every rejection has a stable code, a message that says what to do, and stores nothing.

Most cases go through the raw HTTP protocol so the server's own checks are tested, not only the
client's early ones (which are tested separately at the end).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from cli.client import Registry
from registry.core.errors import InvalidLoraTensors, PickleRefused, RegistryError
from tests.conftest import RunningServer, copy_adapter, unique_name


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def adapter_files(source: Path) -> dict[str, bytes]:
    return {
        p.relative_to(source).as_posix(): p.read_bytes() for p in source.rglob("*") if p.is_file()
    }


def safetensors_bytes(tensors: dict[str, dict[str, Any]], data: bytes, pad: bool = True) -> bytes:
    header = json.dumps(tensors).encode()
    if pad:
        header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + data


def raw_push(
    server: RunningServer, name: str, files: dict[str, bytes], **commit: Any
) -> httpx.Response:
    """Upload whatever the server says is missing, then commit; returns the last response."""
    manifest = [{"path": p, "size": len(b), "sha256": sha(b)} for p, b in files.items()]
    by_sha = {sha(b): b for b in files.values()}
    with httpx.Client(base_url=server.url, timeout=60) as http:
        plan = http.post(f"/api/v1/adapters/{name}/uploads", json={"files": manifest})
        if plan.status_code != 200:
            return plan
        for item in plan.json()["missing"]:
            assert item["kind"] == "single"
            target = http if item["url"].startswith("/") else httpx
            sent = target.put(item["url"], content=by_sha[item["sha256"]], headers=item["headers"])
            assert sent.status_code < 300, sent.text
        return http.post(f"/api/v1/adapters/{name}/versions", json={"files": manifest, **commit})


def assert_refused(response: httpx.Response, status: int, code: str, *words: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["code"] == code, body
    assert body["status"] == status
    for word in words:
        assert word in body["detail"], body["detail"]


def assert_nothing_stored(server: RunningServer, name: str) -> None:
    assert httpx.get(f"{server.url}/api/v1/adapters/{name}").json()["code"] == "adapter_not_found"


@pytest.fixture
def good(adapter_dir) -> dict[str, bytes]:
    return adapter_files(adapter_dir("llama"))


def weights_with(tensors: dict[str, tuple[str, list[int]]]) -> bytes:
    header, offset = {}, 0
    for key, (dtype, shape) in tensors.items():
        size = 4
        for dim in shape:
            size *= dim
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    return safetensors_bytes(header, b"\0" * offset)


P = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    ("change", "code", "words"),
    [
        (
            lambda f: f.pop("adapter_config.json"),
            "missing_file",
            ["adapter_config.json", "save_pretrained"],
        ),
        (
            lambda f: f.pop("adapter_model.safetensors"),
            "missing_file",
            ["adapter_model.safetensors"],
        ),
        (
            lambda f: f.update({"adapter_config.json": b"{not json"}),
            "invalid_adapter_config",
            ["not valid JSON"],
        ),
        (
            lambda f: f.update({"adapter_config.json": b'{"r": 8}'}),
            "invalid_adapter_config",
            ["peft_type"],
        ),
        (
            lambda f: f.update({"adapter_config.json": json.dumps({"peft_type": "IA3"}).encode()}),
            "unsupported_peft_type",
            ["IA3", "LORA"],
        ),
        (
            lambda f: f.update({"training_args.bin": b"\x80\x04pickle"}),
            "pickle_refused",
            ["training_args.bin", "safetensors", "--exclude"],
        ),
        (lambda f: f.update({"model.pt": b"x"}), "pickle_refused", ["model.pt"]),
        (lambda f: f.update({"w.pth": b"x"}), "pickle_refused", ["w.pth"]),
        (lambda f: f.update({"x.pkl": b"x"}), "pickle_refused", ["x.pkl"]),
    ],
    ids=[
        "no-config",
        "no-weights",
        "config-not-json",
        "no-peft-type",
        "not-lora",
        "bin",
        "pt",
        "pth",
        "pkl",
    ],
)
def test_bad_adapter_folders_are_refused(server: RunningServer, good, change, code, words) -> None:
    name = unique_name()
    files = dict(good)
    change(files)
    assert_refused(raw_push(server, name, files), 422, code, *words)
    assert_nothing_stored(server, name)


@pytest.mark.parametrize(
    ("weights", "words"),
    [
        (b"\x01\x02\x03", ["too short"]),
        (struct.pack("<Q", 30_000_000) + b"{}", ["larger than"]),
        (struct.pack("<Q", 500) + b"{}", ["past the end"]),
        (safetensors_bytes({}, b"", pad=False)[:8] + b"not json", ["not UTF-8 JSON"]),
        (
            safetensors_bytes(
                {f"{P}.lora_A.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}},
                b"\0" * 32,
            ),
            ["outside"],
        ),
        (
            safetensors_bytes(
                {
                    f"{P}.lora_A.weight": {
                        "dtype": "F32",
                        "shape": [2, 2],
                        "data_offsets": [0, 16],
                    },
                    f"{P}.lora_B.weight": {
                        "dtype": "F32",
                        "shape": [2, 2],
                        "data_offsets": [8, 24],
                    },
                },
                b"\0" * 24,
            ),
            ["overlaps"],
        ),
        (
            safetensors_bytes(
                {
                    f"{P}.lora_A.weight": {
                        "dtype": "F32",
                        "shape": [2, 2],
                        "data_offsets": [0, 16],
                    },
                    f"{P}.lora_B.weight": {
                        "dtype": "F32",
                        "shape": [2, 2],
                        "data_offsets": [24, 40],
                    },
                },
                b"\0" * 40,
            ),
            ["gap"],
        ),
        (
            safetensors_bytes(
                {f"{P}.lora_A.weight": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 1]}}, b"\0"
            ),
            ["unknown dtype", "Q4"],
        ),
    ],
    ids=[
        "short",
        "header-too-large",
        "header-past-eof",
        "not-json",
        "outside-file",
        "overlap",
        "gap",
        "dtype",
    ],
)
def test_malformed_safetensors_is_refused(
    server: RunningServer, good, weights: bytes, words
) -> None:
    name = unique_name()
    files = {**good, "adapter_model.safetensors": weights}
    assert_refused(raw_push(server, name, files), 422, "invalid_safetensors", *words)
    assert_nothing_stored(server, name)


def test_lora_pairs_with_different_ranks_are_refused(server: RunningServer, good) -> None:
    name = unique_name()
    weights = weights_with(
        {f"{P}.lora_A.weight": ("F32", [4, 64]), f"{P}.lora_B.weight": ("F32", [64, 8])}
    )
    response = raw_push(server, name, {**good, "adapter_model.safetensors": weights})
    assert_refused(response, 422, "invalid_lora_tensors", "q_proj", "rank 4", "rank 8")
    assert_nothing_stored(server, name)


@pytest.mark.parametrize(
    "path",
    [
        "../escape.json",
        "/etc/passwd",
        "C:/x.json",
        "dir\\file.json",
        "nul\x00byte",
        "a/" * 130 + "x",
        "a//b",
        "./a",
    ],
    ids=["dotdot", "absolute", "drive", "backslash", "nul", "too-long", "double-slash", "dot"],
)
def test_bad_manifest_paths_are_refused(server: RunningServer, good, path: str) -> None:
    name = unique_name()
    files = [{"path": p, "size": len(b), "sha256": sha(b)} for p, b in good.items()]
    files.append({"path": path, "size": 1, "sha256": sha(b"x")})
    for step in ("uploads", "versions"):
        response = httpx.post(f"{server.url}/api/v1/adapters/{name}/{step}", json={"files": files})
        assert_refused(response, 422, "invalid_path")
    assert_nothing_stored(server, name)


def test_more_than_1000_files_are_refused(server: RunningServer, good) -> None:
    files = [{"path": p, "size": len(b), "sha256": sha(b)} for p, b in good.items()]
    files += [
        {"path": f"extra/{i}.txt", "size": 1, "sha256": sha(str(i).encode())} for i in range(1000)
    ]
    response = httpx.post(
        f"{server.url}/api/v1/adapters/{unique_name()}/uploads", json={"files": files}
    )
    assert_refused(response, 422, "too_many_files", "1000")


def test_versions_over_the_default_20_gib_limit_are_refused(server: RunningServer, good) -> None:
    files = [{"path": p, "size": len(b), "sha256": sha(b)} for p, b in good.items()]
    files.append({"path": "huge.safetensors", "size": 21 * 1024**3, "sha256": "ab" * 32})
    response = httpx.post(
        f"{server.url}/api/v1/adapters/{unique_name()}/uploads", json={"files": files}
    )
    assert_refused(response, 413, "version_too_large", "LORA_REG_MAX_VERSION_BYTES")


def test_the_version_size_limit_is_configurable(tmp_path: Path, good, monkeypatch) -> None:
    from registry.app import create_app
    from registry.db import upgrade
    from registry.settings import Settings

    settings = Settings(
        database_url=f"sqlite:///{tmp_path}/r.db",
        storage_url=f"file://{tmp_path}/objects",
        max_version_bytes=1000,
        auth=False,
    )
    upgrade(settings)
    files = [{"path": p, "size": len(b), "sha256": sha(b)} for p, b in good.items()]
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as http:
        response = http.post("/api/v1/adapters/a/b/uploads", json={"files": files})
    assert response.status_code == 413 and response.json()["code"] == "version_too_large"
    assert "1000 bytes" in response.json()["detail"]


@pytest.mark.parametrize("name", ["Upper/case", "a/b/c", "-x/y", "ns/" + "n" * 65, "ns/bad name"])
def test_bad_adapter_names_are_refused(server: RunningServer, good, name: str) -> None:
    files = [{"path": p, "size": len(b), "sha256": sha(b)} for p, b in good.items()]
    response = httpx.post(f"{server.url}/api/v1/adapters/{name}/uploads", json={"files": files})
    assert response.status_code in (404, 422), response.text
    if response.status_code == 422:
        assert response.json()["code"] == "invalid_name"


def test_client_refuses_bad_names_before_sending_anything(tmp_path: Path, adapter_dir) -> None:
    registry = Registry("http://127.0.0.1:9")  # nothing listens: proves no request is made
    with pytest.raises(RegistryError) as caught:
        registry.push(adapter_dir("llama"), "Team/Summarizer")
    assert caught.value.code == "invalid_name"


def test_uploaded_bytes_must_match_their_digest(server: RunningServer, good) -> None:
    name = unique_name()
    # Blobs are shared server-wide: a fresh file guarantees one blob is missing.
    files = {**good, "notes.txt": os.urandom(256)}
    manifest = [{"path": p, "size": len(b), "sha256": sha(b)} for p, b in files.items()]
    with httpx.Client(base_url=server.url, timeout=30) as http:
        plan = http.post(f"/api/v1/adapters/{name}/uploads", json={"files": manifest}).json()
        # Other blobs may be missing too when this test runs alone; pick the fresh one.
        (item,) = [i for i in plan["missing"] if i["sha256"] == sha(files["notes.txt"])]
        liar = b"x" * item["size"]
        if item["url"].startswith("/"):
            response = http.put(item["url"], content=liar)
            assert_refused(response, 400, "checksum_mismatch", "does not match")
        else:  # presigned S3 PUT signed with the sha256: the store itself refuses the bytes
            response = httpx.put(item["url"], content=liar, headers=item["headers"])
            assert response.status_code == 400 and "BadDigest" in response.text
        commit = http.post(f"/api/v1/adapters/{name}/versions", json={"files": manifest})
        assert_refused(commit, 422, "blob_missing", "not uploaded")
        again = http.post(f"/api/v1/adapters/{name}/uploads", json={"files": manifest}).json()
        assert item["sha256"] in {i["sha256"] for i in again["missing"]}
    assert_nothing_stored(server, name)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "high", True, None])
def test_metrics_must_be_finite_numbers(server: RunningServer, good, value) -> None:
    name = unique_name()
    response = raw_push(server, name, good, metrics={"rougeL": value})
    assert_refused(response, 422, "invalid_metric", "rougeL")
    assert_nothing_stored(server, name)


def test_client_refuses_pickle_before_uploading_and_exclude_skips_it(
    client: Registry, adapter_dir, tmp_path: Path
) -> None:
    folder = copy_adapter(adapter_dir("llama"), tmp_path / "with-pickle")
    (folder / "training_args.bin").write_bytes(b"\x80\x04")
    name = unique_name()
    with pytest.raises(PickleRefused):
        client.push(folder, name)
    result = client.push(folder, name, exclude=("training_args.bin",))
    assert result.created
    assert "training_args.bin" not in {f.path for f in result.version.files or []}


def test_client_refuses_mismatched_ranks_before_uploading(tmp_path: Path, adapter_dir) -> None:
    folder = copy_adapter(adapter_dir("llama"), tmp_path / "bad")
    (folder / "adapter_model.safetensors").write_bytes(
        weights_with(
            {f"{P}.lora_A.weight": ("F32", [4, 64]), f"{P}.lora_B.weight": ("F32", [64, 2])}
        )
    )
    with pytest.raises(InvalidLoraTensors):
        Registry("http://127.0.0.1:9").push(folder, unique_name())


def test_an_oversized_adapter_config_is_refused_without_reading_it(
    server: RunningServer, good
) -> None:
    name = unique_name()
    files = {**good, "adapter_config.json": b"{" + b" " * (2 * 1024 * 1024) + b"}"}
    assert_refused(raw_push(server, name, files), 422, "invalid_adapter_config", "larger than")
    assert_nothing_stored(server, name)


def test_config_strings_too_long_to_index_are_refused_with_a_hint(
    server: RunningServer, good
) -> None:
    name = unique_name()
    config = json.loads(good["adapter_config.json"])
    config["base_model_name_or_path"] = "/very/long/local/path/" + "x" * 300
    files = {**good, "adapter_config.json": json.dumps(config).encode()}
    response = raw_push(server, name, files)
    assert_refused(response, 422, "invalid_adapter_config", "base_model_name_or_path", "local path")
    assert_nothing_stored(server, name)


def test_a_file_that_is_also_a_folder_is_refused(server: RunningServer, good) -> None:
    files = [{"path": p, "size": len(b), "sha256": sha(b)} for p, b in good.items()]
    files.append({"path": "adapter_config.json/inner.txt", "size": 1, "sha256": sha(b"x")})
    response = httpx.post(
        f"{server.url}/api/v1/adapters/{unique_name()}/uploads", json={"files": files}
    )
    assert_refused(response, 422, "invalid_path", "both a file and a folder")


def test_huge_version_numbers_are_invalid_references_not_errors(server: RunningServer) -> None:
    response = httpx.get(f"{server.url}/api/v1/adapters/a/b/versions/9223372036854775808")
    assert_refused(response, 422, "invalid_reference")


def test_blob_uploads_larger_than_the_version_limit_are_refused_up_front(
    server: RunningServer,
) -> None:
    """Announce 21 GiB and send nothing: the refusal must come before any byte is read."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        connection.sendall(
            f"PUT /api/v1/blobs/sha256:{'ab' * 32} HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Length: {21 * 1024**3}\r\n\r\n".encode()
        )
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = connection.recv(65536)
            if not chunk:
                break
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), head
    problem = json.loads(body)
    assert problem["code"] == "version_too_large"
    assert "LORA_REG_MAX_VERSION_BYTES" in problem["detail"]


def test_multipart_completion_on_the_folder_store_is_a_clear_error(tmp_path: Path) -> None:
    from registry.app import create_app
    from registry.db import upgrade
    from registry.settings import Settings

    settings = Settings(
        database_url=f"sqlite:///{tmp_path}/r.db",
        storage_url=f"file://{tmp_path}/objects",
        auth=False,
    )
    upgrade(settings)
    body = {"upload_id": "x", "key": "uploads/x", "size": 1, "parts": []}
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as http:
        response = http.post(f"/api/v1/blobs/sha256:{'ab' * 32}/multipart", json=body)
    assert response.status_code == 400 and response.json()["code"] == "upload_mode"
