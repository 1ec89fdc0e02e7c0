"""REST endpoints for tokens under /api/v1/tokens (admin only) and /api/v1/whoami."""

from __future__ import annotations

from fastapi import APIRouter, status

from registry.auth import AdminAccess, ReadAccess
from registry.core.errors import NotFound
from registry.core.schemas import TokenCreate, TokenCreated, TokenOut, WhoAmI
from registry.deps import ReadSessionDep, SessionDep, SettingsDep
from registry.guards import ThreadedJSONRoute
from registry.openapi import errors
from registry.tokens import service

router = APIRouter(prefix="/api/v1", tags=["tokens"], route_class=ThreadedJSONRoute)


@router.post("/tokens", response_model=TokenCreated, status_code=status.HTTP_201_CREATED)
def create_token(session: SessionDep, caller: AdminAccess, request: TokenCreate) -> TokenCreated:
    """Create a token; the response holds its secret, which is never shown again."""
    return service.create_token(session, request.name, request.scope, caller.name)


@router.get("/tokens", response_model=list[TokenOut])
def list_tokens(
    session: ReadSessionDep, _caller: AdminAccess, revoked: bool = False
) -> list[TokenOut]:
    """Every active token (`?revoked=true`: revoked ones too); never their secrets."""
    return service.list_tokens(session, include_revoked=revoked)


@router.delete("/tokens/{name}", response_model=TokenOut, responses=errors(NotFound))
def revoke_token(session: SessionDep, caller: AdminAccess, name: str) -> TokenOut:
    """Revoke a token: it stops working at once; the row stays for the audit log."""
    return service.revoke_token(session, name, caller.name)


@router.get("/whoami", response_model=WhoAmI)
def whoami(caller: ReadAccess, settings: SettingsDep) -> WhoAmI:
    """The token's name and scope (any valid token)."""
    return WhoAmI(name=caller.name, scope=caller.scope, auth=settings.auth)
