"""Starting the API server: settings check, schema check or migration, then uvicorn.

Called by `lora-reg server` and `lora-reg db ...` (through `cli.server_commands`). SQLite
databases are migrated at start; PostgreSQL must be migrated explicitly (`lora-reg db upgrade`),
because several replicas racing to migrate a shared database at start-up is how schemas break.

`serve(workers=N)` with N > 1 runs uvicorn's supervisor in this process and N worker processes
that each build the app (`worker_app`) and serve the one port. This process does the start-up
checks once and runs the embedded merge worker, one per server whatever N (it speaks HTTP to
the port like any other worker). Each worker process runs a webhook sender, as replicas do:
deliveries are claimed under row locks, so the senders share the work and each delivery goes out
once per attempt. What the workers must share comes through their environment: the embedded
worker's internal token (its hash), the revocation stamp file
(`registry.tokens.service.REVOCATIONS`) and the metrics folder.
"""

from __future__ import annotations

import gc
import ipaddress
import json
import os
import secrets
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from registry.core.errors import Conflict, RegistryError
from registry.core.schemas import Scope, TokenCreated
from registry.core.tokens import DATABASE_ACTOR, EMBEDDED_WORKER_ACTOR
from registry.db import fill_pool, make_engine, schema_status, session_scope, upgrade
from registry.settings import Settings

if TYPE_CHECKING:
    from fastapi import FastAPI

    from worker.runner import Worker

# With more CPUs than this, more processes mostly add PostgreSQL connections and memory.
MAX_DEFAULT_WORKERS = 8
# The embedded merge worker's internal token for every worker process: {sha256: [name, scope]}.
INTERNAL_CALLERS_ENV = "LORA_REG_INTERNAL_CALLERS"


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
    threading.Thread(
        target=_serve_when_up, args=(url, runner, stop), name="embedded-worker", daemon=True
    ).start()
    print(f"embedded merge worker {runner.name} started", file=sys.stderr)
    return stop


def _serve_when_up(url: str, runner: Worker, stop: threading.Event) -> None:
    """Start polling for jobs once the server answers (worker processes take a few seconds to
    start), so the worker does not report an unreachable registry meanwhile."""
    import httpx

    deadline = time.monotonic() + 60
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        stop.wait(0.2)
    runner.serve(stop)


def default_workers() -> int:
    """One server process per CPU this process may use, at most MAX_DEFAULT_WORKERS."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_DEFAULT_WORKERS))


def open_startup_connections(app: FastAPI) -> None:
    """Open the connections a serving process uses at once under steady reads: its read
    threads' (`registry.guards.READ_THREADS`), a token look-up's and the webhook sender's; steady
    read load then opens none. Writes and other threads open more as they need them, and the
    pool keeps them (`registry.db.POOL_SIZE`)."""
    from registry.guards import READ_THREADS

    fill_pool(app.state.engine, READ_THREADS + 2)


def worker_app() -> FastAPI:
    """The app of one worker process of `serve(workers=N)` (uvicorn calls it in each process)."""
    from registry.access import Caller
    from registry.app import create_app
    from registry.webhooks.sender import start_webhook_sender

    app = create_app(load_settings())
    for digest, (name, scope) in json.loads(os.environ.get(INTERNAL_CALLERS_ENV, "{}")).items():
        app.state.internal_callers[digest] = Caller(name, scope)
    start_webhook_sender(app.state.engine)  # a daemon thread: it ends with the process
    open_startup_connections(app)
    freeze_startup_objects()
    return app


def freeze_startup_objects() -> None:
    """Leave what start-up made (modules, the app, its routes and models: ~190,000 objects) out
    of every later garbage collection: they live as long as the process, and collections that
    walk them cost each request about 10% more CPU."""
    gc.collect()
    gc.freeze()


@contextmanager
def shared_with_workers(app: FastAPI) -> Iterator[None]:
    """Put in the environment the worker processes inherit what they must share with this one:
    the internal callers (hashes only), the revocation stamp file and the metrics folder."""
    from registry.metrics import prepare_multiprocess_dir
    from registry.tokens.service import REVOCATIONS, STAMP_FILE_ENV, make_stamp_file

    folder = Path(tempfile.mkdtemp(prefix="lora-reg-server-"))
    stamp = folder / "revocations"
    make_stamp_file(stamp)
    REVOCATIONS.share(stamp)
    metrics_dir = prepare_multiprocess_dir()
    callers = {digest: [c.name, c.scope] for digest, c in app.state.internal_callers.items()}
    os.environ[INTERNAL_CALLERS_ENV] = json.dumps(callers)
    os.environ[STAMP_FILE_ENV] = str(stamp)
    try:
        yield
    finally:
        stamp.unlink(missing_ok=True)
        folder.rmdir()
        if metrics_dir is not None:
            import shutil

            shutil.rmtree(metrics_dir, ignore_errors=True)


def serve(
    host: str,
    port: int,
    log_level: str = "info",
    embedded_worker: bool = True,
    workers: int | None = None,
) -> None:
    import uvicorn

    from registry.app import create_app
    from registry.auth import issue_internal_token

    workers = workers or default_workers()
    settings = load_settings()
    check_auth(settings, host)
    prepare_database(settings)
    if settings.auth:
        bootstrap_admin_token(settings)
    # With several worker processes this one only checks the set-up and runs the merge worker.
    app = create_app(settings)
    try:
        app.state.store.check()
    except RegistryError as exc:
        raise StartupError(exc.message) from None
    processes = f"{workers} worker process" + ("es" if workers > 1 else "")
    print(
        f"lora-registry serving on http://{host}:{port} with {processes} "
        f"(database {settings.database_url.split('@')[-1]}, storage {settings.storage_url})",
        file=sys.stderr,
    )
    if not settings.auth:
        print("auth is off (LORA_REG_AUTH=off): every local caller is an admin", file=sys.stderr)
    stop = None
    if embedded_worker:
        # Its own worker-scope token, known only to this server (or LORA_REG_WORKER_TOKEN).
        token = os.environ.get("LORA_REG_WORKER_TOKEN") or (
            issue_internal_token(app, EMBEDDED_WORKER_ACTOR, "worker") if settings.auth else None
        )
        stop = start_embedded_worker(host, port, token)
    try:
        if workers == 1:
            serve_one(app, host, port, log_level)
        else:
            with shared_with_workers(app):
                uvicorn.run(
                    "registry.server:worker_app",
                    factory=True,
                    host=host,
                    port=port,
                    log_level=log_level,
                    workers=workers,
                )
    finally:
        if stop is not None:
            stop.set()


def serve_one(app: FastAPI, host: str, port: int, log_level: str) -> None:
    """Serve `app` in this process, with its webhook sender."""
    import uvicorn

    from registry.webhooks.sender import start_webhook_sender

    stop_webhooks = start_webhook_sender(app.state.engine)
    open_startup_connections(app)
    freeze_startup_objects()
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level)
    finally:
        stop_webhooks.set()
