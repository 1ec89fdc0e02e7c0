"""REST endpoints for aliases, their history, yanks, identify and the audit log (routes only:
each calls one service function; no SQL here).

Under /api/v1/adapters/{ns}/{name}/aliases, /history and /versions/{selector}/yank, plus
/api/v1/aliases/{alias} (who runs it), /api/v1/identify and /api/v1/audit.
"""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from registry.adapters import service as adapters
from registry.aliases import service
from registry.auth import READ, WriteAccess
from registry.core.errors import (
    AdapterNotFound,
    AliasNotFound,
    Conflict,
    InvalidInput,
    InvalidName,
    InvalidPath,
    InvalidReference,
    ProtectedAlias,
    VersionYanked,
)
from registry.core.names import AdapterName, Reference, check_part, parse_selector
from registry.core.schemas import (
    AliasMoveOut,
    AliasOut,
    AliasSetRequest,
    AuditEventOut,
    IdentifyOut,
    IdentifyRequest,
    IsoDatetime,
    Page,
    VersionOut,
    YankRequest,
)
from registry.deps import Limit, Offset, ReadSessionDep, SessionDep, SettingsDep
from registry.guards import ThreadedJSONRoute
from registry.openapi import RESOLVE_ERRORS, errors

router = APIRouter(prefix="/api/v1", tags=["aliases"], route_class=ThreadedJSONRoute)
MAX_IDENTIFY_FILES = 10_000


def _name(namespace: str, name: str) -> AdapterName:
    return AdapterName(check_part("namespace", namespace), check_part("name", name))


@router.get(
    "/adapters/{namespace}/{name}/aliases",
    response_model=list[AliasOut],
    dependencies=[READ],
    responses=errors(InvalidName, AdapterNotFound),
)
def list_aliases(session: ReadSessionDep, namespace: str, name: str) -> list[AliasOut]:
    return service.list_aliases(session, _name(namespace, name))


@router.put(
    "/adapters/{namespace}/{name}/aliases/{alias}",
    response_model=AliasOut,
    responses=errors(*RESOLVE_ERRORS, ProtectedAlias, VersionYanked),
)
def set_alias(
    session: SessionDep,
    settings: SettingsDep,
    caller: WriteAccess,
    namespace: str,
    name: str,
    alias: str,
    request: AliasSetRequest,
) -> AliasOut:
    """Point an alias at a version (`version`: a number, `sha256:...` or another alias)."""
    return service.move_alias(
        session, settings, caller, _name(namespace, name), alias, request.version
    )


@router.delete(
    "/adapters/{namespace}/{name}/aliases/{alias}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=errors(InvalidName, InvalidReference, AdapterNotFound, AliasNotFound, ProtectedAlias),
)
def remove_alias(
    session: SessionDep,
    settings: SettingsDep,
    caller: WriteAccess,
    namespace: str,
    name: str,
    alias: str,
) -> Response:
    service.delete_alias(session, settings, caller, _name(namespace, name), alias)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(
    "/adapters/{namespace}/{name}/aliases/{alias}",
    response_model=AliasOut,
    dependencies=[READ],
    responses=errors(InvalidName, InvalidReference, AdapterNotFound, AliasNotFound),
)
def get_alias(
    session: ReadSessionDep,
    namespace: str,
    name: str,
    alias: str,
    at: IsoDatetime | None = None,
) -> AliasOut:
    """Where an alias points now, or (`?at=2026-11-20T10:00Z`) where it pointed then."""
    if at is not None:
        return service.resolve_at(session, _name(namespace, name), alias, at)
    return service.current_alias(session, _name(namespace, name), alias)


@router.get(
    "/adapters/{namespace}/{name}/history",
    response_model=Page[AliasMoveOut],
    dependencies=[READ],
    responses=errors(InvalidName, InvalidReference, AdapterNotFound),
)
def history(
    session: ReadSessionDep,
    namespace: str,
    name: str,
    alias: str | None = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> Page[AliasMoveOut]:
    """Every alias move of an adapter, newest first."""
    return service.history(session, _name(namespace, name), alias, limit, offset)


@router.get(
    "/aliases/{alias}",
    response_model=Page[AliasOut],
    dependencies=[READ],
    responses=errors(InvalidReference),
)
def who_runs(
    session: ReadSessionDep, alias: str, limit: Limit = 100, offset: Offset = 0
) -> Page[AliasOut]:
    """Every adapter whose `alias` is set: version, digest, since when, by whom."""
    return service.who_runs(session, alias, limit, offset)


@router.post(
    "/adapters/{namespace}/{name}/versions/{selector}/yank",
    response_model=VersionOut,
    responses=errors(*RESOLVE_ERRORS, Conflict),
)
def yank(
    session: SessionDep,
    caller: WriteAccess,
    namespace: str,
    name: str,
    selector: str,
    request: YankRequest,
) -> VersionOut:
    """Mark a version as not to be used: pull refuses it, no alias may point at it."""
    ref = Reference(_name(namespace, name), parse_selector(selector))
    return adapters.yank_version(session, caller, ref, request.reason)


@router.post(
    "/identify", response_model=IdentifyOut, dependencies=[READ], responses=errors(InvalidPath)
)
def identify(session: ReadSessionDep, request: IdentifyRequest) -> IdentifyOut:
    """Which version a set of files is (by sha256 only: no bytes are sent)."""
    if not request.files or len(request.files) > MAX_IDENTIFY_FILES:
        raise InvalidInput(f"identify takes 1 to {MAX_IDENTIFY_FILES} files (path, size, sha256)")
    # Paths were checked by FileSpec; anything else on disk (checkpoints, pickles) is just extra.
    entries = sorted({spec.path: spec.entry() for spec in request.files}.values())
    return service.identify(session, entries)


@router.get("/audit", response_model=Page[AuditEventOut], dependencies=[READ])
def audit(
    session: ReadSessionDep,
    since: IsoDatetime | None = None,
    until: IsoDatetime | None = None,
    actor: str | None = None,
    action: str | None = None,
    subject: str | None = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> Page[AuditEventOut]:
    """The append-only audit log, oldest first. There is no endpoint that changes it."""
    return service.audit(
        session,
        since=since,
        until=until,
        actor=actor,
        action=action,
        subject=subject,
        limit=limit,
        offset=offset,
    )
