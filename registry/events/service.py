"""Recording events: the one place an audit row is written (docs/architecture.md §12).

Services call `record` inside the request's transaction, beside the change the event describes,
so the event exists exactly when the change does; it flushes nothing and never commits. The audit
table is append-only (PostgreSQL triggers refuse UPDATE and DELETE): it is the outbox the event
stream and webhooks read.
"""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Session

from registry.core.events import Event
from registry.models import AuditEvent


def record(session: Session, actor: str | None, event: Event, at: datetime | None = None) -> None:
    """Append `event`, caused by `actor` (a token name; None when auth is off), at `at` (default:
    now)."""
    row = AuditEvent(
        actor=actor, action=event.action, subject=event.subject, details=event.details()
    )
    if at is not None:
        row.at = at
    session.add(row)
