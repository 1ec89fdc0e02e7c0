"""Starting the API server: settings check, schema check or migration, then uvicorn.

Called by `lora-reg server` and `lora-reg db ...` (through `cli.server_commands`). SQLite
databases are migrated at start; PostgreSQL must be migrated explicitly (`lora-reg db upgrade`),
because several replicas racing to migrate a shared database at start-up is how schemas break.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import sys
import threading
from pathlib import Path

from pydantic import ValidationError

from registry.core.errors import Conflict, RegistryError
from registry.core.schemas import Scope, TokenCreated
from registry.core.tokens import DATABASE_ACTOR, EMBEDDED_WORKER_ACTOR
from registry.db import make_engine, schema_status, session_scope, upgrade
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


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_auth(settings: Settings, host: str) -> None:
    """Auth off is for a server on your own machine: refuse to expose it."""
    if not settings.auth and not is_loopback(host):
        raise StartupError(
            f"LORA_REG_AUTH=off would let anyone who reaches {host} push, move aliases and "
            "delete blobs: bind to 127.0.0.1 (--host 127.0.0.1) or turn auth on"
        )


def write_secret(path: Path, secret: str) -> None:
    """Write a secret only its owner can read: a new 0600 file (created exclusively, never
    through a symbolic link) renamed over `path`, in a folder created 0700."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.partial")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    descriptor = os.open(temporary, flags, 0o600)
    try:
        with os.fdopen(descriptor, "w") as file:
            file.write(secret + "\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def bootstrap_admin_token(settings: Settings) -> None:
    """First start on a database without tokens: create the `admin` token, print it once and
    write it to LORA_REG_BOOTSTRAP_TOKEN_FILE (0600). If the file cannot be written the secret
    is still printed (its only copy), then the server stops so that the operator sees it."""
    from registry.tokens.service import bootstrap_admin

    engine = make_engine(settings.sqlalchemy_url)
    try:
        with session_scope(engine) as session:
            created = bootstrap_admin(session)
    except Conflict:  # another replica bootstrapped at the same moment
        return
    finally:
        engine.dispose()
    if created is None:
        return
    path = settings.bootstrap_token_file
    try:
        write_secret(path, created.token)
    except OSError as exc:
        failure: OSError | None = exc
        where = f"NOT written to {path} ({exc}): this is its only copy"
    else:
        failure, where = None, f"also written to {path}, mode 0600"
    print(
        f"created the bootstrap admin token {created.name!r} (shown once, {where}):\n\n"
        f"    {created.token}\n\n"
        "use it to create your own tokens: LORA_REG_TOKEN=<it> lora-reg token create NAME "
        "--scope write",
        file=sys.stderr,
    )
    if failure is not None:
        raise StartupError(
            f"could not write the bootstrap admin token to {path} ({failure}): keep the token "
            "printed above (it is valid), fix LORA_REG_BOOTSTRAP_TOKEN_FILE and start again"
        )


def create_token_in_database(settings: Settings, name: str, scope: Scope) -> TokenCreated:
    """A token made straight in the database, for operators who lost every admin token (or
    provision tokens before the API is up). Its audit row's actor is `(database)`."""
    from registry.tokens.service import create_token

    engine = make_engine(settings.sqlalchemy_url)
    try:
        with session_scope(engine) as session:
            return create_token(session, name, scope, actor=DATABASE_ACTOR)
    finally:
        engine.dispose()


def start_embedded_worker(host: str, port: int, token: str | None) -> threading.Event | None:
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
    client = Registry(url, token)
    runner = Worker(client, name=f"embedded-{os.getpid()}", poll_s=1.0)
    threading.Thread(target=runner.serve, args=(stop,), name="embedded-worker", daemon=True).start()
    print(f"embedded merge worker {runner.name} started", file=sys.stderr)
    return stop


def serve(host: str, port: int, log_level: str = "info", embedded_worker: bool = True) -> None:
    import uvicorn

    from registry.app import create_app
    from registry.auth import issue_internal_token

    settings = load_settings()
    check_auth(settings, host)
    prepare_database(settings)
    if settings.auth:
        bootstrap_admin_token(settings)
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
    if not settings.auth:
        print("auth is off (LORA_REG_AUTH=off): every local caller is an admin", file=sys.stderr)
    stop = None
    if embedded_worker:
        # Its own worker-scope token, known only to this process (or LORA_REG_WORKER_TOKEN).
        token = os.environ.get("LORA_REG_WORKER_TOKEN") or (
            issue_internal_token(app, EMBEDDED_WORKER_ACTOR, "worker") if settings.auth else None
        )
        stop = start_embedded_worker(host, port, token)
    from registry.webhooks.sender import start_webhook_sender

    stop_webhooks = start_webhook_sender(app.state.engine)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level)
    finally:
        stop_webhooks.set()
        if stop is not None:
            stop.set()
