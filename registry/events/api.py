"""The event stream: GET /api/v1/events, a cursor over the append-only event log (long-poll).

Followers (the vLLM plugin, sidecars, scripts) ask for events after the last id they saw, with
`wait=` seconds to block until one arrives; nothing is lost across their restarts. Routes only:
the reads are `registry.events.service.events_after`, each in its own short transaction, so a
waiting request holds no database connection between polls.
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool

from registry.auth import READ
from registry.core.errors import InvalidInput
from registry.core.events import ACTIONS
from registry.core.schemas import EventPage
from registry.db import read_only, session_scope
from registry.events import service
from registry.guards import ThreadedJSONRoute

router = APIRouter(prefix="/api/v1", tags=["events"], route_class=ThreadedJSONRoute)

MAX_WAIT_S = 30
POLL_S = 0.5


@router.get("/events", response_model=EventPage, dependencies=[READ])
async def events(
    request: Request,
    after: Annotated[int, Query(ge=-1, le=2**31 - 1)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    wait: Annotated[float, Query(ge=0, le=MAX_WAIT_S)] = 0,
    action: Annotated[list[str], Query()] = [],  # noqa: B006  (FastAPI copies defaults)
) -> EventPage:
    """Events with an id above `after`, oldest first, optionally only some `action`s
    (`alias.set`, `version.push`, ...). `after=-1` answers at once with no events and the
    newest id: where a new follower starts. With `wait` (at most 30 s) the request waits until
    an event arrives. Ask again with `after=last_id`."""
    unknown = sorted(set(action) - ACTIONS)
    if unknown:
        raise InvalidInput(
            f"unknown event action(s) {', '.join(unknown)}: use {', '.join(sorted(ACTIONS))}"
        )
    engine = read_only(request.app.state.engine)

    def read() -> EventPage:
        with session_scope(engine) as session:
            return service.events_after(session, after, limit, action or None)

    deadline = time.monotonic() + wait
    page = await run_in_threadpool(read)
    while not page.items and after >= 0 and time.monotonic() < deadline:
        if await request.is_disconnected():
            break
        await asyncio.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))
        page = await run_in_threadpool(read)
    return page
