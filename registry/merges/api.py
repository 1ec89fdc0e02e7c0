"""REST endpoints for merge jobs under /api/v1/merges (routes only: no SQL here).

Users request, list, show and cancel jobs; workers claim them (`/claim`), renew their lease
(`/{job_id}/heartbeat`), upload output blobs (`/{job_id}/uploads`) and finish them
(`/{job_id}/finish`). Merged artifacts stored in the registry are read at `/artifacts/{digest}`.
"""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from registry.auth import READ, WorkerAccess, WriteAccess
from registry.core.errors import (
    ArtifactNotFound,
    BaseNotFound,
    BlobMissing,
    BlobNotFound,
    ChecksumMismatch,
    Incompatible,
    InvalidReference,
    InvalidTarget,
    JobFinished,
    JobNotFound,
    LeaseLost,
    VersionYanked,
)
from registry.core.jobs import (
    ArtifactOut,
    Claim,
    ClaimRequest,
    FinishRequest,
    HeartbeatOut,
    HeartbeatRequest,
    JobOut,
    MergeRequest,
    WorkerOut,
)
from registry.core.schemas import Page, UploadPlan, UploadPlanRequest
from registry.deps import Limit, Offset, ReadSessionDep, SessionDep, SettingsDep, StoreDep
from registry.guards import ThreadedJSONRoute
from registry.merges import service
from registry.openapi import ADAPTER_FILE_ERRORS, MANIFEST_ERRORS, RESOLVE_ERRORS, errors

router = APIRouter(prefix="/api/v1/merges", tags=["merges"], route_class=ThreadedJSONRoute)


@router.post(
    "",
    response_model=JobOut,
    status_code=status.HTTP_201_CREATED,
    responses={
        **errors(
            *RESOLVE_ERRORS,
            *ADAPTER_FILE_ERRORS,
            InvalidTarget,
            VersionYanked,
            BaseNotFound,
            BlobNotFound,
            Incompatible,
        ),
        200: {"model": JobOut, "description": "a matching job succeeded (memoized) or is running"},
    },
)
def request_merge(
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    caller: WriteAccess,
    request: MergeRequest,
    response: Response,
) -> JobOut:
    """Queue a merge of an adapter version into a registered base (checked with the merge
    profile first). A request matching a succeeded job returns it (`memoized`) unless `force`."""
    job = service.request_merge(session, store, settings, caller, request)
    if not job.created:
        response.status_code = status.HTTP_200_OK
    return job


@router.get("", response_model=Page[JobOut], dependencies=[READ])
def list_jobs(
    session: ReadSessionDep,
    status: str | None = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> Page[JobOut]:
    """Merge jobs, newest first, optionally in one status."""
    return service.list_jobs(session, status=status, limit=limit, offset=offset)


@router.post(
    "/claim",
    response_model=Claim,
    responses={204: {"description": "no job is waiting"}},
)
def claim(session: SessionDep, caller: WorkerAccess, request: ClaimRequest) -> Claim | Response:
    """Worker: take the oldest queued job with a lease (204 when there is none)."""
    claimed = service.claim(session, request, caller.name)
    if claimed is None:
        return Response(status_code=status.HTTP_204_NO_CONTENT)
    return claimed


@router.get("/workers", response_model=Page[WorkerOut], dependencies=[READ])
def list_workers(session: ReadSessionDep, limit: Limit = 50, offset: Offset = 0) -> Page[WorkerOut]:
    """Merge workers that called in (claim or heartbeat), most recently seen first: a queued
    job waits for one of them."""
    return service.list_workers(session, limit=limit, offset=offset)


@router.get(
    "/artifacts/{digest}",
    response_model=ArtifactOut,
    dependencies=[READ],
    responses=errors(InvalidReference, ArtifactNotFound),
)
def get_artifact(session: ReadSessionDep, digest: str) -> ArtifactOut:
    """A merged artifact and its files (with download URLs when it is stored here)."""
    return service.get_artifact(session, digest)


@router.get("/{job_id}", response_model=JobOut, dependencies=[READ], responses=errors(JobNotFound))
def get_job(session: ReadSessionDep, job_id: str) -> JobOut:
    return service.get_job(session, job_id)


@router.post("/{job_id}/cancel", response_model=JobOut, responses=errors(JobNotFound, JobFinished))
def cancel(session: SessionDep, caller: WriteAccess, job_id: str) -> JobOut:
    """Cancel a queued job at once, or ask the worker running it to stop."""
    return service.cancel(session, job_id, caller.name)


@router.post(
    "/{job_id}/heartbeat", response_model=HeartbeatOut, responses=errors(JobNotFound, LeaseLost)
)
def heartbeat(
    session: SessionDep, caller: WorkerAccess, job_id: str, request: HeartbeatRequest
) -> HeartbeatOut:
    """Worker: renew the lease and report progress; 409 lease_lost means drop the job."""
    return service.heartbeat(session, job_id, request, caller.name)


@router.post(
    "/{job_id}/uploads",
    response_model=UploadPlan,
    responses=errors(JobNotFound, LeaseLost, *MANIFEST_ERRORS, ChecksumMismatch),
)
def plan_upload(
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    caller: WorkerAccess,
    job_id: str,
    request: UploadPlanRequest,
    worker: str | None = None,
) -> UploadPlan:
    """Worker: which output blobs of a running job are missing, and how to upload each."""
    return service.plan_upload(session, store, settings, job_id, worker, caller.name, request.files)


@router.post(
    "/{job_id}/finish",
    response_model=JobOut,
    responses=errors(JobNotFound, LeaseLost, *MANIFEST_ERRORS, BlobMissing, ChecksumMismatch),
)
def finish(
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    caller: WorkerAccess,
    job_id: str,
    request: FinishRequest,
) -> JobOut:
    """Worker: end the job (succeeded with its result, failed or cancelled with an error)."""
    return service.finish(session, store, settings, job_id, request, caller.name)
