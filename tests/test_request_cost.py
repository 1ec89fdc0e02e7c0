"""What one request costs the database, pinned: a GET of an authenticated caller takes one pooled
connection and runs one transaction (no token look-up of its own, no ping), a busy pool opens no
connections, and a token trusted from the cache still stops working when it is revoked.

Counted with SQLAlchemy event listeners on the app's engine (both backends) and, on PostgreSQL,
with pg_stat_database, which also sees what SQLAlchemy does below its events (a pre-ping runs
a transaction of its own). No timings: the token cache's clock is a test clock.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlmodel import select

from registry.app import create_app
from registry.auth import TOKEN_CACHE_S, TokenCache
from registry.db import (
    POOL_SIZE,
    make_engine,
    ping_after_idle,
    read_only,
    session_scope,
    upgrade,
)
from registry.guards import READ_THREADS
from registry.models import ApiToken
from registry.server import open_startup_connections
from registry.settings import Settings
from registry.tokens import service as tokens
from registry.tokens.service import RevocationStamp, make_stamp_file
from tests.conftest import PG_ADMIN_URL, own_server

NAME = "team/cost"
# Statements each read runs, besides SQLite's BEGIN and COMMIT (PostgreSQL runs reads without:
# each statement on its own): what the services ask for today. A change that adds a query to one
# of these routes must say so here.
READS = {
    "get version": (f"/api/v1/adapters/{NAME}/versions/1", 1),  # the version with its files
    "get latest": (f"/api/v1/adapters/{NAME}/versions/latest", 2),  # + the yanked it skipped
    "get by alias": (f"/api/v1/adapters/{NAME}/versions/production", 1),
    "list versions by metric": (
        f"/api/v1/adapters/{NAME}/versions?sort=-metrics.rougeL",
        1,  # the page, with the count of all versions
    ),
    "resolve alias": (f"/api/v1/adapters/{NAME}/aliases/production", 1),
}


class Clock:
    """The token cache's clock, moved by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Cost:
    connects: int = 0
    checkouts: int = 0
    transactions: int = 0
    statements: list[str] = field(default_factory=list)


@contextmanager
def counted(engine: sa.Engine) -> Iterator[Cost]:
    """What the engine does inside the block: new connections, checkouts, transactions and
    statements (SQLite's BEGIN is not counted as a statement: it is the transaction)."""
    cost = Cost()

    def connect(*_: Any) -> None:
        cost.connects += 1

    def checkout(*_: Any) -> None:
        cost.checkouts += 1

    def begin(*_: Any) -> None:
        cost.transactions += 1

    def statement(_conn: Any, _cursor: Any, text: str, *_: Any) -> None:
        if not text.startswith("BEGIN"):
            cost.statements.append(text.split("\n")[0])

    listeners = [
        (engine.pool, "connect", connect),
        (engine.pool, "checkout", checkout),
        (engine, "begin", begin),
        (engine, "before_cursor_execute", statement),
    ]
    for target, name, function in listeners:
        sa.event.listen(target, name, function)
    try:
        yield cost
    finally:
        for target, name, function in listeners:
            sa.event.remove(target, name, function)


@dataclass
class Served:
    app: FastAPI
    http: TestClient
    settings: Settings
    clock: Clock
    admin: str  # an admin token's secret

    def get(self, path: str, secret: str | None = None) -> Any:
        response = self.http.get(path, headers=bearer(secret or self.admin))
        assert response.status_code == 200, response.text
        return response


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def seed(http: TestClient, secret: str, folder: Path) -> None:
    """One version of NAME (files uploaded to the folder store), a metric, alias production."""
    files = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        put = http.put(f"/api/v1/blobs/sha256:{digest}", content=data, headers=bearer(secret))
        assert put.status_code == 204, put.text
        files.append({"path": path.relative_to(folder).as_posix(), "size": len(data)})
        files[-1]["sha256"] = digest
    body = {"files": files, "metrics": {"rougeL": 0.4}}
    commit = http.post(f"/api/v1/adapters/{NAME}/versions", json=body, headers=bearer(secret))
    assert commit.status_code == 201, commit.text
    alias = http.put(
        f"/api/v1/adapters/{NAME}/aliases/production", json={"version": "1"}, headers=bearer(secret)
    )
    assert alias.status_code == 200, alias.text


@pytest.fixture(params=["sqlite", "postgres"])
def served(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    pg_database: Callable[[], str],
    adapter_dir: Callable[..., Path],
) -> Iterator[Served]:
    """An app with auth on and a seeded adapter; its token cache runs on a test clock."""
    database = f"sqlite:///{tmp_path}/registry.db" if request.param == "sqlite" else pg_database()
    settings = Settings(database_url=database, storage_url=f"file://{tmp_path}/objects")
    upgrade(settings)
    engine = make_engine(settings.sqlalchemy_url)
    with session_scope(engine) as session:
        admin = tokens.create_token(session, "admin", "admin", None).token
    engine.dispose()
    app = create_app(settings)
    clock = Clock()
    app.state.token_cache = TokenCache(clock=clock)
    with TestClient(app, base_url="http://127.0.0.1") as http:
        seed(http, admin, adapter_dir("llama"))
        yield Served(app, http, settings, clock, admin)
    app.state.engine.dispose()


@pytest.mark.parametrize("route", list(READS))
def test_a_read_costs_one_transaction_on_one_pooled_connection(served: Served, route: str) -> None:
    path, statements = READS[route]
    served.get(path)  # the token is looked up once, then trusted for TOKEN_CACHE_S
    for _ in range(5):
        with counted(served.app.state.engine) as cost:
            served.get(path)
        assert cost.transactions == 1, cost
        assert cost.checkouts == 1, cost
        assert cost.connects == 0, cost
        assert len(cost.statements) == statements, cost.statements


@pytest.mark.parametrize(
    ("path", "status", "code", "total"),
    [
        (f"/api/v1/adapters/{NAME}/versions?offset=5", 200, None, 1),  # past the end: total
        (f"/api/v1/adapters/{NAME}/versions?sort=-metrics.absent", 200, None, 1),
        ("/api/v1/adapters/team/absent/versions", 404, "adapter_not_found", None),
        ("/api/v1/adapters/team/absent/versions/1", 404, "adapter_not_found", None),
        (f"/api/v1/adapters/{NAME}/versions/9", 404, "version_not_found", None),
        (f"/api/v1/adapters/{NAME}/versions/staging", 404, "alias_not_found", None),
        (f"/api/v1/adapters/{NAME}/aliases/staging", 404, "alias_not_found", None),
        ("/api/v1/adapters/team/absent/aliases/production", 404, "adapter_not_found", None),
        ("/api/v1/adapters/team/absent/aliases", 404, "adapter_not_found", None),
    ],
)
def test_reads_that_find_nothing_still_say_why(
    served: Served, path: str, status: int, code: str | None, total: int | None
) -> None:
    """The one-query reads fall back to the queries that tell an empty page from a missing
    adapter, version or alias."""
    answer = served.http.get(path, headers=bearer(served.admin))
    assert answer.status_code == status, answer.text
    if code is not None:
        assert answer.json()["code"] == code
    if total is not None:
        assert answer.json()["total"] == total


def test_a_token_is_looked_up_once_then_trusted_for_a_second(served: Served) -> None:
    path = READS["get version"][0]
    with session_scope(served.app.state.engine) as session:
        secret = tokens.create_token(session, "reader", "read", None).token
    with counted(served.app.state.engine) as first:
        served.get(path, secret)
    assert first.transactions == 2, first  # the token's row, then the route
    assert any("api_tokens" in text for text in first.statements), first.statements
    served.clock.now += TOKEN_CACHE_S * 0.9
    with counted(served.app.state.engine) as cached:
        served.get(path, secret)
    assert cached.transactions == 1 and not any("api_tokens" in s for s in cached.statements)
    served.clock.now += TOKEN_CACHE_S * 0.2
    with counted(served.app.state.engine) as again:
        served.get(path, secret)
    assert again.transactions == 2, again  # looked up again once the second has passed


def test_a_trusted_token_revoked_through_this_server_is_refused_at_once(served: Served) -> None:
    path = READS["get version"][0]
    with session_scope(served.app.state.engine) as session:
        secret = tokens.create_token(session, "ci", "write", None).token
    served.get(path, secret)
    served.get(path, secret)  # trusted from the cache now
    revoked = served.http.delete("/api/v1/tokens/ci", headers=bearer(served.admin))
    assert revoked.status_code == 200, revoked.text
    refused = served.http.get(path, headers=bearer(secret))
    assert refused.status_code == 401 and "'ci' was revoked" in refused.json()["detail"]


def test_a_token_revoked_by_another_replica_is_refused_within_the_cache_time(
    served: Served,
) -> None:
    """Another replica's revocation is a row change this process hears nothing about."""
    path = READS["get version"][0]
    with session_scope(served.app.state.engine) as session:
        secret = tokens.create_token(session, "elsewhere", "read", None).token
    served.get(path, secret)
    with session_scope(served.app.state.engine) as session:  # what the other replica commits
        row = session.exec(select(ApiToken).where(ApiToken.name == "elsewhere")).one()
        row.revoked_at, row.revoked_by = datetime.now(UTC), "admin"
        session.add(row)
    served.clock.now += TOKEN_CACHE_S * 0.5
    served.get(path, secret)  # still trusted: the bound is TOKEN_CACHE_S
    served.clock.now += TOKEN_CACHE_S * 0.5
    refused = served.http.get(path, headers=bearer(secret))
    assert refused.status_code == 401 and "was revoked" in refused.json()["detail"]


def test_unknown_and_revoked_tokens_are_never_trusted_from_the_cache(served: Served) -> None:
    path = READS["get version"][0]
    unknown = "lrt_" + "B" * 43
    for _ in range(2):
        with counted(served.app.state.engine) as cost:
            refused = served.http.get(path, headers=bearer(unknown))
        assert refused.status_code == 401
        assert cost.transactions == 1, cost  # looked up every time


def test_worker_processes_of_one_server_share_the_revocation_stamp(tmp_path: Path) -> None:
    """Two mappings of the server's stamp file, as its worker processes have: a revocation
    committed in one changes what the other reads, so it forgets every token it trusted."""
    path = tmp_path / "revocations"
    make_stamp_file(path)
    here, sibling = RevocationStamp(), RevocationStamp()
    here.share(path)
    sibling.share(path)
    seen = sibling.read()
    here.change()
    assert sibling.read() != seen
    assert sibling.read() == here.read()


def test_the_pool_keeps_a_connection_for_every_request_thread(served: Served) -> None:
    """Steady load opens no connections: once as many requests as there are worker threads
    held a connection at the same time, they all stay open (before: 10, the rest closed)."""
    if served.settings.is_sqlite:
        pytest.skip("SQLite opens a file, not a server session")
    engine = served.app.state.engine

    def hold_all() -> Cost:
        with counted(engine) as cost:
            connections = [engine.connect() for _ in range(POOL_SIZE)]
            for connection in connections:
                connection.exec_driver_sql("SELECT 1")
            for connection in connections:
                connection.close()
        return cost

    hold_all()
    assert hold_all().connects == 0


def test_a_serving_process_opens_at_start_what_steady_reads_hold_at_once(served: Served) -> None:
    """`lora-reg server` fills its pool at start (`registry.server.open_startup_connections`):
    the read threads, a token look-up and the webhook sender at once then open no connection,
    however late in a run that peak comes."""
    if served.settings.is_sqlite:
        pytest.skip("SQLite opens a file, not a server session")
    engine = served.app.state.engine
    engine.dispose()
    open_startup_connections(served.app)
    with counted(engine) as cost:
        connections = [engine.connect() for _ in range(READ_THREADS + 2)]
        for connection in connections:
            connection.exec_driver_sql("SELECT 1")
        for connection in connections:
            connection.close()
    assert cost.connects == 0, cost


# --- PostgreSQL's own count ------------------------------------------------------------------


def pg_counters(database: str) -> tuple[int, int]:
    """(transactions, sessions) PostgreSQL counted for `database`."""
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as connection:
        connection.execute("SELECT pg_stat_clear_snapshot()")
        row = connection.execute(
            "SELECT xact_commit + xact_rollback, sessions FROM pg_stat_database WHERE datname = %s",
            (database,),
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def close_pool(engine: sa.Engine, database: str) -> None:
    """Close every pooled connection and wait until their backends are gone: a backend writes
    its counts to pg_stat_database as it exits."""
    engine.dispose()
    wait_for_backends(database)


def wait_for_backends(database: str, pid: int | None = None) -> None:
    """Until no backend (or not `pid`) is connected to `database`."""
    query = "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()"
    parameters: tuple[Any, ...] = (database,)
    if pid is not None:
        query, parameters = query + " AND pid = %s", (database, pid)
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as connection:
        for _ in range(400):
            row = connection.execute(query, parameters).fetchone()
            if row is not None and row[0] == 0:
                return
            time.sleep(0.05)
    raise AssertionError(f"backends of {database} did not exit")


def test_postgresql_counts_one_transaction_and_one_session_for_ten_reads(served: Served) -> None:
    if served.settings.is_sqlite:
        pytest.skip("pg_stat_database counts PostgreSQL's transactions")
    database = served.settings.database_url.rsplit("/", 1)[1]
    engine = served.app.state.engine
    # Reads of one statement each: on PostgreSQL a read runs each statement as its own
    # transaction (`registry.db.read_only`), so one statement is one transaction.
    paths = [path for path, statements in READS.values() if statements == 1]
    for path in paths:
        served.get(path)  # the token is trusted from here on
    close_pool(engine, database)
    # What opening a connection costs by itself (the driver's set-up statements).
    transactions, _ = pg_counters(database)
    with engine.connect() as connection:
        connection.exec_driver_sql("SELECT 1")
        connection.commit()
    close_pool(engine, database)
    opened = pg_counters(database)[0] - transactions - 1
    transactions, sessions = pg_counters(database)
    for _ in range(4):
        for path in paths[:2]:
            served.get(path)
    served.get(paths[2])
    served.get(paths[2])
    close_pool(engine, database)
    after_transactions, after_sessions = pg_counters(database)
    # A pre-ping would add one per checkout, a token look-up one per read.
    assert after_transactions - transactions == 10 + opened
    assert after_sessions - sessions == 1  # one connection, reused


def test_an_idle_connection_that_died_is_replaced_before_use(
    pg_database: Callable[[], str],
) -> None:
    """After PING_AFTER_IDLE_S of idleness a connection is pinged before use: one that the
    database closed meanwhile (a restart, a firewall) is replaced and the caller never sees it.
    (The test pings after 0 s.)"""
    url = Settings(database_url=pg_database()).sqlalchemy_url
    database = url.rsplit("/", 1)[1]
    engine = sa.create_engine(url, pool_size=1, max_overflow=0)
    ping_after_idle(engine, 0.0)
    try:
        with engine.connect() as connection:
            pid = connection.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        wait_for_backends(database, pid)
        with engine.connect() as connection:
            new_pid = connection.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
        assert new_pid != pid
    finally:
        engine.dispose()


# --- several worker processes ------------------------------------------------------------------


def test_worker_processes_share_the_embedded_worker_token_and_revocations(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """`lora-reg server --workers 2`: the embedded merge worker's token (known only to this
    server) is accepted by both worker processes, and a token both have trusted is refused by
    both as soon as its revocation answers. Each request below opens its own connection, so the
    two processes share them."""
    with own_server(
        request,
        tmp_path,
        "postgres-folder",
        LORA_REG_AUTH="on",
        LORA_REG_EMBEDDED_WORKER="true",
        LORA_REG_WORKERS="2",
    ) as server:
        assert server.token is not None
        log = next(tmp_path.glob("server-*.log")).read_text()
        assert "with 2 worker processes" in log, log
        admin = bearer(server.token)
        created = httpx.post(
            f"{server.url}/api/v1/tokens", json={"name": "ci", "scope": "write"}, headers=admin
        )
        assert created.status_code == 201, created.text
        ci = bearer(created.json()["token"])
        for _ in range(30):
            assert httpx.get(f"{server.url}/api/v1/whoami", headers=ci).status_code == 200
        revoked = httpx.delete(f"{server.url}/api/v1/tokens/ci", headers=admin)
        assert revoked.status_code == 200, revoked.text
        for _ in range(30):
            refused = httpx.get(f"{server.url}/api/v1/whoami", headers=ci)
            assert refused.status_code == 401 and "was revoked" in refused.json()["detail"]
        deadline = time.monotonic() + 60
        workers: list[Any] = []
        while not workers and time.monotonic() < deadline:
            listed = httpx.get(f"{server.url}/api/v1/merges/workers", headers=admin)
            assert listed.status_code == 200, listed.text
            workers = listed.json()["items"]
            time.sleep(0.2)
        assert [w["name"] for w in workers] == [f"embedded-{server.process.pid}"], workers


def test_a_read_session_runs_without_begin_and_commit_on_postgresql(served: Served) -> None:
    """The driver connection serving a GET is in autocommit: psycopg sends no BEGIN before the
    statement and no COMMIT after it (two round trips of the three a one-statement read cost)."""
    if served.settings.is_sqlite:
        pytest.skip("SQLite reads in one BEGIN DEFERRED transaction")
    modes: list[bool] = []

    def seen(connection: sa.Connection, *_: Any) -> None:
        modes.append(connection.connection.dbapi_connection.autocommit)  # type: ignore[union-attr]

    engine = served.app.state.engine
    served.get(READS["get version"][0])
    sa.event.listen(engine, "before_cursor_execute", seen)
    try:
        served.get(READS["get version"][0])
    finally:
        sa.event.remove(engine, "before_cursor_execute", seen)
    assert modes == [True], modes
    # And a write session still runs in one transaction.
    with engine.connect() as connection:
        assert connection.connection.dbapi_connection.autocommit is False  # type: ignore[union-attr]


def test_a_read_session_refuses_to_write_and_writes_nothing(served: Served) -> None:
    engine = served.app.state.engine
    with (
        pytest.raises(RuntimeError, match="may only query"),
        session_scope(read_only(engine)) as session,
    ):
        session.execute(sa.text("UPDATE adapters SET name = 'changed'"))
    with session_scope(engine) as session:
        names = session.execute(sa.text("SELECT name FROM adapters")).scalars().all()
    assert names == [NAME.split("/")[1]]
