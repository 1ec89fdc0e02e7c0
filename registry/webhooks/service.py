"""Webhooks: registering endpoints, turning events into deliveries, and the delivery state.

The audit table is the outbox: no request writes a delivery. The delivery loop
(`registry.webhooks.sender`) calls, each in its own short transaction:

1. `enqueue`: for each webhook (row locked, SKIP LOCKED on PostgreSQL so replicas share the
   work), the events after its cursor that it subscribes to become delivery rows (unique per
   webhook and event, so doing it twice adds nothing), and the cursor moves on;
2. `claim`: the oldest due pending delivery of a webhook that has no earlier pending one (each
   endpoint gets its events in order), leased by pushing its next attempt `LEASE_S` ahead, so a
   sender that dies mid-POST leaves it to be retried (at least once);
3. `settle`: succeeded on a 2xx, else retried with exponential backoff until `MAX_ATTEMPTS`.

No transaction is open while a POST is in flight.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col, select

from registry import metrics
from registry.access import Caller
from registry.core.errors import InvalidInput, NotFound
from registry.core.events import ACTIONS
from registry.core.schemas import DeliveryOut, Page, WebhookCreate, WebhookOut, make_page
from registry.models import AuditEvent, Webhook, WebhookDelivery, as_utc, utcnow
from registry.repository import count, db_time, for_update, insert_ignore, skip_locked

MAX_ATTEMPTS = 10
LEASE_S = 60  # a claimed delivery is retried after this long if its sender never settles it
BACKOFF_S = (5, 15, 60, 300, 900, 1800, 3600)  # after attempt 1, 2, ...; then the last
ENQUEUE_BATCH = 500


def create(session: Session, caller: Caller, request: WebhookCreate) -> WebhookOut:
    """A webhook for the events from now on (`events`: actions; none = every action)."""
    unknown = sorted(set(request.events) - ACTIONS)
    if unknown:
        raise InvalidInput(
            f"unknown event action(s) {', '.join(unknown)}: use {', '.join(sorted(ACTIONS))}"
        )
    newest = session.execute(sa.select(sa.func.max(col(AuditEvent.id)))).scalar_one()
    row = Webhook(
        url=request.url,
        events=sorted(set(request.events)),
        secret=request.secret,
        cursor=int(newest or 0),
        created_by=caller.name,
    )
    session.add(row)
    session.flush()
    return _outs(session, [row])[0]


def list_webhooks(session: Session) -> Page[WebhookOut]:
    rows = list(session.exec(select(Webhook).order_by(col(Webhook.id))).all())
    return make_page(_outs(session, rows), len(rows), max(len(rows), 1), 0)


def delete(session: Session, webhook_id: int) -> None:
    """Remove a webhook and its delivery records."""
    row = _get(session, webhook_id, lock=True)
    session.execute(sa.delete(WebhookDelivery).where(col(WebhookDelivery.webhook_id) == row.id))
    session.delete(row)
    session.flush()


def deliveries(
    session: Session, webhook_id: int, *, status: str | None, limit: int, offset: int
) -> Page[DeliveryOut]:
    """A webhook's deliveries, newest first."""
    _get(session, webhook_id)
    query: Any = (
        select(WebhookDelivery, AuditEvent)
        .join(AuditEvent, col(AuditEvent.id) == WebhookDelivery.event_id)
        .where(WebhookDelivery.webhook_id == webhook_id)
    )
    if status:
        if status not in ("pending", "succeeded", "failed"):
            raise InvalidInput(f"delivery status {status!r}: use pending, succeeded or failed")
        query = query.where(WebhookDelivery.status == status)
    total = count(session, query)
    rows = session.exec(
        query.order_by(col(WebhookDelivery.event_id).desc()).limit(limit).offset(offset)
    ).all()
    items = [_delivery_out(delivery, event) for delivery, event in rows]
    return make_page(items, total, limit, offset)


# --- the delivery loop's steps -------------------------------------------------------------------


def enqueue(session: Session) -> int:
    """Turn new events into deliveries for every webhook; the number of deliveries added."""
    hooks = session.exec(skip_locked(session, select(Webhook).order_by(col(Webhook.id)))).all()
    added = 0
    for hook in hooks:
        query: Any = select(AuditEvent.id, AuditEvent.action).where(
            col(AuditEvent.id) > hook.cursor
        )
        rows = session.exec(query.order_by(col(AuditEvent.id)).limit(ENQUEUE_BATCH)).all()
        if not rows:
            continue
        wanted = [
            {"webhook_id": hook.id, "event_id": event_id, "next_attempt_at": utcnow()}
            for event_id, action in rows
            if not hook.events or action in hook.events
        ]
        added += insert_ignore(session, WebhookDelivery, wanted)
        hook.cursor = rows[-1][0]
        session.add(hook)
    session.flush()
    return added


@dataclass(frozen=True)
class Claimed:
    """A delivery to attempt now: where, with what secret, and the event to send."""

    delivery_id: int
    url: str
    secret: str
    attempt: int
    event: dict[str, Any]


def claim(session: Session, now: datetime) -> Claimed | None:
    """The oldest due delivery of a webhook with no earlier pending one, leased."""
    earlier = sa.orm.aliased(WebhookDelivery)
    statement: Any = (
        select(WebhookDelivery)
        .where(
            WebhookDelivery.status == "pending",
            col(WebhookDelivery.next_attempt_at) <= db_time(session, now),
            ~sa.exists().where(
                col(earlier.webhook_id) == WebhookDelivery.webhook_id,
                col(earlier.status) == "pending",
                col(earlier.event_id) < WebhookDelivery.event_id,
            ),
        )
        .order_by(col(WebhookDelivery.next_attempt_at), col(WebhookDelivery.id))
        .limit(1)
    )
    delivery = session.exec(skip_locked(session, statement)).first()
    if delivery is None:
        return None
    hook = session.get(Webhook, delivery.webhook_id)
    event = session.get(AuditEvent, delivery.event_id)
    assert hook is not None and event is not None and delivery.id is not None
    delivery.attempts += 1
    delivery.next_attempt_at = now + timedelta(seconds=LEASE_S)
    session.add(delivery)
    session.flush()
    return Claimed(
        delivery_id=delivery.id,
        url=hook.url,
        secret=hook.secret,
        attempt=delivery.attempts,
        event={
            "id": event.id,
            "at": as_utc(event.at).isoformat(),
            "actor": event.actor,
            "action": event.action,
            "subject": event.subject,
            "details": event.details,
        },
    )


def settle(
    session: Session,
    delivery_id: int,
    now: datetime,
    *,
    status: int | None,
    error: str | None,
) -> None:
    """Record an attempt: succeeded on a 2xx; else retried later, or failed after the last."""
    statement = select(WebhookDelivery).where(WebhookDelivery.id == delivery_id)
    delivery = session.exec(for_update(session, statement)).first()
    if delivery is None or delivery.status != "pending":
        return  # deleted with its webhook, or settled by a sender whose lease ran out
    delivery.last_status, delivery.last_error = status, (error or "")[:500] or None
    if status is not None and 200 <= status < 300:
        delivery.status, delivery.delivered_at = "succeeded", now
    elif delivery.attempts >= MAX_ATTEMPTS:
        delivery.status = "failed"
    else:
        wait = BACKOFF_S[min(delivery.attempts, len(BACKOFF_S)) - 1]
        delivery.next_attempt_at = now + timedelta(seconds=wait)
    metrics.webhook_attempted(session, delivery.status)
    session.add(delivery)
    session.flush()


# --- helpers -------------------------------------------------------------------------------------


def _get(session: Session, webhook_id: int, *, lock: bool = False) -> Webhook:
    statement = select(Webhook).where(Webhook.id == webhook_id)
    row: Webhook | None = session.exec(
        for_update(session, statement) if lock else statement
    ).first()
    if row is None:
        raise NotFound(f"webhook {webhook_id} does not exist (see lora-reg webhook ls)")
    return row


def _outs(session: Session, rows: list[Webhook]) -> list[WebhookOut]:
    ids = [row.id for row in rows]
    tally: dict[tuple[int, str], int] = {
        (hook_id, status): int(n)
        for hook_id, status, n in session.execute(
            sa.select(col(WebhookDelivery.webhook_id), col(WebhookDelivery.status), sa.func.count())
            .where(col(WebhookDelivery.webhook_id).in_(ids))
            .where(col(WebhookDelivery.status).in_(["pending", "failed"]))
            .group_by(col(WebhookDelivery.webhook_id), col(WebhookDelivery.status))
        ).all()
    }
    outs = []
    for row in rows:
        assert row.id is not None
        outs.append(
            WebhookOut(
                id=row.id,
                url=row.url,
                events=row.events,
                created_by=row.created_by,
                created_at=as_utc(row.created_at),
                pending=tally.get((row.id, "pending"), 0),
                failed=tally.get((row.id, "failed"), 0),
            )
        )
    return outs


def _delivery_out(delivery: WebhookDelivery, event: AuditEvent) -> DeliveryOut:
    assert delivery.id is not None
    pending = delivery.status == "pending"
    return DeliveryOut(
        id=delivery.id,
        webhook_id=delivery.webhook_id,
        event_id=delivery.event_id,
        action=event.action,
        subject=event.subject,
        status=delivery.status,  # type: ignore[arg-type]  # written only here
        attempts=delivery.attempts,
        next_attempt_at=as_utc(delivery.next_attempt_at) if pending else None,
        last_status=delivery.last_status,
        last_error=delivery.last_error,
        delivered_at=as_utc(delivery.delivered_at) if delivery.delivered_at else None,
    )
