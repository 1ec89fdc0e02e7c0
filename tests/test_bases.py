"""Base models and compatibility end to end: `lora-reg base`, `lora-reg check`, reports on push.

Runs the real CLI and client against real servers (SQLite + folder store, PostgreSQL +
SeaweedFS) with real PEFT adapters and tiny transformers bases.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from cli.client import Registry
from registry.core.errors import BaseNotFound, Conflict, Incompatible, InvalidBase
from tests.conftest import (
    RunningServer,
    run_cli,
    start_server,
    stop_server,
    unique,
    unique_name,
)
from tests.support.seaweed import s3_client


def unique_base(server_rev: str = "v1") -> str:
    return f"{unique('org')}/tiny@{server_rev}"


def test_base_add_records_the_signature_read_from_headers(
    server: RunningServer, base_dir: Callable[..., Path], tmp_path: Path
) -> None:
    base = unique_base()
    source = base_dir("llama", max_shard_size="40KB")
    added = server.cli("base", "add", base, "--from", str(source), "--json")
    assert added.returncode == 0, added.stderr
    body = json.loads(added.stdout)
    assert body["base"]["created"] is True
    assert body["base"]["model_type"] == "llama"
    assert len(body["base"]["shards"]) >= 2
    index = json.loads((source / "model.safetensors.index.json").read_text())
    shown = json.loads(server.cli("base", "show", base, "--tensors", "--json").stdout)
    assert set(shown["tensors"]) == set(index["weight_map"])
    assert all(shown["tensors"][k]["shard"] == v for k, v in index["weight_map"].items())
    # Only config.json, the index and each shard's header were read: far less than the weights.
    weights = sum(p.stat().st_size for p in source.glob("*.safetensors"))
    assert 0 < body["bytes_read"] < weights / 4

    again = server.cli("base", "add", base, "--from", str(source), "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["base"]["created"] is False
    listed = json.loads(server.cli("base", "ls", base.split("@")[0], "--json").stdout)
    assert [item["revision"] for item in listed["items"]] == ["v1"]


def test_a_registered_revision_cannot_change(
    client: Registry, base_dir: Callable[..., Path]
) -> None:
    base = unique_base()
    client.add_base(base, base_dir("llama"))
    with pytest.raises(Conflict, match="immutable"):
        client.add_base(base, base_dir("llama", hidden_size=96))


def test_base_add_refuses_a_folder_without_weights(client: Registry, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(InvalidBase, match="no safetensors weights"):
        client.add_base(unique_base(), tmp_path)
    no_config = tmp_path / "weights-only"
    no_config.mkdir()
    (no_config / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(InvalidBase, match=r"config\.json is missing"):
        client.add_base(unique_base(), no_config)


def test_base_add_from_s3_is_read_by_the_server_with_ranged_gets(
    servers: Callable[[str], RunningServer], base_dir: Callable[..., Path]
) -> None:
    server = servers("postgres-s3")
    source = base_dir("gpt2", max_shard_size="60KB")
    s3 = s3_client(server.env["AWS_ENDPOINT_URL"])
    assert server.bucket
    prefix = f"bases/{unique()}"
    for path in source.iterdir():
        s3.upload_file(str(path), server.bucket, f"{prefix}/{path.name}")
    base = unique_base()
    added = server.cli("base", "add", base, "--from", f"s3://{server.bucket}/{prefix}", "--json")
    assert added.returncode == 0, added.stderr
    body = json.loads(added.stdout)["base"]
    assert body["source"] == f"s3://{server.bucket}/{prefix}"
    assert body["model_type"] == "gpt2" and len(body["shards"]) >= 2
    local = json.loads(server.cli("base", "show", base, "--tensors", "--json").stdout)
    from cli.bases import folder_signature

    expected = folder_signature(source).signature
    assert {k: v["shape"] for k, v in local["tensors"].items()} == {
        k: t.shape for k, t in expected.tensors.items()
    }

    missing = server.cli("base", "add", unique_base(), "--from", f"s3://{server.bucket}/nothing")
    assert missing.returncode == 6 and "invalid_base" in missing.stderr


def test_base_add_upload_stores_the_weights_content_addressed(
    server: RunningServer, base_dir: Callable[..., Path], tmp_path: Path
) -> None:
    source = base_dir("qwen2", max_shard_size="60KB")
    base = unique_base()
    added = server.cli("base", "add", base, "--from", str(source), "--upload", "--json")
    assert added.returncode == 0, added.stderr
    body = json.loads(added.stdout)
    assert body["base"]["stored"] is True and body["base"]["source"] == "registry"
    files = {f["path"]: f for f in body["base"]["files"]}
    assert set(files) == {p.name for p in source.iterdir()}
    import hashlib

    import httpx

    for path in source.iterdir():
        assert files[path.name]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    shard = next(p for p in source.glob("*.safetensors"))
    fetched = httpx.get(server.url + files[shard.name]["url"], follow_redirects=True)
    assert fetched.content == shard.read_bytes()
    # Uploading again sends nothing new.
    again = json.loads(
        server.cli("base", "add", base, "--from", str(source), "--upload", "--json").stdout
    )
    assert again["uploaded_bytes"] == 0 and again["base"]["created"] is False


def test_push_records_the_report_against_the_registered_base(
    client: Registry,
    server: RunningServer,
    adapter_dir: Callable[..., Path],
    base_dir: Callable[..., Path],
) -> None:
    base = unique_base()
    client.add_base(base, base_dir("llama"))
    name = unique_name()
    pushed = client.push(adapter_dir("llama", target_modules="all-linear"), name, base=base)
    version = pushed.version
    assert version.compat_status == "compatible" and version.compat_base == base
    stored = client.get(f"{name}@1")
    assert stored.compat_report is not None
    assert len(stored.compat_report.modules) == 14  # 7 projections x 2 layers
    assert all(row.ok and row.base_tensor for row in stored.compat_report.modules)
    # Listings stay small: the status, not the report.
    assert client.versions(name).items[0].compat_report is None

    shown = server.cli("show", f"{name}@1")
    assert "compatible with " + base in shown.stdout


def test_incompatible_pushes_are_stored_flagged_or_refused_when_required(
    client: Registry,
    server: RunningServer,
    adapter_dir: Callable[..., Path],
    base_dir: Callable[..., Path],
) -> None:
    base = unique_base()
    client.add_base(base, base_dir("llama", hidden_size=96))
    adapter = adapter_dir("llama")  # trained on hidden_size 64
    refused_name = unique_name()
    refused = server.cli("push", str(adapter), refused_name, "--base", base, "--require-compatible")
    assert refused.returncode == 8, refused.stderr
    assert "error (incompatible)" in refused.stderr and "shape_mismatch" in refused.stderr
    with pytest.raises(Incompatible) as caught:
        client.push(adapter, refused_name, base=base, require_compatible=True)
    assert caught.value.details["report"]["errors"][0]["code"] == "shape_mismatch"
    assert server.cli("versions", refused_name).returncode == 3  # nothing was stored

    flagged = unique_name()
    result = client.push(adapter, flagged, base=base)
    assert result.version.compat_status == "incompatible"
    namespace = flagged.split("/")[0]
    assert [a.name for a in client.list(namespace, compat="incompatible").items] == [flagged]
    assert client.list(namespace, compat="compatible").items == []

    unchecked = unique_name()
    client.push(adapter, unchecked, base=f"{unique('nobody')}/base")
    assert [a.name for a in client.list(unchecked.split("/")[0], compat="unchecked").items] == [
        unchecked
    ]
    with pytest.raises(BaseNotFound, match="not registered"):
        client.push(adapter, unique_name(), base=f"{unique('x')}/y", require_compatible=True)


def test_a_repush_with_require_compatible_proves_the_existing_version_or_refuses(
    client: Registry,
    server: RunningServer,
    adapter_dir: Callable[..., Path],
    base_dir: Callable[..., Path],
) -> None:
    adapter = adapter_dir("llama")  # trained on hidden_size 64
    recorded, other, wider = unique_base(), unique_base(), unique_base()
    name = unique_name()
    first = client.push(adapter, name, base=recorded)  # its base is not registered yet
    assert first.version.compat_status is None
    client.add_base(recorded, base_dir("llama"))
    client.add_base(other, base_dir("llama"))

    def repush(*args: str) -> subprocess.CompletedProcess[str]:
        return server.cli("push", str(adapter), name, "--require-compatible", *args)

    # Another base than the version's: a version never changes, so this is refused.
    moved = repush("--base", other)
    assert moved.returncode == 4 and "base never changes" in moved.stderr, moved.stderr
    assert client.get(f"{name}@1").base_model_id == recorded.split("@")[0]
    # Its own base: proven now, and the report is recorded on the version.
    proven = repush("--base", recorded)
    assert proven.returncode == 0, proven.stderr
    assert client.get(f"{name}@1").compat_status == "compatible"
    assert repush().returncode == 0  # without --base: the version's own base as well

    wide_name = unique_name()
    client.push(adapter, wide_name, base=wider)
    client.add_base(wider, base_dir("llama", hidden_size=96))
    refused = server.cli("push", str(adapter), wide_name, "--require-compatible")
    assert refused.returncode == 8 and "shape_mismatch" in refused.stderr, refused.stderr


def test_check_exit_codes_and_json_for_folders_and_references(
    server: RunningServer,
    client: Registry,
    adapter_dir: Callable[..., Path],
    base_dir: Callable[..., Path],
) -> None:
    adapter = adapter_dir("gpt2")
    good, bad = base_dir("gpt2"), base_dir("gpt2", n_embd=96)
    offline = run_cli("check", str(adapter), "--base", str(good), "--json", cwd=server.workdir)
    assert offline.returncode == 0, offline.stderr
    report = json.loads(offline.stdout)
    assert report["compatible"] is True
    assert {row["kind"] for row in report["modules"]} == {"conv1d"}
    assert report["adapter_bytes_read"] > 0 and report["base_bytes_read"] > 0

    failing = run_cli("check", str(adapter), "--base", str(bad), cwd=server.workdir)
    assert failing.returncode == 8
    assert "shape_mismatch" in failing.stdout and "not compatible" in failing.stdout

    base = unique_base()
    client.add_base(base, good)
    name = unique_name()
    client.push(adapter, name, base=base)
    by_ref = server.cli("check", f"{name}@1", "--json")
    assert by_ref.returncode == 0 and json.loads(by_ref.stdout)["base"] == base
    vllm = server.cli("check", f"{name}@1", "--profile", "vllm", "--json")
    assert vllm.returncode == 8
    codes = {e["code"] for e in json.loads(vllm.stdout)["errors"]}
    assert "vllm_unsupported_model" in codes  # vLLM's GPT-2 has no LoRA support
    registered = server.cli("check", str(adapter), "--base", base)
    assert registered.returncode == 0 and "compatible" in registered.stdout

    bad_option = server.cli("check", f"{name}@1", "--profile", "vllm", "-O", "max_lora_rank=7")
    assert bad_option.returncode == 6 and "invalid_profile" in bad_option.stderr
    usage = server.cli("check", f"{name}@1", "--base", str(good))
    assert usage.returncode == 2
    unknown = server.cli("check", f"{name}@1", "--base", f"{unique('no')}/base")
    assert unknown.returncode == 3 and "base_not_found" in unknown.stderr


def test_check_of_a_reference_records_the_report_once_its_base_is_registered(
    client: Registry, adapter_dir: Callable[..., Path], base_dir: Callable[..., Path]
) -> None:
    base = unique_base()
    name = unique_name()
    client.push(adapter_dir("qwen2"), name, base=base)
    assert client.get(name).compat_status is None
    client.add_base(base, base_dir("qwen2"))
    report = client.check(name)
    assert report.compatible
    assert client.get(name).compat_status == "compatible"
    # A profile check answers, but does not replace the recorded plain report.
    client.check(name, profile="merge")
    assert client.get(name).compat_report == report


def test_the_server_can_require_compatibility_for_every_push(
    tmp_path: Path, adapter_dir: Callable[..., Path]
) -> None:
    env = {
        "LORA_REG_DATABASE_URL": f"sqlite:///{tmp_path}/r.db",
        "LORA_REG_STORAGE_URL": f"file://{tmp_path}/objects",
    }
    strict = start_server(
        tmp_path, env, "sqlite-folder", extra_env={"LORA_REG_REQUIRE_COMPATIBLE": "true"}
    )
    try:
        with (
            strict.client(tmp_path / "cache") as client,  # auth on: the bootstrap token
            pytest.raises(BaseNotFound),
        ):
            client.push(adapter_dir("llama"), unique_name(), base="org/unregistered")
    finally:
        stop_server(strict.process)


@pytest.fixture
def hub_fake(monkeypatch: pytest.MonkeyPatch, base_dir: Callable[..., Path]) -> dict[str, object]:
    """A fake Hugging Face Hub at the huggingface_hub API boundary, serving a real local base's
    headers through huggingface_hub's own metadata classes, and recording the calls."""
    import huggingface_hub
    from huggingface_hub.utils import SafetensorsFileMetadata, SafetensorsRepoMetadata, TensorInfo

    from registry.core.safetensors_header import read_header_from_file

    source = base_dir("mistral")
    calls: dict[str, object] = {"model_info": [], "download": [], "metadata": []}

    class Info:
        sha = "0123456789abcdef0123456789abcdef01234567"

    def model_info(self: object, repo_id: str, revision: str | None = None, **_: object) -> Info:
        calls["model_info"].append((repo_id, revision))  # type: ignore[attr-defined]
        return Info()

    def download(repo_id: str, filename: str, revision: str | None = None, **_: object) -> str:
        calls["download"].append((repo_id, filename, revision))  # type: ignore[attr-defined]
        return str(source / filename)

    def metadata(self: object, repo_id: str, revision: str | None = None, **_: object) -> object:
        calls["metadata"].append((repo_id, revision))  # type: ignore[attr-defined]
        header = read_header_from_file(str(source / "model.safetensors"))
        tensors = {
            name: TensorInfo(
                dtype=info.dtype,  # type: ignore[arg-type]
                shape=list(info.shape),
                data_offsets=(info.begin, info.end),
            )
            for name, info in header.tensors.items()
        }
        files = {"model.safetensors": SafetensorsFileMetadata(metadata={}, tensors=tensors)}
        return SafetensorsRepoMetadata(
            metadata=None,
            sharded=False,
            weight_map=dict.fromkeys(tensors, "model.safetensors"),
            files_metadata=files,
        )

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub.HfApi, "get_safetensors_metadata", metadata)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    return calls


def test_base_add_from_the_hub_reads_headers_and_pins_the_commit(
    client: Registry, hub_fake: dict[str, object], adapter_dir: Callable[..., Path]
) -> None:
    repo = f"{unique('org')}/tiny-mistral"
    result = client.add_base(f"{repo}@main", "hf")
    assert result.base.revision == "0123456789abcdef0123456789abcdef01234567"
    assert result.base.source == f"hf://{repo}@{result.base.revision}"
    assert result.base.model_type == "mistral"
    assert hub_fake["model_info"] == [(repo, "main")]
    assert hub_fake["metadata"] == [(repo, result.base.revision)]
    assert hub_fake["download"] == [(repo, "config.json", result.base.revision)]
    report = client.check_folder(adapter_dir("mistral"), f"{repo}@{result.base.revision}").report
    assert report.compatible, report.errors


@pytest.mark.live_hf
def test_base_add_from_the_live_hub(client: Registry) -> None:
    import os

    token = os.environ.get("LORA_REG_TEST_HF_TOKEN")
    if not token:
        pytest.skip("set LORA_REG_TEST_HF_TOKEN to run against the real Hugging Face Hub")
    os.environ.setdefault("HF_TOKEN", token)
    result = client.add_base("hf-internal-testing/tiny-random-LlamaForCausalLM", "hf")
    assert result.base.model_type == "llama" and result.base.revision
    assert result.bytes_read < 1024 * 1024


def test_copying_a_base_keeps_it_checkable(tmp_path: Path, base_dir: Callable[..., Path]) -> None:
    # Shards are found through the index even when the folder has other files.
    source = shutil.copytree(base_dir("llama", max_shard_size="40KB"), tmp_path / "base")
    (source / "README.md").write_text("notes")
    from cli.bases import folder_signature

    assert folder_signature(source).signature.config["model_type"] == "llama"


def test_an_unreachable_hub_is_unavailable_whatever_transport_huggingface_hub_uses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """huggingface_hub 2.x raises httpx2 transport errors, which are not OSError: they must
    still be `unavailable` (exit 7, retry later), not a traceback."""
    import httpx2
    import huggingface_hub

    from cli.bases import hub_signature
    from registry.core.errors import Unavailable

    def refuse(self: object, *args: object, **kwargs: object) -> None:
        raise httpx2.ConnectError("connection refused")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", refuse)
    with pytest.raises(Unavailable, match="cannot reach the Hugging Face Hub"):
        hub_signature("org/model", None)
