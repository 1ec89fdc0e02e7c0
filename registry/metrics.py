"""Prometheus metrics: what the server counts, and the exposition served at `/metrics`.

Owns every instrument (names start with `lora_reg_`), the ASGI middleware that times each
request by its route template, and the scrape (`exposition`). The services count what only they
know (events recorded, merge durations, webhook deliveries, presigned transfers, dedup hits)
through the small functions below, and only once their transaction commits (`on_commit`): a
rolled-back request counts nothing it did not do. Imports prometheus_client, SQLAlchemy and
ASGI types only, never FastAPI routes, services or `registry.auth`, so every service may import
it. Counting is in memory (or in PROMETHEUS_MULTIPROC_DIR's files with several worker
processes), never a database write; the merge queue depth is read with one query per scrape.

Label values are bounded: routes are templates (`/api/v1/adapters/{namespace}/{name}`), and a
path that matches no route is `unmatched`; methods outside the HTTP set are `other`.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import sqlalchemy as sa
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session
from sqlmodel import col
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from registry.db import read_only
from registry.models import MergeJob

log = logging.getLogger("registry")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
UNMATCHED = "unmatched"  # the route label of every path that matches no route
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

# --- instruments -------------------------------------------------------------------------------

# No `_created` series beside every counter and histogram: half the exposition, and Prometheus
# detects counter resets without them.
disable_created_metrics()  # type: ignore[no-untyped-call]


HTTP_REQUESTS = Counter(
    "lora_reg_http_requests",
    "HTTP requests answered, by surface (api, hub, ui, metrics; other outside them), method, "
    "route template and status.",
    ["surface", "method", "route", "status"],
)
HTTP_DURATION = Histogram(
    "lora_reg_http_request_duration_seconds",
    "Time from a request's arrival to its last response byte.",
    ["surface", "method", "route", "status"],
)
TRANSFER_BYTES = Counter(
    "lora_reg_transfer_bytes",
    "Blob bytes pushed and pulled. via=server: bytes that went through this server (blob "
    "uploads and downloads, Hugging Face file downloads). via=presigned: bytes the server "
    "planned for presigned S3 URLs when it handed them out (the transfer itself goes straight "
    "between client and store).",
    ["direction", "via"],
)
CACHE_LOOKUPS = Counter(
    "lora_reg_cache_lookups",
    "What the server already had. cache=blobs: a blob in an upload plan already stored (hit) or "
    "to upload (miss). cache=merges: a merge request answered by a succeeded job (hit), joined to "
    "an identical job in flight (coalesced) or queued (miss).",
    ["cache", "result"],
)
EVENTS_RECORDED = Counter(
    "lora_reg_events_recorded",
    "Events committed to the event log (the audit table), by action.",
    ["action"],
)
WEBHOOK_DELIVERIES = Counter(
    "lora_reg_webhook_deliveries",
    "Webhook delivery attempts by outcome: succeeded, retried (will be attempted again) or "
    "failed (the last attempt failed).",
    ["outcome"],
)
MERGE_DURATION = Histogram(
    "lora_reg_merge_duration_seconds",
    "Time from a merge job's claim to its worker's finish, by final status.",
    ["status"],
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800),
)

# --- counting after commit ---------------------------------------------------------------------

_PENDING = "lora_reg.metrics.pending"


def on_commit(session: Session, count: Callable[[], None]) -> None:
    """Run `count` once the session's transaction commits; drop it if it rolls back."""
    session.info.setdefault(_PENDING, []).append(count)


@event.listens_for(Session, "after_commit")
def _count_committed(session: Session) -> None:
    for count in session.info.pop(_PENDING, []):
        count()


@event.listens_for(Session, "after_rollback")
def _drop_rolled_back(session: Session) -> None:
    session.info.pop(_PENDING, None)


def event_recorded(session: Session, action: str) -> None:
    on_commit(session, EVENTS_RECORDED.labels(action).inc)


def webhook_attempted(session: Session, status: str) -> None:
    """A delivery attempt that left the delivery `status` (pending: it will be retried)."""
    outcome = "retried" if status == "pending" else status
    on_commit(session, WEBHOOK_DELIVERIES.labels(outcome).inc)


def merge_finished(session: Session, status: str, seconds: float) -> None:
    on_commit(session, lambda: MERGE_DURATION.labels(status).observe(seconds))


def merge_requested(session: Session, result: str) -> None:
    """`result`: hit (a succeeded job answers it), coalesced (one in flight does) or miss."""
    on_commit(session, CACHE_LOOKUPS.labels("merges", result).inc)


def upload_planned(session: Session, present: int, missing: int, presigned_bytes: int) -> None:
    """An upload plan: blobs already stored and to upload, and the bytes it presigned."""

    def count() -> None:
        CACHE_LOOKUPS.labels("blobs", "hit").inc(present)
        CACHE_LOOKUPS.labels("blobs", "miss").inc(missing)
        TRANSFER_BYTES.labels("push", "presigned").inc(presigned_bytes)

    on_commit(session, count)


def presigned_download(size: int) -> None:
    """A redirect to a presigned URL for `size` bytes (counted when it is handed out)."""
    TRANSFER_BYTES.labels("pull", "presigned").inc(size)


# --- HTTP requests -----------------------------------------------------------------------------


class _Surface(Protocol):  # registry.auth.Surface, without importing it
    @property
    def name(self) -> str: ...

    def owns(self, path: str) -> bool: ...


# Routes whose bodies are blob bytes: what the middleware counts as pushed and pulled.
PUSH_ROUTES = frozenset({("PUT", "/api/v1/blobs/{digest:sha256}")})
PULL_ROUTES = frozenset(
    {
        ("GET", "/api/v1/blobs/{digest:sha256}"),
        ("GET", "/hf/{namespace}/{name}/resolve/{revision}/{path:path}"),
    }
)


@dataclass(frozen=True)
class _Routes:
    """An app's route templates: by route object (what the router leaves in the scope), and as
    patterns for requests answered before routing (refused tokens, bodies or Hosts; 404s)."""

    by_route: dict[int, str]
    patterns: list[tuple[re.Pattern[str], str]]

    @classmethod
    def of(cls, app: Any) -> _Routes:
        try:  # FastAPI >= 0.16x includes routers lazily: walk them with their prefixes
            from fastapi.routing import iter_route_contexts
        except ImportError:  # older FastAPI: app.routes is already flat
            contexts: list[Any] = list(app.routes)
        else:
            contexts = list(iter_route_contexts(app.routes))
        by_route: dict[int, str] = {}
        patterns = []
        for context in contexts:
            path = context.path
            by_route[id(getattr(context, "original_route", context))] = path
            patterns.append((compile_path(path)[0], path))
        return cls(by_route, patterns)

    def template(self, scope: Scope) -> str:
        route = scope.get("route")
        found = self.by_route.get(id(route)) if route is not None else None
        if found is not None:
            return found
        path = scope["path"]
        return next((t for pattern, t in self.patterns if pattern.fullmatch(path)), UNMATCHED)


class MetricsMiddleware:
    """Counts and times every HTTP request by surface, method, route template and status, and
    the blob bytes of the transfer routes. Outermost, so refusals by the other middlewares
    (Host, token, body size) are counted too. A request whose handler failed before answering
    counts as 500, like the answer the server sends."""

    def __init__(self, app: ASGIApp, surfaces: Sequence[_Surface]) -> None:
        self.app = app
        self.surfaces = surfaces
        self.routes: _Routes | None = None  # built at the first request, once every route exists

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        received = sent = 0
        observed = False

        def observe() -> None:
            nonlocal observed
            observed = True
            self._observe(scope, status, received, sent, time.perf_counter() - started)

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
            return message

        async def counting_send(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
                if not message.get("more_body", False):
                    observe()  # before the last byte leaves: a client never sees it uncounted
            await send(message)

        try:
            await self.app(scope, counting_receive, counting_send)
        finally:
            if not observed:  # failed before its last byte: counted as what was sent, or 500
                observe()

    def _observe(self, scope: Scope, status: int, received: int, sent: int, took: float) -> None:
        if self.routes is None:
            self.routes = _Routes.of(scope["app"])
        route = self.routes.template(scope)
        method = scope["method"] if scope["method"] in _METHODS else "other"
        surface = next((s.name for s in self.surfaces if s.owns(scope["path"])), "other")
        labels = (surface, method, route, str(status))
        HTTP_REQUESTS.labels(*labels).inc()
        HTTP_DURATION.labels(*labels).observe(took)
        if (method, route) in PUSH_ROUTES:
            TRANSFER_BYTES.labels("push", "server").inc(received)
        elif (method, route) in PULL_ROUTES and status < 300:
            TRANSFER_BYTES.labels("pull", "server").inc(sent)


# --- the scrape --------------------------------------------------------------------------------


class MergeQueueCollector:
    """Merge jobs queued and running, read from the database at each scrape (one indexed
    GROUP BY): the queue is shared by every process and replica, so no process counts it."""

    STATUSES = ("queued", "running")

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        query = (
            sa.select(col(MergeJob.status), sa.func.count())
            .where(col(MergeJob.status).in_(self.STATUSES))
            .group_by(col(MergeJob.status))
        )
        try:
            with read_only(self.engine).connect() as connection:  # no write lock on SQLite
                counts = {status: int(n) for status, n in connection.execute(query)}
        except sa.exc.SQLAlchemyError as exc:
            log.warning("metrics: merge queue depth unavailable: %s", exc)
            return
        gauge = GaugeMetricFamily(
            "lora_reg_merge_jobs", "Merge jobs now queued or running.", labels=["status"]
        )
        for status in self.STATUSES:
            gauge.add_metric([status], counts.get(status, 0))
        yield gauge


def exposition(engine: Engine, accept: str | None) -> tuple[bytes, str]:
    """The metrics of every process of this server (several with PROMETHEUS_MULTIPROC_DIR) and
    the merge queue, in the format the scraper asked for: (body, content type)."""
    registry = CollectorRegistry()
    if os.environ.get(MULTIPROC_ENV):
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        registry.register(REGISTRY)  # this process's instruments, and its process_* metrics
    registry.register(MergeQueueCollector(engine))
    encode, content_type = choose_encoder(accept or "")
    return encode(registry), content_type


def prepare_multiprocess_dir() -> str | None:
    """Before starting several worker processes (and before any of them imports this module):
    point PROMETHEUS_MULTIPROC_DIR at an empty folder, so each process writes its counts there
    and a scrape answered by any of them sums them all. An operator's own folder is emptied
    (counts of an earlier run would add up); otherwise a temporary one is made, and returned so
    that the server removes it when it stops."""
    path = os.environ.get(MULTIPROC_ENV)
    if path:
        os.makedirs(path, exist_ok=True)
        for name in os.listdir(path):
            if name.endswith(".db"):
                os.unlink(os.path.join(path, name))
        return None
    made = tempfile.mkdtemp(prefix="lora-reg-metrics-")
    os.environ[MULTIPROC_ENV] = made
    return made
