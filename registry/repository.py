"""Small SQL helpers shared by the services: dialect-neutral upserts and row locks, and the
hot reads' way to run a statement.

Services call these inside the request's transaction; nothing here commits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session, SQLModel


def core_rows(
    session: Session, statement: Any, params: Mapping[str, Any] | None = None
) -> Sequence[sa.Row[Any]]:
    """The rows of a statement of columns (never of ORM entities), run on the session's
    connection, in its transaction, without the ORM's execution layer: a tenth of the CPU of a
    GET that runs one statement (bench/README.md, bench.api)."""
    return session.connection().execute(statement, dict(params or {})).all()


def insert_ignore(session: Session, model: type[SQLModel], rows: list[dict[str, Any]]) -> int:
    """INSERT ... ON CONFLICT DO NOTHING on both SQLite and PostgreSQL; the rows inserted."""
    if not rows:
        return 0
    table = model.__table__  # type: ignore[attr-defined]
    dialect = session.get_bind().dialect.name
    statement: Any
    if dialect == "postgresql":
        statement = postgresql.insert(table).values(rows).on_conflict_do_nothing()
    elif dialect == "sqlite":
        statement = sqlite.insert(table).values(rows).on_conflict_do_nothing()
    else:  # pragma: no cover - only the two supported databases reach here
        raise NotImplementedError(dialect)
    # RETURNING lists only the rows inserted (rowcount is -1 for multi-row inserts on psycopg).
    return len(session.execute(statement.returning(*table.primary_key.columns)).all())


def upsert(
    session: Session, model: type[SQLModel], row: dict[str, Any], update: tuple[str, ...]
) -> None:
    """INSERT ... ON CONFLICT (primary key) DO UPDATE of the `update` columns, on both
    databases."""
    table = model.__table__  # type: ignore[attr-defined]
    dialect = session.get_bind().dialect.name
    insert: Any
    if dialect == "postgresql":
        insert = postgresql.insert(table)
    elif dialect == "sqlite":
        insert = sqlite.insert(table)
    else:  # pragma: no cover - only the two supported databases reach here
        raise NotImplementedError(dialect)
    statement = insert.values(row)
    statement = statement.on_conflict_do_update(
        index_elements=list(table.primary_key.columns),
        set_={name: statement.excluded[name] for name in update},
    )
    session.execute(statement)


def _postgres(session: Session) -> bool:
    return bool(session.get_bind().dialect.name == "postgresql")


def for_update(session: Session, statement: Any) -> Any:
    """Lock the selected rows until the transaction ends (SQLite already holds the DB lock)."""
    if _postgres(session):
        return statement.with_for_update()
    return statement


def skip_locked(session: Session, statement: Any) -> Any:
    """Lock the selected rows, skipping rows another transaction holds (PostgreSQL); SQLite's
    write transaction already holds the whole database."""
    if _postgres(session):
        return statement.with_for_update(skip_locked=True)
    return statement


def db_time(session: Session, at: datetime) -> datetime:
    """A timestamp to compare with stored ones: SQLite keeps them naive (in UTC)."""
    return at if _postgres(session) else at.replace(tzinfo=None)


def for_share(session: Session, statement: Any) -> Any:
    """Share-lock the selected rows until the transaction ends, so a concurrent garbage
    collection (which takes them FOR UPDATE) waits for us, and we for it."""
    if _postgres(session):
        return statement.with_for_update(read=True)
    return statement


def count(session: Session, statement: Any) -> int:
    subquery = statement.order_by(None).subquery()
    return int(session.execute(sa.select(sa.func.count()).select_from(subquery)).scalar_one())
