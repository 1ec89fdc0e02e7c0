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

from collections.abc import Callable, Sequence
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
from registry.tokens.service import find_token


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
    surface = surface_for(request.app.state.surfaces, request.url.path)
    secret = (surface.secret if surface else bearer_secret)(request)
    if secret is None:
        raise NotAuthenticated(
            "this registry needs a token: set LORA_REG_TOKEN (or pass --token); an admin "
            "creates one with lora-reg token create NAME --scope read|write"
        )
    return caller_for(request.app, secret)


def caller_for(app: FastAPI, secret: str) -> Caller:
    """The caller a token secret belongs to: a process-internal token, else a stored one that
    is not revoked."""
    internal: Caller | None = app.state.internal_callers.get(secret_sha256(secret))
    if internal is not None:
        return internal
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
    return Caller(token.name, token.scope)  # type: ignore[arg-type]  # checked on insert


class AuthMiddleware:
    """Authenticates every request under a surface's prefix before the route reads its body: an
    anonymous client cannot make the server buffer or parse anything. A refusal is rendered the
    way that surface renders errors."""

    def __init__(self, app: ASGIApp, surfaces: Sequence[Surface]) -> None:
        self.app = app
        self.surfaces = surfaces

    async def __call__(self, scope: AsgiScope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["app"].state.settings.auth:
            surface = surface_for(self.surfaces, scope["path"])
            if surface is not None:  # outside every surface: public routes only
                request = Request(scope)
                try:
                    request.state.caller = await run_in_threadpool(authenticate, request)
                except RegistryError as exc:
                    await surface.render(request, exc)(scope, receive, send)
                    return
        await self.app(scope, receive, send)


def _require(need: Need) -> Callable[[Request], Caller]:
    def dependency(request: Request) -> Caller:
        if need == "public":
            return ANONYMOUS
        return require(authenticate(request), need)

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
