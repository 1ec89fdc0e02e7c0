"""Merge jobs (docs/architecture.md §9): requests with memoization, claims with leases,
heartbeats, finishes, cancellation, and the merged artifacts succeeded jobs record.

Called by `registry.merges.api` inside one request transaction; flushes, never commits. Two
workers never hold one job: on PostgreSQL a claim takes the oldest queued row with
`SELECT ... FOR UPDATE SKIP LOCKED` (concurrent claims skip each other's rows instead of
waiting), and heartbeats, finishes and cancels lock the job row `FOR UPDATE`; SQLite runs every
write transaction as `BEGIN IMMEDIATE`, so claims run one at a time. Expired leases are dealt
with at the start of every claim: the job goes back to the queue while attempts remain, else it
fails with `lease_expired` (or ends as cancelled, when a cancel was asked for). Every state
change writes an audit event in the same transaction.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col, select

from registry import metrics
from registry.access import Caller, check_merge_target
from registry.adapters import service as adapters
from registry.adapters.repository import resolve
from registry.bases import service as bases
from registry.blobs import service as blobs
from registry.blobs.service import adopt_stored, blob_url
from registry.core import events
from registry.core.errors import (
    ArtifactNotFound,
    BlobMissing,
    Incompatible,
    InvalidInput,
    JobFinished,
    JobNotFound,
    LeaseLost,
    NotPermitted,
    VersionYanked,
)
from registry.core.events import JobEvent
from registry.core.jobs import (
    FINISHED,
    JOB_STATUSES,
    ArtifactOut,
    Claim,
    ClaimRequest,
    FinishRequest,
    HeartbeatOut,
    HeartbeatRequest,
    JobError,
    JobOut,
    JobResult,
    MergeOptions,
    MergeRequest,
    Progress,
    WorkerOut,
    memo_key,
    parse_artifact_digest,
    parse_target,
)
from registry.core.manifest import FileEntry, check_manifest, manifest_digest
from registry.core.names import BaseModelId, parse_base, parse_reference
from registry.core.schemas import FileSpec, Page, UploadPlan, VersionFileOut, make_page
from registry.core.tokens import LEASE_EXPIRY_ACTOR
from registry.events.service import record
from registry.models import (
    Adapter,
    AdapterVersion,
    MergedArtifact,
    MergedArtifactFile,
    MergeJob,
    MergeWorker,
    VersionFile,
    as_utc,
    utcnow,
)
from registry.repository import (
    count,
    db_time,
    for_update,
    insert_ignore,
    skip_locked,
    upsert,
)
from registry.settings import Settings
from registry.storage import ObjectStore

EXPIRE_BATCH = 100


# --- helpers -----------------------------------------------------------------------------------


def _base_label(base_id: str, revision: str) -> str:
    return str(BaseModelId(base_id, revision))


def _opt_utc(value: datetime | None) -> datetime | None:
    return as_utc(value) if value is not None else None


def job_out(job: MergeJob, *, memoized: bool = False, created: bool | None = None) -> JobOut:
    return JobOut(
        id=job.id,
        status=job.status,  # type: ignore[arg-type]  # one of JOB_STATUSES, written only here
        adapter=job.adapter,
        adapter_digest=job.adapter_digest,
        base=_base_label(job.base_id, job.base_revision),
        target=job.target,
        options=MergeOptions.model_validate(job.options),
        attempts=job.attempts,
        max_attempts=job.max_attempts,
        worker=job.worker,
        device=job.device,
        lease_expires_at=_opt_utc(job.lease_expires_at),
        progress=Progress.model_validate(job.progress) if job.progress else None,
        cancel_requested=job.cancel_requested,
        error=JobError.model_validate(job.error) if job.error else None,
        result=JobResult.model_validate(job.result) if job.result else None,
        memoized=memoized,
        created=created,
        requested_by=job.requested_by,
        created_at=as_utc(job.created_at),
        started_at=_opt_utc(job.started_at),
        finished_at=_opt_utc(job.finished_at),
    )


def _record(
    session: Session, job: MergeJob, actor: str | None, event: type[JobEvent], **details: Any
) -> None:
    """Record `event` about `job` (its subject is the job's adapter)."""
    base = _base_label(job.base_id, job.base_revision)
    record(session, actor, event(subject=job.adapter, job=job.id, base=base, **details))


def _get_job(session: Session, job_id: str, *, lock: bool = False) -> MergeJob:
    statement = select(MergeJob).where(MergeJob.id == job_id)
    job: MergeJob | None = session.exec(
        for_update(session, statement) if lock else statement
    ).first()
    if job is None:
        raise JobNotFound(f"merge job {job_id!r} does not exist (see lora-reg jobs)", job=job_id)
    return job


def _check_holder(job: MergeJob, worker: str | None, token: str | None) -> None:
    """The job must be running under `worker` (None: under any worker), else that worker must
    drop it (lease_lost: its lease ran out and the job was requeued or claimed by another); and
    it must have been claimed with `token` (the caller's token name), else not_permitted."""
    if job.status == "running" and worker in (None, job.worker):
        if job.claimed_by is not None and token != job.claimed_by:
            raise NotPermitted(
                f"merge job {job.id} was claimed with another token ({job.claimed_by!r}); only "
                "that token may report on it",
                job=job.id,
            )
        return
    if job.status == "running":
        why = f"worker {job.worker} holds it now"
    elif job.status == "queued":
        why = "it is queued again (the lease expired)"
    else:
        why = f"it has finished ({job.status})"
    raise LeaseLost(
        f"worker {worker or '?'} no longer holds merge job {job.id}: {why}; drop it",
        job=job.id,
        job_status=job.status,
    )


# --- requests ----------------------------------------------------------------------------------


def request_merge(
    session: Session,
    store: ObjectStore,
    settings: Settings,
    caller: Caller,
    request: MergeRequest,
) -> JobOut:
    """Queue a merge, or return the job that already answers it (memoized, or in flight), if
    the caller may send merges to its target."""
    check_merge_target(settings, caller, request.target)
    actor = caller.name
    ref = parse_reference(request.adapter)
    target = str(parse_target(request.target))
    options = request.options
    version = resolve(session, ref)
    assert version.id is not None
    label = f"{ref.name}@{version.number}"
    if version.yanked_at is not None:
        raise VersionYanked(
            f"{label} is yanked ({version.yank_reason}); merge another version",
            version=version.number,
        )
    if request.base:
        wanted = parse_base(request.base)
    elif version.base_model_id:
        wanted = BaseModelId(version.base_model_id, version.base_model_revision)
    else:
        raise InvalidInput(
            f"{label} records no base model: pass --base ID[@REVISION] to merge it into one"
        )
    base = bases.get_base_row(session, wanted)
    key = memo_key(version.digest, base.model_id, base.revision, options, target)

    # One request per version at a time (PostgreSQL; SQLite's write transaction already is),
    # so two identical requests never both queue a job.
    session.exec(for_update(session, select(AdapterVersion).where(AdapterVersion.id == version.id)))
    if not request.force:
        existing = _memoized(session, key)
        if existing is not None:
            memoized = existing.status == "succeeded"
            metrics.merge_requested(session, "hit" if memoized else "coalesced")
            return job_out(existing, memoized=memoized, created=False)

    files = session.exec(select(VersionFile).where(VersionFile.version_id == version.id)).all()
    summary, header = adapters.read_adapter(
        store, [FileEntry(f.path, f.size, f.sha256) for f in files]
    )
    claimed = (version.base_model_id, version.base_model_revision)
    report = adapters._run_check(
        summary.raw, header, base, claimed, "merge", {"untie": options.untie}
    )
    if not report.compatible:
        first = report.errors[0].message
        more = len(report.errors) - 1
        raise Incompatible(
            f"{label} cannot be merged into {report.base}: {first}"
            + (f" (and {more} more error(s))" if more else ""),
            report=report.model_dump(mode="json"),
        )

    job = MergeJob(
        id=uuid.uuid4().hex,
        status="queued",
        adapter_version_id=version.id,
        adapter=label,
        adapter_digest=version.digest,
        base_id=base.model_id,
        base_revision=base.revision,
        target=target,
        options=options.model_dump(mode="json"),
        memo_key=key,
        attempts=0,
        max_attempts=settings.merge_max_attempts,
        requested_by=actor,
    )
    session.add(job)
    metrics.merge_requested(session, "miss")
    _record(
        session,
        job,
        actor,
        events.MergeRequested,
        target=target,
        options=job.options,
        adapter_digest=version.digest,
        force=request.force,
    )
    session.flush()
    return job_out(job, created=True)


def _memoized(session: Session, key: str) -> MergeJob | None:
    """The newest succeeded job with this key, else the newest one queued or running."""
    for statuses in (("succeeded",), ("queued", "running")):
        found = session.exec(
            select(MergeJob)
            .where(MergeJob.memo_key == key, col(MergeJob.status).in_(statuses))
            .order_by(col(MergeJob.created_at).desc(), col(MergeJob.id).desc())
            .limit(1)
        ).first()
        if found is not None:
            return found
    return None


def list_jobs(
    session: Session,
    *,
    status: str | None,
    limit: int,
    offset: int,
    adapter_digest: str | None = None,
) -> Page[JobOut]:
    """Jobs, newest first, optionally in one status or of one adapter version (by digest)."""
    query: Any = select(MergeJob)
    if adapter_digest:
        query = query.where(MergeJob.adapter_digest == adapter_digest)
    if status:
        if status not in JOB_STATUSES:
            raise InvalidInput(f"job status {status!r}: use one of {', '.join(JOB_STATUSES)}")
        query = query.where(MergeJob.status == status)
    total = count(session, query)
    rows = session.exec(
        query.order_by(col(MergeJob.created_at).desc(), col(MergeJob.id).desc())
        .limit(limit)
        .offset(offset)
    ).all()
    return make_page([job_out(row) for row in rows], total, limit, offset)


def get_job(session: Session, job_id: str) -> JobOut:
    return job_out(_get_job(session, job_id))


def cancel(session: Session, job_id: str, actor: str | None) -> JobOut:
    """Queued (or running under a lease that ran out): cancelled at once. Running: the worker is
    told (heartbeat) and finishes it as cancelled. Finished: refused."""
    job = _get_job(session, job_id, lock=True)
    if job.status in FINISHED:
        raise JobFinished(
            f"merge job {job.id} has already finished ({job.status}); it cannot be cancelled",
            job=job.id,
            job_status=job.status,
        )
    now = utcnow()
    lapsed = job.lease_expires_at is not None and as_utc(job.lease_expires_at) < now
    if job.status == "queued" or lapsed:  # a worker whose lease ran out is presumed gone
        was = job.status
        job.status = "cancelled"
        job.finished_at = now
        job.error = JobError(
            code="cancelled", message=f"cancelled by {actor or 'a user'}"
        ).model_dump()
        job.worker, job.claimed_by, job.lease_expires_at = None, None, None
        _record(session, job, actor, events.MergeCancelled, was=was)
    elif not job.cancel_requested:
        job.cancel_requested = True
        _record(session, job, actor, events.MergeCancelRequested, worker=job.worker)
    session.add(job)
    session.flush()
    return job_out(job)


# --- workers -----------------------------------------------------------------------------------


def expire_leases(session: Session, now: datetime, noticed_by: str | None) -> int:
    """Deal with running jobs whose lease ran out: requeue them while attempts remain, else
    fail them (`lease_expired`); a job whose cancel was asked for ends as cancelled. The audit
    actor is LEASE_EXPIRY_ACTOR (not whoever's claim noticed it, which the details name)."""
    actor = LEASE_EXPIRY_ACTOR
    statement = (
        select(MergeJob)
        .where(
            MergeJob.status == "running",
            col(MergeJob.lease_expires_at) < db_time(session, now),
        )
        .order_by(col(MergeJob.id))
        .limit(EXPIRE_BATCH)
    )
    rows = session.exec(skip_locked(session, statement)).all()
    for job in rows:
        worker = job.worker
        if job.cancel_requested:
            job.status, job.finished_at = "cancelled", now
            job.error = JobError(
                code="cancelled", message=f"cancelled; worker {worker} stopped renewing its lease"
            ).model_dump()
            _record(
                session,
                job,
                actor,
                events.MergeLeaseCancelled,
                worker=worker,
                noticed_by=noticed_by,
            )
        elif job.attempts >= job.max_attempts:
            job.status, job.finished_at = "failed", now
            job.error = JobError(
                code="lease_expired",
                message=f"worker {worker} stopped renewing its lease on attempt {job.attempts} "
                f"of {job.max_attempts}; no attempts left (request the merge again)",
            ).model_dump()
            _record(
                session,
                job,
                actor,
                events.MergeLeaseFailed,
                worker=worker,
                attempts=job.attempts,
                error=job.error,
                noticed_by=noticed_by,
            )
        else:
            job.status = "queued"
            _record(
                session,
                job,
                actor,
                events.MergeRequeued,
                worker=worker,
                attempts=job.attempts,
                noticed_by=noticed_by,
            )
        job.worker = job.claimed_by = None
        job.lease_expires_at = None
        job.progress = None
        session.add(job)
    session.flush()
    return len(rows)


def claim(session: Session, request: ClaimRequest, actor: str | None) -> Claim | None:
    """Give the oldest queued job to `request.worker` with a lease; None when there is none."""
    now = utcnow()
    _seen(session, request.worker, actor, request.device, now)
    expire_leases(session, now, actor)
    statement = (
        select(MergeJob)
        .where(MergeJob.status == "queued")
        .order_by(col(MergeJob.created_at), col(MergeJob.id))
        .limit(1)
    )
    job = session.exec(skip_locked(session, statement)).first()
    if job is None:
        return None
    job.status = "running"
    job.worker, job.claimed_by = request.worker, actor
    job.device = request.device
    job.attempts += 1
    job.lease_s = request.lease_s
    job.lease_expires_at = now + timedelta(seconds=request.lease_s)
    job.heartbeat_at = now
    job.started_at = now
    job.progress = None
    job.error = None
    session.add(job)
    _record(
        session,
        job,
        actor,
        events.MergeStarted,
        worker=request.worker,
        attempt=job.attempts,
        device=request.device,
    )
    session.flush()
    return Claim(job=job_out(job), lease_s=request.lease_s)


def heartbeat(
    session: Session, job_id: str, request: HeartbeatRequest, token: str | None
) -> HeartbeatOut:
    """Renew the lease of `request.worker` on the job and record its progress."""
    job = _get_job(session, job_id, lock=True)
    _check_holder(job, request.worker, token)
    now = utcnow()
    _seen(session, request.worker, token, job.device, now)
    expires = now + timedelta(seconds=job.lease_s)
    job.heartbeat_at, job.lease_expires_at = now, expires
    if request.progress is not None:
        job.progress = request.progress.model_dump()
    session.add(job)
    session.flush()
    return HeartbeatOut(cancel_requested=job.cancel_requested, lease_expires_at=expires)


def _seen(
    session: Session, worker: str, token: str | None, device: str | None, now: datetime
) -> None:
    """Record that `worker` called in (claim or heartbeat)."""
    row = {"name": worker, "token": token, "device": device, "last_seen_at": now}
    upsert(session, MergeWorker, row, update=("token", "device", "last_seen_at"))


def list_workers(session: Session, *, limit: int, offset: int) -> Page[WorkerOut]:
    """Workers the registry has heard from, most recently seen first, with the jobs each runs."""
    query: Any = select(MergeWorker)
    total = count(session, query)
    rows = session.exec(
        query.order_by(col(MergeWorker.last_seen_at).desc(), col(MergeWorker.name))
        .limit(limit)
        .offset(offset)
    ).all()
    running: dict[str, int] = {}
    if rows:
        statement: Any = (
            select(MergeJob.worker, sa.func.count())
            .where(MergeJob.status == "running")
            .where(col(MergeJob.worker).in_([row.name for row in rows]))
            .group_by(MergeJob.worker)
        )
        running = {name: int(n) for name, n in session.exec(statement).all()}
    items = [
        WorkerOut(
            name=row.name,
            device=row.device,
            last_seen=as_utc(row.last_seen_at),
            running=running.get(row.name, 0),
        )
        for row in rows
    ]
    return make_page(items, total, limit, offset)


def merged_entries(files: list[FileSpec], settings: Settings) -> list[FileEntry]:
    """A merge's output files, checked like a manifest (paths, duplicates, no pickles), within
    the size allowed for a base (a merged checkpoint is a base-sized model)."""
    return check_manifest(
        (spec.entry() for spec in files),
        max_files=settings.max_files,
        max_bytes=settings.max_base_bytes,
        required=(),
        what="merged checkpoint",
        size_setting="LORA_REG_MAX_BASE_BYTES",
    )


def plan_upload(
    session: Session,
    store: ObjectStore,
    settings: Settings,
    job_id: str,
    worker: str | None,
    token: str | None,
    files: list[FileSpec],
) -> UploadPlan:
    """Which of a running job's output files are missing from the store, and how to upload each
    (the same plan a push gets)."""
    _check_holder(_get_job(session, job_id), worker, token)
    return blobs.plan_upload(session, store, settings, merged_entries(files, settings))


def finish(
    session: Session,
    store: ObjectStore,
    settings: Settings,
    job_id: str,
    request: FinishRequest,
    actor: str | None,
) -> JobOut:
    """End the job the worker holds. A success records the merged artifact (for the registry
    target only once every file's blob is stored). Repeating a finish that landed returns the
    job as it is."""
    job = _get_job(session, job_id, lock=True)
    if job.status == request.status and job.worker == request.worker:
        return job_out(job)  # a retried finish whose first answer was lost
    _check_holder(job, request.worker, actor)
    now = utcnow()
    details: dict[str, Any] = {"worker": request.worker, "attempt": job.attempts}
    if request.status == "succeeded":
        if request.result is None:
            raise InvalidInput("a succeeded merge must report its result (location and files)")
        result = _record_result(session, store, settings, job, request.result, now)
        job.result = result.model_dump(mode="json")
        job.error = None
        details.update(location=result.location, artifact=result.artifact, size=result.size)
    else:
        default = (
            JobError(code="cancelled", message="cancelled")
            if request.status == "cancelled"
            else JobError(code="merge_failed", message="the worker reported no reason")
        )
        job.error = (request.error or default).model_dump()
        details["error"] = job.error
    job.status = request.status
    job.finished_at = now
    job.lease_expires_at = None
    if job.started_at is not None:
        took = (now - as_utc(job.started_at)).total_seconds()
        metrics.merge_finished(session, request.status, took)
    session.add(job)
    finished: dict[str, type[JobEvent]] = {
        "succeeded": events.MergeSucceeded,
        "failed": events.MergeFailed,
        "cancelled": events.MergeStopped,
    }
    _record(session, job, actor, finished[request.status], **details)
    session.flush()
    return job_out(job)


def _record_result(
    session: Session,
    store: ObjectStore,
    settings: Settings,
    job: MergeJob,
    result: JobResult,
    now: datetime,
) -> JobResult:
    entries = merged_entries(result.files, settings)
    stored = parse_target(job.target).kind == "registry"
    if stored:
        if not entries:
            raise InvalidInput("a merge into the registry must list the files it uploaded")
        # Share-locked until commit, so a garbage collection cannot take them in between.
        _, missing = adopt_stored(session, store, entries)
        if missing:
            paths = sorted(entry.path for entry in entries if entry.sha256 in missing)
            raise BlobMissing(
                f"{len(paths)} merged file(s) are not uploaded yet: {', '.join(paths[:5])}"
                + (" ..." if len(paths) > 5 else "")
                + "; upload them (POST /api/v1/merges/{id}/uploads) and finish again",
                paths=paths,
            )
    size = sum(entry.size for entry in entries)
    digest = manifest_digest(entries) if entries else None
    if digest is not None:
        _record_artifact(session, job, digest, entries, result.location, stored, size, now)
    return JobResult(
        location=result.location,
        artifact=digest,
        files=[FileSpec(path=e.path, size=e.size, sha256=e.sha256) for e in entries],
        size=size,
        device=result.device,
    )


def _record_artifact(
    session: Session,
    job: MergeJob,
    digest: str,
    entries: list[FileEntry],
    location: str,
    stored: bool,
    size: int,
    now: datetime,
) -> None:
    """Insert-or-keep by digest: identical output (a forced re-run, another target) is one
    artifact; output stored in the registry marks an artifact published elsewhere as stored."""
    created = insert_ignore(
        session,
        MergedArtifact,
        [
            {
                "digest": digest,
                "job_id": job.id,
                "adapter_version_id": job.adapter_version_id,
                "adapter_digest": job.adapter_digest,
                "base_id": job.base_id,
                "base_revision": job.base_revision,
                "options": job.options,
                "target": job.target,
                "location": location,
                "stored": stored,
                "size": size,
                "created_at": now,
            }
        ],
    )
    row = session.exec(
        for_update(session, select(MergedArtifact).where(MergedArtifact.digest == digest))
    ).one()
    assert row.id is not None
    if created:
        session.add_all(
            [
                MergedArtifactFile(artifact_id=row.id, path=e.path, size=e.size, sha256=e.sha256)
                for e in entries
            ]
        )
    elif stored and not row.stored:
        row.stored, row.location, row.target, row.job_id = True, location, job.target, job.id
        session.add(row)
    session.flush()


# --- artifacts ---------------------------------------------------------------------------------


def get_artifact(session: Session, text: str) -> ArtifactOut:
    """The merged artifact `text` (`sha256:<64 hex>`) names, with its files."""
    digest = parse_artifact_digest(text)
    row = session.exec(select(MergedArtifact).where(MergedArtifact.digest == digest)).first()
    if row is None:
        raise ArtifactNotFound(f"no merged artifact {digest} in this registry", digest=digest)
    version = session.get(AdapterVersion, row.adapter_version_id)
    adapter = session.get(Adapter, version.adapter_id) if version else None
    label = f"{adapter.namespace}/{adapter.name}@{version.number}" if adapter and version else "?"
    files = session.exec(
        select(MergedArtifactFile)
        .where(MergedArtifactFile.artifact_id == row.id)
        .order_by(col(MergedArtifactFile.path))
    ).all()
    return ArtifactOut(
        digest=row.digest,
        job_id=row.job_id,
        adapter=label,
        adapter_digest=row.adapter_digest,
        base=_base_label(row.base_id, row.base_revision),
        options=MergeOptions.model_validate(row.options),
        target=row.target,
        location=row.location,
        stored=row.stored,
        size=row.size,
        created_at=as_utc(row.created_at),
        files=[
            VersionFileOut(
                path=f.path,
                size=f.size,
                sha256=f.sha256,
                url=blob_url(f.sha256) if row.stored else None,
            )
            for f in files
        ],
    )
