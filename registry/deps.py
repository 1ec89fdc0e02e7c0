"""FastAPI dependencies: the request's database session, the store, the settings.

Who is calling (tokens, scopes) lives in `registry.auth`.

The session dependency commits when the endpoint returns and rolls back when it raises; with
`scope="function"` the commit happens before the response is sent, so a client never sees a
success for a write that did not land.

The dependencies themselves run on the event loop and do no I/O: a session takes its connection
when it first runs a statement, inside the thread that runs the endpoint. `end_in_thread` lets
that same thread end the transaction right after the endpoint returns (API routes do this
through `registry.guards.ThreadedJSONRoute`), so a request costs one trip to a worker thread and
holds its connection only inside it; the dependency's exit then finds the session ended. For any
other route the exit ends the transaction in a worker thread of its own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from sqlmodel import Session

from registry.db import end_session, new_session, read_only
from registry.settings import Settings
from registry.storage import ObjectStore

# The paging query parameters of every list route.
MAX_PAGE = 500
Limit = Annotated[int, Query(ge=1, le=MAX_PAGE)]
Offset = Annotated[int, Query(ge=0, le=2**62)]  # SQLite integers are 64-bit

T = TypeVar("T")


async def get_session(request: Request) -> AsyncIterator[Session]:
    async with _transaction(new_session(request.app.state.engine)) as session:
        yield session


async def get_read_session(request: Request) -> AsyncIterator[Session]:
    """For GET routes: never takes SQLite's write lock, so reads never queue behind writes."""
    async with _transaction(new_session(read_only(request.app.state.engine))) as session:
        yield session


@asynccontextmanager
async def _transaction(session: Session) -> AsyncIterator[Session]:
    """Commit when the endpoint returns, roll back when it raises (`registry.db.end_session`),
    unless the endpoint's thread ended the transaction already (`end_in_thread`)."""
    try:
        yield session
    except BaseException as exc:
        await _end(session, exc)
        raise
    await _end(session, None)


async def _end(session: Session, error: BaseException | None) -> None:
    if session.in_transaction():  # a commit or a rollback is a round trip: not on the loop
        await run_in_threadpool(end_session, session, error)
    else:
        session.close()  # nothing to end: no connection is held


def end_in_thread(endpoint: Callable[..., T], arguments: dict[str, Any]) -> T:
    """Call a sync endpoint, then end the transactions of the sessions among its arguments:
    commit when it returned, roll back when it raised. Blocking: for a worker thread."""
    sessions = [value for value in arguments.values() if isinstance(value, Session)]
    try:
        result = endpoint(**arguments)
    except BaseException as exc:
        for session in sessions:
            end_session(session, exc)
        raise
    for session in sessions:
        end_session(session)
    return result


async def get_store(request: Request) -> ObjectStore:
    store: ObjectStore = request.app.state.store
    return store


async def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


SessionDep = Annotated[Session, Depends(get_session, scope="function")]
ReadSessionDep = Annotated[Session, Depends(get_read_session, scope="function")]
StoreDep = Annotated[ObjectStore, Depends(get_store)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
