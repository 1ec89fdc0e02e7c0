"""Blob bookkeeping: which blobs exist, how clients should upload the missing ones.

A `blobs` row is written only after the store has the verified bytes (bytes before rows). Called
by the blob and adapter APIs inside the request transaction; flushes, never commits.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import BinaryIO

from sqlmodel import Session, select

from registry.core.errors import BlobNotFound, ChecksumMismatch
from registry.core.manifest import FileEntry
from registry.core.schemas import CompletedPart, UploadInstruction, UploadPlan
from registry.models import Blob, utcnow
from registry.repository import insert_ignore
from registry.settings import Settings
from registry.storage import ObjectStore


def blob_url(sha256: str) -> str:
    """The API path that serves (or redirects to) a blob's bytes."""
    return f"/api/v1/blobs/sha256:{sha256}"


def known_blobs(session: Session, sha256s: Iterable[str]) -> dict[str, int]:
    wanted = sorted(set(sha256s))
    if not wanted:
        return {}
    rows = session.exec(select(Blob).where(Blob.sha256.in_(wanted))).all()  # type: ignore[attr-defined]
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
    known = known_blobs(session, wanted)
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


def plan_upload(
    session: Session, store: ObjectStore, settings: Settings, entries: list[FileEntry]
) -> UploadPlan:
    present, missing = adopt_stored(session, store, entries)
    instructions = []
    for sha, size in sorted(missing.items()):
        instruction = store.upload_instruction(
            sha,
            size,
            multipart_threshold=settings.multipart_threshold,
            part_size=settings.part_size,
        ) or UploadInstruction(sha256=sha, size=size, kind="single", url=blob_url(sha))
        if instruction.kind == "multipart":
            instruction.complete_url = blob_url(sha) + "/multipart"
        instructions.append(instruction)
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
    register_blobs(session, store, {sha256: size})


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
    register_blobs(session, store, {sha256: size})


def require_blob(session: Session, sha256: str) -> int:
    size = known_blobs(session, [sha256]).get(sha256)
    if size is None:
        raise BlobNotFound(f"blob sha256:{sha256} is not in the registry")
    return size
