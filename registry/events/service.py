"""Events: recording them (the one place an audit row is written) and reading them back in
order for followers (docs/architecture.md §12).

Services call `record` inside the request's transaction, beside the change the event describes,
so the event exists exactly when the change does; it flushes nothing and never commits. The audit
table is append-only (PostgreSQL triggers refuse UPDATE and DELETE): it is the outbox the event
stream and webhooks read.

The event id is the followers' cursor, so ids must become visible in order: an event 12 must
never be readable while event 11 can still commit (a follower that read 12 would skip 11 for
ever). SQLite runs one write transaction at a time; on PostgreSQL `record` takes a transaction
advisory lock before taking its id, so transactions that record events commit them one after
another, in id order (the lock is held from the first event to the commit, which is short).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col, select

from registry import metrics
from registry.core.events import Event
from registry.core.schemas import AuditEventOut, EventPage
from registry.models import AuditEvent, as_utc

# The key of the PostgreSQL advisory lock that orders event ids (any constant unique to us).
EVENT_ORDER_LOCK = 0x6C6F7261  # "lora"


def record(session: Session, actor: str | None, event: Event, at: datetime | None = None) -> None:
    """Append `event`, caused by `actor` (a token name; None when auth is off), at `at` (default:
    now)."""
    row = AuditEvent(
        actor=actor, action=event.action, subject=event.subject, details=event.details()
    )
    if at is not None:
        row.at = at
    if session.get_bind().dialect.name == "postgresql":  # held until commit or rollback
        session.execute(sa.select(sa.func.pg_advisory_xact_lock(EVENT_ORDER_LOCK)))
    session.add(row)
    metrics.event_recorded(session, event.action)


def event_out(row: AuditEvent) -> AuditEventOut:
    assert row.id is not None
    return AuditEventOut(
        id=row.id,
        at=as_utc(row.at),
        actor=row.actor,
        action=row.action,
        subject=row.subject,
        details=row.details,
    )


def events_after(
    session: Session, after: int, limit: int, actions: list[str] | None = None
) -> EventPage:
    """Events with an id above `after`, oldest first (`after=-1`: none, only where "now" is).
    `last_id` is the cursor to ask with next time."""
    newest: Any = session.execute(sa.select(sa.func.max(col(AuditEvent.id)))).scalar_one()
    newest = int(newest or 0)
    if after < 0:
        return EventPage(items=[], last_id=newest)
    query: Any = select(AuditEvent).where(col(AuditEvent.id) > after)
    if actions:
        query = query.where(col(AuditEvent.action).in_(actions))
    rows = session.exec(query.order_by(col(AuditEvent.id)).limit(limit)).all()
    items = [event_out(row) for row in rows]
    # Nothing (of these actions) after `after`: the cursor moves up to what was read.
    last = items[-1].id if items else max(after, newest)
    return EventPage(items=items, last_id=last)
