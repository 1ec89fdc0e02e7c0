"""Starting the API server: settings check, schema check or migration, then uvicorn.

Called by `lora-reg server` and `lora-reg db ...` (through `cli.server_commands`). SQLite
databases are migrated at start; PostgreSQL must be migrated explicitly (`lora-reg db upgrade`),
because several replicas racing to migrate a shared database at start-up is how schemas break.
"""

from __future__ import annotations

import os
import sys
import threading

from pydantic import ValidationError

from registry.core.errors import RegistryError
from registry.db import make_engine, schema_status, upgrade
from registry.settings import Settings


class StartupError(Exception):
    """The server cannot start; the message says what to do."""


def load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        lines = [
            f"  {'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors()
        ]
        raise StartupError("invalid settings:\n" + "\n".join(lines)) from None


def prepare_database(settings: Settings) -> None:
    """Migrate SQLite; refuse to start on a PostgreSQL schema that is not at head."""
    if settings.is_sqlite:
        upgrade(settings)
        return
    engine = make_engine(settings.sqlalchemy_url)
    try:
        status = schema_status(engine, settings.sqlalchemy_url)
    except RegistryError as exc:
        raise StartupError(exc.message) from None
    finally:
        engine.dispose()
    if not status.up_to_date:
        raise StartupError(
            f"the database schema is at {status.current or 'nothing (empty database)'} but this "
            f"server needs {status.head}: run `lora-reg db upgrade` (with the same "
            "LORA_REG_DATABASE_URL), then start the server again"
        )


def start_embedded_worker(host: str, port: int) -> threading.Event | None:
    """One merge worker in a thread of this process, talking HTTP to this server like any other
    worker (so `lora-reg merge` works with no second process). Needs the [worker] extra."""
    try:
        from cli.client import Registry
        from worker.runner import Worker
    except ImportError as exc:
        print(
            f"no embedded merge worker ({exc}): pip install 'lora-registry[worker]'",
            file=sys.stderr,
        )
        return None
    address = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    url = f"http://[{address}]:{port}" if ":" in address else f"http://{address}:{port}"
    stop = threading.Event()
    client = Registry(url, os.environ.get("LORA_REG_WORKER_TOKEN"))
    runner = Worker(client, name=f"embedded-{os.getpid()}", poll_s=1.0)
    threading.Thread(target=runner.serve, args=(stop,), name="embedded-worker", daemon=True).start()
    print(f"embedded merge worker {runner.name} started", file=sys.stderr)
    return stop


def serve(host: str, port: int, log_level: str = "info", embedded_worker: bool = True) -> None:
    import uvicorn

    from registry.app import create_app

    settings = load_settings()
    prepare_database(settings)
    app = create_app(settings)
    try:
        app.state.store.check()
    except RegistryError as exc:
        raise StartupError(exc.message) from None
    print(
        f"lora-registry serving on http://{host}:{port} "
        f"(database {settings.database_url.split('@')[-1]}, storage {settings.storage_url})",
        file=sys.stderr,
    )
    stop = start_embedded_worker(host, port) if embedded_worker else None
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level)
    finally:
        if stop is not None:
            stop.set()
