"""Tokens and scopes: every route enforces its rule, secrets are shown once and stored hashed,
protected aliases move only by admin, and the audit log names the token behind each change.

The authorization matrix walks the app's own route table, so a route added without a rule (or
with a rule that differs from EXPECTED below) fails here.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlmodel import col, select

from registry.app import create_app
from registry.auth import route_rules
from registry.core.jobs import MIN_LEASE_S
from registry.db import make_engine, session_scope, upgrade
from registry.models import ApiToken, AuditEvent
from registry.settings import Settings
from registry.tokens import service as tokens
from tests.conftest import (
    BACKENDS,
    RunningServer,
    own_server,
    run_cli,
    start_server,
    stop_server,
    unique_name,
)
from tests.support.files import manifest

DOCS = ("/openapi.json",)
# What each route needs: written out here, independently of registry/auth.py.
EXPECTED: dict[tuple[str, str], str] = {
    ("GET", "/healthz"): "public",
    ("GET", "/readyz"): "public",
    # Prometheus metrics: a read token by default (LORA_REG_METRICS_AUTH=none makes it public).
    ("GET", "/metrics"): "read",
    **{(method, path): "public" for method in ("GET", "HEAD") for path in DOCS},
    ("GET", "/api/v1/adapters"): "read",
    ("GET", "/api/v1/adapters/{namespace}/{name}"): "read",
    ("GET", "/api/v1/adapters/{namespace}/{name}/versions"): "read",
    ("GET", "/api/v1/adapters/{namespace}/{name}/versions/{selector}"): "read",
    ("GET", "/api/v1/adapters/{namespace}/{name}/versions/{selector}/files"): "read",
    ("POST", "/api/v1/adapters/{namespace}/{name}/versions/{selector}/check"): "read",
    ("POST", "/api/v1/adapters/{namespace}/{name}/uploads"): "write",
    ("POST", "/api/v1/adapters/{namespace}/{name}/versions"): "write",
    ("POST", "/api/v1/adapters/{namespace}/{name}/versions/{selector}/yank"): "write",
    ("GET", "/api/v1/adapters/{namespace}/{name}/aliases"): "read",
    ("GET", "/api/v1/adapters/{namespace}/{name}/aliases/{alias}"): "read",
    ("PUT", "/api/v1/adapters/{namespace}/{name}/aliases/{alias}"): "write",
    ("DELETE", "/api/v1/adapters/{namespace}/{name}/aliases/{alias}"): "write",
    ("GET", "/api/v1/adapters/{namespace}/{name}/history"): "read",
    ("GET", "/api/v1/aliases/{alias}"): "read",
    ("POST", "/api/v1/identify"): "read",
    ("GET", "/api/v1/audit"): "read",
    ("GET", "/api/v1/bases"): "read",
    ("GET", "/api/v1/bases/{ref:path}"): "read",
    ("POST", "/api/v1/bases"): "write",
    ("POST", "/api/v1/bases/uploads"): "write",
    ("GET", "/api/v1/blobs/{digest:sha256}"): "read",
    ("PUT", "/api/v1/blobs/{digest:sha256}"): "upload",
    ("POST", "/api/v1/blobs/{digest:sha256}/multipart"): "upload",
    ("POST", "/api/v1/blobs/gc"): "admin",
    ("GET", "/api/v1/merges"): "read",
    ("GET", "/api/v1/merges/{job_id}"): "read",
    ("GET", "/api/v1/merges/artifacts/{digest}"): "read",
    ("GET", "/api/v1/merges/workers"): "read",
    ("GET", "/api/v1/events"): "read",
    ("GET", "/api/v1/deployments"): "read",
    ("PUT", "/api/v1/deployments/{instance_id}"): "serving",
    ("DELETE", "/api/v1/deployments/{instance_id}"): "serving",
    ("POST", "/api/v1/webhooks"): "admin",
    ("GET", "/api/v1/webhooks"): "admin",
    ("DELETE", "/api/v1/webhooks/{webhook_id}"): "admin",
    ("GET", "/api/v1/webhooks/{webhook_id}/deliveries"): "admin",
    ("POST", "/api/v1/merges"): "write",
    ("POST", "/api/v1/merges/{job_id}/cancel"): "write",
    ("POST", "/api/v1/merges/claim"): "worker",
    ("POST", "/api/v1/merges/{job_id}/heartbeat"): "worker",
    ("POST", "/api/v1/merges/{job_id}/uploads"): "worker",
    ("POST", "/api/v1/merges/{job_id}/finish"): "worker",
    ("POST", "/api/v1/tokens"): "admin",
    ("GET", "/api/v1/tokens"): "admin",
    ("DELETE", "/api/v1/tokens/{name}"): "admin",
    ("GET", "/api/v1/whoami"): "read",
    # The Hugging Face protocol (registry/hub/api.py): read-only, every route needs read.
    ("GET", "/hf/api/models/{namespace}/{name}"): "read",
    ("GET", "/hf/api/models/{namespace}/{name}/revision/{revision}"): "read",
    ("GET", "/hf/api/models/{namespace}/{name}/tree/{revision}"): "read",
    ("GET", "/hf/api/models/{namespace}/{name}/tree/{revision}/{path:path}"): "read",
    ("GET", "/hf/{namespace}/{name}/resolve/{revision}/{path:path}"): "read",
    ("HEAD", "/hf/{namespace}/{name}/resolve/{revision}/{path:path}"): "read",
    # Outside every surface: the way into the UI, its assets, the API docs (served from here).
    ("GET", "/"): "public",
    ("GET", "/static/{name:path}"): "public",
    ("GET", "/docs"): "public",
    ("GET", "/redoc"): "public",
    # The web UI (registry/ui): a cookie instead of a header, forms with a CSRF token.
    ("GET", "/ui/"): "read",
    ("GET", "/ui/sign-in"): "public",
    ("POST", "/ui/sign-in"): "public",
    ("POST", "/ui/sign-out"): "public",
    ("GET", "/ui/adapters"): "read",
    ("GET", "/ui/adapters/{namespace}/{name}"): "read",
    ("GET", "/ui/adapters/{namespace}/{name}/versions/{number}"): "read",
    ("POST", "/ui/adapters/{namespace}/{name}/aliases"): "write",
    ("POST", "/ui/adapters/{namespace}/{name}/aliases/{alias}/delete"): "write",
    ("POST", "/ui/adapters/{namespace}/{name}/versions/{number}/yank"): "write",
    ("GET", "/ui/bases"): "read",
    ("GET", "/ui/bases/{ref:path}"): "read",
    ("GET", "/ui/jobs"): "read",
    ("GET", "/ui/jobs/{job_id}"): "read",
    ("GET", "/ui/jobs/{job_id}/status"): "read",
    ("POST", "/ui/jobs/{job_id}/cancel"): "write",
    ("POST", "/ui/merges"): "write",
    ("GET", "/ui/audit"): "read",
    ("GET", "/ui/tokens"): "admin",
    ("POST", "/ui/tokens"): "admin",
    ("POST", "/ui/tokens/{name}/revoke"): "admin",
}
# Which token scopes each need admits (read < write < admin, and worker and serving beside).
ADMITS: dict[str, set[str]] = {
    "public": {"read", "write", "admin", "worker", "serving"},
    "read": {"read", "write", "admin", "worker", "serving"},
    "write": {"write", "admin"},
    "admin": {"admin"},
    "worker": {"worker", "admin"},
    "upload": {"write", "worker", "admin"},
    "serving": {"serving", "admin"},
}
SCOPES = ("read", "write", "admin", "worker", "serving")
BAD_CREDENTIALS = ("none", "malformed", "unknown", "revoked")
PATH_VALUES = {
    "namespace": "nobody",
    "name": "nothing",
    "selector": "1",
    "digest": "sha256:" + "0" * 64,
    "digest:sha256": "sha256:" + "0" * 64,
    "ref:path": "nobody/nothing",
    "job_id": "0" * 32,
    "alias": "staging",
    "instance_id": "vllm-0",
    "webhook_id": "1",
    "revision": "main",
    "path:path": "adapter_config.json",
    "number": "1",
    "name:path": "ui.css",
}
UI_CSRF = "c" * 43  # the UI's CSRF cookie and form field (registry/ui/session.py)


def concrete(path: str) -> str:
    return re.sub(r"\{([\w:]+)\}", lambda m: PATH_VALUES[m.group(1)], path)


@pytest.fixture(scope="module")
def secured(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[TestClient, dict[str, str]]]:
    """An app with auth on (SQLite) and one secret per credential kind."""
    workdir = tmp_path_factory.mktemp("secured")
    settings = Settings(
        database_url=f"sqlite:///{workdir}/r.db", storage_url=f"file://{workdir}/objects"
    )
    upgrade(settings)
    engine = make_engine(settings.sqlalchemy_url)
    secrets: dict[str, str] = {}
    with session_scope(engine) as session:
        for scope in SCOPES:
            secrets[scope] = tokens.create_token(session, f"t-{scope}", scope, None).token
        secrets["revoked"] = tokens.create_token(session, "t-revoked", "admin", None).token
        tokens.revoke_token(session, "t-revoked", None)
    engine.dispose()
    secrets["unknown"] = "lrt_" + "A" * 43
    secrets["malformed"] = "not-a-token"
    with TestClient(create_app(settings), raise_server_exceptions=False) as http:
        yield http, secrets


def headers_for(kind: str, secrets: dict[str, str]) -> dict[str, str]:
    return {} if kind == "none" else {"Authorization": f"Bearer {secrets[kind]}"}


def test_every_route_of_the_app_has_the_expected_rule() -> None:
    """A new route must be added to EXPECTED (and so declare a rule) or this fails."""
    app = create_app(Settings(database_url="sqlite:///:memory:", storage_url="file:///tmp/x"))
    declared = {(rule.method, rule.path): rule.need for rule in route_rules(app)}
    assert declared == EXPECTED


@pytest.mark.parametrize("kind", [*BAD_CREDENTIALS, *SCOPES])
@pytest.mark.parametrize(("method", "path"), sorted(EXPECTED))
def test_authorization_matrix(
    secured: tuple[TestClient, dict[str, str]], method: str, path: str, kind: str
) -> None:
    http, secrets = secured
    need = EXPECTED[(method, path)]
    if path.startswith("/ui/"):
        check_ui_route(http, secrets, method, path, kind, need)
        return
    # Without a valid token the body is malformed JSON: auth must answer before it is parsed.
    body = b"{" if kind in BAD_CREDENTIALS else b"{}"
    response = http.request(
        method,
        concrete(path),
        content=body,
        headers={**headers_for(kind, secrets), "Content-Type": "application/json"},
    )
    if need == "public":
        assert response.status_code == 200, response.text
    elif kind in BAD_CREDENTIALS:
        assert response.status_code == 401, response.text
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        if path.startswith("/hf/"):  # the Hub's error headers (registry/hub/protocol.py)
            if kind == "none":
                assert response.headers["X-Error-Code"] == "GatedRepo"
            else:
                message = response.headers["X-Error-Message"]
                assert message == "Invalid credentials in Authorization header"
        else:
            assert response.json()["code"] == "not_authenticated"
    elif kind in ADMITS[need]:
        assert response.status_code not in (401, 403), response.text
        assert response.status_code < 500, response.text
    else:
        assert response.status_code == 403, response.text
        assert response.json()["code"] == "not_permitted"


def check_ui_route(
    http: TestClient, secrets: dict[str, str], method: str, path: str, kind: str, need: str
) -> None:
    """The UI's half of the matrix: the token is in the `lr_token` cookie; a visitor without a
    valid one is sent to sign in, one whose scope is short gets a 403 page."""
    cookies = [f"lr_csrf={UI_CSRF}"]
    if kind != "none":
        cookies.append(f"lr_token={secrets[kind]}")
    response = http.request(
        method,
        concrete(path),
        content=f"csrf={UI_CSRF}" if method == "POST" else None,
        headers={
            "Cookie": "; ".join(cookies),
            "Content-Type": "application/x-www-form-urlencoded",
        },
        follow_redirects=False,
    )
    signing_in = response.status_code == 303 and response.headers["location"].startswith(
        "/ui/sign-in"
    )
    if need == "public":  # the sign-in page; signing in with no token is refused with a page
        assert response.status_code in ((200,) if method == "GET" else (303, 401)), response.text
    elif kind in BAD_CREDENTIALS:
        assert signing_in, (response.status_code, response.headers.get("location"))
    elif kind in ADMITS[need]:
        assert not signing_in and response.status_code not in (401, 403), response.text
        assert response.status_code < 500, response.text
    else:
        assert response.status_code == 403, response.text
        assert "not_permitted" in response.text


def test_a_route_without_a_rule_stops_the_app_from_starting() -> None:
    from fastapi import APIRouter

    from registry.auth import check_routes

    app = create_app(Settings(database_url="sqlite:///:memory:", storage_url="file:///tmp/x"))
    router = APIRouter()

    @router.get("/api/v1/forgotten")
    def forgotten() -> dict[str, str]:
        return {}

    app.include_router(router)
    with pytest.raises(RuntimeError, match="GET /api/v1/forgotten"):
        check_routes(app, app.state.surfaces)


@pytest.mark.parametrize(
    ("path", "dependency", "complaint"),
    [
        ("/api/v1/open", "public", "public inside api"),
        ("/elsewhere", "read", "outside every surface, not public"),
    ],
)
def test_a_route_on_the_wrong_side_of_a_surface_stops_the_app_from_starting(
    path: str, dependency: str, complaint: str
) -> None:
    """AuthMiddleware authenticates exactly the surfaces' requests, before their bodies are
    read: a public route inside one would be refused, a token route outside one would read its
    body before the token is checked."""
    from fastapi import APIRouter

    from registry.auth import PUBLIC, READ, check_routes

    app = create_app(Settings(database_url="sqlite:///:memory:", storage_url="file:///tmp/x"))
    router = APIRouter()

    @router.get(path, dependencies=[PUBLIC if dependency == "public" else READ])
    def misplaced() -> dict[str, str]:
        return {}

    app.include_router(router)
    with pytest.raises(RuntimeError, match=f"GET {path} \\({complaint}\\)"):
        check_routes(app, app.state.surfaces)


# --- tokens through the API ----------------------------------------------------------------------


@pytest.fixture
def app_with_admin(tmp_path: Path) -> Iterator[tuple[TestClient, Settings, str]]:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path}/r.db", storage_url=f"file://{tmp_path}/objects"
    )
    upgrade(settings)
    engine = make_engine(settings.sqlalchemy_url)
    with session_scope(engine) as session:
        created = tokens.bootstrap_admin(session)
        assert created is not None
        assert tokens.bootstrap_admin(session) is None  # only on a database without tokens
    engine.dispose()
    with TestClient(create_app(settings), raise_server_exceptions=False) as http:
        yield http, settings, created.token


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def test_tokens_are_shown_once_stored_hashed_and_revoked_at_once(
    app_with_admin: tuple[TestClient, Settings, str],
) -> None:
    http, settings, admin = app_with_admin
    created = http.post(
        "/api/v1/tokens", json={"name": "ci", "scope": "write"}, headers=bearer(admin)
    )
    assert created.status_code == 201, created.text
    secret = created.json()["token"]
    assert created.json()["created_by"] == "admin"
    assert http.get("/api/v1/whoami", headers=bearer(secret)).json() == {
        "name": "ci",
        "scope": "write",
        "auth": True,
    }

    listed = http.get("/api/v1/tokens", headers=bearer(admin)).json()
    assert {item["name"] for item in listed} == {"admin", "ci"}
    assert secret not in json.dumps(listed)
    engine = make_engine(settings.sqlalchemy_url)
    with session_scope(engine) as session:
        rows = session.exec(select(ApiToken)).all()
        assert all(secret not in json.dumps(row.model_dump(mode="json")) for row in rows)

    again = http.post("/api/v1/tokens", json={"name": "ci", "scope": "read"}, headers=bearer(admin))
    assert again.status_code == 409 and "never reused" in again.json()["detail"]
    bad = http.post(
        "/api/v1/tokens", json={"name": "CI push", "scope": "write"}, headers=bearer(admin)
    )
    assert bad.status_code == 422 and bad.json()["code"] == "invalid_input"
    bad_scope = http.post(
        "/api/v1/tokens", json={"name": "x", "scope": "root"}, headers=bearer(admin)
    )
    assert bad_scope.status_code == 422

    revoked = http.delete("/api/v1/tokens/ci", headers=bearer(admin))
    assert revoked.status_code == 200 and revoked.json()["revoked_by"] == "admin"
    refused = http.get("/api/v1/adapters", headers=bearer(secret))
    assert refused.status_code == 401 and "'ci' was revoked" in refused.json()["detail"]
    assert [t["name"] for t in http.get("/api/v1/tokens", headers=bearer(admin)).json()] == [
        "admin"
    ]
    with_revoked = http.get("/api/v1/tokens?revoked=true", headers=bearer(admin)).json()
    assert {t["name"] for t in with_revoked} == {"admin", "ci"}

    last = http.delete("/api/v1/tokens/admin", headers=bearer(admin))
    assert last.status_code == 409 and "last admin token" in last.json()["detail"]
    assert http.delete("/api/v1/tokens/nobody", headers=bearer(admin)).status_code == 404

    with session_scope(engine) as session:
        events = session.exec(
            select(AuditEvent).where(col(AuditEvent.action).startswith("token."))
        ).all()
        assert [(e.action, e.subject, e.actor) for e in events] == [
            ("token.create", "admin", "(bootstrap)"),
            ("token.create", "ci", "admin"),
            ("token.revoke", "ci", "admin"),
        ]
    engine.dispose()


def push_over_http(
    http: TestClient, secret: str, folder: Path, name: str, **commit: str
) -> httpx.Response:
    """Push step by step (plan, upload through the API, commit) with one token."""
    files = manifest(folder)
    plan = http.post(
        f"/api/v1/adapters/{name}/uploads", json={"files": files}, headers=bearer(secret)
    )
    assert plan.status_code == 200, plan.text
    for item in plan.json()["missing"]:  # the folder store: PUT through the API
        path = next(f["path"] for f in files if f["sha256"] == item["sha256"])
        body = (folder / str(path)).read_bytes()
        put = http.put(item["url"], content=body, headers={**item["headers"], **bearer(secret)})
        assert put.status_code == 204, put.text
    body = {"files": files, **commit}  # alias=..., base=...
    return http.post(f"/api/v1/adapters/{name}/versions", json=body, headers=bearer(secret))


def new_token(http: TestClient, admin: str, name: str, scope: str) -> str:
    created = http.post(
        "/api/v1/tokens", json={"name": name, "scope": scope}, headers=bearer(admin)
    )
    assert created.status_code == 201, created.text
    return str(created.json()["token"])


def test_protected_aliases_move_only_by_admin(
    app_with_admin: tuple[TestClient, Settings, str], adapter_dir: Callable[..., Path]
) -> None:
    http, _settings, admin = app_with_admin
    dev = new_token(http, admin, "dev", "write")
    name = unique_name()
    assert push_over_http(http, dev, adapter_dir("llama"), name).status_code == 201
    aliases = f"/api/v1/adapters/{name}/aliases"
    staging = http.put(f"{aliases}/staging", json={"version": "1"}, headers=bearer(dev))
    assert staging.status_code == 200, staging.text
    refused = http.put(f"{aliases}/production", json={"version": "1"}, headers=bearer(dev))
    assert refused.status_code == 409 and refused.json()["code"] == "protected_alias"
    assert "only an admin token" in refused.json()["detail"]

    promoted = http.put(f"{aliases}/production", json={"version": "1"}, headers=bearer(admin))
    assert promoted.status_code == 200 and promoted.json()["by"] == "admin"
    removal = http.delete(f"{aliases}/production", headers=bearer(dev))
    assert removal.status_code == 409 and removal.json()["code"] == "protected_alias"
    moves = http.get(f"/api/v1/adapters/{name}/history", headers=bearer(dev)).json()["items"]
    assert [(m["alias"], m["actor"]) for m in moves] == [
        ("production", "admin"),
        ("staging", "dev"),
    ]
    assert http.delete(f"{aliases}/production", headers=bearer(admin)).status_code == 204


def test_push_with_a_protected_alias_by_a_write_token_stores_nothing(
    app_with_admin: tuple[TestClient, Settings, str], adapter_dir: Callable[..., Path]
) -> None:
    http, _settings, admin = app_with_admin
    dev = new_token(http, admin, "dev", "write")
    name = unique_name()
    commit = push_over_http(http, dev, adapter_dir("llama"), name, alias="production")
    assert commit.status_code == 409 and commit.json()["code"] == "protected_alias"
    assert http.get(f"/api/v1/adapters/{name}", headers=bearer(dev)).status_code == 404
    by_admin = push_over_http(http, admin, adapter_dir("llama"), name, alias="production")
    assert by_admin.status_code == 201, by_admin.text


def test_protected_aliases_are_configurable(tmp_path: Path) -> None:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path}/r.db",
        storage_url=f"file://{tmp_path}/objects",
        protected_aliases="production, canary",
    )
    assert settings.protected_alias_names == {"production", "canary"}
    with pytest.raises(ValueError, match="not an alias"):
        Settings(protected_aliases="Production")


@pytest.mark.parametrize(
    ("target", "allowed", "inside"),
    [
        ("dir:/srv/models/a", "dir:/srv/models", True),
        ("dir:/srv/models", "dir:/srv/models", True),
        ("dir:/srv/models-evil", "dir:/srv/models", False),
        ("dir:/srv/models/../etc", "dir:/srv/models", False),
        ("s3://bkt/models/x", "s3://bkt/models", True),
        ("s3://bkt/modelsx", "s3://bkt/models", False),
        ("s3://other/models/x", "s3://bkt/models", False),
        ("s3://bkt/anything", "s3://bkt", True),
        ("hub:acme/m", "hub:acme/*", True),
        ("hub:acme-evil/m", "hub:acme/*", False),
        ("hub:acme/m@dev", "hub:acme/m@main", False),
        ("hub:acme/m@dev", "hub:acme/m", True),
        ("dir:/srv/models/a", "s3://bkt/models", False),
    ],
)
def test_merge_target_allow_list(target: str, allowed: str, inside: bool) -> None:
    from registry.core.jobs import parse_allowed_target, parse_target, target_within

    assert target_within(parse_target(target), parse_allowed_target(allowed)) is inside


def test_write_tokens_send_merges_only_where_the_operator_allows(tmp_path: Path) -> None:
    """Workers publish with their own credentials: a write token may not point them anywhere."""
    settings = Settings(
        database_url=f"sqlite:///{tmp_path}/r.db",
        storage_url=f"file://{tmp_path}/objects",
        merge_targets="dir:/srv/models, hub:acme/*",
    )
    upgrade(settings)
    engine = make_engine(settings.sqlalchemy_url)
    with session_scope(engine) as session:
        admin = tokens.create_token(session, "root", "admin", None).token
        dev = tokens.create_token(session, "dev", "write", None).token
    engine.dispose()
    with TestClient(create_app(settings), raise_server_exceptions=False) as http:

        def merge(secret: str, target: str) -> httpx.Response:
            body = {"adapter": "nobody/nothing@1", "target": target}
            return http.post("/api/v1/merges", json=body, headers=bearer(secret))

        refused = merge(dev, "dir:/etc/cron.d")
        assert refused.status_code == 403 and refused.json()["code"] == "not_permitted"
        assert "LORA_REG_MERGE_TARGETS" in refused.json()["detail"]
        assert merge(dev, "hub:someone/else").status_code == 403
        # Past the check, the request fails on what it names (no such adapter): 404, not 403.
        for target in ("registry", "dir:/srv/models/summarizer", "hub:acme/summarizer"):
            assert merge(dev, target).status_code == 404, target
        assert merge(admin, "dir:/etc/cron.d").status_code == 404
    with pytest.raises(ValueError, match="LORA_REG_MERGE_TARGETS"):
        Settings(merge_targets="ftp://nowhere")


def test_a_read_token_checks_without_recording(
    app_with_admin: tuple[TestClient, Settings, str],
    adapter_dir: Callable[..., Path],
    base_dir: Callable[..., Path],
) -> None:
    from cli.bases import folder_signature
    from cli.client import _signature_body

    http, _settings, admin = app_with_admin
    reader, writer = new_token(http, admin, "ro", "read"), new_token(http, admin, "dev", "write")
    name = unique_name()
    pushed = push_over_http(http, writer, adapter_dir("llama"), name, base="org/tiny")
    assert pushed.status_code == 201, pushed.text
    base = base_dir("llama")
    body = {"base": "org/tiny", "source": f"file://{base}"}
    body.update(_signature_body(folder_signature(base).signature))
    registered = http.post("/api/v1/bases", json=body, headers=bearer(writer))
    assert registered.status_code in (200, 201), registered.text
    path = f"/api/v1/adapters/{name}/versions/1/check"
    for secret, recorded in ((reader, False), (writer, True)):
        checked = http.post(path, json={}, headers=bearer(secret))  # against its own base
        assert checked.status_code == 200, checked.text
        version = http.get(f"/api/v1/adapters/{name}/versions/1", headers=bearer(reader)).json()
        assert (version["compat_status"] is not None) is recorded


# --- real servers ---------------------------------------------------------------------------------


@pytest.fixture(params=BACKENDS)
def secured_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RunningServer]:
    with own_server(request, tmp_path / "server", request.param, LORA_REG_AUTH="on") as running:
        yield running


def as_token(server: RunningServer, secret: str) -> Callable[..., subprocess.CompletedProcess[str]]:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return server.cli(*args, env={"LORA_REG_TOKEN": secret})

    return cli


def create_tokens(server: RunningServer, **scopes: str) -> dict[str, str]:
    """Tokens made with the bootstrap admin token through the CLI: name -> secret."""
    secrets = {}
    for name, scope in scopes.items():
        created = server.cli("token", "create", name, "--scope", scope, "--json")
        assert created.returncode == 0, created.stderr
        secrets[name] = json.loads(created.stdout)["token"]
    return secrets


def push_for_merge(
    cli: Callable[..., subprocess.CompletedProcess[str]], base: Path, adapter: Path
) -> str:
    """Register `base` as org/tiny (stored) and push `adapter` on it; the adapter's name."""
    added = cli("base", "add", "org/tiny", "--from", str(base), "--upload")
    assert added.returncode == 0, added.stderr
    name = unique_name()
    pushed = cli("push", str(adapter), name, "--base", "org/tiny")
    assert pushed.returncode == 0, pushed.stderr
    return name


def test_bootstrap_token_is_printed_once_and_written_0600(secured_server: RunningServer) -> None:
    token_file = Path(secured_server.env["LORA_REG_BOOTSTRAP_TOKEN_FILE"])
    assert secured_server.token is not None
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    logs = list(secured_server.workdir.glob("server-*.log"))
    assert sum(log.read_text().count(secured_server.token) for log in logs) == 1

    # A restart on the same database creates no second token and leaves the file alone.
    stop_server(secured_server.process)
    # An operator who lost the admin token makes another one straight in the database.
    workdir, env = secured_server.workdir, secured_server.env
    rescue = run_cli("db", "create-token", "rescue", "--scope", "admin", cwd=workdir, env=env)
    assert rescue.returncode == 0, rescue.stderr
    bad_scope = run_cli("db", "create-token", "x", "--scope", "root", cwd=workdir, env=env)
    assert bad_scope.returncode == 2
    bad_name = run_cli("db", "create-token", "Rescue Me", cwd=workdir, env=env)
    assert bad_name.returncode == 6 and "invalid token name" in bad_name.stderr
    again = start_server(
        secured_server.workdir, secured_server.env, secured_server.backend, secured_server.bucket
    )
    try:
        assert again.token == secured_server.token
        listed = again.cli("token", "ls", "--json")
        assert listed.returncode == 0, listed.stderr
        assert [t["name"] for t in json.loads(listed.stdout)["items"]] == ["admin", "rescue"]
        me = again.cli("whoami", "--json", env={"LORA_REG_TOKEN": rescue.stdout.strip()})
        assert json.loads(me.stdout) == {"name": "rescue", "scope": "admin", "auth": True}
        audit = json.loads(again.cli("audit", "--subject", "rescue", "--json").stdout)["items"]
        assert [(e["action"], e["actor"]) for e in audit] == [("token.create", "(database)")]
        port = again.url.rsplit(":", 1)[1]
        assert "bootstrap admin token" not in (workdir / f"server-{port}.log").read_text()
    finally:
        stop_server(again.process)


def test_a_bootstrap_token_that_cannot_be_written_is_still_shown(tmp_path: Path) -> None:
    """Its row is committed before the file is written: the secret must reach the operator."""
    (tmp_path / "a-file").write_text("not a folder")
    env = {
        "LORA_REG_DATABASE_URL": f"sqlite:///{tmp_path}/r.db",
        "LORA_REG_STORAGE_URL": f"file://{tmp_path}/objects",
        "LORA_REG_BOOTSTRAP_TOKEN_FILE": str(tmp_path / "a-file" / "admin-token"),
    }
    refused = run_cli("server", "--port", "1", cwd=tmp_path, env=env, timeout=60)
    assert refused.returncode == 7 and "NOT written" in refused.stderr
    secret = re.search(r"lrt_[A-Za-z0-9_-]{43}", refused.stderr)
    assert secret is not None

    # Started again with a writable path: no second token; the printed one works.
    token_file = tmp_path / "secrets" / "admin-token"
    token_file.parent.mkdir()
    token_file.write_text("an older file, world-readable\n")
    token_file.chmod(0o644)
    env["LORA_REG_BOOTSTRAP_TOKEN_FILE"] = str(token_file)
    server = start_server(tmp_path, env, "sqlite-folder")
    try:
        me = server.cli("whoami", "--json", env={"LORA_REG_TOKEN": secret.group(0)})
        assert json.loads(me.stdout)["name"] == "admin"
        assert token_file.read_text() == "an older file, world-readable\n"  # nothing rewritten
    finally:
        stop_server(server.process)


def test_the_bootstrap_file_replaces_an_older_world_readable_one(tmp_path: Path) -> None:
    from registry.server import write_secret

    token_file = tmp_path / "admin-token"
    token_file.write_text("old")
    token_file.chmod(0o644)
    decoy = tmp_path / "decoy"
    decoy.write_text("untouched")
    (tmp_path / "link").symlink_to(decoy)
    write_secret(token_file, "lrt_secret")
    write_secret(tmp_path / "link", "lrt_other")  # replaces the link, never writes through it
    assert token_file.read_text() == "lrt_secret\n"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert decoy.read_text() == "untouched"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")] == []


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("localhost", True),
        ("::1", True),
        ("[::1]", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.5", False),
        ("registry.internal", False),
    ],
)
def test_auth_off_needs_a_loopback_address(host: str, loopback: bool) -> None:
    from registry.server import StartupError, check_auth

    settings = Settings(auth=False)
    if loopback:
        check_auth(settings, host)
    else:
        with pytest.raises(StartupError, match="LORA_REG_AUTH=off"):
            check_auth(settings, host)
    check_auth(Settings(auth=True), host)  # with auth on, any address


def test_a_job_answers_only_to_the_token_that_claimed_it(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    adapter_dir: Callable[..., Path],
    base_dir: Callable[..., Path],
) -> None:
    with own_server(request, tmp_path, LORA_REG_AUTH="on") as server:
        secrets = create_tokens(server, trainer="write", **{"gpu-1": "worker", "gpu-2": "worker"})
        trainer = as_token(server, secrets["trainer"])
        name = push_for_merge(trainer, base_dir("llama"), adapter_dir("llama"))
        assert trainer("merge", f"{name}@1").returncode == 0

        def call(token: str, path: str, body: dict[str, object]) -> httpx.Response:
            return httpx.post(f"{server.url}/api/v1/merges{path}", json=body, headers=bearer(token))

        claimed = call(secrets["gpu-1"], "/claim", {"worker": "gpu-1", "lease_s": MIN_LEASE_S})
        assert claimed.status_code == 200, claimed.text
        job = claimed.json()["job"]["id"]
        # gpu-2 knows the worker name (any reader sees it) but not gpu-1's token.
        beat = {"worker": "gpu-1"}
        stolen = call(secrets["gpu-2"], f"/{job}/heartbeat", beat)
        assert stolen.status_code == 403 and "claimed with another token" in stolen.text
        failed = {"worker": "gpu-1", "status": "failed", "error": {"code": "x", "message": "x"}}
        assert call(secrets["gpu-2"], f"/{job}/finish", failed).status_code == 403
        assert call(secrets["gpu-1"], f"/{job}/heartbeat", beat).status_code == 200

        # gpu-1's lease runs out and gpu-2 claims the job: gpu-1 is told to drop it (lease_lost,
        # which workers handle), not refused as an impostor (which would stop its worker).
        time.sleep(MIN_LEASE_S + 1)
        again = call(secrets["gpu-2"], "/claim", {"worker": "gpu-2", "lease_s": MIN_LEASE_S})
        assert again.status_code == 200 and again.json()["job"]["id"] == job
        for path, body in ((f"/{job}/heartbeat", beat), (f"/{job}/finish", failed)):
            late = call(secrets["gpu-1"], path, body)
            assert late.status_code == 409 and late.json()["code"] == "lease_lost", late.text
        beat_2 = {"worker": "gpu-2"}
        assert call(secrets["gpu-2"], f"/{job}/heartbeat", beat_2).status_code == 200
        started = json.loads(server.cli("audit", "--action", "merge.started", "--json").stdout)
        assert [e["actor"] for e in started["items"]] == ["gpu-1", "gpu-2"]
        requeued = json.loads(server.cli("audit", "--action", "merge.requeued", "--json").stdout)
        assert [(e["actor"], e["details"]["noticed_by"]) for e in requeued["items"]] == [
            ("(lease-expiry)", "gpu-2")
        ]


def test_who_moved_what_and_when_across_actors(
    secured_server: RunningServer, adapter_dir: Callable[..., Path]
) -> None:
    """Point-in-time resolution across moves by three different tokens, audit actors, scopes."""
    server = secured_server
    secrets = create_tokens(server, alice="write", bob="write", release="admin", ro="read")
    alice, bob, release, ro = (
        as_token(server, secrets[n]) for n in ("alice", "bob", "release", "ro")
    )
    assert json.loads(alice("whoami", "--json").stdout) == {
        "name": "alice",
        "scope": "write",
        "auth": True,
    }

    name = unique_name()
    assert alice("push", str(adapter_dir("llama", seed=1)), name).returncode == 0
    assert bob("push", str(adapter_dir("llama", seed=2)), name).returncode == 0
    steps = [
        (alice, "1", "staging"),
        (bob, "2", "staging"),
        (release, "1", "production"),
        (release, "2", "production"),
    ]
    for actor, version, alias in steps:
        moved = actor("alias", "set", f"{name}@{version}", alias)
        assert moved.returncode == 0, moved.stderr
    refused = alice("alias", "set", f"{name}@1", "production")
    assert refused.returncode == 4 and "protected" in refused.stderr
    denied = ro("push", str(adapter_dir("llama", seed=3)), name)
    assert denied.returncode == 5 and "scope" in denied.stderr
    not_a_worker = ro("worker", "--name", "ro-worker")  # exits instead of retrying forever
    assert not_a_worker.returncode == 5 and "scope admin or worker" in not_a_worker.stderr
    anonymous = server.cli("ls", env={"LORA_REG_TOKEN": ""})
    assert anonymous.returncode == 5 and "needs a token" in anonymous.stderr

    history = json.loads(ro("history", name, "--json").stdout)["items"]
    assert [(m["alias"], m["version"], m["actor"]) for m in reversed(history)] == [
        ("staging", 1, "alice"),
        ("staging", 2, "bob"),
        ("production", 1, "release"),
        ("production", 2, "release"),
    ]
    production_moves = [m for m in reversed(history) if m["alias"] == "production"]
    for move in production_moves:
        at = datetime.fromisoformat(move["at"]).isoformat()
        resolved = ro("resolve", f"{name}@production", "--at", at, "--json")
        assert resolved.returncode == 0, resolved.stderr
        answer = json.loads(resolved.stdout)
        assert answer["version"] == move["version"] and answer["by"] == "release"

    audit = json.loads(ro("audit", "--subject", name, "--json").stdout)["items"]
    assert {(e["action"], e["actor"]) for e in audit} >= {
        ("version.push", "alice"),
        ("version.push", "bob"),
        ("alias.set", "alice"),
        ("alias.set", "bob"),
        ("alias.set", "release"),
    }

    assert server.cli("token", "revoke", "bob").returncode == 0
    gone = bob("ls")
    assert gone.returncode == 5 and "revoked" in gone.stderr
    not_admin = alice("token", "create", "mallory", "--scope", "admin")
    assert not_admin.returncode == 5


def test_the_embedded_worker_merges_with_auth_on(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    adapter_dir: Callable[..., Path],
    base_dir: Callable[..., Path],
) -> None:
    """Its token exists only in the server process; a write token requests the merge."""
    with own_server(
        request, tmp_path, LORA_REG_AUTH="on", LORA_REG_EMBEDDED_WORKER="true"
    ) as server:
        trainer = as_token(server, create_tokens(server, trainer="write")["trainer"])
        name = push_for_merge(trainer, base_dir("llama"), adapter_dir("llama"))
        merged = trainer("merge", f"{name}@1", "--wait", "--json")
        assert merged.returncode == 0, merged.stderr
        job = json.loads(merged.stdout)
        assert job["status"] == "succeeded" and job["worker"].startswith("embedded-")
        events = json.loads(server.cli("audit", "--action", "merge.started", "--json").stdout)
        assert [e["actor"] for e in events["items"]] == ["(embedded-worker)"]


def test_auth_off_is_refused_on_a_non_loopback_address(tmp_path: Path) -> None:
    env = {
        "LORA_REG_AUTH": "off",
        "LORA_REG_DATABASE_URL": f"sqlite:///{tmp_path}/r.db",
        "LORA_REG_STORAGE_URL": f"file://{tmp_path}/objects",
    }
    refused = run_cli(
        "server", "--host", "0.0.0.0", "--port", "1", cwd=tmp_path, env=env, timeout=60
    )
    assert refused.returncode == 7
    assert "LORA_REG_AUTH=off" in refused.stderr and "127.0.0.1" in refused.stderr
    assert not os.path.exists(tmp_path / "r.db")  # refused before touching anything


def test_replicas_starting_together_create_one_bootstrap_token(
    pg_database: Callable[[], str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import threading

    from registry.server import bootstrap_admin_token

    settings = Settings(
        database_url=pg_database(),
        storage_url=f"file://{tmp_path}/objects",
        bootstrap_token_file=tmp_path / "admin-token",
    )
    upgrade(settings)
    start = threading.Barrier(4)
    failures: list[BaseException] = []

    def replica() -> None:
        start.wait()
        try:
            bootstrap_admin_token(settings)
        except BaseException as exc:  # collected: a thread's exception would be lost
            failures.append(exc)

    threads = [threading.Thread(target=replica) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert capsys.readouterr().err.count("created the bootstrap admin token") == 1
    engine = make_engine(settings.sqlalchemy_url)
    with session_scope(engine) as session:
        rows = session.exec(select(ApiToken)).all()
    engine.dispose()
    assert [row.name for row in rows] == ["admin"]
    assert (tmp_path / "admin-token").read_text().strip().startswith("lrt_")
