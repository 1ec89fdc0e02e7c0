"""Blob bookkeeping: which blobs exist, how clients should upload the missing ones.

A `blobs` row is written only after the store has the verified bytes (bytes before rows). Called
by the blob and adapter APIs inside the request transaction; flushes, never commits.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import BinaryIO

import sqlalchemy as sa
from sqlmodel import Session, col, select

from registry import metrics
from registry.core import events
from registry.core.errors import BlobMissing, BlobNotFound, ChecksumMismatch
from registry.core.manifest import FileEntry
from registry.core.schemas import CompletedPart, GcOut, UploadInstruction, UploadPlan
from registry.events.service import record
from registry.models import (
    BaseModelFile,
    Blob,
    MergedArtifactFile,
    VersionFile,
    utcnow,
)
from registry.repository import for_share, for_update, insert_ignore
from registry.settings import Settings
from registry.storage import ObjectStore

GC_BATCH = 1000


def blob_url(sha256: str) -> str:
    """The API path that serves (or redirects to) a blob's bytes."""
    return f"/api/v1/blobs/sha256:{sha256}"


def known_blobs(session: Session, sha256s: Iterable[str], *, lock: bool = False) -> dict[str, int]:
    """Recorded blobs and their sizes; `lock` share-locks the rows (see `collect_garbage`)."""
    wanted = sorted(set(sha256s))
    if not wanted:
        return {}
    # Sorted, like garbage collection's FOR UPDATE, so the two lock rows in one order.
    statement = select(Blob).where(col(Blob.sha256).in_(wanted)).order_by(col(Blob.sha256))
    rows = session.exec(for_share(session, statement) if lock else statement).all()
    return {row.sha256: row.size for row in rows}


def register_blobs(session: Session, store: ObjectStore, blobs: dict[str, int]) -> None:
    # Sorted, so concurrent pushes insert shared blobs in one order and cannot deadlock.
    insert_ignore(
        session,
        Blob,
        [
            {"sha256": sha, "size": size, "storage_key": store.key(sha), "created_at": utcnow()}
            for sha, size in sorted(blobs.items())
        ],
    )


def adopt_stored(
    session: Session, store: ObjectStore, entries: Iterable[FileEntry]
) -> tuple[dict[str, int], dict[str, int]]:
    """Split blobs into (present, missing).

    Present means stored with the right size, and verified: either recorded in `blobs` (rows are
    written only after verification) or verified now and recorded (uploaded directly to S3, or by
    a push that died before its commit).
    """
    wanted = {entry.sha256: entry.size for entry in entries}
    # Locked until commit: a garbage collection cannot delete what this transaction will use.
    known = known_blobs(session, wanted, lock=True)
    for sha, size in known.items():
        if wanted[sha] != size:
            raise ChecksumMismatch(
                f"sha256:{sha} is stored with {size} bytes but was declared with {wanted[sha]}",
                sha256=sha,
            )
    present = {sha: size for sha, size in known.items() if store.blob_size(sha) == size}
    adopted = {
        sha: size
        for sha, size in wanted.items()
        if sha not in known and store.verify_blob(sha, size)
    }
    register_blobs(session, store, adopted)
    present.update(adopted)
    missing = {sha: size for sha, size in wanted.items() if sha not in present}
    return present, missing


# One plan presigns at most this many part URLs (S3 takes 10,000 parts per upload; each URL is
# a signature and ~400 bytes of answer): a larger plan gets larger parts instead.
MAX_PLAN_PARTS = 10_000


def plan_upload(
    session: Session, store: ObjectStore, settings: Settings, entries: list[FileEntry]
) -> UploadPlan:
    present, missing = adopt_stored(session, store, entries)
    multipart = sum(size for size in missing.values() if size > settings.multipart_threshold)
    part_size = max(settings.part_size, -(-multipart // MAX_PLAN_PARTS))
    instructions = []
    presigned = 0  # bytes sent straight to the store (S3), not through this server
    for sha, size in sorted(missing.items()):
        instruction = store.upload_instruction(
            sha,
            size,
            multipart_threshold=settings.multipart_threshold,
            part_size=part_size,
        )
        if instruction is None:
            instruction = UploadInstruction(sha256=sha, size=size, kind="single", url=blob_url(sha))
        else:
            presigned += size
        if instruction.kind == "multipart":
            instruction.complete_url = blob_url(sha) + "/multipart"
        instructions.append(instruction)
    metrics.upload_planned(session, len(present), len(missing), presigned)
    return UploadPlan(missing=instructions, present=sorted(present))


def put_blob(
    session: Session, store: ObjectStore, sha256: str, size: int, stream: BinaryIO
) -> None:
    """Store bytes sent through the API, verified, then record the blob.

    The bytes are written before the first SQL statement, so no database lock is held while a
    client uploads.
    """
    if store.blob_size(sha256) != size:
        store.put_blob(sha256, size, stream)
    _record_stored(session, store, sha256, size)


def _record_stored(session: Session, store: ObjectStore, sha256: str, size: int) -> None:
    """Record a blob whose bytes are in the store, and make sure they still are once the row is
    locked: a garbage collection may have removed them since they were written or seen."""
    register_blobs(session, store, {sha256: size})
    known_blobs(session, [sha256], lock=True)
    if store.blob_size(sha256) != size:
        raise BlobMissing(
            f"blob sha256:{sha256} was garbage-collected while it was being uploaded; upload it "
            "again (re-run the push)",
            sha256=sha256,
        )


def complete_multipart(
    session: Session,
    store: ObjectStore,
    sha256: str,
    size: int,
    upload_id: str,
    key: str,
    parts: list[CompletedPart],
) -> None:
    store.complete_multipart(sha256, size, upload_id, key, parts)
    _record_stored(session, store, sha256, size)


def require_blob(session: Session, sha256: str) -> int:
    size = known_blobs(session, [sha256]).get(sha256)
    if size is None:
        raise BlobNotFound(f"blob sha256:{sha256} is not in the registry")
    return size


def collect_garbage(
    session: Session,
    store: ObjectStore,
    *,
    older_than: timedelta,
    dry_run: bool,
    actor: str | None,
    limit: int = GC_BATCH,
) -> GcOut:
    """Delete blobs that no version, stored base or merged artifact references, recorded
    before `older_than`.

    Safe against pushes in flight: the candidate rows are locked FOR UPDATE (SQLite: the whole
    database, this is a write transaction) and their references checked again under that lock;
    pushes share-lock the blob rows they use (`adopt_stored`), so either the push commits first
    and its blobs are kept, or it waits, finds them gone and asks for them again (BlobMissing:
    re-running the push uploads them). Objects are deleted before their rows.
    """
    cutoff = utcnow() - older_than
    referenced = sa.or_(
        sa.exists().where(col(VersionFile.sha256) == col(Blob.sha256)),
        sa.exists().where(col(BaseModelFile.sha256) == col(Blob.sha256)),
        sa.exists().where(col(MergedArtifactFile.sha256) == col(Blob.sha256)),
    )
    candidates = select(Blob).where(col(Blob.created_at) < _naive(session, cutoff), ~referenced)
    locked = session.exec(for_update(session, candidates.order_by(col(Blob.sha256)).limit(limit)))
    rows = list(locked.all())
    # Checked again now that the rows are ours: a push that held them has committed by now.
    still = {
        sha
        for sha in session.exec(
            select(Blob.sha256).where(
                col(Blob.sha256).in_([row.sha256 for row in rows]), ~referenced
            )
        ).all()
    }
    doomed = [row for row in rows if row.sha256 in still]
    if not dry_run:
        for row in doomed:
            store.delete_blob(row.sha256)
            session.delete(row)
        record(
            session,
            actor,
            events.BlobsCollected(deleted=len(doomed), bytes=sum(r.size for r in doomed)),
        )
        session.flush()
    return GcOut(
        deleted=len(doomed),
        deleted_bytes=sum(row.size for row in doomed),
        dry_run=dry_run,
        more=len(rows) == limit,
    )


def _naive(session: Session, at: datetime) -> datetime:
    return at.replace(tzinfo=None) if session.get_bind().dialect.name == "sqlite" else at
