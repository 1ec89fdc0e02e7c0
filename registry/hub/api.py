"""The Hugging Face protocol's routes under /hf/ and its surface, `HUB` (routes only: no SQL).

With `HF_ENDPOINT=http://registry:8000/hf`, huggingface_hub (and so transformers, PEFT, vLLM,
LoRAX) reads repository info (`/hf/api/models/{repo_id}[/revision/{revision}]`), tree listings
(`/hf/api/models/{repo_id}/tree/{revision}[/{path}]`) and files
(`/hf/{repo_id}/resolve/{revision}/{path}`, HEAD and GET). Every route needs `read`; the token
is `HF_TOKEN`, which huggingface_hub sends as `Authorization: Bearer ...`. Refusals carry the
Hub's error headers (`registry.hub.protocol.hub_error`). The routes stay out of the OpenAPI
document: they are the Hub's API, not ours.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, StreamingResponse
from starlette.responses import Response

from registry import metrics
from registry.auth import READ, Surface, bearer_secret
from registry.core.errors import NotAuthenticated, RegistryError
from registry.deps import ReadSessionDep, SettingsDep, StoreDep
from registry.guards import ThreadedJSONRoute
from registry.hub import protocol, service
from registry.hub.protocol import (
    HEADER_COMMIT,
    HEADER_LINKED_ETAG,
    HEADER_LINKED_SIZE,
    MAIN,
    HubFile,
    Snapshot,
)

log = logging.getLogger("registry")

PREFIX = "/hf"


def hub_secret(request: Request) -> str | None:
    """The registry token in `Authorization: Bearer lrt_...` (huggingface_hub sends HF_TOKEN
    there); None when there is no header."""
    try:
        return bearer_secret(request)
    except NotAuthenticated:
        raise NotAuthenticated(
            "HF_TOKEN is not a registry token: set it to the lrt_... token that lora-reg token "
            "create printed"
        ) from None


def render_hub_error(request: Request, error: RegistryError) -> Response:
    """A registry error the way the Hub answers it (see `protocol.hub_error`)."""
    if error.status >= 500:
        log.error("%s: %s", error.code, error.message, exc_info=error.__cause__ or error)
    answer = protocol.hub_error(error, credential_sent="authorization" in request.headers)
    return JSONResponse({"error": answer.message}, answer.status, headers=answer.headers)


HUB = Surface(name="hub", prefix=PREFIX + "/", secret=hub_secret, render=render_hub_error)

# ThreadedJSONRoute: each endpoint and the end of its transaction run in one worker thread.
router = APIRouter(
    prefix=PREFIX, tags=["hub"], include_in_schema=False, route_class=ThreadedJSONRoute
)


def _repo(namespace: str, name: str) -> str:
    return f"{namespace}/{name}"


@router.get("/api/models/{namespace}/{name}", dependencies=[READ])
def model_info(
    session: ReadSessionDep, settings: SettingsDep, namespace: str, name: str
) -> JSONResponse:
    """Repository info at `main`."""
    found = service.snapshot(session, _repo(namespace, name), MAIN)
    return JSONResponse(protocol.model_info(found, private=settings.auth))


@router.get("/api/models/{namespace}/{name}/revision/{revision}", dependencies=[READ])
def model_info_at(
    session: ReadSessionDep, settings: SettingsDep, namespace: str, name: str, revision: str
) -> JSONResponse:
    """Repository info at a revision (its `sha` is the revision's commit)."""
    found = service.snapshot(session, _repo(namespace, name), revision)
    return JSONResponse(protocol.model_info(found, private=settings.auth))


@router.get("/api/models/{namespace}/{name}/tree/{revision}", dependencies=[READ])
def tree(
    request: Request,
    session: ReadSessionDep,
    namespace: str,
    name: str,
    revision: str,
    recursive: bool = False,
    expand: bool = False,
    cursor: str | None = None,
) -> JSONResponse:
    """The files and folders at the top of the repository (everything with `recursive`)."""
    return tree_at(request, session, namespace, name, revision, "", recursive, expand, cursor)


@router.get("/api/models/{namespace}/{name}/tree/{revision}/{path:path}", dependencies=[READ])
def tree_at(
    request: Request,
    session: ReadSessionDep,
    namespace: str,
    name: str,
    revision: str,
    path: str,
    recursive: bool = False,
    expand: bool = False,
    cursor: str | None = None,
) -> JSONResponse:
    """The files and folders in a folder; pages of 1000 entries linked by a `Link` header."""
    found = service.snapshot(session, _repo(namespace, name), revision)
    entries, following = protocol.page(
        protocol.tree(found, path, recursive=recursive, expand=expand), cursor
    )
    headers = {}
    if following is not None:
        next_url = request.url.include_query_params(cursor=str(following))
        headers["Link"] = f'<{next_url}>; rel="next"'
    return JSONResponse(entries, headers=headers)


@router.api_route(
    "/{namespace}/{name}/resolve/{revision}/{path:path}",
    methods=["GET", "HEAD"],
    dependencies=[READ],
    response_class=Response,
)
def resolve_file(
    request: Request,
    session: ReadSessionDep,
    store: StoreDep,
    namespace: str,
    name: str,
    revision: str,
    path: str,
) -> Response:
    """A file's bytes (with Range support) or, when the store is S3, a redirect to a presigned
    URL; either way with the commit, the ETag (the sha256) and the size the client checks."""
    found, file = service.resolve_file(session, _repo(namespace, name), revision, path)
    headers = _file_headers(found, file)
    local = service.local_path(store, file)
    if local is not None:
        return FileResponse(local, headers=headers, media_type="application/octet-stream")
    url = service.download_url(store, file)
    if url is not None:
        headers[HEADER_LINKED_ETAG] = file.etag
        headers[HEADER_LINKED_SIZE] = str(file.size)
        if request.method == "GET":
            metrics.presigned_download(file.size)
        return RedirectResponse(url, status_code=302, headers=headers)
    headers["Content-Length"] = str(file.size)
    return StreamingResponse(
        service.stream(store, file), headers=headers, media_type="application/octet-stream"
    )


def _file_headers(found: Snapshot, file: HubFile) -> dict[str, str]:
    return {HEADER_COMMIT: found.commit, "ETag": file.etag}
