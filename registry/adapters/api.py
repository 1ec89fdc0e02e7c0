"""REST endpoints for adapters and versions under /api/v1/adapters (routes only: no SQL here)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response, status

from registry.adapters import service
from registry.auth import READ, WRITE, ReadAccess, WriteAccess
from registry.core.compat import CompatReport
from registry.core.errors import (
    AdapterNotFound,
    BaseNotFound,
    BlobMissing,
    BlobNotFound,
    ChecksumMismatch,
    Incompatible,
    InvalidMetric,
    InvalidName,
    InvalidProfile,
    ProtectedAlias,
    VersionYanked,
)
from registry.core.names import AdapterName, Reference, check_part, parse_selector
from registry.core.schemas import (
    AdapterOut,
    CheckRequest,
    CommitRequest,
    Page,
    UploadPlan,
    UploadPlanRequest,
    VersionFileOut,
    VersionOut,
    parse_pairs,
)
from registry.deps import Limit, Offset, ReadSessionDep, SessionDep, SettingsDep, StoreDep
from registry.guards import ThreadedJSONRoute
from registry.openapi import ADAPTER_FILE_ERRORS, MANIFEST_ERRORS, RESOLVE_ERRORS, errors

router = APIRouter(prefix="/api/v1/adapters", tags=["adapters"], route_class=ThreadedJSONRoute)


def _name(namespace: str, name: str) -> AdapterName:
    return AdapterName(check_part("namespace", namespace), check_part("name", name))


@router.get("", response_model=Page[AdapterOut], dependencies=[READ], responses=errors(InvalidName))
def list_adapters(
    session: ReadSessionDep,
    namespace: str | None = None,
    base: str | None = None,
    label: Annotated[list[str], Query()] = [],  # noqa: B006  (FastAPI copies defaults)
    compat: str | None = None,
    q: Annotated[str | None, Query(max_length=200)] = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> Page[AdapterOut]:
    """Adapters, filtered by namespace, base model (`org/model[@rev]`), labels (`key=value`),
    the compatibility of their latest version (`compatible`, `incompatible`, `unchecked`) and
    `q`, a part of `ns/name` (any case)."""
    return service.list_adapters(
        session,
        search=q,
        namespace=check_part("namespace", namespace) if namespace else None,
        base=base,
        labels=parse_pairs("label filter", label),
        limit=limit,
        offset=offset,
        compat=compat,
    )


@router.get(
    "/{namespace}/{name}",
    response_model=AdapterOut,
    dependencies=[READ],
    responses=errors(InvalidName, AdapterNotFound),
)
def get_adapter(session: ReadSessionDep, namespace: str, name: str) -> AdapterOut:
    return service.get_adapter(session, _name(namespace, name))


@router.get(
    "/{namespace}/{name}/versions",
    response_model=Page[VersionOut],
    dependencies=[READ],
    responses=errors(InvalidName, AdapterNotFound),
)
def list_versions(
    session: ReadSessionDep,
    namespace: str,
    name: str,
    sort: str = "-number",
    limit: Limit = 50,
    offset: Offset = 0,
) -> Page[VersionOut]:
    """Versions, sorted by `number`, `created` or `metrics.<name>`; `-` for descending."""
    return service.list_versions(
        session, _name(namespace, name), sort=sort, limit=limit, offset=offset
    )


@router.get(
    "/{namespace}/{name}/versions/{selector}",
    response_model=VersionOut,
    dependencies=[READ],
    responses=errors(*RESOLVE_ERRORS),
)
def get_version(session: ReadSessionDep, namespace: str, name: str, selector: str) -> VersionOut:
    """One version with its files; `selector` is a number, `latest`, an alias or a digest."""
    return service.get_version(session, Reference(_name(namespace, name), parse_selector(selector)))


@router.get(
    "/{namespace}/{name}/versions/{selector}/files",
    response_model=list[VersionFileOut],
    dependencies=[READ],
    responses=errors(*RESOLVE_ERRORS),
)
def get_version_files(
    session: ReadSessionDep, namespace: str, name: str, selector: str
) -> list[VersionFileOut]:
    return (
        service.get_version(
            session, Reference(_name(namespace, name), parse_selector(selector))
        ).files
        or []
    )


@router.post(
    "/{namespace}/{name}/versions/{selector}/check",
    response_model=CompatReport,
    responses=errors(
        *RESOLVE_ERRORS, *ADAPTER_FILE_ERRORS, BaseNotFound, BlobNotFound, InvalidProfile
    ),
)
def check_version(
    session: SessionDep,
    store: StoreDep,
    caller: ReadAccess,
    namespace: str,
    name: str,
    selector: str,
    request: CheckRequest,
) -> CompatReport:
    """Check a version against a registered base (default: its own) and an optional serving
    profile, from headers only. A plain check against its own base is recorded on the version."""
    ref = Reference(_name(namespace, name), parse_selector(selector))
    return service.check_version(session, store, caller, ref, request)


@router.post(
    "/{namespace}/{name}/uploads",
    response_model=UploadPlan,
    dependencies=[WRITE],
    responses=errors(InvalidName, *MANIFEST_ERRORS, ChecksumMismatch),
)
def plan_upload(
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    namespace: str,
    name: str,
    request: UploadPlanRequest,
) -> UploadPlan:
    """Push step 1: which blobs are missing, and how to upload each of them."""
    _name(namespace, name)
    return service.plan_upload(session, store, settings, request.files)


@router.post(
    "/{namespace}/{name}/versions",
    response_model=VersionOut,
    status_code=status.HTTP_201_CREATED,
    responses={
        **errors(
            *RESOLVE_ERRORS,
            *MANIFEST_ERRORS,
            *ADAPTER_FILE_ERRORS,
            InvalidMetric,
            BlobMissing,
            ChecksumMismatch,
            BaseNotFound,
            Incompatible,
            ProtectedAlias,
            VersionYanked,
        ),
        200: {"model": VersionOut, "description": "identical content already existed"},
    },
)
def commit_version(
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    caller: WriteAccess,
    namespace: str,
    name: str,
    request: CommitRequest,
    response: Response,
) -> VersionOut:
    """Push step 3: create the version from uploaded blobs (idempotent by content digest)."""
    version = service.commit_version(
        session, store, settings, caller, _name(namespace, name), request
    )
    if not version.created:
        response.status_code = status.HTTP_200_OK
    return version
