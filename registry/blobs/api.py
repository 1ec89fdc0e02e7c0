"""REST endpoints for blob bytes under /api/v1/blobs.

PUT uploads through the API (the folder store, or any store when a client cannot reach S3);
GET streams from the folder store or redirects to a presigned S3 URL; POST .../multipart finishes
a direct multipart upload. Blocking work runs in the thread pool, never on the event loop.
"""

from __future__ import annotations

import io
import re
from collections.abc import AsyncIterator
from typing import BinaryIO, cast

import anyio.from_thread
from fastapi import APIRouter, Header, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, RedirectResponse

from registry.blobs import service
from registry.core.errors import InvalidInput
from registry.core.schemas import CompleteMultipart
from registry.deps import SessionDep, StoreDep
from registry.storage.folder import FolderStore

router = APIRouter(prefix="/api/v1/blobs", tags=["blobs"])

_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")


def _sha(digest: str) -> str:
    match = _DIGEST.fullmatch(digest)
    if not match:
        raise InvalidInput(f"invalid blob digest {digest!r}: expected sha256:<64 hex>")
    return match.group(1)


class _BodyReader(io.RawIOBase):
    """A blocking file-like view of the request body, for use from a worker thread."""

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self._chunks = chunks
        self._buffer = b""
        self._done = False

    async def _next_chunk(self) -> bytes:
        return await self._chunks.__anext__()

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        while not self._done and (size < 0 or len(self._buffer) < size):
            try:
                self._buffer += anyio.from_thread.run(self._next_chunk)
            except StopAsyncIteration:
                self._done = True
        if size < 0:
            size = len(self._buffer)
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data


@router.put("/{digest}", status_code=status.HTTP_204_NO_CONTENT)
async def put_blob(
    digest: str,
    request: Request,
    session: SessionDep,
    store: StoreDep,
    content_length: int = Header(),
) -> Response:
    """Upload a blob's bytes; refused (and nothing kept) unless they hash to `digest`."""
    sha = _sha(digest)
    reader = cast(BinaryIO, _BodyReader(request.stream()))
    await run_in_threadpool(service.put_blob, session, store, sha, content_length, reader)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/{digest}/multipart", status_code=status.HTTP_204_NO_CONTENT)
def complete_multipart(
    digest: str, body: CompleteMultipart, session: SessionDep, store: StoreDep
) -> Response:
    """Finish a direct multipart upload; the server hashes it before publishing it."""
    service.complete_multipart(
        session, store, _sha(digest), body.size, body.upload_id, body.key, body.parts
    )
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(
    "/{digest}",
    responses={200: {"content": {"application/octet-stream": {}}}, 307: {}},
    response_class=Response,
)
def get_blob(digest: str, session: SessionDep, store: StoreDep) -> Response:
    """A blob's bytes (folder store) or a redirect to a presigned URL (S3 store)."""
    sha = _sha(digest)
    service.require_blob(session, sha)
    if isinstance(store, FolderStore):
        return FileResponse(store.path(sha), media_type="application/octet-stream")
    url = store.download_url(sha)
    assert url is not None
    return RedirectResponse(url, status_code=status.HTTP_307_TEMPORARY_REDIRECT)
