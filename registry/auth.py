"""Who is calling and what they may do: bearer tokens, scopes, and the access rule of each route.

Every route declares what it needs with one of the annotated dependencies below, e.g.

    @router.post("/{namespace}/{name}/uploads")
    def plan_upload(caller: WriteAccess, ...) -> UploadPlan: ...

    @router.get("", dependencies=[READ])
    def list_adapters(...) -> Page[AdapterOut]: ...

`create_app` refuses to start when a route declares none (`check_routes`), so a new route cannot
be left open by mistake. Scopes: `read` < `write` < `admin`, and `worker` (read + the merge job
endpoints). With `LORA_REG_AUTH=off` (loopback only) every caller is an anonymous admin.

Secrets look like `lrt_` + 43 URL-safe characters (256 random bits); only their sha256 is
stored, so a plain hash is enough (there is nothing to brute-force).
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from sqlmodel import col, select

from registry.core.errors import NotAuthenticated, NotPermitted, ProtectedAlias
from registry.core.schemas import Scope
from registry.db import read_only, session_scope
from registry.models import ApiToken
from registry.settings import Settings

SECRET_PREFIX = "lrt_"
SECRET_RE = re.compile(r"lrt_[A-Za-z0-9_-]{43}")

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


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def secret_sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def issue_internal_token(app: FastAPI, name: str, scope: Scope) -> str:
    """A token that only this process knows (never stored), e.g. for the embedded worker."""
    secret = new_secret()
    app.state.internal_callers[secret_sha256(secret)] = Caller(name, scope)
    return secret


def authenticate(request: Request) -> Caller:
    settings: Settings = request.app.state.settings
    if not settings.auth:
        return ANONYMOUS
    header = request.headers.get("authorization")
    if not header:
        raise NotAuthenticated(
            "this registry needs a token: pass --token or set LORA_REG_TOKEN "
            "(an admin creates one with lora-reg token create NAME --scope read|write)"
        )
    scheme, _, secret = header.partition(" ")
    secret = secret.strip()
    if scheme.lower() != "bearer" or not SECRET_RE.fullmatch(secret):
        raise NotAuthenticated(
            "malformed Authorization header: expected 'Bearer lrt_...' with the token "
            "lora-reg token create printed"
        )
    digest = secret_sha256(secret)
    internal: Caller | None = request.app.state.internal_callers.get(digest)
    if internal is not None:
        return internal
    with session_scope(read_only(request.app.state.engine)) as session:
        token = session.exec(select(ApiToken).where(col(ApiToken.secret_sha256) == digest)).first()
    if token is None:
        raise NotAuthenticated(
            "unknown token: check LORA_REG_TOKEN (or --token) and the server URL, "
            "or ask an admin for a token (lora-reg token create)"
        )
    if token.revoked_at is not None:
        raise NotAuthenticated(
            f"token {token.name!r} was revoked: ask an admin for a new one (lora-reg token create)",
            token=token.name,
        )
    return Caller(token.name, token.scope)  # type: ignore[arg-type]  # checked on insert


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

    dependency.need = need  # type: ignore[attr-defined]  # read by access_of
    dependency.__name__ = f"require_{need}"
    return dependency


PublicAccess = Annotated[Caller, Depends(_require("public"))]
ReadAccess = Annotated[Caller, Depends(_require("read"))]
WriteAccess = Annotated[Caller, Depends(_require("write"))]
AdminAccess = Annotated[Caller, Depends(_require("admin"))]
WorkerAccess = Annotated[Caller, Depends(_require("worker"))]
UploadAccess = Annotated[Caller, Depends(_require("upload"))]
PUBLIC: Any = Depends(_require("public"))
READ: Any = Depends(_require("read"))
WRITE: Any = Depends(_require("write"))
WORKER: Any = Depends(_require("worker"))
UPLOAD: Any = Depends(_require("upload"))


@dataclass(frozen=True)
class RouteRule:
    method: str
    path: str
    need: Need | None  # None: the route declares no rule


def route_rules(app: FastAPI) -> list[RouteRule]:
    """The access rule of every API route, one per method (what the matrix test walks)."""
    try:  # FastAPI >= 0.16x includes routers lazily; this walks them with their prefixes
        from fastapi.routing import iter_route_contexts
    except ImportError:  # older FastAPI: app.routes is already flat
        routes: list[Any] = list(app.routes)
    else:
        routes = list(iter_route_contexts(app.routes))
    rules: list[RouteRule] = []
    for route in routes:
        if not isinstance(getattr(route, "original_route", route), APIRoute):
            continue  # the OpenAPI document and docs pages: public by nature
        need = _need(route.dependant)
        rules.extend(RouteRule(method, route.path, need) for method in sorted(route.methods))
    return rules


def _need(dependant: Dependant) -> Need | None:
    for dependency in dependant.dependencies:
        need = getattr(dependency.call, "need", None) or _need(dependency)
        if need is not None:
            return need
    return None


def check_routes(app: FastAPI) -> None:
    """Refuse to build an app with a route that declares no access rule."""
    missing = [f"{rule.method} {rule.path}" for rule in route_rules(app) if rule.need is None]
    if missing:
        raise RuntimeError(
            "routes without an access rule (add a registry.auth dependency): " + "; ".join(missing)
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
