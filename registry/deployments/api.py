"""REST endpoints for observed deployments under /api/v1/deployments (routes only: no SQL).

Serving engines (the vLLM plugin, with a `serving` token) PUT their full loaded set to
`/{instance_id}` on every load, reload and unload, and every 30 s; DELETE it when they stop.
Anyone who may read lists them with drift against the aliases.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response, status

from registry.aliases.service import check_alias
from registry.auth import READ, ServingAccess
from registry.core.errors import InvalidName, InvalidReference, NotFound
from registry.core.names import parse_name
from registry.core.schemas import INSTANCE_ID_RE, DeploymentOut, DeploymentReport, Page
from registry.deployments import service
from registry.deps import Limit, Offset, ReadSessionDep, SessionDep
from registry.guards import ThreadedJSONRoute
from registry.openapi import errors

router = APIRouter(
    prefix="/api/v1/deployments", tags=["deployments"], route_class=ThreadedJSONRoute
)
InstanceId = Annotated[str, Path(pattern=INSTANCE_ID_RE)]


@router.put(
    "/{instance_id}", response_model=DeploymentOut, responses=errors(InvalidName, InvalidReference)
)
def report(
    session: SessionDep, caller: ServingAccess, instance_id: InstanceId, body: DeploymentReport
) -> DeploymentOut:
    """An engine instance's full loaded set as it is now (idempotent); loads and unloads are
    recorded as events."""
    return service.report(session, caller, instance_id, body)


@router.delete("/{instance_id}", status_code=status.HTTP_204_NO_CONTENT, responses=errors(NotFound))
def forget(session: SessionDep, caller: ServingAccess, instance_id: InstanceId) -> Response:
    """An instance that stopped: everything it had loaded is recorded as unloaded."""
    service.forget(session, caller, instance_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(
    "",
    response_model=Page[DeploymentOut],
    dependencies=[READ],
    responses=errors(InvalidName, InvalidReference),
)
def list_deployments(
    session: ReadSessionDep,
    adapter: str | None = None,
    alias: str | None = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> Page[DeploymentOut]:
    """Engine instances, most recently seen first, with what each runs and where that differs
    from what the aliases mean (`drift`); `alive` is false once one stops reporting."""
    return service.list_deployments(
        session,
        adapter=parse_name(adapter) if adapter else None,
        alias=check_alias(alias) if alias else None,
        limit=limit,
        offset=offset,
    )
