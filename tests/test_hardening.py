"""Hardening at the edge of the server (issue 14, items 7, 9, 10), against real `lora-reg server`
subprocesses: request bodies are bounded per route before they are read, an answer given before
its body was read closes the connection, JSON bodies are decoded off the event loop, and with
auth off only loopback Host names are answered.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import select
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from pydantic import BaseModel, field_validator

from registry.app import create_app
from registry.core.errors import InvalidPath, RegistryError
from registry.guards import ThreadedJSONRoute, is_loopback_host
from registry.settings import Settings
from tests.conftest import RunningServer, own_server

MiB = 1024 * 1024
SMALL_JSON = 64 * 1024  # LORA_REG_MAX_JSON_BODY of the `local` server
SMALL_SIGNATURE = 128 * 1024  # its LORA_REG_MAX_BASE_SIGNATURE_BODY


@pytest.fixture(scope="module")
def secured(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    """Auth on, default limits."""
    with own_server(request, tmp_path_factory.mktemp("secured"), LORA_REG_AUTH="on") as server:
        yield server


@pytest.fixture(scope="module")
def read_token(secured: RunningServer) -> str:
    created = secured.cli("token", "create", "reader", "--scope", "read", "--json")
    assert created.returncode == 0, created.stderr
    return str(json.loads(created.stdout)["token"])


@pytest.fixture(scope="module")
def local(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    """Auth off (a developer's laptop), small body limits."""
    limits = {
        "LORA_REG_MAX_JSON_BODY": str(SMALL_JSON),
        "LORA_REG_MAX_BASE_SIGNATURE_BODY": str(SMALL_SIGNATURE),
    }
    with own_server(request, tmp_path_factory.mktemp("local"), **limits) as server:
        yield server


# --- raw HTTP/1.1, to see what happens on one connection ------------------------------------------


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def problem(self) -> dict[str, object]:
        assert self.headers["content-type"] == "application/problem+json", self.headers
        problem = json.loads(self.body)
        assert isinstance(problem, dict)
        return problem


class RawConnection:
    """One TCP connection to a server; requests are written byte for byte."""

    def __init__(self, server: RunningServer, timeout: float = 10) -> None:
        self.address = server.url.removeprefix("http://")
        host, port = self.address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.buffer = b""

    def close(self) -> None:
        self.sock.close()

    def head(self, method: str, path: str, **headers: str | int) -> bytes:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.address}"]
        lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def send(self, data: bytes) -> bool:
        """False when the server has closed the connection."""
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            return False
        return True

    def answered(self) -> bool:
        """The server has sent something (or closed the connection)."""
        return bool(self.buffer) or bool(select.select([self.sock], [], [], 0)[0])

    def _fill(self) -> bool:
        try:
            chunk = self.sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        self.buffer += chunk
        return bool(chunk)

    def response(self) -> RawResponse | None:
        """The next response, or None when the server closed the connection instead.
        A server that keeps the connection open without answering times the read out."""
        while b"\r\n\r\n" not in self.buffer:
            if not self._fill():
                assert not self.buffer, f"connection closed mid-response: {self.buffer!r}"
                return None
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(self.buffer) < length:
            assert self._fill(), "connection closed mid-body"
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return RawResponse(int(status_line.split()[1]), headers, body)


def identify_body(count: int, path_bytes: int = 20) -> bytes:
    """An identify request for `count` files with paths of `path_bytes` bytes, as the CLI
    sends it (compact JSON)."""
    files = [
        {"path": f"{i:08d}".ljust(path_bytes, "x"), "size": 2**40, "sha256": f"{i:064x}"}
        for i in range(count)
    ]
    return json.dumps({"files": files}, separators=(",", ":")).encode()


def vm_rss_mb(server: RunningServer) -> float:
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


# --- item 7: bounded bodies ---------------------------------------------------------------------


def test_a_body_declared_too_large_is_refused_before_a_byte_of_it_is_read(
    secured: RunningServer, read_token: str
) -> None:
    """366 MB announced, 64 KiB sent: the 413 comes back at once (a server that waited for the
    body would time this read out) and the connection is closed."""
    connection = RawConnection(secured)
    try:
        connection.send(
            connection.head(
                "POST",
                "/api/v1/identify",
                Authorization=f"Bearer {read_token}",
                Content_Type="application/json",
                Content_Length=366 * 1000**2,
            )
            + b'{"files":['
            + b" " * (64 * 1024)
        )
        response = connection.response()
        assert response is not None and response.status == 413
        problem = response.problem()
        assert problem["code"] == "body_too_large"
        assert "LORA_REG_MAX_JSON_BODY" in str(problem["detail"])
        assert f"{8 * MiB}-byte limit" in str(problem["detail"])
        assert response.headers["connection"] == "close"
        assert connection.response() is None
    finally:
        connection.close()


def test_a_streamed_oversized_body_is_cut_off_and_the_server_does_not_grow(
    secured: RunningServer, read_token: str
) -> None:
    """A valid identify body of 48 MB sent chunked (no Content-Length): the server stops at its
    8 MiB limit with 413, its memory stays flat, and /healthz still answers."""
    auth = {"Authorization": f"Bearer {read_token}", "Content-Type": "application/json"}
    warm = httpx.post(f"{secured.url}/api/v1/identify", content=identify_body(5000), headers=auth)
    assert warm.status_code == 200, warm.text
    before = vm_rss_mb(secured)

    entry = b'{"path":"weights/adapter_model.safetensors","size":1,"sha256":"' + b"0" * 64 + b'"},'
    chunk = entry * (256 * 1024 // len(entry))
    connection = RawConnection(secured, timeout=60)
    try:
        connection.send(
            connection.head(
                "POST",
                "/api/v1/identify",
                Authorization=f"Bearer {read_token}",
                Content_Type="application/json",
                Transfer_Encoding="chunked",
            )
        )
        parts = [b'{"files":[', *[chunk] * (48 * MiB // len(chunk)), entry[:-1] + b"]}"]
        for part in parts:
            if connection.answered():
                break
            if not connection.send(b"%x\r\n%s\r\n" % (len(part), part)):
                break
        else:
            connection.send(b"0\r\n\r\n")
        response = connection.response()
    finally:
        connection.close()
    after = vm_rss_mb(secured)

    assert after - before < 40, f"server RSS grew from {before:.0f} MB to {after:.0f} MB"
    assert httpx.get(f"{secured.url}/healthz", timeout=10).status_code == 200
    assert response is not None and response.status == 413
    assert response.problem()["code"] == "body_too_large"
    assert response.headers["connection"] == "close"


def test_the_default_json_limit_fits_the_largest_identify_and_refuses_a_byte_more(
    secured: RunningServer, read_token: str
) -> None:
    auth = {"Authorization": f"Bearer {read_token}", "Content-Type": "application/json"}
    largest = identify_body(10_000, path_bytes=255)  # the most identify takes, longest paths
    assert 3 * MiB < len(largest) < 8 * MiB
    found = httpx.post(f"{secured.url}/api/v1/identify", content=largest, headers=auth)
    assert found.status_code == 200, found.text
    assert found.json()["status"] == "unknown"

    over = largest[:-1] + b" " * (8 * MiB - len(largest) + 1) + b"}"
    assert len(over) == 8 * MiB + 1
    refused = httpx.post(f"{secured.url}/api/v1/identify", content=over, headers=auth)
    assert refused.status_code == 413 and refused.json()["code"] == "body_too_large"


def test_each_route_has_its_own_body_limit(local: RunningServer) -> None:
    """JSON routes: LORA_REG_MAX_JSON_BODY; base registration (tensor signatures): its own
    LORA_REG_MAX_BASE_SIGNATURE_BODY; blob bytes: not the JSON limit (they stream to storage)."""
    padding = b" " * (SMALL_JSON + 1)
    plan = httpx.post(
        f"{local.url}/api/v1/adapters/ns/a/uploads",
        content=b'{"files":[]}' + padding,
        headers={"Content-Type": "application/json"},
    )
    assert plan.status_code == 413, plan.text
    assert plan.json()["code"] == "body_too_large"
    assert "LORA_REG_MAX_JSON_BODY" in plan.json()["detail"]
    assert plan.json()["details"] == {"limit": SMALL_JSON, "setting": "LORA_REG_MAX_JSON_BODY"}

    signature = {"base": "org/big", "source": "hf://org/big", "config": {"model_type": "llama"}}
    body = json.dumps(signature).encode()
    under = httpx.post(
        f"{local.url}/api/v1/bases",
        content=body[:-1] + padding + b"}",
        headers={"Content-Type": "application/json"},
    )
    assert under.status_code != 413, under.text
    over = httpx.post(
        f"{local.url}/api/v1/bases",
        content=body[:-1] + b" " * SMALL_SIGNATURE + b"}",
        headers={"Content-Type": "application/json"},
    )
    assert over.status_code == 413 and over.json()["code"] == "body_too_large"
    assert "LORA_REG_MAX_BASE_SIGNATURE_BODY" in over.json()["detail"]

    blob = b"b" * (4 * SMALL_JSON)
    put = httpx.put(
        f"{local.url}/api/v1/blobs/sha256:{hashlib.sha256(blob).hexdigest()}", content=blob
    )
    assert put.status_code == 204, put.text


def on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class Files(BaseModel):
    paths: list[str]
    validated_on_loop: ClassVar[list[bool]] = []

    @field_validator("paths")
    @classmethod
    def _spy(cls, value: list[str]) -> list[str]:
        cls.validated_on_loop.append(on_event_loop())
        if ".." in value:
            raise InvalidPath("'..' is not allowed")  # a registry error, not a ValueError
        return value


async def registry_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RegistryError)
    return JSONResponse({"code": exc.code}, status_code=exc.status)


def test_json_bodies_are_decoded_and_validated_off_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    decoded_on_loop: list[bool] = []
    validated_on_loop = Files.validated_on_loop
    validated_on_loop.clear()
    loads = json.loads

    def spying_loads(text: str | bytes, **kwargs: Any) -> Any:
        decoded_on_loop.append(on_event_loop())
        return loads(text, **kwargs)

    router = APIRouter(route_class=ThreadedJSONRoute)

    @router.post("/count")
    async def count(files: Files) -> int:
        return len(files.paths)

    @router.post("/pair")
    async def pair(a: Files, b: Files) -> int:  # two body parameters: embedded
        return len(a.paths) + len(b.paths)

    app = FastAPI()
    app.include_router(router)
    app.add_exception_handler(RegistryError, registry_error)
    monkeypatch.setattr(json, "loads", spying_loads)
    with TestClient(app) as http:
        counted = http.post("/count", json={"paths": ["a", "b"]})
        assert decoded_on_loop == [False] and validated_on_loop == [False]
        paired = http.post("/pair", json={"a": {"paths": ["a"]}, "b": {"paths": []}})
        assert decoded_on_loop == [False, False]
        malformed = http.post("/count", content=b"{", headers={"Content-Type": "application/json"})
        invalid = http.post("/count", json={"paths": "a"})
        refused = http.post("/count", json={"paths": [".."]})
        assert decoded_on_loop == [False] * 5
    assert counted.status_code == 200 and counted.json() == 2
    assert paired.status_code == 200 and paired.json() == 1
    # Errors come out as without the thread: FastAPI validates again and raises them itself.
    assert malformed.status_code == 422 and invalid.status_code == 422
    assert invalid.json()["detail"][0]["loc"] == ["body", "paths"]
    assert refused.status_code == 422 and refused.json()["code"] == "invalid_path"


def test_every_route_with_a_body_decodes_it_off_the_event_loop() -> None:
    from fastapi.routing import APIRoute

    app = create_app(Settings(database_url="sqlite:///:memory:", storage_url="file:///tmp/x"))
    routes: list[Any]
    try:  # FastAPI >= 0.16x includes routers lazily; this walks them with their prefixes
        from fastapi.routing import iter_route_contexts
    except ImportError:  # older FastAPI: app.routes is already flat
        routes = list(app.routes)
    else:
        routes = list(iter_route_contexts(app.routes))
    originals = [getattr(route, "original_route", route) for route in routes]
    with_body = [r for r in originals if isinstance(r, APIRoute) and r.body_field is not None]
    assert len(with_body) >= 10
    plain = [route.path for route in with_body if not isinstance(route, ThreadedJSONRoute)]
    assert plain == []


# --- item 9: early answers close the connection ------------------------------------------------


def test_a_second_request_after_an_early_401_is_never_read_as_the_first_ones_body(
    secured: RunningServer,
) -> None:
    """The client stops sending its body when the 401 arrives and reuses the connection: the
    next request must not be taken for the rest of that body."""
    connection = RawConnection(secured, timeout=5)
    second = connection.head("GET", "/healthz")
    try:
        connection.send(
            connection.head(
                "POST",
                "/api/v1/identify",
                Content_Type="application/json",
                Content_Length=10 + len(second),
            )
            + b'{"files":['
        )
        refused = connection.response()
        assert refused is not None and refused.status == 401
        assert refused.problem()["code"] == "not_authenticated"
        connection.send(second)
        try:
            answer = connection.response()
        except TimeoutError:
            pytest.fail("the second request got no answer: it was read as the first's body")
        assert answer is None or (answer.status == 200 and b'"ok"' in answer.body)
        assert refused.headers["connection"] == "close"
    finally:
        connection.close()


def test_a_second_request_after_an_early_413_is_never_read_as_the_first_ones_body(
    local: RunningServer,
) -> None:
    """Only early answers close: a request whose body was read keeps the connection open."""
    connection = RawConnection(local, timeout=5)
    second = connection.head("GET", "/healthz")
    read = b'{"files":[]}'
    try:
        connection.send(
            connection.head(
                "POST",
                "/api/v1/identify",
                Content_Type="application/json",
                Content_Length=len(read),
            )
            + read
        )
        answered = connection.response()
        assert answered is not None and answered.status == 422
        assert "connection" not in answered.headers

        connection.send(
            connection.head(
                "POST",
                "/api/v1/identify",
                Content_Type="application/json",
                Content_Length=SMALL_JSON + 1,
            )
            + b'{"files":['
        )
        refused = connection.response()
        assert refused is not None and refused.status == 413
        assert refused.problem()["code"] == "body_too_large"
        connection.send(second + b" " * (SMALL_JSON - 10 - len(second)))
        try:
            answer = connection.response()
        except TimeoutError:
            pytest.fail("the second request got no answer: it was read as the first's body")
        assert answer is None or (answer.status == 200 and b'"ok"' in answer.body)
        assert refused.headers["connection"] == "close"
    finally:
        connection.close()


# --- item 10: loopback Host names only, with auth off -------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("LocalHost:8000", True),
        ("127.0.0.1", True),
        ("127.0.0.1:8000", True),
        ("127.45.6.7:1", True),
        ("[::1]", True),
        ("[::1]:8000", True),
        ("evil.example", False),
        ("evil.example:8000", False),
        ("localhost.evil.example", False),
        ("127.0.0.1.nip.io", False),
        ("0.0.0.0:8000", False),
        ("10.0.0.1", False),
        ("[::1]x", False),
        ("localhost:80:80", False),
        ("2130706433", False),
        ("", False),
    ],
)
def test_loopback_host_names(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


def test_with_auth_off_only_loopback_host_names_are_answered(
    local: RunningServer, secured: RunningServer
) -> None:
    port = local.url.rsplit(":", 1)[1]
    for host in (f"localhost:{port}", "127.0.0.1", f"127.0.0.2:{port}", f"[::1]:{port}"):
        response = httpx.get(f"{local.url}/healthz", headers={"Host": host})
        assert response.status_code == 200, (host, response.text)

    # What a page on evil.example re-pointed at 127.0.0.1 (DNS rebinding) would send.
    for host in (f"evil.example:{port}", "localhost.evil.example"):
        for method, path, body in (
            ("GET", "/api/v1/adapters", None),
            ("POST", "/api/v1/tokens", {"name": "rebound", "scope": "admin"}),
        ):
            refused = httpx.request(method, f"{local.url}{path}", json=body, headers={"Host": host})
            assert refused.status_code == 400, (host, refused.text)
            assert refused.headers["content-type"] == "application/problem+json"
            problem = refused.json()
            assert problem["code"] == "host_not_allowed"
            assert "LORA_REG_AUTH=off" in problem["detail"]
            assert "http://127.0.0.1:PORT" in problem["detail"]
    tokens = httpx.get(f"{local.url}/api/v1/tokens").json()
    assert "rebound" not in [token["name"] for token in tokens]

    # With auth on, any name is fine (behind a proxy, under a DNS name).
    named = httpx.get(f"{secured.url}/healthz", headers={"Host": "registry.example:443"})
    assert named.status_code == 200
