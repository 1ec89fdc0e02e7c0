"""The FastAPI application: routers, the one error shape, and health endpoints.

Every error leaves as RFC 9457 problem+json with the registry's stable `code`
(`registry.core.schemas.Problem`): registry errors, request validation errors and unknown routes
alike. `create_app` takes settings so tests and the server build it the same way.
"""

from __future__ import annotations

import logging
from typing import Any

import sqlalchemy as sa
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from registry import __version__
from registry.adapters.api import router as adapters_router
from registry.aliases.api import router as aliases_router
from registry.auth import (
    PUBLIC,
    READ,
    AuthMiddleware,
    Surface,
    bearer_secret,
    check_routes,
    surface_for,
)
from registry.bases.api import router as bases_router
from registry.blobs.api import router as blobs_router
from registry.core.errors import (
    DatabaseUnavailable,
    InvalidInput,
    NotFound,
    RegistryError,
    StorageUnavailable,
)
from registry.core.schemas import Problem
from registry.db import make_engine
from registry.deployments.api import router as deployments_router
from registry.events.api import router as events_router
from registry.guards import BodyLimitMiddleware, CloseUnreadBodyMiddleware, LoopbackHostMiddleware
from registry.hub.api import HUB
from registry.hub.api import router as hub_router
from registry.merges.api import router as merges_router
from registry.metrics import MetricsMiddleware, exposition
from registry.openapi import allowed_methods, errors, install
from registry.settings import Settings
from registry.storage import open_store
from registry.tokens.api import router as tokens_router
from registry.ui.api import UI
from registry.ui.api import router as ui_router
from registry.webhooks.api import router as webhooks_router

log = logging.getLogger("registry")

PROBLEM_JSON = "application/problem+json"
_HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}


def problem(status: int, code: str, title: str, detail: str, **details: Any) -> JSONResponse:
    body = Problem(
        type=f"https://lora-registry.dev/errors/{code}",
        title=title,
        status=status,
        detail=detail,
        code=code,
        details=details,
    )
    return JSONResponse(body.model_dump(mode="json"), status_code=status, media_type=PROBLEM_JSON)


def error_response(exc: RegistryError) -> JSONResponse:
    """A registry error as problem+json (the API's renderer)."""
    if exc.status >= 500:
        log.error("%s: %s", exc.code, exc.message, exc_info=exc.__cause__ or exc)
    response = problem(exc.status, exc.code, exc.title, exc.message, **exc.details)
    if exc.status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="lora-registry"'
    return response


def _render_api(_request: Request, exc: RegistryError) -> Response:
    return error_response(exc)


# The REST API: bearer tokens, problem+json. The Hugging Face protocol (registry/hub) has its
# own: HF_TOKEN as a bearer token, errors as the Hub's headers; the web UI (registry/ui) signs in
# with a cookie and shows refusals as pages.
API = Surface(name="api", prefix="/api/", secret=bearer_secret, render=_render_api)
SURFACES = (API, HUB, UI)
# /metrics with LORA_REG_METRICS_AUTH=token (the default): a read token, refusals as problem+json.
# With `none` it is a public route outside every surface, like /healthz.
METRICS = Surface(name="metrics", prefix="/metrics", secret=bearer_secret, render=_render_api)


def render(request: Request, exc: RegistryError) -> Response:
    """A registry error the way the surface the request came through renders errors (outside
    every surface, health and docs: the API's problem+json)."""
    surface = surface_for(request.app.state.surfaces, request.url.path) or API
    return surface.render(request, exc)


async def _registry_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RegistryError)
    return render(request, exc)


def _on_ui(request: Request) -> bool:
    return surface_for(request.app.state.surfaces, request.url.path) is UI


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {}
    where = ".".join(str(part) for part in first.get("loc", ()))
    message = str(first.get("msg", "invalid request"))
    # Validators raising our own errors keep their code (e.g. invalid_path).
    cause = first.get("ctx", {}).get("error")
    if isinstance(cause, RegistryError):
        if _on_ui(request):
            return UI.render(request, cause)
        return problem(cause.status, cause.code, cause.title, cause.message, **cause.details)
    if _on_ui(request):
        return UI.render(request, InvalidInput(f"{where}: {message}" if where else message))
    return problem(
        422,
        "invalid_input",
        "Invalid input.",
        f"{where}: {message}" if where else message,
        errors=[{"loc": list(e.get("loc", ())), "msg": str(e.get("msg"))} for e in errors[:20]],
    )


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if _on_ui(request) and exc.status_code == 404:
        return UI.render(request, NotFound("no such page: see the adapters page"))
    code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
    response = problem(exc.status_code, code, str(exc.detail), str(exc.detail))
    response.headers.update(exc.headers or {})
    if exc.status_code == 405:
        response.headers["Allow"] = allowed_methods(request.app, request.scope)
    return response


async def _unexpected(request: Request, exc: Exception) -> Response:
    # The details stay in the server log: they can hold SQL, paths or parameters.
    if _on_ui(request):
        error = RegistryError("see the server log")
        error.__cause__ = exc
        return UI.render(request, error)  # logs it, with the traceback
    log.exception("unexpected error", exc_info=exc)
    return problem(500, "internal", "Unexpected registry error.", "see the server log")


def create_app(settings: Settings) -> FastAPI:
    app = FastAPI(
        title="lora-registry",
        version=__version__,
        description="Versioned, content-addressed registry for LoRA adapters.",
        docs_url=None,  # served by registry/ui with assets from this server, not a CDN
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.engine = make_engine(settings.sqlalchemy_url)
    app.state.store = open_store(settings)
    app.state.internal_callers = {}  # sha256 of a secret -> Caller (registry.auth)
    surfaces = (*SURFACES, METRICS) if settings.metrics_auth == "token" else SURFACES
    app.state.surfaces = surfaces
    app.include_router(adapters_router)
    app.include_router(blobs_router)
    app.include_router(bases_router)
    app.include_router(aliases_router)
    app.include_router(merges_router)
    app.include_router(tokens_router)
    app.include_router(events_router)
    app.include_router(deployments_router)
    app.include_router(webhooks_router)
    app.include_router(hub_router)
    app.include_router(ui_router)
    app.add_exception_handler(RegistryError, _registry_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    # Starlette runs the last added first: metrics, close-unread-body, host check, auth, body
    # limits.
    app.add_middleware(BodyLimitMiddleware, settings=settings, render=render)
    app.add_middleware(AuthMiddleware, surfaces=surfaces)
    app.add_middleware(LoopbackHostMiddleware, settings=settings, render=render)
    app.add_middleware(CloseUnreadBodyMiddleware)
    app.add_middleware(MetricsMiddleware, surfaces=surfaces)  # outermost: counts every answer

    @app.get("/healthz", tags=["health"], dependencies=[PUBLIC])
    def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok", "version": __version__}

    @app.get(
        "/readyz",
        tags=["health"],
        dependencies=[PUBLIC],
        responses=errors(DatabaseUnavailable, StorageUnavailable),
    )
    async def readyz() -> JSONResponse:
        """The database and the object store are reachable."""

        def check() -> None:
            try:
                with app.state.engine.connect() as connection:
                    connection.execute(sa.text("SELECT 1"))
            except sa.exc.SQLAlchemyError as exc:
                raise DatabaseUnavailable(f"database unreachable: {exc}") from exc
            app.state.store.check()

        try:
            await run_in_threadpool(check)
        except RegistryError as exc:
            return problem(exc.status, exc.code, exc.title, exc.message)
        return JSONResponse({"status": "ready"})

    @app.get(
        "/metrics",
        tags=["health"],
        dependencies=[READ if settings.metrics_auth == "token" else PUBLIC],
        include_in_schema=False,
    )
    def metrics(request: Request) -> Response:
        """Prometheus metrics of every process of this server (registry/metrics.py)."""
        body, content_type = exposition(app.state.engine, request.headers.get("accept"))
        return Response(body, media_type=content_type)

    check_routes(app, surfaces)
    install(app)
    return app
