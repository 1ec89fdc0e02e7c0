"""Database engine, sessions and schema migrations.

One engine per process (`get_engine`). SQLite runs write transactions as `BEGIN IMMEDIATE`, so
writers queue on the database lock instead of failing half-way, and read-only ones
(`read_only(engine)`) as `BEGIN DEFERRED`; PostgreSQL relies on row locks
(`SELECT ... FOR UPDATE`) taken by the services. The schema exists only through Alembic:
`upgrade` applies migrations and `schema_status` tells the server whether it may start.
"""

from __future__ import annotations

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
    return sa.create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


@lru_cache
def get_engine() -> Engine:
    return make_engine(get_settings().sqlalchemy_url)


def read_only(engine: Engine) -> Engine:
    """The same engine (and pool), for transactions that only read."""
    return engine.execution_options(sqlite_begin="DEFERRED")


@contextmanager
def session_scope(engine: Engine | None = None) -> Iterator[Session]:
    """One transaction: commit on success, roll back on error, translate driver errors once."""
    with Session(engine or get_engine(), expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except OperationalError as exc:
            session.rollback()
            raise DatabaseUnavailable(f"database unavailable: {exc.orig}") from exc
        except IntegrityError as exc:
            session.rollback()
            raise Conflict("the change conflicts with one made at the same time; retry it") from exc
        except DataError as exc:
            session.rollback()
            raise InvalidInput(f"a value does not fit the database: {exc.orig}") from exc
        except BaseException:
            session.rollback()
            raise


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
