"""Observed deployments (docs/architecture.md §13): engines report their full loaded set, the
registry records loads and unloads as events and shows drift against the aliases. Played here by
the client against the real servers; tests/test_vllm_serving.py drives them from a real vLLM."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from cli.client import Registry
from registry.core.errors import InvalidInput
from registry.core.schemas import DeploymentReport, LoadedAdapter
from tests.conftest import RunningServer, push_versions


def loaded(client: Registry, reference: str, name: str | None = None) -> LoadedAdapter:
    version = client.get(reference)
    return LoadedAdapter(
        name=name or reference,
        reference=reference,
        adapter=version.adapter,
        version=version.number,
        digest=version.digest,
        loaded_at=datetime.now(UTC),
    )


def report(*items: LoadedAdapter) -> DeploymentReport:
    return DeploymentReport(
        host="gpu-1",
        port=8000,
        engine="vllm",
        engine_version="0.32.0",
        served_model="/models/tiny-llama",
        loaded=list(items),
    )


def test_reports_record_loads_and_unloads_once_and_show_drift(
    client: Registry, server: RunningServer, adapter_dir: Callable[..., Path]
) -> None:
    name = push_versions(client, adapter_dir, 3)
    client.set_alias(f"{name}@1", "production")
    instance = f"vllm-{uuid.uuid4().hex[:8]}"
    cursor = client.events(-1).last_id

    production = loaded(client, f"{name}@production")
    first = client.report_deployment(instance, report(production))
    assert first.alive and [(x.version, x.drift) for x in first.loaded] == [(1, None)]
    client.report_deployment(instance, report(production))  # a heartbeat: nothing new

    client.set_alias(f"{name}@2", "production")  # the server misses the move: drift
    (seen,) = client.deployments(name).items
    assert seen.instance_id == instance
    assert seen.loaded[0].drift == "production points at @2 now; this still runs @1"

    pinned = loaded(client, f"{name}@3")
    client.report_deployment(instance, report(loaded(client, f"{name}@production"), pinned))
    (seen,) = client.deployments(name).items
    drifts = {x.name: x.drift for x in seen.loaded}
    assert drifts == {f"{name}@production": None, f"{name}@3": "no alias points at @3"}
    assert [d.instance_id for d in client.deployments(alias="production").items] == [instance]

    client.forget_deployment(instance)
    assert client.deployments(name).items == []
    mine = [
        (e.action, e.subject, e.details["name"], e.details.get("previous"))
        for e in client.events(cursor, actions=["deployment.load", "deployment.unload"]).items
        if e.details["instance"] == instance
    ]
    v1, v2 = client.get(f"{name}@1").digest, client.get(f"{name}@2").digest
    assert mine == [
        ("deployment.load", f"{name}@1", f"{name}@production", None),
        # One report: each load in the order of the names (reloaded in place: previous digest).
        ("deployment.load", f"{name}@3", f"{name}@3", None),
        ("deployment.load", f"{name}@2", f"{name}@production", v1),
        ("deployment.unload", f"{name}@3", f"{name}@3", None),  # in the order of their names
        ("deployment.unload", f"{name}@2", f"{name}@production", None),
    ]
    assert v2 != v1


def test_the_cli_shows_what_runs_and_its_drift(
    client: Registry, server: RunningServer, adapter_dir: Callable[..., Path]
) -> None:
    name = push_versions(client, adapter_dir, 2)
    client.set_alias(f"{name}@1", "production")
    instance = f"vllm-{uuid.uuid4().hex[:8]}"
    client.report_deployment(instance, report(loaded(client, f"{name}@production")))
    client.set_alias(f"{name}@2", "production")

    shown = server.cli("deployments", name)
    assert shown.returncode == 0, shown.stderr
    assert instance in shown.stdout and f"{name}@1" in shown.stdout
    assert "points at @2 now" in shown.stdout
    observed = server.cli("who-runs", "production", "--observed", "--json")
    assert observed.returncode == 0, observed.stderr
    page = json.loads(observed.stdout)
    ours = [d for d in page["items"] if d["instance_id"] == instance]
    assert [x["version"] for x in ours[0]["loaded"]] == [1]
    client.forget_deployment(instance)


def test_a_report_naming_one_adapter_twice_is_refused(
    client: Registry, adapter_dir: Callable[..., Path]
) -> None:
    name = push_versions(client, adapter_dir, 1)
    twice = loaded(client, f"{name}@1")
    with pytest.raises(InvalidInput, match="twice"):
        client.report_deployment("vllm-dup", report(twice, twice))
