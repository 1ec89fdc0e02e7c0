"""Prometheus metrics at /metrics (registry/metrics.py), scraped from real servers and parsed with
prometheus_client's own text parser: every count moves by exactly what the test did.

Requests by route template and status, blob bytes pushed and pulled (through the server with
the folder store, by presigned URL with S3), blob and merge cache hits, events recorded, merge
queue depth and durations, webhook deliveries, Hugging Face protocol requests; paths that match
no route collapse into one label; `LORA_REG_METRICS_AUTH` both ways; several processes summed
through PROMETHEUS_MULTIPROC_DIR.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from cli.client import Registry
from registry.app import create_app
from registry.core.events import TokenRevoked
from registry.core.jobs import JobResult
from registry.core.schemas import FileSpec
from registry.db import make_engine, session_scope, upgrade
from registry.events.service import record
from registry.metrics import prepare_multiprocess_dir
from registry.settings import Settings
from registry.tokens import service as tokens
from tests.conftest import RunningServer, copy_adapter, own_server, unique, unique_name
from tests.test_webhooks import SECRET, Receiver

Labels = tuple[tuple[str, str], ...]


class Samples:
    """One scrape: every sample by name and labels."""

    def __init__(self, text: str) -> None:
        self.values: dict[tuple[str, Labels], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                self.values[key] = sample.value

    def total(self, name: str, **labels: str) -> float:
        """The sum of the samples of `name` whose labels include `labels`."""
        wanted = set(labels.items())
        return sum(v for (n, ls), v in self.values.items() if n == name and wanted <= set(ls))

    def label_values(self, name: str, label: str) -> set[str]:
        return {dict(ls)[label] for (n, ls) in self.values if n == name and label in dict(ls)}


def scrape(url: str, token: str | None = None) -> Samples:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = httpx.get(f"{url}/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return Samples(response.text)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return after.total(name, **labels) - before.total(name, **labels)


REQUESTS = "lora_reg_http_requests_total"
DURATION = "lora_reg_http_request_duration_seconds_count"
BYTES = "lora_reg_transfer_bytes_total"
CACHE = "lora_reg_cache_lookups_total"
EVENTS = "lora_reg_events_recorded_total"
QUEUE = "lora_reg_merge_jobs"
MERGES = "lora_reg_merge_duration_seconds_count"
WEBHOOKS = "lora_reg_webhook_deliveries_total"


def events_since(client: Registry, cursor: int) -> Counter[str]:
    page = client.events(after=cursor, limit=500)
    return Counter(event.action for event in page.items)


def event_deltas(before: Samples, after: Samples) -> Counter[str]:
    """How many events of each action were counted between two scrapes (moved ones only)."""
    deltas = {
        a: int(moved(before, after, EVENTS, action=a)) for a in after.label_values(EVENTS, "action")
    }
    return Counter({action: n for action, n in deltas.items() if n})


# --- requests ------------------------------------------------------------------------------------


def test_requests_are_counted_by_route_template_and_status(server: RunningServer) -> None:
    route = "/api/v1/adapters/{namespace}/{name}"
    before = scrape(server.url)
    for _ in range(3):
        assert httpx.get(f"{server.url}/api/v1/adapters").status_code == 200
    for _ in range(2):
        missing = httpx.get(f"{server.url}/api/v1/adapters/{unique('ns')}/none")
        assert missing.status_code == 404
    assert httpx.get(f"{server.url}/healthz").status_code == 200
    after = scrape(server.url)

    listed = {"surface": "api", "method": "GET", "route": "/api/v1/adapters", "status": "200"}
    assert moved(before, after, REQUESTS, **listed) == 3
    assert moved(before, after, DURATION, **listed) == 3
    assert moved(before, after, REQUESTS, route=route, status="404") == 2
    assert moved(before, after, REQUESTS, surface="other", route="/healthz") == 1
    assert moved(before, after, REQUESTS, route="/metrics") == 1  # the first scrape
    # Nothing else moved: six requests and a scrape.
    assert moved(before, after, REQUESTS) == 7


def test_paths_that_match_no_route_share_one_label(
    servers: Callable[[str], RunningServer],
) -> None:
    server = servers("sqlite-folder")
    before = scrape(server.url)
    paths = [f"/api/v1/{unique('nothing')}" for _ in range(10)]
    paths += [f"/{unique('elsewhere')}/{unique()}" for _ in range(10)]
    for path in paths:
        assert httpx.get(server.url + path).status_code == 404
    # A method outside the HTTP set that the server's parser still accepts (httptools answers a
    # made-up one such as BREW with 400 before the app sees it; h11 passed it through).
    assert httpx.request("PURGE", f"{server.url}/api/v1/adapters").status_code == 405
    after = scrape(server.url)

    assert moved(before, after, REQUESTS, route="unmatched", status="404") == 20
    routes = after.label_values(REQUESTS, "route")
    assert not any(path in routes for path in paths)
    assert all(r == "unmatched" or r.startswith("/") for r in routes)
    assert moved(before, after, REQUESTS, method="other", route="/api/v1/adapters") == 1
    assert "PURGE" not in after.label_values(REQUESTS, "method")


# --- bytes, blob hits and events ------------------------------------------------------------------


def test_pushed_and_pulled_bytes_blob_hits_and_events_are_counted(
    server: RunningServer, client: Registry, adapter_dir: Callable[..., Path], tmp_path: Path
) -> None:
    """The folder store moves bytes through the server; S3 by presigned URLs (planned bytes)."""
    via, other = (
        ("server", "presigned") if server.backend.endswith("folder") else ("presigned", "server")
    )
    # A file no other test pushed, so this server has not stored all of the folder yet.
    folder = copy_adapter(adapter_dir("llama", seed=7), tmp_path / "adapter")
    (folder / "README.md").write_text(f"metrics test {unique()}\n")
    cursor = client.events(after=-1).last_id
    before = scrape(server.url)
    first = client.push(folder, unique_name())
    middle = scrape(server.url)
    again = client.push(folder, unique_name())  # the same bytes under another name
    pulled = client.pull(f"{first.version.adapter}@1", tmp_path / "out")
    after = scrape(server.url)

    files = len(first.version.files or [])
    assert first.uploaded_bytes > 0 and again.uploaded_bytes == 0
    assert moved(before, middle, BYTES, direction="push", via=via) == first.uploaded_bytes
    assert moved(before, middle, CACHE, cache="blobs", result="miss") == first.uploaded_files
    assert moved(before, middle, CACHE, cache="blobs", result="hit") == files - first.uploaded_files
    assert moved(middle, after, CACHE, cache="blobs", result="hit") == files
    assert moved(middle, after, CACHE, cache="blobs", result="miss") == 0
    assert moved(middle, after, BYTES, direction="push") == 0

    assert pulled.downloaded_bytes == first.version.size > 0
    assert moved(before, after, BYTES, direction="pull", via=via) == pulled.downloaded_bytes
    assert moved(before, after, BYTES, via=other) == 0
    assert event_deltas(before, after) == events_since(client, cursor)


def test_hugging_face_protocol_requests_and_bytes_are_counted(
    server: RunningServer, client: Registry, adapter_dir: Callable[..., Path]
) -> None:
    name = unique_name()
    pushed = client.push(adapter_dir("llama"), name)
    config = next(f for f in pushed.version.files or [] if f.path == "adapter_config.json")
    url = f"{server.url}/hf/{name}/resolve/1/adapter_config.json"
    before = scrape(server.url)
    assert httpx.head(url).status_code in (200, 302)
    got = httpx.get(url, follow_redirects=True)
    after = scrape(server.url)

    assert hashlib.sha256(got.content).hexdigest() == config.sha256
    route = "/hf/{namespace}/{name}/resolve/{revision}/{path:path}"
    assert moved(before, after, REQUESTS, surface="hub", route=route) == 2
    via = "server" if server.backend.endswith("folder") else "presigned"
    assert moved(before, after, BYTES, direction="pull", via=via) == config.size  # not the HEAD


# --- merges and webhooks, on a server of their own ------------------------------------------------


@pytest.fixture(scope="module")
def quiet_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    """No other test's jobs, webhooks or requests: queue depth and deliveries are ours alone."""
    with own_server(request, tmp_path_factory.mktemp("metrics-quiet")) as running:
        yield running


@pytest.fixture
def quiet_client(quiet_server: RunningServer, tmp_path: Path) -> Iterator[Registry]:
    registry = quiet_server.client(tmp_path / "cache")
    yield registry
    registry.close()


def test_merge_queue_depth_durations_and_memoized_requests(
    quiet_server: RunningServer,
    quiet_client: Registry,
    adapter_dir: Callable[..., Path],
    base_dir: Callable[..., Path],
    tmp_path: Path,
) -> None:
    client, url = quiet_client, quiet_server.url
    base = f"{unique('org')}/tiny@v1"
    client.add_base(base, base_dir("llama"))
    name = unique_name()
    client.push(adapter_dir("llama"), name, base=base)
    target = f"dir:{tmp_path / 'merged'}"
    start = scrape(url)
    assert start.total(QUEUE, status="queued") == start.total(QUEUE, status="running") == 0

    job = client.request_merge(f"{name}@1", target=target)
    same = client.request_merge(f"{name}@1", target=target)  # joins the queued job
    assert same.id == job.id
    queued = scrape(url)
    assert (queued.total(QUEUE, status="queued"), queued.total(QUEUE, status="running")) == (1, 0)
    assert moved(start, queued, CACHE, cache="merges", result="miss") == 1
    assert moved(start, queued, CACHE, cache="merges", result="coalesced") == 1

    claim = client.claim_job("w1", device="cpu")
    assert claim is not None and claim.job.id == job.id
    running = scrape(url)
    assert (running.total(QUEUE, status="queued"), running.total(QUEUE, status="running")) == (0, 1)

    data = b"merged weights"
    spec = FileSpec(
        path="model.safetensors", size=len(data), sha256=hashlib.sha256(data).hexdigest()
    )
    result = JobResult(location=target, files=[spec], size=len(data), device="cpu")
    client.finish_job(job.id, "w1", "succeeded", result=result)
    memoized = client.request_merge(f"{name}@1", target=target)
    assert memoized.memoized
    end = scrape(url)
    assert (end.total(QUEUE, status="queued"), end.total(QUEUE, status="running")) == (0, 0)
    assert moved(start, end, MERGES, status="succeeded") == 1
    assert moved(start, end, MERGES) == 1
    assert moved(start, end, CACHE, cache="merges", result="hit") == 1


def test_webhook_deliveries_are_counted_by_outcome(
    quiet_server: RunningServer, quiet_client: Registry, adapter_dir: Callable[..., Path]
) -> None:
    client, url = quiet_client, quiet_server.url
    name = unique_name()
    client.push(adapter_dir("llama"), name)
    endpoint = Receiver(fail=1)  # the first attempt fails, the retry (5 s later) succeeds
    hook = client.add_webhook(endpoint.url, ["alias.set"], SECRET)
    try:
        before = scrape(url)
        client.set_alias(f"{name}@1", "staging")
        endpoint.wait_for(2)
        deadline = time.monotonic() + 30  # the sender settles the attempt after the POST
        after = scrape(url)
        while moved(before, after, WEBHOOKS, outcome="succeeded") < 1:
            assert time.monotonic() < deadline, "the successful delivery was never counted"
            time.sleep(0.2)
            after = scrape(url)
    finally:
        client.remove_webhook(hook.id)
        endpoint.server.shutdown()
        endpoint.server.server_close()
    assert moved(before, after, WEBHOOKS, outcome="retried") == 1
    assert moved(before, after, WEBHOOKS, outcome="succeeded") == 1
    assert moved(before, after, WEBHOOKS, outcome="failed") == 0


# --- several processes ---------------------------------------------------------------------------


def test_a_multiprocess_directory_is_where_counts_are_kept_and_read(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """With PROMETHEUS_MULTIPROC_DIR (what `lora-reg server --workers N` sets) each process
    writes its counts there and a scrape sums the folder."""
    folder = tmp_path / "prometheus"
    folder.mkdir()
    settings = {"PROMETHEUS_MULTIPROC_DIR": str(folder)}
    with own_server(request, tmp_path / "server", **settings) as running:
        before = scrape(running.url)
        for _ in range(4):
            httpx.get(f"{running.url}/api/v1/adapters")
        after = scrape(running.url)
    assert moved(before, after, REQUESTS, route="/api/v1/adapters", status="200") == 4
    assert any(path.suffix == ".db" for path in folder.iterdir())
    assert after.total(QUEUE, status="queued") == 0


def test_a_rolled_back_transaction_counts_nothing(tmp_path: Path) -> None:
    """Services count after commit (`registry.metrics.on_commit`): an event that was never
    recorded is never counted."""
    settings = Settings(
        database_url=f"sqlite:///{tmp_path}/r.db", storage_url=f"file://{tmp_path}/o"
    )
    upgrade(settings)
    engine = make_engine(settings.sqlalchemy_url)

    def revoked() -> float:
        return REGISTRY.get_sample_value(EVENTS, {"action": "token.revoke"}) or 0.0

    start = revoked()
    with pytest.raises(RuntimeError), session_scope(engine) as session:
        record(session, None, TokenRevoked(subject="t", scope="read"))
        raise RuntimeError("the request failed after recording")
    assert revoked() == start
    with session_scope(engine) as session:
        record(session, None, TokenRevoked(subject="t", scope="read"))
    engine.dispose()
    assert revoked() == start + 1


def test_a_multiprocess_directory_is_prepared_empty_before_processes_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`prepare_multiprocess_dir` (for servers with several processes): an operator's folder
    is emptied of an earlier run's counts; without one a temporary folder is made and named."""
    own = tmp_path / "own"
    own.mkdir()
    (own / "counter_123.db").write_bytes(b"stale")
    (own / "notes.txt").write_text("not ours")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(own))
    assert prepare_multiprocess_dir() is None
    assert [path.name for path in own.iterdir()] == ["notes.txt"]

    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
    made = prepare_multiprocess_dir()
    assert made is not None and Path(made).is_dir() and not any(Path(made).iterdir())
    assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == made
    Path(made).rmdir()


# --- who may scrape ------------------------------------------------------------------------------


def secured_app(tmp_path: Path, **settings: str) -> tuple[TestClient, str]:
    """An app with auth on (SQLite) and a read token."""
    config = Settings(
        database_url=f"sqlite:///{tmp_path}/r.db",
        storage_url=f"file://{tmp_path}/objects",
        **settings,  # type: ignore[arg-type]
    )
    upgrade(config)
    engine = make_engine(config.sqlalchemy_url)
    with session_scope(engine) as session:
        secret = tokens.create_token(session, "scraper", "read", None).token
    engine.dispose()
    return TestClient(create_app(config), raise_server_exceptions=False), secret


def test_metrics_need_a_read_token_by_default(tmp_path: Path) -> None:
    http, secret = secured_app(tmp_path)
    with http:
        refused = http.get("/metrics")
        assert refused.status_code == 401
        assert refused.json()["code"] == "not_authenticated"
        assert refused.headers["WWW-Authenticate"].startswith("Bearer")
        wrong = http.get("/metrics", headers={"Authorization": "Bearer lrt_" + "A" * 43})
        assert wrong.status_code == 401
        allowed = http.get("/metrics", headers={"Authorization": f"Bearer {secret}"})
        assert allowed.status_code == 200
        assert "lora_reg_http_requests_total" in allowed.text


def test_metrics_auth_none_lets_scrapers_without_a_token_in(tmp_path: Path) -> None:
    http, _ = secured_app(tmp_path, metrics_auth="none")
    with http:
        assert http.get("/metrics").status_code == 200
        assert http.get("/api/v1/adapters").status_code == 401  # the API still needs one
