"""The UI's forms (POST): sign in and out, move or remove an alias, yank, request a merge,
cancel a job, create and revoke tokens. Each checks the form's CSRF token first
(`registry.ui.session.read_form`), then calls the same service function as the REST API with
the signed-in caller, so the same permission rules and messages apply. Success redirects (303)
to the page that shows the result; a refusal is the UI's error page with the API's code and
message. Routes only: no SQL here.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError
from starlette.responses import Response

from registry.adapters import service as adapters
from registry.aliases import service as aliases
from registry.auth import PUBLIC, AdminAccess, WriteAccess, caller_for
from registry.core.errors import InvalidInput, NotAuthenticated
from registry.core.jobs import MergeRequest
from registry.core.names import AdapterName, Reference, check_part, parse_selector
from registry.core.schemas import TokenCreate, YankRequest
from registry.deps import SessionDep, SettingsDep, StoreDep
from registry.merges import service as merges
from registry.tokens import service as tokens
from registry.ui.pages import safe_next
from registry.ui.render import page, redirect
from registry.ui.session import clear_token_cookie, read_form, set_token_cookie
from registry.ui.urls import PREFIX, urls

router = APIRouter(prefix=PREFIX, include_in_schema=False)


def _name(namespace: str, name: str) -> AdapterName:
    return AdapterName(check_part("namespace", namespace), check_part("name", name))


def _field(fields: dict[str, str], key: str, what: str) -> str:
    value = fields.get(key, "").strip()
    if not value:
        raise InvalidInput(f"{what} is required")
    return value


def _first_error(exc: ValidationError) -> InvalidInput:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first.get("loc", ()))
    return InvalidInput(f"{where}: {first.get('msg')}" if where else str(first.get("msg")))


@router.post("/sign-in", dependencies=[PUBLIC])
async def sign_in(request: Request) -> Response:
    """Check the pasted token and keep it in the browser's cookie."""
    fields = await read_form(request)
    secret = fields.get("token", "").strip()
    target = safe_next(fields.get("next"))
    try:
        await run_in_threadpool(caller_for, request.app, secret)
    except NotAuthenticated as exc:
        # The API's words speak of LORA_REG_TOKEN; a person at a browser pasted a token.
        if not secret.startswith("lrt_"):
            message = "paste a registry token: it starts with lrt_"
        elif "revoked" in exc.message:
            message = exc.message
        else:
            message = (
                "unknown token: check that you pasted the whole lrt_... token, or ask an admin "
                "for one (lora-reg token create)"
            )
        return page(request, "sign_in.html", status=401, next=target, error=message)
    response = redirect(request, target)
    set_token_cookie(request, response, secret)
    return response


@router.post("/sign-out", dependencies=[PUBLIC])
async def sign_out(request: Request) -> Response:
    await read_form(request)
    response = redirect(request, urls.sign_in())
    clear_token_cookie(request, response)
    return response


@router.post("/adapters/{namespace}/{name}/aliases")
async def set_alias(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    caller: WriteAccess,
    namespace: str,
    name: str,
) -> Response:
    """Point an alias (new or existing) at a version."""
    fields = await read_form(request)
    adapter = _name(namespace, name)
    alias = _field(fields, "alias", "the alias")
    version = _field(fields, "version", "the version")
    await run_in_threadpool(aliases.move_alias, session, settings, caller, adapter, alias, version)
    return redirect(request, urls.adapter(str(adapter)) + "#aliases")


@router.post("/adapters/{namespace}/{name}/aliases/{alias}/delete")
async def delete_alias(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    caller: WriteAccess,
    namespace: str,
    name: str,
    alias: str,
) -> Response:
    await read_form(request)
    adapter = _name(namespace, name)
    await run_in_threadpool(aliases.delete_alias, session, settings, caller, adapter, alias)
    return redirect(request, urls.adapter(str(adapter)) + "#aliases")


@router.post("/adapters/{namespace}/{name}/versions/{number}/yank")
async def yank(
    request: Request,
    session: SessionDep,
    caller: WriteAccess,
    namespace: str,
    name: str,
    number: int,
) -> Response:
    fields = await read_form(request)
    reason = _field(fields, "reason", "a reason (people read it when pull refuses the version)")
    try:
        checked = YankRequest(reason=reason)
    except ValidationError as exc:
        raise _first_error(exc) from None
    ref = Reference(_name(namespace, name), parse_selector(str(number)))
    await run_in_threadpool(adapters.yank_version, session, caller, ref, checked.reason)
    return redirect(request, urls.version(str(ref.name), number))


@router.post("/merges")
async def request_merge(
    request: Request,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    caller: WriteAccess,
) -> Response:
    """Queue a merge (or find the matching one) and show its job."""
    fields = await read_form(request)
    try:
        merge = MergeRequest(
            adapter=_field(fields, "adapter", "the adapter version"),
            base=fields.get("base", "").strip() or None,
            target=fields.get("target", "").strip() or "registry",
        )
    except ValidationError as exc:
        raise _first_error(exc) from None
    job = await run_in_threadpool(merges.request_merge, session, store, settings, caller, merge)
    return redirect(request, urls.job(job.id))


@router.post("/jobs/{job_id}/cancel")
async def cancel_job(
    request: Request, session: SessionDep, caller: WriteAccess, job_id: str
) -> Response:
    await read_form(request)
    await run_in_threadpool(merges.cancel, session, job_id, caller.name)
    return redirect(request, urls.job(job_id))


@router.post("/tokens")
async def create_token(request: Request, session: SessionDep, caller: AdminAccess) -> Response:
    """Create a token and show its secret, once (the page is not cached)."""
    fields = await read_form(request)
    try:
        wanted = TokenCreate(name=fields.get("name", "").strip(), scope=fields.get("scope", ""))  # type: ignore[arg-type]
    except ValidationError as exc:
        raise _first_error(exc) from None
    created = await run_in_threadpool(
        tokens.create_token, session, wanted.name, wanted.scope, caller.name
    )
    listed = await run_in_threadpool(tokens.list_tokens, session, True)
    return page(request, "tokens.html", status=201, tokens=listed, created=created)


@router.post("/tokens/{name}/revoke")
async def revoke_token(
    request: Request, session: SessionDep, caller: AdminAccess, name: str
) -> Response:
    await read_form(request)
    await run_in_threadpool(tokens.revoke_token, session, name, caller.name)
    return redirect(request, urls.tokens)
