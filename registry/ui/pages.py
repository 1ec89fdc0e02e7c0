"""The UI's pages (GET): each calls the same service functions as the REST API and renders the
same models. Routes only: no SQL here.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from registry.adapters import service as adapters
from registry.aliases import service as aliases
from registry.auth import PUBLIC, READ, AdminAccess
from registry.bases import service as bases
from registry.core.errors import InvalidInput
from registry.core.jobs import JOB_STATUSES
from registry.core.names import AdapterName, Reference, check_part, parse_base, parse_selector
from registry.core.schemas import IsoDatetime, parse_pairs
from registry.deployments import service as deployments
from registry.deps import ReadSessionDep, SettingsDep
from registry.guards import ThreadedJSONRoute
from registry.merges import service as merges
from registry.tokens import service as tokens
from registry.ui import views
from registry.ui.render import fragment, page
from registry.ui.urls import PREFIX, urls

# Pages run with their session's end in one worker thread, like the API's GET routes.
router = APIRouter(prefix=PREFIX, include_in_schema=False, route_class=ThreadedJSONRoute)

PAGE_SIZE = 50
CHART_VERSIONS = 100  # versions drawn in a metric's chart (the newest)
TIMELINE_SPANS = 20  # an alias's newest moves on its adapter's page; the audit log has them all
Offset = Annotated[int, Query(ge=0, le=2**62)]
Text = Annotated[str | None, Query(max_length=200)]


def _name(namespace: str, name: str) -> AdapterName:
    return AdapterName(check_part("namespace", namespace), check_part("name", name))


def safe_next(target: str | None) -> str:
    """Where to go after signing in: a UI path on this server, never another site."""
    if target and target.startswith(PREFIX + "/") and not target.startswith("//"):
        return target
    return urls.home


@router.get("/", dependencies=[READ])
def home() -> Response:
    return RedirectResponse(urls.adapters(), status_code=303)


@router.get("/sign-in", dependencies=[PUBLIC])
def sign_in_page(request: Request, settings: SettingsDep, next: Text = None) -> Response:
    if not settings.auth:
        return RedirectResponse(safe_next(next), status_code=303)
    return page(request, "sign_in.html", next=safe_next(next), error=None)


@router.get("/adapters", dependencies=[READ])
def adapter_list(
    request: Request,
    session: ReadSessionDep,
    q: Text = None,
    namespace: Text = None,
    base: Text = None,
    label: Annotated[list[str], Query(max_length=20)] = [],  # noqa: B006
    compat: Text = None,
    offset: Offset = 0,
) -> HTMLResponse:
    found = adapters.list_adapters(
        session,
        search=q or None,
        namespace=check_part("namespace", namespace) if namespace else None,
        base=base or None,
        labels=parse_pairs("label filter", [text for text in label if text]),
        compat=compat or None,
        limit=PAGE_SIZE,
        offset=offset,
    )
    filters = {"q": q, "namespace": namespace, "base": base, "label": label, "compat": compat}
    return page(
        request,
        "adapters.html",
        found=found,
        filters=filters,
        filtered=any(filters.values()),
        aliases=aliases.aliases_of(session, [item.name for item in found.items]),
        compat_filters=adapters.COMPAT_FILTERS,
    )


@router.get("/adapters/{namespace}/{name}", dependencies=[READ])
def adapter_page(
    request: Request,
    session: ReadSessionDep,
    namespace: str,
    name: str,
    sort: Annotated[str, Query(max_length=200)] = "-number",
    offset: Offset = 0,
) -> HTMLResponse:
    adapter_name = _name(namespace, name)
    adapter = adapters.get_adapter(session, adapter_name)
    versions = adapters.list_versions(
        session, adapter_name, sort=sort, limit=PAGE_SIZE, offset=offset
    )
    recent = adapters.metric_series(session, adapter_name, limit=CHART_VERSIONS)
    metric_names = views.metric_names(recent)
    charts = [chart for m in metric_names if (chart := views.chart(m, recent)) is not None]
    moves = aliases.history(session, adapter_name, None, limit=500, offset=0).items
    return page(
        request,
        "adapter.html",
        adapter=adapter,
        versions=versions,
        sort=sort,
        metric_names=metric_names,
        charts=charts,
        aliases=aliases.list_aliases(session, adapter_name),
        timelines=views.timelines(moves),
        timeline_spans=TIMELINE_SPANS,
        numbers=[point.number for point in reversed(recent) if not point.yanked],
    )


@router.get("/adapters/{namespace}/{name}/versions/{number}", dependencies=[READ])
def version_page(
    request: Request, session: ReadSessionDep, namespace: str, name: str, number: int
) -> HTMLResponse:
    adapter_name = _name(namespace, name)
    version = adapters.get_version(session, Reference(adapter_name, parse_selector(str(number))))
    loaded = [
        (deployment, row)
        for deployment in deployments.list_deployments(
            session, adapter=adapter_name, alias=None, limit=100, offset=0
        ).items
        for row in deployment.loaded
        if row.adapter == str(adapter_name) and row.version == number
    ]
    return page(
        request,
        "version.html",
        version=version,
        aliases=[a for a in aliases.list_aliases(session, adapter_name) if a.version == number],
        jobs=merges.list_jobs(
            session, status=None, adapter_digest=version.digest, limit=20, offset=0
        ).items,
        loaded=loaded,
        base_ref=_base_ref(version.base_model_id, version.base_model_revision),
    )


def _base_ref(model_id: str | None, revision: str | None) -> str | None:
    if model_id is None:
        return None
    return f"{model_id}@{revision}" if revision else model_id


@router.get("/bases", dependencies=[READ])
def base_list(request: Request, session: ReadSessionDep, offset: Offset = 0) -> HTMLResponse:
    found = bases.list_bases(session, model_id=None, limit=PAGE_SIZE, offset=offset)
    return page(request, "bases.html", found=found)


@router.get("/bases/{ref:path}", dependencies=[READ])
def base_page(request: Request, session: ReadSessionDep, ref: str) -> HTMLResponse:
    base = bases.base_out(session, bases.get_base_row(session, parse_base(ref)))
    trained = adapters.list_adapters(
        session, namespace=None, base=base.ref, labels={}, limit=PAGE_SIZE, offset=0
    )
    return page(request, "base_model.html", base=base, trained=trained)


@router.get("/jobs", dependencies=[READ])
def job_list(
    request: Request, session: ReadSessionDep, status: Text = None, offset: Offset = 0
) -> HTMLResponse:
    found = merges.list_jobs(session, status=status or None, limit=PAGE_SIZE, offset=offset)
    return page(request, "jobs.html", found=found, wanted=status, statuses=JOB_STATUSES)


@router.get("/jobs/{job_id}", dependencies=[READ])
def job_page(request: Request, session: ReadSessionDep, job_id: str) -> HTMLResponse:
    return page(request, "job.html", job=merges.get_job(session, job_id))


@router.get("/jobs/{job_id}/status", dependencies=[READ])
def job_status(request: Request, session: ReadSessionDep, job_id: str) -> HTMLResponse:
    """The live part of a job's page, fetched again by the page's script until it finishes."""
    return fragment(request, "_job_status.html", job=merges.get_job(session, job_id))


@router.get("/audit", dependencies=[READ])
def audit_page(
    request: Request,
    session: ReadSessionDep,
    actor: Text = None,
    action: Text = None,
    subject: Text = None,
    since: IsoDatetime | None = None,
    until: IsoDatetime | None = None,
    offset: Offset = 0,
) -> HTMLResponse:
    if since and until and since > until:
        raise InvalidInput("since is after until: swap them")
    found = aliases.audit(
        session,
        since=since,
        until=until,
        actor=actor or None,
        action=action or None,
        subject=subject or None,
        limit=PAGE_SIZE,
        offset=offset,
        newest_first=True,
    )
    filters = {"actor": actor, "action": action, "subject": subject, "since": since, "until": until}
    return page(request, "audit.html", found=found, filters=filters, filtered=any(filters.values()))


@router.get("/tokens")
def token_page(request: Request, session: ReadSessionDep, _caller: AdminAccess) -> HTMLResponse:
    return page(request, "tokens.html", tokens=tokens.list_tokens(session, True), created=None)
