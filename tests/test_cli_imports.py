"""`lora-reg` imports only what the command being run needs (issue 18: the CLI answers in 0.3 s).

A process pays for every module it imports: the server side (FastAPI, SQLAlchemy, boto3), the
worker's torch, the compatibility checker and pydantic's models together cost more than the whole
budget of a `lora-reg ls`. These tests run the real entry point (`cli.main:main`, what the
console script calls) in a subprocess and look at `sys.modules` when it exits; `bench/cli.py`
measures the time. No timing is asserted here.
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import ROOT, RunningServer, unique_name

# Never needed by the CLI's entry point or by a command's help: the server side and the worker.
SERVER_AND_WORKER = (
    "fastapi",
    "starlette",
    "uvicorn",
    "sqlalchemy",
    "sqlmodel",
    "alembic",
    "psycopg",
    "boto3",
    "botocore",
    "torch",
    "numpy",
    "safetensors",
    "huggingface_hub",
    "registry.server",
)
# What `ls`, `show`, `versions` and `resolve` also do without: they print the server's JSON
# as it came, so neither the `Registry` client, nor its pydantic models, nor the compatibility
# checker are imported, nor pydantic itself (typer >= 0.29 would: it coerces every option's
# value through pydantic, which is why pyproject.toml keeps typer below 0.29).
CLIENT = (
    "cli.client",
    "registry.core.schemas",
    "registry.core.jobs",
    "registry.core.compat",
    "pydantic",
)
READ = SERVER_AND_WORKER + CLIENT
COMMAND_MODULES = (
    "cli.adapter_commands",
    "cli.alias_commands",
    "cli.base_commands",
    "cli.deployment_commands",
    "cli.merge_commands",
    "cli.server_commands",
    "cli.token_commands",
    "cli.webhook_commands",
)

# Runs the entry point as the console script does, then writes what was imported.
ENTRY = """
import atexit, json, os, sys
def dump():
    with open(os.environ["IMPORTED_OUT"], "w") as handle:
        json.dump(sorted(sys.modules), handle)
atexit.register(dump)
from cli.main import main
if sys.argv[1:] != ["--import-only"]:
    main()
"""


def imported(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> tuple[set[str], subprocess.CompletedProcess[str]]:
    """The modules loaded by `lora-reg ARGS` (or by importing the entry point: `--import-only`)
    by the time the process exits."""
    out = tmp_path / "imported.json"
    result = subprocess.run(
        [sys.executable, "-c", ENTRY, *args],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT), "IMPORTED_OUT": str(out), **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )
    return set(json.loads(out.read_text())), result


def loaded(modules: set[str], names: tuple[str, ...]) -> list[str]:
    """The `names` (packages included with their submodules) found in `modules`."""
    return sorted(
        name for name in names if any(m == name or m.startswith(name + ".") for m in modules)
    )


def test_importing_the_entry_point_loads_no_command_and_no_client(tmp_path: Path) -> None:
    modules, result = imported(tmp_path, "--import-only")
    assert result.returncode == 0, result.stderr
    assert loaded(modules, (*READ, *COMMAND_MODULES, "httpx")) == []


@pytest.mark.parametrize(
    ("command", "own"),
    [
        ("ls", ["cli.adapter_commands"]),
        ("show", ["cli.adapter_commands"]),
        ("resolve", ["cli.alias_commands"]),
        ("merge", ["cli.merge_commands"]),
        ("server", ["cli.server_commands", "cli.token_commands"]),  # --scope of the token
    ],
)
def test_a_command_help_loads_its_own_modules_only(
    tmp_path: Path, command: str, own: list[str]
) -> None:
    modules, result = imported(tmp_path, command, "--help")
    assert result.returncode == 0, result.stderr
    assert "--url" in result.stdout
    assert loaded(modules, COMMAND_MODULES) == own
    assert loaded(modules, SERVER_AND_WORKER) == []
    if command in ("ls", "show", "resolve"):
        assert loaded(modules, (*CLIENT, "httpx")) == []


def test_the_read_commands_import_neither_the_client_nor_its_models(
    servers: Callable[[str], RunningServer], adapter_dir: Callable[..., Path], tmp_path: Path
) -> None:
    server = servers("sqlite-folder")
    name = unique_name()
    assert server.cli("push", str(adapter_dir("llama")), name).returncode == 0
    assert server.cli("alias", "set", f"{name}@1", "prod").returncode == 0
    env = {"LORA_REG_URL": server.url, "LORA_REG_TOKEN": server.token or ""}
    digest = json.loads(server.cli("show", name, "--json").stdout)["digest"]
    for args, shown in (
        (["ls", name.split("/")[0]], name),
        (["ls", name.split("/")[0], "--json"], name),
        (["show", f"{name}@1"], digest),
        (["show", name, "--json"], digest),
        (["versions", name], digest[:19]),
        (["versions", name, "--json"], digest),
        (["resolve", f"{name}@prod"], digest),
        (["resolve", f"{name}@prod", "--json"], digest),
    ):
        modules, result = imported(tmp_path, *args, env=env)
        assert result.returncode == 0, (args, result.stderr)
        assert shown in result.stdout, args
        assert loaded(modules, READ) == [], args


def test_a_read_error_is_reported_without_the_client(tmp_path: Path) -> None:
    # Nothing listens there: the same message and exit code as the client's.
    modules, result = imported(tmp_path, "ls", env={"LORA_REG_URL": "http://127.0.0.1:9"})
    assert result.returncode == 7, result.stderr
    assert "cannot reach the registry at http://127.0.0.1:9" in result.stderr
    assert loaded(modules, READ) == []


@contextmanager
def redirecting_to(target: str) -> Iterator[str]:
    """A local HTTP server answering every GET with a 307 to the same path on `target`."""

    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(307)
            self.send_header("Location", target + self.path)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_read_follows_redirects_and_proxies_as_the_client_does(
    servers: Callable[[str], RunningServer], adapter_dir: Callable[..., Path], tmp_path: Path
) -> None:
    server = servers("sqlite-folder")
    name = unique_name()
    assert server.cli("push", str(adapter_dir("llama")), name).returncode == 0
    direct = server.cli("show", name, "--json")
    with redirecting_to(server.url) as url:
        redirected = server.cli("show", name, "--json", env={"LORA_REG_URL": url})
    assert redirected.returncode == 0, redirected.stderr
    assert redirected.stdout == direct.stdout
    # A proxy in the environment is used (here one that is not there).
    proxied = server.cli(
        "show",
        name,
        env={"HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": "", "no_proxy": ""},
    )
    assert proxied.returncode == 7, proxied.stderr
    assert "cannot reach the registry" in proxied.stderr
