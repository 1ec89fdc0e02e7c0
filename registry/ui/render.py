"""Rendering UI pages and UI errors: the Jinja2 environment, the context every page gets, the
headers every page carries, and the UI surface's error renderer.

Every template gets `request`, `caller` (who is signed in; None when signed out), `auth` (whether
the server wants tokens), `urls` (registry.ui.urls), `csrf` (the token its forms carry) and
`app_version`, besides its own context (documented at the top of each template).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import Request
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from starlette.responses import HTMLResponse, RedirectResponse, Response

from registry import __version__
from registry.access import ANONYMOUS, Caller
from registry.core.errors import NotAuthenticated, RegistryError
from registry.ui.session import clear_token_cookie, csrf_token, remember_csrf
from registry.ui.urls import urls

log = logging.getLogger("registry")

TEMPLATES = Path(__file__).parent / "templates"

# Pages load only what this server serves: no CDN, no inline script, no framing by other sites.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


NONE = "\u2013"  # an en dash: "no value" in a table cell


def size(value: int | None) -> str:
    """Bytes for people: 1.2 MB (powers of 1000, like the CLI)."""
    if value is None:
        return NONE
    amount = float(value)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if amount < 1000 or unit == "TB":
            return f"{int(amount)} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1000
    return f"{value} B"


def ago(when: datetime | None, now: datetime | None = None) -> str:
    """How long ago, coarsely: 'just now', '5 min ago', '3 h ago', '12 d ago'."""
    if when is None:
        return NONE
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    seconds = ((now or datetime.now(UTC)) - when).total_seconds()
    if seconds < 60:
        return "just now"
    for unit, length in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= length:
            return f"{int(seconds // length)} {unit} ago"
    return "just now"


def stamp(when: datetime | None, seconds: bool = False) -> str:
    """A time as people read it in a table: 2026-12-03 14:05 UTC (14:05:09 with seconds)."""
    if when is None:
        return NONE
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).strftime(
        "%Y-%m-%d %H:%M:%S UTC" if seconds else "%Y-%m-%d %H:%M UTC"
    )


def iso(when: datetime | None) -> str:
    if when is None:
        return ""
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).isoformat(timespec="seconds")


def short(digest: str | None, length: int = 12) -> str:
    """sha256:0123abcd... -> 0123abcd4567 (what people compare at a glance)."""
    if not digest:
        return NONE
    return digest.removeprefix("sha256:")[:length]


def metric(value: float | None) -> str:
    if value is None:
        return NONE
    return f"{value:.4g}"


def _environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=select_autoescape(["html"]),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        auto_reload=False,
    )
    env.filters.update(size=size, ago=ago, stamp=stamp, iso=iso, short=short, metric=metric)
    env.globals.update(urls=urls, app_version=__version__)
    return env


ENV = _environment()


def current_caller(request: Request) -> Caller | None:
    caller: Caller | None = getattr(request.state, "caller", None)
    return caller


def page(request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
    """A whole page: `template` rendered with the common context and the UI's headers."""
    settings = request.app.state.settings
    caller = current_caller(request)
    if caller is None and not settings.auth:
        caller = ANONYMOUS
    html = ENV.get_template(template).render(
        request=request,
        caller=caller,
        auth=settings.auth,
        csrf=csrf_token(request),
        **context,
    )
    response = HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)
    remember_csrf(request, response)
    return response


def fragment(request: Request, template: str, **context: Any) -> HTMLResponse:
    """A piece of a page that the page's script swaps in (e.g. a job's live status)."""
    html = ENV.get_template(template).render(request=request, **context)
    return HTMLResponse(html, headers=SECURITY_HEADERS)


def redirect(request: Request, url: str) -> Response:
    """After a form: see the result on its page (303, so a reload does not post again)."""
    response = RedirectResponse(url, status_code=303, headers=SECURITY_HEADERS)
    remember_csrf(request, response)
    return response


def _return_path(request: Request) -> str:
    path = request.url.path
    if request.method != "GET":
        return urls.home
    return path + (f"?{request.url.query}" if request.url.query else "")


def render_ui_error(request: Request, error: RegistryError) -> Response:
    """A registry error the way the UI shows it: a visitor who is not (or no longer) signed in
    goes to the sign-in page, which brings them back afterwards; anything else is a page with
    the same code and message the API and the CLI give."""
    if error.status >= 500:
        log.error("%s: %s", error.code, error.message, exc_info=error.__cause__ or error)
    if isinstance(error, NotAuthenticated):
        response = RedirectResponse(
            urls.sign_in(_return_path(request)), status_code=303, headers=SECURITY_HEADERS
        )
        if "lr_token" in request.cookies:
            clear_token_cookie(request, response)
        return response
    return page(request, "error.html", status=error.status, error=error)
