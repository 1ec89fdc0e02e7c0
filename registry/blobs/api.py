"""REST endpoints for blob bytes under /api/v1/blobs.

PUT uploads through the API (the folder store, or any store when a client cannot reach S3);
GET streams from the folder store or redirects to a presigned S3 URL; POST .../multipart finishes
a direct multipart upload. Blocking work runs in the thread pool, never on the event loop.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import BinaryIO, cast

import anyio.from_thread
import anyio.lowlevel
from fastapi import APIRouter, Header, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, RedirectResponse
from starlette.requests import ClientDisconnect

from registry import metrics
from registry.auth import READ, UPLOAD, AdminAccess
from registry.blobs import service
from registry.core.errors import (
    BlobMissing,
    BlobNotFound,
    ChecksumMismatch,
    InvalidReference,
    StoreUploadMode,
    UploadIncomplete,
    VersionTooLarge,
)
from registry.core.names import parse_selector
from registry.core.schemas import CompleteMultipart, GcOut, GcRequest
from registry.deps import ReadSessionDep, SessionDep, SettingsDep, StoreDep
from registry.guards import ThreadedJSONRoute
from registry.openapi import errors
from registry.storage.folder import FolderStore

router = APIRouter(prefix="/api/v1/blobs", tags=["blobs"], route_class=ThreadedJSONRoute)


def _sha(digest: str) -> str:
    selector = parse_selector(digest)
    if selector.kind != "digest":
        raise InvalidReference(f"invalid blob digest {digest!r}: expected sha256:<64 hex>")
    return selector.value.removeprefix("sha256:")


class _BodyReader(io.RawIOBase):
    """A blocking file-like view of the request body, for a worker thread of this request.

    `token` ties calls back to the request's event loop, so the reader also works from threads
    that the store starts itself (boto3's transfer manager).
    """

    def __init__(self, chunks: AsyncIterator[bytes], token: anyio.lowlevel.EventLoopToken) -> None:
        self._chunks = chunks
        self._token = token
        self._buffer = bytearray()
        self._done = False

    async def _next_chunk(self) -> bytes:
        return await self._chunks.__anext__()

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        while not self._done and (size < 0 or len(self._buffer) < size):
            try:
                self._buffer += anyio.from_thread.run(self._next_chunk, token=self._token)
            except StopAsyncIteration:
                self._done = True
            except ClientDisconnect:
                raise UploadIncomplete(
                    "the client disconnected before sending every byte"
                ) from None
        if size < 0:
            size = len(self._buffer)
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data


@router.put(
    "/{digest:sha256}",
    status_code=status.HTTP_204_NO_CONTENT,
    dependencies=[UPLOAD],
    responses=errors(VersionTooLarge, ChecksumMismatch, UploadIncomplete, BlobMissing),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
        }
    },
)
async def put_blob(
    digest: str,
    request: Request,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    content_length: int = Header(include_in_schema=False),
) -> Response:
    """Upload a blob's bytes; refused (and nothing kept) unless they hash to `digest`."""
    sha = _sha(digest)
    if content_length > settings.max_version_bytes:
        raise VersionTooLarge(
            f"a blob of {content_length} bytes is larger than this server's "
            f"{settings.max_version_bytes}-byte limit (LORA_REG_MAX_VERSION_BYTES)"
        )
    reader = cast(BinaryIO, _BodyReader(request.stream(), anyio.lowlevel.current_token()))
    await run_in_threadpool(service.put_blob, session, store, sha, content_length, reader)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/{digest:sha256}/multipart",
    status_code=status.HTTP_204_NO_CONTENT,
    dependencies=[UPLOAD],
    responses=errors(ChecksumMismatch, StoreUploadMode, BlobMissing, BlobNotFound),
)
def complete_multipart(
    digest: str, body: CompleteMultipart, session: SessionDep, store: StoreDep
) -> Response:
    """Finish a direct multipart upload; the server hashes it before publishing it."""
    service.complete_multipart(
        session, store, _sha(digest), body.size, body.upload_id, body.key, body.parts
    )
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/gc", response_model=GcOut)
def collect_garbage(
    session: SessionDep, store: StoreDep, caller: AdminAccess, request: GcRequest
) -> GcOut:
    """Delete blobs no version or stored base references (recorded before `older_than_s`)."""
    return service.collect_garbage(
        session,
        store,
        older_than=timedelta(seconds=request.older_than_s),
        dry_run=request.dry_run,
        actor=caller.name,
    )


@router.get(
    "/{digest:sha256}",
    responses={
        **errors(BlobNotFound),
        200: {
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            }
        },
        307: {
            "description": "a presigned URL of the object store (S3)",
            "headers": {"Location": {"schema": {"type": "string"}}},
        },
    },
    response_class=Response,
    dependencies=[READ],
)
def get_blob(digest: str, session: ReadSessionDep, store: StoreDep) -> Response:
    """A blob's bytes (folder store) or a redirect to a presigned URL (S3 store)."""
    sha = _sha(digest)
    size = service.require_blob(session, sha)
    if isinstance(store, FolderStore):
        return FileResponse(store.path(sha), media_type="application/octet-stream")
    url = store.download_url(sha)
    assert url is not None
    metrics.presigned_download(size)
    return RedirectResponse(url, status_code=status.HTTP_307_TEMPORARY_REDIRECT)
