"""Who is calling, per surface: credentials, the access rule each route declares, and the
check that every route declares one.

The server has surfaces (`Surface`): the REST API under /api/ and the Hugging Face protocol
under /hf/ (`registry.hub.api.HUB`); the web UI will join them. Each has its own rule for where a
request's credential is (a bearer header, a cookie) and its own way to render a refusal
(problem+json, Hub error headers, a page). Two steps, so that nothing about a request is read
before its caller is known:

1. `AuthMiddleware` authenticates every request under a surface's prefix (missing, malformed,
   unknown and revoked tokens are refused before the body is read or parsed) and keeps the
   `Caller` on the request.
2. Every route declares what it needs with one of the annotated dependencies below, which checks
   the caller's scope (`registry.access.require`), e.g.

       @router.post("/{namespace}/{name}/uploads", dependencies=[WRITE])
       def plan_upload(...) -> UploadPlan: ...

       @router.put("/adapters/{namespace}/{name}/aliases/{alias}")
       def set_alias(caller: WriteAccess, ...) -> AliasOut: ...

`create_app` refuses to build an app with a route that declares no rule, a public route inside
a surface or a non-public route outside every surface (`check_routes`), so a new route cannot be
left open by mistake. The rules themselves (scopes, protected aliases, merge targets) are in
`registry.access`, where the services apply them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Send
from starlette.types import Scope as AsgiScope

from registry.access import ANONYMOUS, Caller, Need, require
from registry.core.errors import NotAuthenticated, RegistryError
from registry.core.schemas import Scope
from registry.core.tokens import SECRET_RE, new_secret, secret_sha256
from registry.db import read_only, session_scope
from registry.settings import Settings
from registry.tokens.service import REVOCATIONS, find_token


def bearer_secret(request: Request) -> str | None:
    """The token in `Authorization: Bearer lrt_...`; None when there is no header."""
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, secret = header.partition(" ")
    secret = secret.strip()
    if scheme.lower() != "bearer" or not SECRET_RE.fullmatch(secret):
        raise NotAuthenticated(
            "malformed Authorization header: expected 'Bearer lrt_...' with the token "
            "lora-reg token create printed"
        )
    return secret


@dataclass(frozen=True)
class Surface:
    """One face of the server: the requests under `prefix`, where their credential is
    (`secret`: the token's secret, None when the request carries none) and how a refusal is
    rendered (`render`). Routes under `prefix` all need a token, except `public` ones."""

    name: str
    prefix: str
    secret: Callable[[Request], str | None]
    render: Callable[[Request, RegistryError], Response]
    public: frozenset[str] = field(default_factory=frozenset)  # route paths open to anyone

    def owns(self, path: str) -> bool:
        return path.startswith(self.prefix)


def surface_for(surfaces: Sequence[Surface], path: str) -> Surface | None:
    """The surface a path belongs to: the one with the longest prefix that matches."""
    matching = [surface for surface in surfaces if surface.owns(path)]
    return max(matching, key=lambda surface: len(surface.prefix), default=None)


def issue_internal_token(app: FastAPI, name: str, scope: Scope) -> str:
    """A token that only this process knows (never stored), e.g. for the embedded worker."""
    secret = new_secret()
    app.state.internal_callers[secret_sha256(secret)] = Caller(name, scope)
    return secret


def authenticate(request: Request) -> Caller:
    """The caller behind the request's credential (blocking: may look the token up in SQL)."""
    cached: Caller | None = getattr(request.state, "caller", None)
    if cached is not None:
        return cached
    settings: Settings = request.app.state.settings
    if not settings.auth:
        return ANONYMOUS
    return caller_for(request.app, request_secret(request))


def request_secret(request: Request) -> str:
    """The token secret the request carries, where its surface keeps it."""
    surface = surface_for(request.app.state.surfaces, request.url.path)
    secret = (surface.secret if surface else bearer_secret)(request)
    if secret is None:
        raise NotAuthenticated(
            "this registry needs a token: set LORA_REG_TOKEN (or pass --token); an admin "
            "creates one with lora-reg token create NAME --scope read|write"
        )
    return secret


# How long a token found valid is trusted without looking at its row again. Only a server
# replica other than the one that revoked a token can accept it after its revocation, for at
# most this long: the revoking process and its sibling worker processes forget every token they
# trusted when a revocation commits (`registry.tokens.service.REVOCATIONS`).
TOKEN_CACHE_S = 1.0


@dataclass
class TokenCache:
    """The callers of tokens found valid in the last `ttl_s` seconds, by the secret's sha256,
    each with the revocation stamp read before its row was: a request of a known caller needs
    no look-up (no worker thread, no transaction). Unknown and revoked tokens are never kept,
    so a new token works at once and a refusal always comes from the database."""

    ttl_s: float = TOKEN_CACHE_S
    clock: Callable[[], float] = time.monotonic
    max_entries: int = 10_000
    entries: dict[str, tuple[Caller, float, bytes]] = field(default_factory=dict)
    # Look-ups under way, by the secret's sha256: when an entry expires under load, the requests
    # that arrive meanwhile wait for the one look-up instead of each starting their own.
    lookups: dict[str, asyncio.Future[Caller]] = field(default_factory=dict)

    def get(self, digest: str) -> Caller | None:
        entry = self.entries.get(digest)
        if entry is None:
            return None
        caller, expires, stamp = entry
        if self.clock() >= expires or stamp != REVOCATIONS.read():
            self.entries.pop(digest, None)
            return None
        return caller

    def put(self, digest: str, caller: Caller, stamp: bytes) -> None:
        if len(self.entries) >= self.max_entries:
            self.entries.clear()
        self.entries[digest] = (caller, self.clock() + self.ttl_s, stamp)


def token_cache(app: FastAPI) -> TokenCache:
    """The app's token cache (made at first use)."""
    cache: TokenCache | None = getattr(app.state, "token_cache", None)
    if cache is None:
        cache = app.state.token_cache = TokenCache()
    return cache


def known_caller(app: FastAPI, secret: str) -> Caller | None:
    """The caller of a process-internal token or of a token found valid moments ago; None when
    only the database can tell. No I/O."""
    digest = secret_sha256(secret)
    internal: Caller | None = app.state.internal_callers.get(digest)
    return internal if internal is not None else token_cache(app).get(digest)


def caller_for(app: FastAPI, secret: str) -> Caller:
    """The caller a token secret belongs to: a process-internal token, else a stored one that
    is not revoked (blocking: looks the row up unless `known_caller` knows it)."""
    known = known_caller(app, secret)
    if known is not None:
        return known
    stamp = REVOCATIONS.read()  # before the row: a revocation committed after it shows
    with session_scope(read_only(app.state.engine)) as session:
        token = find_token(session, secret)
    if token is None:
        raise NotAuthenticated(
            "unknown token: check LORA_REG_TOKEN and the server URL, or ask an admin for a "
            "token (lora-reg token create)"
        )
    if token.revoked_at is not None:
        raise NotAuthenticated(
            f"token {token.name!r} was revoked: ask an admin for a new one (lora-reg token create)",
            token=token.name,
        )
    caller = Caller(token.name, token.scope)  # type: ignore[arg-type]  # checked on insert
    token_cache(app).put(secret_sha256(secret), caller, stamp)
    return caller


async def current_caller(request: Request) -> Caller:
    """`authenticate` without a worker thread when the caller is already known (kept by
    AuthMiddleware, a cached or internal token, auth off)."""
    cached: Caller | None = getattr(request.state, "caller", None)
    if cached is not None:
        return cached
    if not request.app.state.settings.auth:
        return ANONYMOUS
    secret = request_secret(request)
    known = known_caller(request.app, secret)
    if known is not None:
        return known
    return await look_up(request.app, secret)


async def look_up(app: FastAPI, secret: str) -> Caller:
    """`caller_for` in a worker thread, once for all the requests that carry `secret` now."""
    lookups = token_cache(app).lookups
    digest = secret_sha256(secret)
    lookup = lookups.get(digest)
    if lookup is None:
        lookup = asyncio.ensure_future(run_in_threadpool(caller_for, app, secret))
        lookups[digest] = lookup

        def done(finished: asyncio.Future[Caller]) -> None:
            lookups.pop(digest, None)
            if not finished.cancelled():
                finished.exception()  # seen, even when every waiter went away

        lookup.add_done_callback(done)
    # A request that goes away (its client hung up) must not cancel the others' look-up.
    return await asyncio.shield(lookup)


class AuthMiddleware:
    """Authenticates every request under a surface's prefix before the route reads its body: an
    anonymous client cannot make the server buffer or parse anything. A refusal is rendered the
    way that surface renders errors. A token seen valid moments ago (`TokenCache`) is known on
    the event loop; only other tokens are looked up, in a worker thread."""

    def __init__(self, app: ASGIApp, surfaces: Sequence[Surface]) -> None:
        self.app = app
        self.surfaces = surfaces

    async def __call__(self, scope: AsgiScope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["app"].state.settings.auth:
            surface = surface_for(self.surfaces, scope["path"])
            # Outside every surface, and a surface's own public paths: public routes only.
            if surface is not None and scope["path"] not in surface.public:
                request = Request(scope)
                try:
                    request.state.caller = await current_caller(request)
                except RegistryError as exc:
                    await surface.render(request, exc)(scope, receive, send)
                    return
        await self.app(scope, receive, send)


def _require(need: Need) -> Callable[[Request], Awaitable[Caller]]:
    async def dependency(request: Request) -> Caller:
        if need == "public":
            return ANONYMOUS
        return require(await current_caller(request), need)

    dependency.need = need  # type: ignore[attr-defined]  # read by route_rules
    dependency.__name__ = f"require_{need}"
    return dependency


ReadAccess = Annotated[Caller, Depends(_require("read"))]
WriteAccess = Annotated[Caller, Depends(_require("write"))]
AdminAccess = Annotated[Caller, Depends(_require("admin"))]
WorkerAccess = Annotated[Caller, Depends(_require("worker"))]
ServingAccess = Annotated[Caller, Depends(_require("serving"))]
PUBLIC: Any = Depends(_require("public"))
READ: Any = Depends(_require("read"))
WRITE: Any = Depends(_require("write"))
UPLOAD: Any = Depends(_require("upload"))


@dataclass(frozen=True)
class RouteRule:
    method: str
    path: str
    need: Need | None  # None: the route declares no rule


def route_rules(app: FastAPI) -> list[RouteRule]:
    """The access rule of every route, one per method (what the matrix test walks). The
    OpenAPI document and the docs pages are public; any other route must declare a rule."""
    docs = {app.openapi_url, app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url}
    try:  # FastAPI >= 0.16x includes routers lazily; this walks them with their prefixes
        from fastapi.routing import iter_route_contexts
    except ImportError:  # older FastAPI: app.routes is already flat
        routes: list[Any] = list(app.routes)
    else:
        routes = list(iter_route_contexts(app.routes))
    rules: list[RouteRule] = []
    for route in routes:
        methods = sorted(getattr(route, "methods", None) or ["*"])
        if isinstance(getattr(route, "original_route", route), APIRoute):
            need = _need(route.dependant)
        else:
            need = "public" if route.path in docs else None
        rules.extend(RouteRule(method, route.path, need) for method in methods)
    return rules


def _need(dependant: Dependant) -> Need | None:
    for dependency in dependant.dependencies:
        need = getattr(dependency.call, "need", None) or _need(dependency)
        if need is not None:
            return need
    return None


def check_routes(app: FastAPI, surfaces: Sequence[Surface]) -> None:
    """Refuse to build an app with a route that declares no rule, a public route inside a
    surface (other than the surface's own `public` paths) or a non-public route outside every
    surface (AuthMiddleware authenticates exactly the surfaces' requests)."""
    rules = route_rules(app)
    missing = [f"{rule.method} {rule.path}" for rule in rules if rule.need is None]
    if missing:
        raise RuntimeError(
            "routes without an access rule (add a registry.auth dependency): " + "; ".join(missing)
        )
    misplaced = []
    for rule in rules:
        surface = surface_for(surfaces, rule.path)
        public = rule.need == "public"
        if surface is None and not public:
            misplaced.append(f"{rule.method} {rule.path} (outside every surface, not public)")
        elif surface is not None and public and rule.path not in surface.public:
            misplaced.append(f"{rule.method} {rule.path} (public inside {surface.name})")
    if misplaced:
        prefixes = ", ".join(f"{s.name} {s.prefix}" for s in surfaces)
        raise RuntimeError(
            f"public routes must live outside the surfaces ({prefixes}) and every other route "
            "inside one: " + "; ".join(misplaced)
        )
