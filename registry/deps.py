"""FastAPI dependencies: the request's database session, the store, the settings.

Who is calling (tokens, scopes) lives in `registry.auth`.

The session dependency commits when the endpoint returns and rolls back when it raises; with
`scope="function"` the commit happens before the response is sent, so a client never sees a
success for a write that did not land.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Query, Request
from sqlmodel import Session

from registry.db import read_only, session_scope
from registry.settings import Settings
from registry.storage import ObjectStore

# The paging query parameters of every list route.
MAX_PAGE = 500
Limit = Annotated[int, Query(ge=1, le=MAX_PAGE)]
Offset = Annotated[int, Query(ge=0, le=2**62)]  # SQLite integers are 64-bit


def get_session(request: Request) -> Iterator[Session]:
    with session_scope(request.app.state.engine) as session:
        yield session


def get_read_session(request: Request) -> Iterator[Session]:
    """For GET routes: never takes SQLite's write lock, so reads never queue behind writes."""
    with session_scope(read_only(request.app.state.engine)) as session:
        yield session


def get_store(request: Request) -> ObjectStore:
    store: ObjectStore = request.app.state.store
    return store


def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


SessionDep = Annotated[Session, Depends(get_session, scope="function")]
ReadSessionDep = Annotated[Session, Depends(get_read_session, scope="function")]
StoreDep = Annotated[ObjectStore, Depends(get_store)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
