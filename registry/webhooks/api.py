"""REST endpoints for webhooks under /api/v1/webhooks (admin; routes only: no SQL here)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response, status

from registry.auth import AdminAccess
from registry.core.errors import NotFound
from registry.core.schemas import DeliveryOut, Page, WebhookCreate, WebhookOut
from registry.deps import Limit, Offset, ReadSessionDep, SessionDep
from registry.guards import ThreadedJSONRoute
from registry.openapi import errors
from registry.webhooks import service

WebhookId = Annotated[int, Path(ge=1, le=2**31 - 1)]
router = APIRouter(prefix="/api/v1/webhooks", tags=["webhooks"], route_class=ThreadedJSONRoute)


@router.post("", response_model=WebhookOut, status_code=status.HTTP_201_CREATED)
def create_webhook(session: SessionDep, caller: AdminAccess, request: WebhookCreate) -> WebhookOut:
    """POST every event from now on (or only `events`, by action) to `url`, signed with
    `secret` (Standard Webhooks headers), at least once, retried with backoff."""
    return service.create(session, caller, request)


@router.get("", response_model=Page[WebhookOut])
def list_webhooks(session: ReadSessionDep, _caller: AdminAccess) -> Page[WebhookOut]:
    """Every webhook with its pending and failed deliveries; never their secrets."""
    return service.list_webhooks(session)


@router.delete("/{webhook_id}", status_code=status.HTTP_204_NO_CONTENT, responses=errors(NotFound))
def delete_webhook(session: SessionDep, _caller: AdminAccess, webhook_id: WebhookId) -> Response:
    service.delete(session, webhook_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(
    "/{webhook_id}/deliveries", response_model=Page[DeliveryOut], responses=errors(NotFound)
)
def list_deliveries(
    session: ReadSessionDep,
    _caller: AdminAccess,
    webhook_id: WebhookId,
    status: str | None = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> Page[DeliveryOut]:
    """A webhook's deliveries, newest first: attempts, the endpoint's last answer."""
    return service.deliveries(session, webhook_id, status=status, limit=limit, offset=offset)
