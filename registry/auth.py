"""Who is calling and what they may do: bearer tokens, scopes, and the access rule of each route.

Two steps, so that nothing about a request is read before its token is known:

1. `AuthMiddleware` authenticates every request under /api/ (missing, malformed, unknown and
   revoked tokens get 401 before the body is read or parsed) and keeps the `Caller`.
2. Every route declares what it needs with one of the annotated dependencies below, which checks
   the caller's scope, e.g.

       @router.post("/{namespace}/{name}/uploads", dependencies=[WRITE])
       def plan_upload(...) -> UploadPlan: ...

       @router.put("/adapters/{namespace}/{name}/aliases/{alias}")
       def set_alias(caller: WriteAccess, ...) -> AliasOut: ...

`create_app` refuses to build an app with a route that declares no rule, or with a public route
under /api/ (`check_routes`), so a new route cannot be left open by mistake. Scopes: `read` <
`write` < `admin`, and `worker` (read + the merge job endpoints). With `LORA_REG_AUTH=off`
(loopback only) every caller is an anonymous admin.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Receive, Send
from starlette.types import Scope as AsgiScope

from registry.core.errors import NotAuthenticated, NotPermitted, ProtectedAlias, RegistryError
from registry.core.jobs import parse_target, target_within
from registry.core.schemas import Scope
from registry.core.tokens import SECRET_RE, new_secret, secret_sha256
from registry.db import read_only, session_scope
from registry.settings import Settings
from registry.tokens.service import find_token

API_PREFIX = "/api/"

Need = Literal["public", "read", "write", "admin", "worker", "upload"]

# Which token scopes satisfy each need. `upload` is blob bytes: sent by pushes (write) and by
# merge workers publishing to the registry (worker).
ALLOWED: dict[Need, frozenset[Scope]] = {
    "read": frozenset({"read", "write", "admin", "worker"}),
    "write": frozenset({"write", "admin"}),
    "admin": frozenset({"admin"}),
    "worker": frozenset({"worker", "admin"}),
    "upload": frozenset({"write", "worker", "admin"}),
}


@dataclass(frozen=True)
class Caller:
    name: str | None  # the audit actor; None when auth is off
    scope: Scope


ANONYMOUS = Caller(name=None, scope="admin")


def issue_internal_token(app: FastAPI, name: str, scope: Scope) -> str:
    """A token that only this process knows (never stored), e.g. for the embedded worker."""
    secret = new_secret()
    app.state.internal_callers[secret_sha256(secret)] = Caller(name, scope)
    return secret


def authenticate(request: Request) -> Caller:
    """The caller behind the request's bearer token (blocking: may look the token up in SQL)."""
    cached: Caller | None = getattr(request.state, "caller", None)
    if cached is not None:
        return cached
    settings: Settings = request.app.state.settings
    if not settings.auth:
        return ANONYMOUS
    header = request.headers.get("authorization")
    if not header:
        raise NotAuthenticated(
            "this registry needs a token: set LORA_REG_TOKEN (or pass --token); an admin "
            "creates one with lora-reg token create NAME --scope read|write"
        )
    scheme, _, secret = header.partition(" ")
    secret = secret.strip()
    if scheme.lower() != "bearer" or not SECRET_RE.fullmatch(secret):
        raise NotAuthenticated(
            "malformed Authorization header: expected 'Bearer lrt_...' with the token "
            "lora-reg token create printed"
        )
    internal: Caller | None = request.app.state.internal_callers.get(secret_sha256(secret))
    if internal is not None:
        return internal
    with session_scope(read_only(request.app.state.engine)) as session:
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
    """Authenticates every /api/ request before the route reads its body: an anonymous client
    cannot make the server buffer or parse anything. `render` turns a refusal into the app's
    problem+json response."""

    def __init__(self, app: ASGIApp, render: Callable[[RegistryError], Any]) -> None:
        self.app = app
        self.render = render

    async def __call__(self, scope: AsgiScope, receive: Receive, send: Send) -> None:
        if _needs_token(scope):
            request = Request(scope)
            try:
                caller = await run_in_threadpool(authenticate, request)
            except RegistryError as exc:
                await self.render(exc)(scope, receive, send)
                return
            request.state.caller = caller
        await self.app(scope, receive, send)


def _needs_token(scope: AsgiScope) -> bool:
    """An /api/ request to a server with auth on (with it off, nobody is looked up)."""
    if scope["type"] != "http" or not scope["path"].startswith(API_PREFIX):
        return False
    settings: Settings = scope["app"].state.settings
    return settings.auth


def _require(need: Need) -> Callable[[Request], Caller]:
    def dependency(request: Request) -> Caller:
        if need == "public":
            return ANONYMOUS
        caller = authenticate(request)
        allowed = ALLOWED[need]
        if caller.scope not in allowed:
            raise NotPermitted(
                f"this needs a token with scope {' or '.join(sorted(allowed))}; "
                f"token {caller.name!r} has scope {caller.scope}",
                need=need,
                scope=caller.scope,
            )
        return caller

    dependency.need = need  # type: ignore[attr-defined]  # read by route_rules
    dependency.__name__ = f"require_{need}"
    return dependency


ReadAccess = Annotated[Caller, Depends(_require("read"))]
WriteAccess = Annotated[Caller, Depends(_require("write"))]
AdminAccess = Annotated[Caller, Depends(_require("admin"))]
WorkerAccess = Annotated[Caller, Depends(_require("worker"))]
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


def check_routes(app: FastAPI) -> None:
    """Refuse to build an app with a route that declares no rule, or a public route under /api/
    (AuthMiddleware authenticates all of /api/, and only that)."""
    rules = route_rules(app)
    missing = [f"{rule.method} {rule.path}" for rule in rules if rule.need is None]
    if missing:
        raise RuntimeError(
            "routes without an access rule (add a registry.auth dependency): " + "; ".join(missing)
        )
    misplaced = [
        f"{rule.method} {rule.path}"
        for rule in rules
        if (rule.need == "public") == rule.path.startswith(API_PREFIX)
    ]
    if misplaced:
        raise RuntimeError(
            f"public routes must live outside {API_PREFIX} and every other route under it: "
            + "; ".join(misplaced)
        )


def check_alias_move(settings: Settings, caller: Caller, alias: str) -> None:
    """Protected aliases (LORA_REG_PROTECTED_ALIASES, default production) move only by admin."""
    if alias in settings.protected_alias_names and caller.scope != "admin":
        raise ProtectedAlias(
            f"{alias!r} is a protected alias: only an admin token may move or remove it "
            f"(token {caller.name!r} has scope {caller.scope}); ask an admin, or use another "
            "alias such as staging",
            alias=alias,
        )


def check_merge_target(settings: Settings, caller: Caller, text: str) -> None:
    """Workers publish with their own credentials (file system, S3, HF_TOKEN), so a write token
    may send merges only to the registry or inside LORA_REG_MERGE_TARGETS; admins anywhere."""
    target = parse_target(text)
    if caller.scope == "admin" or target.kind == "registry":
        return
    if any(target_within(target, allowed) for allowed in settings.merge_target_list):
        return
    allowed_text = settings.merge_targets or "nothing besides registry"
    raise NotPermitted(
        f"token {caller.name!r} (scope {caller.scope}) may send merges to the registry and to "
        f"LORA_REG_MERGE_TARGETS ({allowed_text}), not to {target}: use --to registry, or ask "
        "an admin to allow that destination",
        target=str(target),
    )
