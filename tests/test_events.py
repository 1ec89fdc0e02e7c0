"""The event stream (docs/architecture.md §12): GET /api/v1/events is a cursor over the
append-only event log, with long-polling, against the real servers on both backends."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cli.client import Registry
from registry.core.errors import InvalidInput
from registry.core.schemas import EventPage
from tests.conftest import RunningServer, push_versions


def test_a_follower_sees_every_change_after_its_cursor_in_order(
    client: Registry, adapter_dir: Callable[..., Path]
) -> None:
    start = client.events(-1)
    assert start.items == [] and start.last_id >= 0  # where a new follower starts: now
    name = push_versions(client, adapter_dir, 2)
    client.set_alias(f"{name}@1", "staging")
    client.set_alias(f"{name}@2", "staging")
    client.yank(f"{name}@1", "superseded")

    mine = [
        event
        for event in client.events(start.last_id, limit=500).items
        if event.subject.startswith(name)
    ]
    assert [(e.action, e.subject) for e in mine] == [
        ("version.push", f"{name}@1"),
        ("version.push", f"{name}@2"),
        ("alias.set", f"{name}@staging"),
        ("alias.set", f"{name}@staging"),
        ("version.yank", f"{name}@1"),
    ]
    moved = mine[3].details
    assert (moved["previous"], moved["version"]) == (1, 2)
    assert moved["digest"] == client.get(f"{name}@2").digest
    ids = [event.id for event in mine]
    assert ids == sorted(ids)

    only = client.events(start.last_id, actions=["alias.set"], limit=500)
    assert {e.action for e in only.items} == {"alias.set"}
    assert [e.id for e in only.items if e.subject.startswith(name)] == ids[2:4]
    assert client.events(ids[-1], actions=["alias.set"]).last_id >= ids[-1]  # cursor moves on


def test_a_waiting_follower_is_answered_when_the_event_arrives(
    client: Registry, adapter_dir: Callable[..., Path]
) -> None:
    name = push_versions(client, adapter_dir, 1)
    cursor = client.events(-1).last_id
    answered: list[EventPage] = []
    follower = threading.Thread(
        target=lambda: answered.append(client.events(cursor, wait=25, actions=["alias.set"]))
    )
    follower.start()
    client.set_alias(f"{name}@1", "canary")
    follower.join(timeout=60)
    assert not follower.is_alive()
    (page,) = answered
    assert [(e.action, e.subject) for e in page.items] == [("alias.set", f"{name}@canary")]


def test_nothing_is_skipped_when_changes_commit_concurrently(
    server: RunningServer, client: Registry, adapter_dir: Callable[..., Path], tmp_path: Path
) -> None:
    """Ids are the cursor: an event must never be visible before an earlier one can still
    commit. A follower polling while eight writers move aliases sees each move exactly once."""
    name = push_versions(client, adapter_dir, 2)
    cursor = client.events(-1).last_id
    seen: list[int] = []
    done = threading.Event()

    def follow() -> None:
        after = cursor
        with server.client(tmp_path / "follower") as follower:
            while True:
                page = follower.events(after, wait=0.2, actions=["alias.set"], limit=500)
                seen.extend(e.id for e in page.items if e.subject.startswith(name))
                after = page.last_id
                if done.is_set() and not page.items:
                    return

    reader = threading.Thread(target=follow)
    reader.start()

    def move(i: int) -> None:
        with server.client(tmp_path / f"writer{i}") as writer:
            for j in range(6):
                writer.set_alias(f"{name}@{1 + (i + j) % 2}", f"a{i}")

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(move, range(8)))
    done.set()
    reader.join(timeout=120)
    everything = [
        e.id
        for e in client.events(cursor, actions=["alias.set"], limit=500).items
        if e.subject.startswith(name)
    ]
    assert len(everything) == 8 * 6
    assert seen == everything


def test_unknown_actions_are_refused(client: Registry) -> None:
    with pytest.raises(InvalidInput, match="unknown event action"):
        client.events(0, actions=["alias.moved"])


def test_an_event_is_never_visible_while_an_earlier_one_can_still_commit(
    pg_database: Callable[[], str],
) -> None:
    """On PostgreSQL, ids come from a sequence in the order transactions take them, not the order
    they commit. Transaction A records an event and stays open; B records one and commits. B's
    event must not be readable before A's (a follower would move its cursor past A's for ever):
    `record` makes B wait for A."""
    from sqlmodel import Session

    from registry.core.events import TokenCreated
    from registry.db import make_engine, session_scope, upgrade
    from registry.events.service import events_after, record
    from registry.settings import Settings

    settings = Settings(database_url=pg_database(), storage_url="file:///tmp/unused")
    upgrade(settings)
    engine = make_engine(settings.sqlalchemy_url)
    try:
        with session_scope(engine) as session:
            cursor = events_after(session, -1, 1).last_id
        first = Session(engine)
        record(first, "a", TokenCreated(subject="first", scope="read"))
        first.flush()  # A holds its id, uncommitted

        def second() -> None:
            with session_scope(engine) as session:
                record(session, "b", TokenCreated(subject="second", scope="read"))

        writer = threading.Thread(target=second)
        writer.start()
        writer.join(timeout=2)  # B waits for A (without the lock it commits now)
        with session_scope(engine) as session:
            visible = [e.subject for e in events_after(session, cursor, 10).items]
        assert visible == []
        first.commit()
        first.close()
        writer.join(timeout=30)
        assert not writer.is_alive()
        with session_scope(engine) as session:
            visible = [e.subject for e in events_after(session, cursor, 10).items]
        assert visible == ["first", "second"]
    finally:
        engine.dispose()
