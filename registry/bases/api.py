"""REST endpoints for base models under /api/v1/bases (routes only: no SQL here)."""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from registry.auth import READ, WRITE, WriteAccess
from registry.bases import service
from registry.core.errors import (
    BaseNotFound,
    BlobMissing,
    ChecksumMismatch,
    InvalidBase,
    InvalidName,
)
from registry.core.names import parse_base
from registry.core.schemas import BaseOut, BaseRegisterRequest, Page, UploadPlan, UploadPlanRequest
from registry.deps import Limit, Offset, ReadSessionDep, SessionDep, SettingsDep, StoreDep
from registry.guards import ThreadedJSONRoute
from registry.openapi import MANIFEST_ERRORS, errors

router = APIRouter(prefix="/api/v1/bases", tags=["bases"], route_class=ThreadedJSONRoute)


@router.get("", response_model=Page[BaseOut], dependencies=[READ], responses=errors(InvalidName))
def list_bases(
    session: ReadSessionDep,
    id: str | None = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> Page[BaseOut]:
    """Registered base models (without their tensor signatures), optionally of one id."""
    return service.list_bases(
        session, model_id=parse_base(id).id if id else None, limit=limit, offset=offset
    )


@router.post(
    "",
    response_model=BaseOut,
    status_code=status.HTTP_201_CREATED,
    responses={
        **errors(InvalidName, *MANIFEST_ERRORS, InvalidBase, BlobMissing, ChecksumMismatch),
        200: {"model": BaseOut, "description": "already registered with this signature"},
    },
)
def register_base(
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    caller: WriteAccess,
    request: BaseRegisterRequest,
    response: Response,
) -> BaseOut:
    """Register a base from an S3 prefix (write tokens: inside LORA_REG_BASE_SOURCES), uploaded
    files, or a signature the client read."""
    base = service.register_base(session, store, settings, caller, request)
    if not base.created:
        response.status_code = status.HTTP_200_OK
    return base


@router.post(
    "/uploads",
    response_model=UploadPlan,
    dependencies=[WRITE],
    responses=errors(*MANIFEST_ERRORS, ChecksumMismatch),
)
def plan_upload(
    session: SessionDep, store: StoreDep, settings: SettingsDep, request: UploadPlanRequest
) -> UploadPlan:
    """Which of a base's files are missing from the store, and how to upload each."""
    return service.plan_upload(session, store, settings, request.files)


@router.get(
    "/{ref:path}",
    response_model=BaseOut,
    dependencies=[READ],
    responses=errors(InvalidName, BaseNotFound),
)
def get_base(session: ReadSessionDep, ref: str, tensors: bool = False) -> BaseOut:
    """One base, `org/model` (latest registered revision) or `org/model@revision`; with
    `?tensors=true` its whole tensor signature."""
    row = service.get_base_row(session, parse_base(ref))
    return service.base_out(session, row, with_tensors=tensors)
