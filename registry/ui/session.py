"""Who is signed in to the UI, and the CSRF check of its forms.

Signing in stores the pasted token's secret in the `lr_token` cookie: `HttpOnly` (no script can
read it), `SameSite=Strict` (no other site's page sends it), `Secure` when the request came over
HTTPS, path `/ui/`. The token never appears in a URL and the server never logs it.

Every form carries a CSRF token that must equal the `lr_csrf` cookie (the double-submit pattern,
on top of SameSite=Strict): a page of another origin can neither read that cookie nor make the
browser send it, so it cannot forge a form that passes. The CSRF cookie is set on the first UI
page a browser sees, signed in or not, so the sign-in form is protected too.
"""

from __future__ import annotations

import secrets
from urllib.parse import parse_qsl

from fastapi import Request
from starlette.responses import Response

from registry.core.errors import InvalidInput, NotAuthenticated, NotPermitted
from registry.core.tokens import SECRET_RE

TOKEN_COOKIE = "lr_token"
CSRF_COOKIE = "lr_csrf"
CSRF_FIELD = "csrf"
COOKIE_PATH = "/ui/"
MAX_FORM_BYTES = 64 * 1024  # the largest UI form body (a merge request, a token name)
TOKEN_MAX_AGE_S = 7 * 24 * 3600


def ui_secret(request: Request) -> str | None:
    """The token secret in the `lr_token` cookie (the UI surface's credential); None when the
    browser has not signed in."""
    secret = request.cookies.get(TOKEN_COOKIE)
    if not secret:
        return None
    if not SECRET_RE.fullmatch(secret):
        raise NotAuthenticated("your sign-in is not valid any more: sign in again with a token")
    return secret


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


def set_token_cookie(request: Request, response: Response, secret: str) -> None:
    response.set_cookie(
        TOKEN_COOKIE,
        secret,
        max_age=TOKEN_MAX_AGE_S,
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=_secure(request),
    )


def clear_token_cookie(request: Request, response: Response) -> None:
    response.delete_cookie(
        TOKEN_COOKIE, path=COOKIE_PATH, httponly=True, samesite="strict", secure=_secure(request)
    )


def csrf_token(request: Request) -> str:
    """The CSRF token forms on this page carry: the browser's `lr_csrf` cookie, or a new one
    that `remember_csrf` sets on the response."""
    existing = request.cookies.get(CSRF_COOKIE)
    if existing and len(existing) == 43:
        return existing
    fresh: str | None = getattr(request.state, "new_csrf", None)
    if fresh is None:
        fresh = secrets.token_urlsafe(32)
        request.state.new_csrf = fresh
    return fresh


def remember_csrf(request: Request, response: Response) -> None:
    """Set the CSRF cookie when this request made a new token."""
    fresh: str | None = getattr(request.state, "new_csrf", None)
    if fresh is not None:
        response.set_cookie(
            CSRF_COOKIE,
            fresh,
            path=COOKIE_PATH,
            httponly=True,
            samesite="strict",
            secure=_secure(request),
        )


async def read_form(request: Request) -> dict[str, str]:
    """The submitted form's fields, once its CSRF token matched the cookie (refused with
    not_permitted otherwise). Bounded: a UI form is small."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        raise InvalidInput("the UI takes forms (application/x-www-form-urlencoded) only")
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise InvalidInput(f"a UI form is at most {MAX_FORM_BYTES} bytes")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput("the form is not UTF-8") from None
    try:
        fields = dict(parse_qsl(text, keep_blank_values=True, max_num_fields=50))
    except ValueError:
        raise InvalidInput("a UI form has at most 50 fields") from None
    cookie = request.cookies.get(CSRF_COOKIE, "")
    sent = fields.pop(CSRF_FIELD, "")
    if not cookie or not secrets.compare_digest(cookie.encode(), sent.encode()):
        raise NotPermitted(
            "this form was not sent from this registry's own page (its CSRF token is missing "
            "or stale): reload the page and submit it again"
        )
    return fields
