"""The HTTP surface: health endpoints, OpenAPI, and one error shape for every route."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from registry.app import create_app
from registry.db import upgrade
from registry.settings import Settings
from tests.conftest import RunningServer


@pytest.fixture
def app_client(tmp_path: Path) -> TestClient:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path}/r.db",
        storage_url=f"file://{tmp_path}/objects",
        auth=False,
    )
    upgrade(settings)
    return TestClient(
        create_app(settings), raise_server_exceptions=False, base_url="http://127.0.0.1"
    )


def test_health_and_readiness(server: RunningServer) -> None:
    assert httpx.get(f"{server.url}/healthz").json()["status"] == "ok"
    assert httpx.get(f"{server.url}/readyz").json() == {"status": "ready"}
    assert httpx.get(f"{server.url}/docs").status_code == 200
    paths = httpx.get(f"{server.url}/openapi.json").json()["paths"]
    assert "/api/v1/adapters/{namespace}/{name}/versions" in paths


def test_readiness_reports_an_unreachable_store(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    settings = Settings(
        database_url=f"sqlite:///{tmp_path}/r.db",
        storage_url=f"file://{blocker}/objects",
        auth=False,
    )
    upgrade(settings)
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as http:
        response = http.get("/readyz")
    assert response.status_code == 503
    assert response.json()["code"] == "storage_unavailable"


def concrete(path: str) -> str:
    """Fill a route's path parameters with values that pass validation but name nothing."""
    values = {
        "namespace": "nobody",
        "name": "nothing",
        "selector": "1",
        "digest": "sha256:" + "0" * 64,
        "ref": "nobody/nothing",
        "job_id": "0" * 32,
        "alias": "production",
        "instance_id": "vllm-0",
        "webhook_id": "1",
    }
    return re.sub(r"\{(\w+)\}", lambda m: values[m.group(1)], path)


def api_routes() -> list[tuple[str, str]]:
    """Every API route and method, from the OpenAPI document (so new routes are included)."""
    app = create_app(
        Settings(database_url="sqlite:///:memory:", storage_url="file:///tmp/x", auth=False)
    )
    routes = sorted(
        (method.upper(), path)
        for path, operations in app.openapi()["paths"].items()
        if path.startswith("/api/")
        for method, operation in operations.items()
        # A route that takes no input at all (whoami) has no invalid input to send.
        if operation.get("parameters") or operation.get("requestBody")
    )
    assert len(routes) >= 8, routes
    return routes


@pytest.mark.parametrize(("method", "path"), api_routes())
def test_every_route_answers_errors_as_problem_json(
    app_client: TestClient, method: str, path: str
) -> None:
    """Invalid or absent input on any route gives the one problem+json shape with a code."""
    response = app_client.request(
        method,
        concrete(path),
        params={"limit": 0, "revoked": "maybe"},  # invalid wherever they are read
        json={"files": []},
        headers={"Content-Length": "1"},
    )
    assert response.status_code >= 400, (method, path, response.text)
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert set(body) >= {"type", "title", "status", "detail", "code"}
    assert body["status"] == response.status_code and body["code"]


def test_unknown_routes_and_methods_use_the_same_shape(app_client: TestClient) -> None:
    missing = app_client.get("/api/v1/nothing-here")
    assert missing.status_code == 404 and missing.json()["code"] == "not_found"
    wrong = app_client.delete("/api/v1/adapters")
    assert wrong.status_code == 405 and wrong.json()["code"] == "method_not_allowed"


def test_malformed_json_bodies_are_invalid_input(app_client: TestClient) -> None:
    response = app_client.post(
        "/api/v1/adapters/a/b/uploads", content=b"{", headers={"content-type": "application/json"}
    )
    assert response.status_code == 422 and response.json()["code"] == "invalid_input"


def test_large_uploads_through_the_api_stream_into_s3(
    seaweed, s3_env: dict[str, str], tmp_path: Path
) -> None:
    """Proxied uploads above the single-PUT limit are streamed by boto3's own threads."""
    import hashlib
    import os

    from tests.conftest import make_bucket

    settings = Settings(
        database_url=f"sqlite:///{tmp_path}/r.db",
        storage_url=f"s3://{make_bucket(seaweed.endpoint)}/reg",
        auth=False,
    )
    upgrade(settings)
    data = os.urandom(3 * 1024 * 1024 + 11)
    digest = hashlib.sha256(data).hexdigest()
    app = create_app(settings)
    app.state.store.proxy_single_put_limit = 1024 * 1024
    with TestClient(app, base_url="http://127.0.0.1") as http:
        wrong = http.put(f"/api/v1/blobs/sha256:{digest}", content=data[:-1] + b"!")
        assert wrong.status_code == 400 and wrong.json()["code"] == "checksum_mismatch"
        assert http.get(f"/api/v1/blobs/sha256:{digest}").status_code == 404
        assert http.put(f"/api/v1/blobs/sha256:{digest}", content=data).status_code == 204
        stored = http.get(f"/api/v1/blobs/sha256:{digest}", follow_redirects=False)
    assert stored.status_code == 307
    assert httpx.get(stored.headers["location"]).content == data


def test_unexpected_errors_keep_their_details_in_the_server_log(
    app_client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from registry.adapters import service

    def boom(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("SELECT token FROM secrets WHERE password='hunter2'")

    monkeypatch.setattr(service, "list_adapters", boom)
    response = app_client.get("/api/v1/adapters")
    assert response.status_code == 500
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["code"] == "internal"
    assert "hunter2" not in response.text and "SELECT" not in response.text


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (
            {
                "base": "o/m",
                "source": "file:///x",
                "config": {},
                "tensors": {"w": {"dtype": "F32", "shape": [2**40, 2**40]}},
            },
            "invalid_base",
        ),
        (
            {
                "base": "o/m",
                "source": "file:///x",
                "config": {},
                "tensors": {"w": {"dtype": "X9", "shape": [2]}},
            },
            "invalid_base",
        ),
        ({"base": "o/m", "source": "file:///x"}, "invalid_base"),
        ({"base": "o/m", "source": "ftp://x"}, "invalid_base"),
        ({"base": "o/m", "source": "s3://"}, "invalid_base"),
        ({"base": "../m", "source": "file:///x", "config": {}, "tensors": {}}, "invalid_name"),
    ],
)
def test_bad_base_registrations_are_refused_with_a_code(
    app_client: TestClient, body: dict[str, object], code: str
) -> None:
    response = app_client.post("/api/v1/bases", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["code"] == code
    assert app_client.get("/api/v1/bases").json()["total"] == 0


def test_the_registry_never_registers_its_own_storage_as_a_base(tmp_path: Path) -> None:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path}/r.db",
        storage_url="s3://registry-bucket/objects",
        auth=False,
    )
    upgrade(settings)
    with TestClient(
        create_app(settings), raise_server_exceptions=False, base_url="http://127.0.0.1"
    ) as http:
        for source in ("s3://registry-bucket/objects/blobs", "s3://registry-bucket"):
            response = http.post("/api/v1/bases", json={"base": "o/m", "source": source})
            assert response.json()["code"] == "invalid_base", source
