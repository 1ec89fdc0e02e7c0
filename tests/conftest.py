"""Shared fixtures: real SeaweedFS, real PostgreSQL, SQLite, real servers and real adapters.

- `seaweed`: one `weed mini` for the session on free loopback ports; each user makes its own
  `test-...` bucket.
- `pg_database()`: a fresh PostgreSQL database (name ending in `_test`), dropped at the end.
- `server(backend)`: a real `lora-reg server` subprocess per backend combination, started once
  per session (`sqlite-folder` is the embedded default, `postgres-s3` production).
- `adapter_dir(arch, seed)`: real PEFT adapters made from tiny random transformers models.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg
import pytest

from cli.client import Registry
from tests.support.seaweed import SeaweedServer, s3_client, start_seaweed, stop_seaweed

PG_ADMIN_URL = os.environ.get("LORA_REG_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
BACKENDS = ["sqlite-folder", "postgres-s3"]
MULTIPART_BYTES = 5 * 1024 * 1024
ALL_BACKENDS = ["sqlite-folder", "postgres-s3", "sqlite-s3", "postgres-folder"]


def unique(prefix: str = "t") -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def unique_name() -> str:
    """A fresh adapter name, so tests sharing a server never see each other's adapters."""
    return f"{unique('ns')}/adapter"


def push_versions(client: Registry, adapter_dir: Callable[..., Path], count: int) -> str:
    """A fresh adapter with `count` versions of real PEFT llama adapters (seeds 0, 1, ...)."""
    name = unique_name()
    for seed in range(count):
        client.push(adapter_dir("llama", seed=seed), name)
    return name


# --- object store ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    server = start_seaweed(tmp_path_factory.mktemp("seaweed"))
    try:
        yield server
    finally:
        stop_seaweed(server)


def make_bucket(endpoint: str) -> str:
    bucket = f"test-{uuid.uuid4().hex[:16]}"
    s3_client(endpoint).create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture
def s3_env(seaweed: SeaweedServer, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """boto3 environment for in-process S3 use, pointing at the session's SeaweedFS."""
    env = s3_environment(seaweed.endpoint)
    # A developer's shell must not redirect the tests to another endpoint or account.
    for key in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def s3_environment(endpoint: str) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "any",
        "AWS_SECRET_ACCESS_KEY": "any",
        "AWS_REGION": "us-east-1",
    }


# --- databases ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_database() -> Iterator[Callable[[], str]]:
    """Factory of fresh PostgreSQL databases (SQLAlchemy-free URLs), all dropped at the end."""
    created: list[str] = []

    def create() -> str:
        name = f"lora_reg_{uuid.uuid4().hex[:12]}_test"
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        created.append(name)
        return PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"

    yield create
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as connection:
        for name in created:
            assert name.endswith("_test")
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --- servers -----------------------------------------------------------------------------------


@dataclass
class RunningServer:
    backend: str
    url: str
    env: dict[str, str]
    workdir: Path
    process: subprocess.Popen[bytes]
    bucket: str | None = None
    extra: dict[str, str] = field(default_factory=dict)
    token: str | None = None  # the bootstrap admin token, when auth is on

    def client(self, cache_dir: Path, token: str | None = None) -> Registry:
        return Registry(self.url, token or self.token, cache_dir=cache_dir)

    def cli(
        self,
        *args: str,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        """Run `lora-reg ARGS` in a subprocess against this server, as a user would."""
        return run_cli(
            *args,
            cwd=cwd or self.workdir,
            env={"LORA_REG_URL": self.url, "LORA_REG_TOKEN": self.token or "", **(env or {})},
            timeout=timeout,
        )


def lora_reg_command() -> list[str]:
    """The installed `lora-reg` console script (what users run), else the module."""
    script = Path(sys.executable).parent / "lora-reg"
    return [str(script)] if script.exists() else [sys.executable, "-m", "cli.main"]


def run_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*lora_reg_command(), *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_environment(
    backend: str, workdir: Path, seaweed: SeaweedServer | None, pg_database: Callable[[], str]
) -> tuple[dict[str, str], str | None]:
    database, store = backend.split("-")
    # Tests that merge start their own workers (or ask for the embedded one explicitly).
    env = {"LORA_REG_CACHE_DIR": str(workdir / "client-cache"), "LORA_REG_EMBEDDED_WORKER": "false"}
    # Tokens and scopes are tested by tests/test_auth.py, on servers started with auth on.
    env["LORA_REG_AUTH"] = "off"
    bucket = None
    if database == "postgres":
        env["LORA_REG_DATABASE_URL"] = pg_database()
    else:
        env["LORA_REG_DATABASE_URL"] = f"sqlite:///{workdir}/registry.db"
    if store == "s3":
        assert seaweed is not None
        bucket = make_bucket(seaweed.endpoint)
        env["LORA_REG_STORAGE_URL"] = f"s3://{bucket}/registry"
        env.update(s3_environment(seaweed.endpoint))
        # The smallest part size S3 allows, so tests exercise multipart with small files.
        env["LORA_REG_MULTIPART_THRESHOLD"] = env["LORA_REG_PART_SIZE"] = str(MULTIPART_BYTES)
    else:
        env["LORA_REG_STORAGE_URL"] = f"file://{workdir}/objects"
    return env, bucket


def start_server(
    workdir: Path,
    env: dict[str, str],
    backend: str,
    bucket: str | None = None,
    extra_env: dict[str, str] | None = None,
) -> RunningServer:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    token_file = workdir / "admin-token"
    full_env = {"LORA_REG_BOOTSTRAP_TOKEN_FILE": str(token_file), **env, **(extra_env or {})}
    log = open(workdir / f"server-{port}.log", "wb")  # noqa: SIM115  (owned by the process)
    process = subprocess.Popen(
        [*lora_reg_command(), "server", "--port", str(port), "--log-level", "warning"],
        cwd=workdir,
        env={**os.environ, "PYTHONPATH": str(ROOT), **full_env},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"server exited with {process.returncode}:\n"
                + (workdir / f"server-{port}.log").read_text()
            )
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                token = token_file.read_text().strip() if token_file.exists() else None
                return RunningServer(backend, url, full_env, workdir, process, bucket, token=token)
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    stop_server(process)
    raise RuntimeError(f"server did not start: {(workdir / f'server-{port}.log').read_text()}")


def stop_server(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def start_migrated_server(
    request: pytest.FixtureRequest, workdir: Path, backend: str, **extra_env: str
) -> RunningServer:
    """A server on `backend` in `workdir` (its PostgreSQL database migrated first), with
    `extra_env` (LORA_REG_* settings) on top of the test defaults."""
    seaweed = request.getfixturevalue("seaweed") if backend.endswith("s3") else None
    workdir.mkdir(parents=True, exist_ok=True)
    env, bucket = server_environment(
        backend, workdir, seaweed, request.getfixturevalue("pg_database")
    )
    env.update(extra_env)
    if backend.startswith("postgres"):
        migrate = run_cli("db", "upgrade", cwd=workdir, env=env)
        assert migrate.returncode == 0, migrate.stderr
    return start_server(workdir, env, backend, bucket)


@contextmanager
def own_server(
    request: pytest.FixtureRequest, workdir: Path, backend: str = "sqlite-folder", **extra_env: str
) -> Iterator[RunningServer]:
    """A server of a test's own (not the shared one), stopped when the block ends."""
    server = start_migrated_server(request, workdir, backend, **extra_env)
    try:
        yield server
    finally:
        stop_server(server.process)


@pytest.fixture(scope="session")
def servers(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Callable[[str], RunningServer]]:
    """Start (once per session) and return the server for a backend combination."""
    running: dict[str, RunningServer] = {}

    def get(backend: str) -> RunningServer:
        if backend not in running:
            workdir = tmp_path_factory.mktemp(f"server-{backend}")
            running[backend] = start_migrated_server(request, workdir, backend)
        return running[backend]

    yield get
    for server in running.values():
        stop_server(server.process)


@pytest.fixture(params=BACKENDS)
def server(
    request: pytest.FixtureRequest, servers: Callable[[str], RunningServer]
) -> RunningServer:
    """The real server, on SQLite + folder store and on PostgreSQL + SeaweedFS."""
    return servers(request.param)


@pytest.fixture
def client(server: RunningServer, tmp_path: Path) -> Iterator[Registry]:
    registry = server.client(tmp_path / "cache")
    yield registry
    registry.close()


# --- adapters ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory of real PEFT adapter folders, made once per (arch, seed, options) per session.

    Returns a read-only original: copy it (`copy_adapter`) before changing anything.
    """
    root = tmp_path_factory.mktemp("adapters")
    made: dict[str, Path] = {}

    def make(arch: str = "llama", seed: int = 0, **options: object) -> Path:
        key = f"{arch}-{seed}-" + "-".join(f"{k}={options[k]}" for k in sorted(options))
        if key not in made:
            from tests.support.adapters import make_adapter

            made[key] = make_adapter(arch, root / unique("adapter"), seed=seed, **options)  # type: ignore[arg-type]
        return made[key]

    return make


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory of real tiny base checkpoints (config.json + safetensors), made once per
    (arch, options); `make_base` options such as max_shard_size="20KB" or hidden_size=96."""
    root = tmp_path_factory.mktemp("bases")
    made: dict[str, Path] = {}

    def make(arch: str = "llama", **options: object) -> Path:
        key = f"{arch}-" + "-".join(f"{k}={options[k]}" for k in sorted(options))
        if key not in made:
            from tests.support.adapters import make_base

            made[key] = make_base(arch, root / unique("base"), **options)  # type: ignore[arg-type]
        return made[key]

    return make


def copy_adapter(source: Path, destination: Path) -> Path:
    shutil.copytree(source, destination)
    return destination
