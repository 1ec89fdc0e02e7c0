"""`lora-reg server` and `lora-reg db ...`: the only CLI commands that run server code.

They import `registry.server` / `registry.db` inside the command bodies, so the rest of the CLI
works without the `[server]` extra; without it these commands say which extra to install. Every
failure is one line on stderr: exit 7 when the server or database cannot be used as configured.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, cast

import typer

from cli.token_commands import ScopeOpt

if TYPE_CHECKING:
    from registry.core.schemas import Scope

db_app = typer.Typer(help="Database schema: upgrade, current, downgrade.", no_args_is_help=True)


@contextmanager
def _server_side() -> Iterator[None]:
    """Import check plus one-line errors for settings and database failures."""
    try:
        from sqlalchemy.exc import SQLAlchemyError

        from registry.server import StartupError
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        typer.echo(
            f"error: this command needs the [server] extra: pip install 'lora-registry[server]' "
            f"({exc})",
            err=True,
        )
        sys.exit(2)
    try:
        yield
    except StartupError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(7)
    except SQLAlchemyError as exc:
        typer.echo(f"error: database unavailable: {getattr(exc, 'orig', None) or exc}", err=True)
        sys.exit(7)


def server(
    host: Annotated[str, typer.Option(envvar="LORA_REG_HOST", help="Interface to bind.")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(envvar="LORA_REG_PORT", help="Port to listen on.")] = 8000,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    worker: Annotated[
        bool,
        typer.Option(
            "--worker/--no-worker",
            envvar="LORA_REG_EMBEDDED_WORKER",
            help="Run one merge worker in this process (needs the [worker] extra).",
        ),
    ] = True,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            envvar="LORA_REG_WORKERS",
            min=1,
            help="Server processes sharing the port (default: one per CPU, at most 8).",
        ),
    ] = None,
) -> None:
    """Run the registry API server (migrates SQLite; checks PostgreSQL is migrated)."""
    with _server_side():
        from registry.server import serve

        serve(host, port, log_level, embedded_worker=worker, workers=workers)


@db_app.command("upgrade")
def db_upgrade(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
) -> None:
    """Apply migrations (LORA_REG_DATABASE_URL)."""
    with _server_side():
        from registry.db import upgrade
        from registry.server import load_settings

        upgrade(load_settings(), revision)
    typer.echo(f"database at {revision}", err=True)


@db_app.command("current")
def db_current() -> None:
    """Show the schema revision of the database and the one this code needs (exit 1 if behind)."""
    with _server_side():
        from registry.db import make_engine, schema_status
        from registry.server import load_settings

        settings = load_settings()
        engine = make_engine(settings.sqlalchemy_url)
        try:
            status = schema_status(engine, settings.sqlalchemy_url)
        finally:
            engine.dispose()
    typer.echo(f"current: {status.current or '-'}  head: {status.head}")
    if not status.up_to_date:
        sys.exit(1)


@db_app.command("downgrade")
def db_downgrade(revision: Annotated[str, typer.Argument(help="Target revision.")]) -> None:
    """Revert migrations down to REVISION (use 'base' for an empty schema)."""
    with _server_side():
        from registry.db import downgrade
        from registry.server import load_settings

        downgrade(load_settings(), revision)
    typer.echo(f"database at {revision}", err=True)


@db_app.command("create-token")
def db_create_token(
    name: Annotated[str, typer.Argument(help="The token's name (the audit actor).")],
    scope: ScopeOpt = "admin",
) -> None:
    """Create a token straight in the database (LORA_REG_DATABASE_URL), without the API: for an
    operator who lost every admin token. Prints the secret once."""
    with _server_side():
        from registry.server import create_token_in_database, load_settings

        created = create_token_in_database(load_settings(), name, cast("Scope", scope))
    typer.echo(f"created token {created.name!r} ({created.scope}); secret, shown once:", err=True)
    typer.echo(created.token)
