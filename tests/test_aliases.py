"""Aliases, alias history with point-in-time resolution, who-runs, and the append-only audit log,
against real servers (SQLite + folder store, PostgreSQL + SeaweedFS) and real PostgreSQL."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg
import pytest

from cli.client import Registry
from registry.core.errors import AliasNotFound, InvalidReference, VersionNotFound, VersionYanked
from tests.conftest import RunningServer, push_versions, unique_name


def test_an_alias_resolves_wherever_a_reference_is_accepted(
    client: Registry,
    server: RunningServer,
    adapter_dir: Callable[..., Path],
    base_dir: Callable[..., Path],
    tmp_path: Path,
) -> None:
    name = push_versions(client, adapter_dir, 2)
    moved = client.set_alias(f"{name}@1", "production")
    assert (moved.version, moved.alias) == (1, "production")
    assert client.get(f"{name}@production").number == 1
    pulled = client.pull(f"{name}@production", tmp_path / "prod")
    assert pulled.version.number == 1
    shown = server.cli("show", f"{name}@production", "--json")
    assert json.loads(shown.stdout)["number"] == 1
    base = f"{name.split('/')[0]}/base@v1"
    client.add_base(base, base_dir("llama"))
    checked = server.cli("check", f"{name}@production", "--base", base, "--json")
    assert checked.returncode == 0 and json.loads(checked.stdout)["compatible"] is True

    staged = client.push(adapter_dir("llama", seed=2), name, alias="staging")
    assert client.get(f"{name}@staging").number == staged.version.number == 3
    listed = server.cli("alias", "ls", name, "--json")
    assert {(a["alias"], a["version"]) for a in json.loads(listed.stdout)["items"]} == {
        ("production", 1),
        ("staging", 3),
    }
    assert server.cli("alias", "rm", name, "staging").returncode == 0
    with pytest.raises(AliasNotFound):
        client.get(f"{name}@staging")
    assert server.cli("alias", "rm", name, "staging").returncode == 3


@pytest.mark.parametrize("alias", ["latest", "7", "Prod", "-x"])
def test_invalid_alias_names_are_refused(
    client: Registry, adapter_dir: Callable[..., Path], alias: str
) -> None:
    name = push_versions(client, adapter_dir, 1)
    with pytest.raises(InvalidReference, match="invalid alias"):
        client.set_alias(f"{name}@1", alias)
    with pytest.raises(InvalidReference):
        client.push(adapter_dir("llama", seed=0), name, alias=alias)


def test_history_and_point_in_time_resolution(
    client: Registry, server: RunningServer, adapter_dir: Callable[..., Path]
) -> None:
    name = push_versions(client, adapter_dir, 3)
    before_any = datetime.now(UTC)
    time.sleep(0.05)
    for version in (1, 2, 3):
        client.set_alias(f"{name}@{version}", "production")
        time.sleep(0.05)
    client.set_alias(f"{name}@3", "production")  # no move: not recorded again
    client.remove_alias(name, "production")
    moves = client.history(name, alias="production").items
    assert [(m.previous, m.version) for m in moves] == [(3, None), (2, 3), (1, 2), (None, 1)]

    with pytest.raises(AliasNotFound, match="not set yet"):
        client.resolve(f"{name}@production", at=before_any)
    for move in reversed(moves[1:]):
        at = move.at + timedelta(milliseconds=1)
        assert client.resolve(f"{name}@production", at=at).version == move.version
    with pytest.raises(AliasNotFound, match="removed"):
        client.resolve(f"{name}@production", at=datetime.now(UTC))
    second = moves[2].at + timedelta(milliseconds=1)
    cli = server.cli("resolve", f"{name}@production", "--at", second.isoformat(), "--json")
    assert cli.returncode == 0 and json.loads(cli.stdout)["version"] == 2
    bad = server.cli("resolve", f"{name}@production", "--at", "last tuesday")
    assert bad.returncode == 6
    path = f"{server.url}/api/v1/adapters/{name}/aliases/production"
    for extreme in ("9999-12-31T23:59:59-05:00", "0001-01-01T00:00:00+05:00"):
        answer = httpx.get(path, params={"at": extreme})
        assert answer.status_code in (404, 422), answer.text  # never a 500


def test_who_runs_lists_every_adapter_with_the_alias(
    client: Registry, server: RunningServer, adapter_dir: Callable[..., Path]
) -> None:
    alias = f"prod-{unique_name().split('/')[0]}"
    first, second = push_versions(client, adapter_dir, 2), push_versions(client, adapter_dir, 1)
    client.set_alias(f"{first}@2", alias)
    client.set_alias(f"{second}@1", alias)
    running = {(a.adapter, a.version) for a in client.who_runs(alias).items}
    assert running == {(first, 2), (second, 1)}
    table = server.cli("who-runs", alias)
    assert first in table.stdout and second in table.stdout


def test_every_mutation_is_in_the_audit_log(
    client: Registry,
    server: RunningServer,
    adapter_dir: Callable[..., Path],
    base_dir: Callable[..., Path],
) -> None:
    start = datetime.now(UTC) - timedelta(seconds=1)
    name = unique_name()
    base = f"{name.split('/')[0]}/base@v1"
    client.push(adapter_dir("llama"), name, base=base, alias="staging")
    client.add_base(base, base_dir("llama"))
    client.set_alias(f"{name}@1", "production")
    client.remove_alias(name, "staging")
    client.check(f"{name}@1")  # its base is registered now: the report is recorded
    events = client.audit(since=start, subject=name.split("/")[0], limit=500).items
    actions = [e.action for e in events]
    for action in ("base.add", "version.push", "alias.set", "alias.remove", "version.check"):
        assert action in actions, actions
    assert [e.details["alias"] for e in events if e.action == "alias.set"] == [
        "staging",
        "production",
    ]
    only = client.audit(since=start, action="alias.remove", subject=name).items
    assert [e.subject for e in only] == [f"{name}@staging"]
    assert client.audit(until=start, subject=name).items == []
    listed = server.cli("audit", "--subject", name, "--json")
    assert listed.returncode == 0 and len(json.loads(listed.stdout)["items"]) >= 4


def test_no_endpoint_changes_the_audit_log(server: RunningServer) -> None:
    for method in ("PUT", "PATCH", "DELETE", "POST"):
        response = httpx.request(method, f"{server.url}/api/v1/audit")
        assert response.status_code == 405, (method, response.status_code)
    paths = httpx.get(f"{server.url}/openapi.json").json()["paths"]
    audit_paths = {p: set(ops) for p, ops in paths.items() if "audit" in p}
    assert audit_paths == {"/api/v1/audit": {"get"}}


def test_postgres_refuses_to_update_or_delete_audit_and_alias_history(
    servers: Callable[[str], RunningServer], adapter_dir: Callable[..., Path], tmp_path: Path
) -> None:
    server = servers("postgres-s3")
    with server.client(tmp_path / "cache") as client:
        name = push_versions(client, adapter_dir, 1)
        client.set_alias(f"{name}@1", "production")
    url = server.env["LORA_REG_DATABASE_URL"]
    for statement in (
        "UPDATE audit_events SET actor = 'mallory'",
        "DELETE FROM audit_events",
        "UPDATE alias_moves SET version_number = 99",
        "DELETE FROM alias_moves",
        "TRUNCATE audit_events, alias_moves",
    ):
        with (
            psycopg.connect(url) as connection,
            pytest.raises(psycopg.errors.InsufficientPrivilege),
        ):
            connection.execute(statement)
    with psycopg.connect(url) as connection:
        rows = connection.execute(
            "SELECT count(*) FROM audit_events WHERE subject LIKE %s", (f"{name}%",)
        ).fetchone()
    assert rows is not None and rows[0] >= 2


def test_identify_an_exact_adapter_a_modified_one_a_file_and_an_unknown_one(
    client: Registry, server: RunningServer, adapter_dir: Callable[..., Path], tmp_path: Path
) -> None:
    name = unique_name()
    client.push(adapter_dir("qwen2", seed=7), name, lineage={"run": "https://ci/run/9"})
    client.set_alias(f"{name}@1", "production")
    deployed = client.pull(f"{name}@production", tmp_path / "deployed").path

    exact = client.identify(deployed)
    assert exact.status == "exact"
    (match,) = exact.matches
    assert (match.adapter, match.version, match.aliases) == (name, 1, ["production"])
    assert match.lineage == {"run": "https://ci/run/9"}
    shown = server.cli("identify", str(deployed))
    assert shown.returncode == 0 and f"{name}@1" in shown.stdout

    weights = deployed / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one byte of one weight
    weights.write_bytes(bytes(data))
    modified = client.identify(deployed)
    assert modified.status == "modified"
    assert modified.matches[0].adapter == name
    assert modified.matches[0].differing == ["adapter_model.safetensors"]
    assert "adapter_config.json" in modified.matches[0].identical
    cli = server.cli("identify", str(deployed), "--json")
    assert cli.returncode == 9
    assert json.loads(cli.stdout)["matches"][0]["differing"] == ["adapter_model.safetensors"]

    config = client.identify(deployed / "adapter_config.json")
    assert config.status == "file" and config.matches[0].identical == ["adapter_config.json"]

    (deployed / "optimizer.pt").write_bytes(b"a trainer left this here")
    with_pickle = client.identify(deployed)
    assert with_pickle.status == "modified" and "optimizer.pt" in with_pickle.matches[0].extra

    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "weights.safetensors").write_bytes(b"nothing the registry has seen")
    assert client.identify(stranger).status == "unknown"
    assert server.cli("identify", str(stranger)).returncode == 9


def test_a_yanked_version_is_kept_but_refused(
    client: Registry, server: RunningServer, adapter_dir: Callable[..., Path], tmp_path: Path
) -> None:
    name = push_versions(client, adapter_dir, 2)
    client.set_alias(f"{name}@1", "production")
    refused = server.cli("yank", f"{name}@1", "--reason", "leaks PII")
    assert refused.returncode == 4 and "production" in refused.stderr  # move the alias first
    client.set_alias(f"{name}@2", "production")
    yanked = client.yank(f"{name}@1", "leaks PII")
    assert yanked.yank_reason == "leaks PII" and yanked.yanked_at is not None
    assert client.yank(f"{name}@1", "again").yank_reason == "leaks PII"  # the first one stays

    with pytest.raises(VersionYanked):
        client.pull(f"{name}@1", tmp_path / "a")
    assert not (tmp_path / "a").exists()
    cli = server.cli("pull", f"{name}@1", "-o", str(tmp_path / "b"))
    assert cli.returncode == 4 and "version_yanked" in cli.stderr
    assert client.pull(f"{name}@1", tmp_path / "c", allow_yanked=True).version.number == 1
    found = client.identify(tmp_path / "c")
    assert found.status == "exact"  # other tests may have pushed these bytes under other names
    assert [m.yanked for m in found.matches if m.adapter == name] == [True]
    with pytest.raises(VersionYanked):
        client.set_alias(f"{name}@1", "staging")
    shown = server.cli("show", f"{name}@1")
    assert "leaks PII" in shown.stdout
    events = client.audit(action="version.yank", subject=name).items
    assert [(e.subject, e.details["reason"]) for e in events] == [(f"{name}@1", "leaks PII")]


def test_latest_is_the_newest_version_that_is_not_yanked(
    client: Registry, server: RunningServer, adapter_dir: Callable[..., Path], tmp_path: Path
) -> None:
    name = push_versions(client, adapter_dir, 3)
    client.yank(f"{name}@3", "diverged")
    client.yank(f"{name}@2", "diverged")
    latest = client.get(name)
    assert latest.number == 1 and latest.yanked_at is None
    assert latest.note is not None and "2, 3" in latest.note

    pulled = server.cli("pull", name, "-o", str(tmp_path / "latest"))
    assert pulled.returncode == 0, pulled.stderr
    assert "@1" in pulled.stdout and "yanked" in pulled.stderr  # the note says what was skipped
    assert client.identify(tmp_path / "latest").status == "exact"
    by_number = server.cli("pull", f"{name}@3", "-o", str(tmp_path / "three"))
    assert by_number.returncode == 4 and "version_yanked" in by_number.stderr
    assert (
        server.cli("pull", f"{name}@3", "-o", str(tmp_path / "three"), "--allow-yanked").returncode
        == 0
    )

    listed = server.cli("ls", name.split("/")[0], "--json")
    assert [a["latest"]["number"] for a in json.loads(listed.stdout)["items"]] == [1]
    assert client.versions(name).total == 3  # yanked versions are still listed

    client.yank(f"{name}@1", "diverged")
    with pytest.raises(VersionNotFound, match=r"every version .* is yanked"):
        client.get(name)
