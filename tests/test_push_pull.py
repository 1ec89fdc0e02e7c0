"""Push and pull through the Python client against the real server, on every backend."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import httpx
import pytest

from cli.client import Registry
from registry.core.errors import AdapterNotFound, OutputNotEmpty, VersionNotFound
from registry.core.manifest import FileEntry, manifest_digest
from tests.conftest import MULTIPART_BYTES, RunningServer, copy_adapter, unique_name
from tests.support.files import manifest, tree_digest
from tests.support.seaweed import s3_client


def test_push_creates_version_one_with_metadata_parsed_from_the_config(
    client: Registry, adapter_dir
) -> None:
    name = unique_name()
    source = adapter_dir("llama", base_model_name_or_path="test-org/tiny-llama")
    result = client.push(
        source,
        name,
        base="test-org/tiny-llama@abc123",
        metrics={"rougeL": 0.41, "loss": "1.5"},
        labels={"team": "search"},
        lineage={"run": "https://ci.example/run/7", "dataset": "s3://data/v3"},
        description="first try",
    )
    version = result.version
    assert result.created and version.number == 1
    assert version.adapter == name
    assert version.base_model_id == "test-org/tiny-llama"
    assert version.base_model_revision == "abc123"
    assert version.peft_type == "LORA"
    assert version.task_type == "CAUSAL_LM"
    assert version.r == 4 and version.lora_alpha == 8
    assert version.target_modules == ["q_proj", "v_proj"]
    assert version.use_dora is False and version.use_rslora is False
    assert version.adapter_config["peft_type"] == "LORA"
    assert version.metrics == {"rougeL": 0.41, "loss": 1.5}
    assert version.labels == {"team": "search"}
    assert version.lineage["run"] == "https://ci.example/run/7"
    files = [FileEntry(f.path, f.size, f.sha256) for f in version.files or []]
    assert {f.path: f.sha256 for f in files} == tree_digest(source)
    assert version.digest == manifest_digest(files)
    # Blobs are shared across adapters: some may already be stored by other pushes.
    assert result.uploaded_bytes + result.skipped_bytes == version.size


def test_pull_returns_exactly_the_pushed_bytes(
    client: Registry, adapter_dir, tmp_path: Path
) -> None:
    name = unique_name()
    source = adapter_dir("gpt2")
    pushed = client.push(source, name).version
    result = client.pull(f"{name}@1", tmp_path / "out")
    assert result.version.digest == pushed.digest
    assert tree_digest(tmp_path / "out") == tree_digest(source)
    assert result.downloaded_bytes == pushed.size and result.cached_bytes == 0


def test_repeated_push_of_identical_content_returns_the_same_version_and_uploads_nothing(
    client: Registry, adapter_dir
) -> None:
    name = unique_name()
    source = adapter_dir("llama")
    first = client.push(source, name)
    again = client.push(source, name, metrics={"ignored": 1.0})
    assert not again.created
    assert again.version.number == first.version.number == 1
    assert again.uploaded_bytes == 0 and again.uploaded_files == 0
    assert again.skipped_bytes == first.version.size
    assert client.versions(name).total == 1


def test_versions_are_numbered_without_gaps_and_share_unchanged_blobs(
    client: Registry, adapter_dir, tmp_path: Path
) -> None:
    name = unique_name()
    one = client.push(adapter_dir("llama", seed=1), name)
    # Same adapter with one changed file: only that file is uploaded.
    changed = copy_adapter(adapter_dir("llama", seed=1), tmp_path / "changed")
    (changed / "README.md").write_text("retrained\n")
    two = client.push(changed, name)
    three = client.push(adapter_dir("llama", seed=2), name)
    assert [one.version.number, two.version.number, three.version.number] == [1, 2, 3]
    assert two.uploaded_files == 1 and two.uploaded_bytes == len("retrained\n")
    assert client.get(name).number == 3
    assert client.get(f"{name}@{two.version.digest}").number == 2


def test_large_files_round_trip_through_multipart_uploads(
    server: RunningServer, client: Registry, adapter_dir, tmp_path: Path
) -> None:
    folder = copy_adapter(adapter_dir("llama"), tmp_path / "big")
    (folder / "optimizer-free-extra.safetensors.txt").write_bytes(
        os.urandom(2 * MULTIPART_BYTES + 7)
    )
    name = unique_name()
    plan = httpx.post(
        f"{server.url}/api/v1/adapters/{name}/uploads", json={"files": manifest(folder)}
    ).json()
    kinds = {item["size"]: item["kind"] for item in plan["missing"]}
    expected = "multipart" if server.backend.endswith("s3") else "single"
    assert kinds[2 * MULTIPART_BYTES + 7] == expected

    result = client.push(folder, name)
    assert result.uploaded_bytes >= 2 * MULTIPART_BYTES
    client.pull(name, tmp_path / "out")
    assert tree_digest(tmp_path / "out") == tree_digest(folder)


def test_warm_pull_downloads_nothing_and_a_damaged_cache_entry_is_fetched_again(
    client: Registry, adapter_dir, tmp_path: Path
) -> None:
    name = unique_name()
    version = client.push(adapter_dir("llama"), name).version
    cold = client.pull(name, tmp_path / "a")
    warm = client.pull(name, tmp_path / "b")
    assert cold.downloaded_bytes == version.size
    assert warm.downloaded_bytes == 0 and warm.cached_bytes == version.size

    weights = next(f for f in version.files or [] if f.path == "adapter_model.safetensors")
    cached = client.cache_dir / "blobs" / "sha256" / weights.sha256[:2] / weights.sha256
    cached.chmod(0o644)  # cache blobs are read-only
    # In place: "a" and "b" are hard links to this blob, so they are damaged with it.
    cached.write_bytes(b"corrupted" + cached.read_bytes()[9:])
    repaired = client.pull(name, tmp_path / "c")
    assert repaired.downloaded_bytes == weights.size
    assert tree_digest(tmp_path / "c") == {f.path: f.sha256 for f in version.files or []}
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == weights.sha256


def test_versions_sort_by_metric_with_missing_metrics_last(client: Registry, adapter_dir) -> None:
    name = unique_name()
    client.push(adapter_dir("llama", seed=1), name, metrics={"rougeL": 0.30})
    client.push(adapter_dir("llama", seed=2), name, metrics={"rougeL": 0.45})
    client.push(adapter_dir("llama", seed=3), name)
    client.push(adapter_dir("llama", seed=4), name, metrics={"rougeL": 0.38})
    best_first = [v.number for v in client.versions(name, sort="-metrics.rougeL").items]
    worst_first = [v.number for v in client.versions(name, sort="metrics.rougeL").items]
    assert best_first == [2, 4, 1, 3]
    assert worst_first == [1, 4, 2, 3]
    assert [v.number for v in client.versions(name, sort="number").items] == [1, 2, 3, 4]
    assert [v.number for v in client.versions(name).items] == [4, 3, 2, 1]


def test_lists_paginate_and_filter_by_namespace_base_and_label(
    client: Registry, adapter_dir
) -> None:
    namespace = unique_name().split("/")[0]
    for index in range(5):
        client.push(
            adapter_dir("llama", seed=10 + index),
            f"{namespace}/a{index}",
            base="org/base-a" if index < 3 else "org/base-b@rev1",
            labels={"team": "x" if index % 2 else "y"},
        )
    first = client.list(namespace, limit=2)
    assert first.total == 5 and [a.name for a in first.items] == [
        f"{namespace}/a0",
        f"{namespace}/a1",
    ]
    assert first.next_offset == 2
    last = client.list(namespace, limit=2, offset=4)
    assert [a.name for a in last.items] == [f"{namespace}/a4"] and last.next_offset is None
    assert client.list(namespace, base="org/base-b").total == 2
    assert client.list(namespace, base="org/base-b@rev1").total == 2
    assert client.list(namespace, base="org/base-b@other").total == 0
    assert {a.name for a in client.list(namespace, labels={"team": "x"}).items} == {
        f"{namespace}/a1",
        f"{namespace}/a3",
    }
    page = client.versions(f"{namespace}/a0", limit=1)
    assert page.total == 1 and page.next_offset is None


def test_missing_adapters_and_versions_are_reported_as_such(client: Registry, adapter_dir) -> None:
    name = unique_name()
    with pytest.raises(AdapterNotFound):
        client.get(name)
    client.push(adapter_dir("llama"), name)
    with pytest.raises(VersionNotFound):
        client.get(f"{name}@2")
    with pytest.raises(VersionNotFound):
        client.get(f"{name}@sha256:{'0' * 64}")


def test_pulled_folder_loads_with_peft(client: Registry, adapter_dir, tmp_path: Path) -> None:
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    from tests.support.adapters import build_base_model

    name = unique_name()
    client.push(adapter_dir("llama"), name)
    out = client.pull(name, tmp_path / "adapter").path
    model = PeftModel.from_pretrained(build_base_model("llama"), out)
    saved = load_file(out / "adapter_model.safetensors")
    loaded = dict(model.named_parameters())
    for key, tensor in saved.items():
        live = key.replace(".weight", ".default.weight")
        assert torch.equal(loaded[live].detach(), tensor), key


def test_a_push_writes_its_audit_event_in_the_same_transaction(
    server: RunningServer, client: Registry, adapter_dir
) -> None:
    import sqlalchemy as sa

    from registry.settings import Settings

    name = unique_name()
    version = client.push(adapter_dir("llama"), name).version
    settings = Settings(database_url=server.env["LORA_REG_DATABASE_URL"])
    engine = sa.create_engine(settings.sqlalchemy_url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                sa.text("SELECT action, details FROM audit_events WHERE subject = :subject"),
                {"subject": f"{name}@1"},
            ).all()
    finally:
        engine.dispose()
    assert len(rows) == 1 and rows[0][0] == "version.push"
    # PostgreSQL's driver decodes JSON columns; SQLite hands back the text.
    details = rows[0][1] if isinstance(rows[0][1], dict) else json.loads(rows[0][1])
    assert details["digest"] == version.digest


def test_rich_progress_reports_push_and_pull(client: Registry, adapter_dir, tmp_path: Path) -> None:
    from cli.progress import RichProgress

    name = unique_name()
    client.push(adapter_dir("llama", seed=7), name, progress=RichProgress())
    client.pull(name, tmp_path / "out", progress=RichProgress())
    assert tree_digest(tmp_path / "out") == tree_digest(adapter_dir("llama", seed=7))


def test_pull_refuses_a_folder_with_other_files_unless_forced(
    client: Registry, adapter_dir, tmp_path: Path
) -> None:
    name = unique_name()
    client.push(adapter_dir("llama", seed=1), name)
    out = tmp_path / "out"
    client.pull(name, out)
    (out / "stale-notes.txt").write_text("from another version")
    with pytest.raises(OutputNotEmpty) as refused:
        client.pull(name, out)
    assert "stale-notes.txt" in refused.value.message and "--force" in refused.value.message
    assert (out / "stale-notes.txt").exists()
    client.pull(name, out, force=True)
    assert tree_digest(out) == tree_digest(adapter_dir("llama", seed=1))


def test_a_recorded_blob_gone_from_the_store_is_uploaded_again(
    server: RunningServer, client: Registry, adapter_dir, tmp_path: Path
) -> None:
    """A blob row is not proof enough: the store must still hold the bytes (DESIGN §5)."""
    folder = copy_adapter(adapter_dir("llama"), tmp_path / "adapter")
    notes = folder / "notes.txt"
    notes.write_bytes(os.urandom(1000))
    sha = hashlib.sha256(notes.read_bytes()).hexdigest()
    client.push(folder, unique_name())
    key = f"blobs/sha256/{sha[:2]}/{sha}"
    if server.backend.endswith("s3"):
        s3_client(server.env["AWS_ENDPOINT_URL"]).delete_object(
            Bucket=server.bucket, Key=f"registry/{key}"
        )
    else:
        (server.workdir / "objects" / key).unlink()

    name = unique_name()
    plan = httpx.post(
        f"{server.url}/api/v1/adapters/{name}/uploads", json={"files": manifest(folder)}
    ).json()
    assert sha in {item["sha256"] for item in plan["missing"]}
    assert sha not in plan["present"]
    result = client.push(folder, name)
    assert result.uploaded_files == 1
    client.pull(name, tmp_path / "out")
    assert tree_digest(tmp_path / "out") == tree_digest(folder)
