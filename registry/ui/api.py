"""The web UI's surface (`UI`): pages and forms under /ui/, signed in with a cookie, refusals
rendered as pages; plus what lives outside every surface and anyone may fetch: `/` (to the UI),
the static assets under /static/ and the API docs (/docs, /redoc), all served by this server.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from starlette.responses import FileResponse, HTMLResponse, RedirectResponse, Response

from registry.auth import PUBLIC, Surface
from registry.core.errors import NotFound
from registry.ui import actions, pages
from registry.ui.render import render_ui_error
from registry.ui.session import ui_secret
from registry.ui.urls import PREFIX, urls

UI = Surface(
    name="ui",
    prefix=PREFIX + "/",
    secret=ui_secret,
    render=render_ui_error,
    public=frozenset({urls.sign_in_page, urls.sign_out}),
)

# Every asset a page or the API docs load, by the name it has under /static/: ours, and the
# Swagger UI / ReDoc bundles that fastapi-offline ships (nothing is fetched from a CDN).
_OURS = Path(__file__).parent / "static"
_DOCS = Path(fastapi_offline.__file__).parent / "static"
ASSETS: dict[str, Path] = {
    **{path.name: path for path in _OURS.iterdir() if path.is_file()},
    "docs/swagger-ui-bundle.js": _DOCS / "swagger-ui-bundle.js",
    "docs/swagger-ui.css": _DOCS / "swagger-ui.css",
    "docs/redoc.standalone.js": _DOCS / "redoc.standalone.js",
    "docs/favicon.png": _DOCS / "favicon.png",
    "docs/logo-mini.svg": _OURS / "favicon.svg",
}
# ReDoc's bundle draws its "API docs by Redocly" logo from Redocly's CDN: point it here.
_REWRITES = {
    "docs/redoc.standalone.js": (
        b"https://cdn.redoc.ly/redoc/logo-mini.svg",
        b"/static/docs/logo-mini.svg",
    )
}
MEDIA_TYPES = {".css": "text/css", ".js": "text/javascript", ".svg": "image/svg+xml"}

outside = APIRouter(include_in_schema=False)


@outside.get("/", dependencies=[PUBLIC])
def root() -> Response:
    return RedirectResponse(urls.home, status_code=303)


@outside.get("/static/{name:path}", dependencies=[PUBLIC])
def asset(name: str) -> Response:
    """One of the known assets (anything else is 404: no path is ever joined to a folder)."""
    path = ASSETS.get(name)
    if path is None:
        raise NotFound(f"no asset {name!r}")
    headers = {"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"}
    media_type = MEDIA_TYPES.get(path.suffix)
    if name in _REWRITES:
        return Response(_rewritten(name), media_type=media_type, headers=headers)
    return FileResponse(path, media_type=media_type, headers=headers)


@cache
def _rewritten(name: str) -> bytes:
    old, new = _REWRITES[name]
    return ASSETS[name].read_bytes().replace(old, new)


@outside.get("/docs", dependencies=[PUBLIC])
def swagger_ui(request: Request) -> HTMLResponse:
    """Swagger UI for the REST API, its assets served from /static/docs/."""
    return get_swagger_ui_html(
        openapi_url=request.app.openapi_url,
        title="lora-registry API",
        swagger_js_url=urls.static("docs/swagger-ui-bundle.js"),
        swagger_css_url=urls.static("docs/swagger-ui.css"),
        swagger_favicon_url=urls.static("docs/favicon.png"),
        # No badge from validator.swagger.io: the docs page talks to this server only.
        swagger_ui_parameters={"validatorUrl": None},
    )


@outside.get("/redoc", dependencies=[PUBLIC])
def redoc(request: Request) -> HTMLResponse:
    """ReDoc for the REST API, its script served from /static/docs/ (no web fonts)."""
    return get_redoc_html(
        openapi_url=request.app.openapi_url,
        title="lora-registry API",
        redoc_js_url=urls.static("docs/redoc.standalone.js"),
        redoc_favicon_url=urls.static("docs/favicon.png"),
        with_google_fonts=False,
    )


router = APIRouter()
router.include_router(pages.router)
router.include_router(actions.router)
router.include_router(outside)
