"""Database engine, sessions and schema migrations.

One engine per process (`get_engine`). SQLite runs write transactions as `BEGIN IMMEDIATE`, so
writers queue on the database lock instead of failing half-way, and read-only ones
(`read_only(engine)`) as `BEGIN DEFERRED`; PostgreSQL relies on row locks
(`SELECT ... FOR UPDATE`) taken by the services, and runs reads statement by statement. The
schema exists only through Alembic: `upgrade` applies migrations and `schema_status` tells the
server whether it may start.

A PostgreSQL pool keeps one connection per request thread (`POOL_SIZE`, anyio's worker thread
count: a request uses its connection only inside the thread that runs it), so steady load never
opens or closes connections; the overflow serves the background threads. A connection is
checked with a round trip only when it was idle for `PING_AFTER_IDLE_S` (where a restarted
server or a firewall drops it), not on every checkout.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DataError, IntegrityError, OperationalError
from sqlmodel import Session

from registry.core.errors import Conflict, DatabaseUnavailable, InvalidInput
from registry.settings import Settings, get_settings

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"

# anyio runs sync endpoints and dependencies in at most 40 worker threads per process; each holds
# at most one connection at a time.
POOL_SIZE = 40
# For the threads outside that pool: the webhook sender, start-up checks, a test's own sessions.
POOL_OVERFLOW = 10
PING_AFTER_IDLE_S = 10.0


def make_engine(url: str) -> Engine:
    """An engine for `url` (SQLAlchemy form); SQLite gets WAL, a busy timeout and FK checks."""
    if url.startswith("sqlite"):
        path = sa.engine.make_url(url).database
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 60})

        @sa.event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            # Let SQLAlchemy's "begin" event below issue BEGIN instead of the sqlite3 module.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=60000")
            cursor.close()

        @sa.event.listens_for(engine, "begin")
        def _on_begin(connection: sa.Connection) -> None:
            # Writers take the lock up front (no failed lock upgrades half-way); read-only
            # sessions ask for DEFERRED and never wait for writers (WAL).
            mode = connection.get_execution_options().get("sqlite_begin", "IMMEDIATE")
            connection.exec_driver_sql(f"BEGIN {mode}")

        return engine
    engine = sa.create_engine(url, pool_size=POOL_SIZE, max_overflow=POOL_OVERFLOW)
    ping_after_idle(engine, PING_AFTER_IDLE_S)
    return engine


def fill_pool(engine: Engine, count: int) -> None:
    """Open `count` pooled connections now (PostgreSQL; SQLite has none to open), so that the
    first moments of load, whose peak of connections used at once may come at any time, open
    none: a server process calls it at start with what its read threads and background threads
    hold at once (`registry.server.open_startup_connections`)."""
    if engine.dialect.name == "sqlite":
        return
    connections = [engine.connect() for _ in range(count)]
    for connection in connections:
        connection.close()


def ping_after_idle(engine: Engine, idle_s: float) -> None:
    """Check a pooled connection with a round trip before use when it has been idle for more
    than `idle_s` seconds: a dead one is replaced (the pool retries with a new connection) and
    the request never sees it. Busy connections are not pinged; one that died under load fails
    its request as `DatabaseUnavailable` (503, retryable), and SQLAlchemy then replaces every
    connection of the pool that is as old."""

    @sa.event.listens_for(engine, "checkin")
    def _returned(_dbapi_connection: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @sa.event.listens_for(engine, "checkout")
    def _check(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.get("idle_since")
        if idle_since is None or time.monotonic() - idle_since <= idle_s:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:
            raise sa.exc.DisconnectionError(f"connection idle for {idle_s:.0f}+ s is gone") from exc


@lru_cache
def get_engine() -> Engine:
    return make_engine(get_settings().sqlalchemy_url)


def read_only(engine: Engine) -> Engine:
    """The same engine (and pool), for sessions that only read (the GET routes').

    On PostgreSQL each statement runs on its own (autocommit): no BEGIN and COMMIT round trips,
    which cost a one-statement read more CPU than the statement itself; a read of one statement
    is one transaction, and a read of several sees committed data as of each statement. SQLite
    reads in one DEFERRED transaction, which never takes the write lock. On both, a statement
    other than a query is refused before it runs (`_refuse_writes`): nothing a read session
    does can write, let alone write half."""
    reads = _READ_ENGINES.get(engine)
    if reads is None:
        options: dict[str, Any] = (
            {"sqlite_begin": "DEFERRED"}
            if engine.dialect.name == "sqlite"
            else {"isolation_level": "AUTOCOMMIT"}
        )
        reads = _READ_ENGINES[engine] = engine.execution_options(**options)
        sa.event.listen(reads, "before_cursor_execute", _refuse_writes)
    return reads


# Made once per engine (a read engine holds its own event listener).
_READ_ENGINES: weakref.WeakKeyDictionary[Engine, Engine] = weakref.WeakKeyDictionary()


# What a read session may send: queries, and SQLite's BEGIN DEFERRED.
_READS = ("SELECT", "WITH", "BEGIN DEFERRED")


def _refuse_writes(_connection: Any, _cursor: Any, statement: str, *_: Any) -> None:
    if not statement[:32].lstrip().upper().startswith(_READS):
        raise RuntimeError(f"a read-only session may only query, not run {statement[:80]!r}")


def new_session(engine: Engine | None = None) -> Session:
    """A session on `engine`; it takes a connection only when it first runs a statement."""
    return Session(engine or get_engine(), expire_on_commit=False)


@contextmanager
def session_scope(engine: Engine | None = None) -> Iterator[Session]:
    """One transaction: commit on success, roll back on error, translate driver errors once."""
    session = new_session(engine)
    try:
        yield session
    except BaseException as exc:
        end_session(session, exc)
        raise
    end_session(session)


def end_session(session: Session, error: BaseException | None = None) -> None:
    """End a session's transaction and give its connection back: commit when there was no
    `error`, else roll back. Blocking (a round trip when a transaction is open). Driver errors,
    `error` or the commit's own, are raised translated (`translate`); others pass unchanged."""
    try:
        if error is None:
            try:
                session.commit()
            except BaseException as exc:
                session.rollback()
                translated = translate(exc)
                if translated is exc:
                    raise
                raise translated from exc
        else:
            session.rollback()
            translated = translate(error)
            if translated is not error:
                raise translated from error
    finally:
        session.close()


def translate(error: BaseException) -> BaseException:
    """A driver error as the registry error it means; any other error as it is."""
    if isinstance(error, OperationalError):
        return DatabaseUnavailable(f"database unavailable: {error.orig}")
    if isinstance(error, IntegrityError):
        return Conflict("the change conflicts with one made at the same time; retry it")
    if isinstance(error, DataError):
        return InvalidInput(f"a value does not fit the database: {error.orig}")
    return error


# --- migrations --------------------------------------------------------------------------------


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(settings: Settings | None = None, revision: str = "head") -> None:
    settings = settings or get_settings()
    command.upgrade(alembic_config(settings.sqlalchemy_url), revision)


def downgrade(settings: Settings | None = None, revision: str = "base") -> None:
    settings = settings or get_settings()
    command.downgrade(alembic_config(settings.sqlalchemy_url), revision)


@dataclass(frozen=True)
class SchemaStatus:
    current: str | None
    head: str | None

    @property
    def up_to_date(self) -> bool:
        return self.current == self.head


def schema_status(engine: Engine, url: str) -> SchemaStatus:
    script = ScriptDirectory.from_config(alembic_config(url))
    try:
        with engine.connect() as connection:
            current = MigrationContext.configure(connection).get_current_revision()
    except OperationalError as exc:
        raise DatabaseUnavailable(f"cannot reach the database: {exc.orig}") from exc
    return SchemaStatus(current=current, head=script.get_current_head())
