"""The layering rules of docs/architecture.md §16, checked by reading every module's imports.

core is pure; the CLI and workers never import the server; only storage imports boto3; services
never import FastAPI; API modules never touch SQL; only workers import torch.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("registry", "cli", "worker", "migrations")


def modules() -> list[Path]:
    found = [p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))]
    assert len(found) > 20
    return found


def imports(path: Path, *, top_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def violations(rule: str, forbidden: tuple[str, ...], paths: list[Path], **kw: bool) -> list[str]:
    found = []
    for path in paths:
        for name in imports(path, **kw):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                found.append(f"{relative(path)} imports {name} ({rule})")
    return found


def under(prefix: str) -> list[Path]:
    return [p for p in modules() if relative(p).startswith(prefix)]


def test_core_imports_only_the_standard_library_pydantic_and_itself() -> None:
    bad = []
    for path in under("registry/core/"):
        for name in imports(path):
            top = name.split(".")[0]
            if (
                top in sys.stdlib_module_names
                or top == "pydantic"
                or name.startswith("registry.core")
            ):
                continue
            if name == "__future__":
                continue
            bad.append(f"{relative(path)} imports {name}")
    assert bad == []


def test_cli_never_imports_the_server_side() -> None:
    server_side = (
        "registry.app",
        "registry.db",
        "registry.models",
        "registry.storage",
        "registry.settings",
        "registry.server",
        "registry.adapters",
        "registry.blobs",
        "registry.deps",
        "registry.repository",
        "fastapi",
        "sqlalchemy",
        "sqlmodel",
        "boto3",
        "alembic",
        "torch",
    )
    paths = under("cli/")
    # server_commands starts the server: it may import it, but only inside its commands.
    top_level = [p for p in paths if p.name == "server_commands.py"]
    everywhere = [p for p in paths if p.name != "server_commands.py"]
    assert violations("cli is client-only", server_side, everywhere) == []
    assert violations("lazy imports only", server_side, top_level, top_level_only=True) == []


def test_workers_never_import_the_server_side() -> None:
    forbidden = (
        "registry.app",
        "registry.db",
        "registry.models",
        "registry.storage",
        "registry.adapters",
        "registry.blobs",
        "fastapi",
        "sqlalchemy",
        "sqlmodel",
    )
    assert violations("workers speak HTTP", forbidden, under("worker/")) == []


def test_only_the_s3_modules_import_boto3() -> None:
    # The server's store, and the worker's own client for s3:// bases and merge targets.
    owners = ("registry/storage/s3.py", "worker/s3.py")
    others = [p for p in modules() if relative(p) not in owners]
    assert violations("storage owns boto3", ("boto3", "botocore"), others) == []


def test_services_never_import_fastapi_and_apis_never_touch_sql() -> None:
    services = [p for p in under("registry/") if p.name in ("service.py", "repository.py")]
    # Routes only: the API modules and the whole web UI (its pages render what services return).
    apis = [p for p in under("registry/") if p.name == "api.py" or p.parent.name == "ui"]
    assert services and apis
    assert violations("services are HTTP-free", ("fastapi", "starlette"), services) == []
    assert (
        violations("APIs call services", ("sqlalchemy", "sqlmodel", "registry.models"), apis) == []
    )


def test_only_workers_import_torch() -> None:
    others = [p for p in modules() if not relative(p).startswith("worker/")]
    assert (
        violations("torch is a worker dependency", ("torch", "transformers", "peft"), others) == []
    )


@pytest.mark.parametrize(
    "path", [p for p in modules() if p.parent.name != "versions"], ids=relative
)
def test_every_module_has_a_docstring(path: Path) -> None:
    assert ast.get_docstring(ast.parse(path.read_text())), f"{relative(path)} has no docstring"


def test_audit_rows_are_written_only_by_the_event_recorder() -> None:
    """Every mutation records a typed event (registry/core/events.py) through one function, so
    the event stream and webhooks see every action under its one name."""
    writers = []
    for path in under("registry/"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "AuditEvent"
            ):
                writers.append(relative(path))
    assert writers == ["registry/events/service.py"]


def test_every_event_class_has_an_action_listed_in_actions() -> None:
    from registry.core import events

    classes = [
        cls
        for cls in vars(events).values()
        if isinstance(cls, type) and issubclass(cls, events.Event) and "action" in vars(cls)
    ]
    assert len(classes) >= 20
    assert {cls.action for cls in classes} == events.ACTIONS
