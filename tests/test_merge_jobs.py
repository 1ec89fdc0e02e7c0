"""Merge jobs over the API (docs/architecture.md §9), without the merge engine: requests with
memoization and refusals, worker claims with leases and heartbeats, finishing with merged
artifacts stored as blobs, cancellation, lease expiry with bounded attempts, concurrent claims,
and gc.

Runs against servers of its own (SQLite + folder store, PostgreSQL + SeaweedFS) with no embedded
worker and LORA_REG_MERGE_MAX_ATTEMPTS=2, so no other test's job is ever claimed here. Each test
cancels what it leaves queued or running. Workers are played by the test through the client.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from cli.client import Registry
from registry.core.errors import (
    ArtifactNotFound,
    BaseNotFound,
    BlobMissing,
    Incompatible,
    InvalidTarget,
    JobFinished,
    JobNotFound,
    LeaseLost,
    VersionYanked,
)
from registry.core.jobs import (
    JobError,
    JobOut,
    JobResult,
    MergeOptions,
    Progress,
    memo_key,
    parse_target,
)
from registry.core.manifest import FileEntry, manifest_digest
from registry.core.schemas import FileSpec
from tests.conftest import (
    BACKENDS,
    RunningServer,
    own_server,
    unique,
    unique_name,
)

MAX_ATTEMPTS = 2
LEASE_S = 5  # the shortest lease a worker may ask for


@pytest.fixture(scope="module", params=BACKENDS)
def merge_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    workdir = tmp_path_factory.mktemp(f"merge-{request.param}")
    settings = {"LORA_REG_MERGE_MAX_ATTEMPTS": str(MAX_ATTEMPTS)}
    with own_server(request, workdir, request.param, **settings) as running:
        yield running


@pytest.fixture
def client(merge_server: RunningServer, tmp_path: Path) -> Iterator[Registry]:
    registry = merge_server.client(tmp_path / "cache")
    yield registry
    # Nothing this test left behind may be claimed by the next one.
    for status in ("queued", "running"):
        for job in registry.jobs(status=status, limit=500).items:
            registry.cancel_job(job.id)
    registry.close()


@pytest.fixture
def adapter_ref(
    client: Registry, adapter_dir: Callable[..., Path], base_dir: Callable[..., Path]
) -> str:
    """A pushed adapter version whose base (registered) it is compatible with."""
    base = f"{unique('org')}/tiny@v1"
    client.add_base(base, base_dir("llama"))
    name = unique_name()
    pushed = client.push(adapter_dir("llama"), name, base=base)
    assert pushed.version.compat_status == "compatible"
    return f"{name}@1"


def write_files(folder: Path, count: int = 2) -> list[FileEntry]:
    """Stand-ins for a merged checkpoint: small files of random bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(count):
        data = os.urandom(1000 + i)
        (folder / f"model-0000{i + 1}.safetensors").write_bytes(data)
        sha = hashlib.sha256(data).hexdigest()
        entries.append(FileEntry(f"model-0000{i + 1}.safetensors", len(data), sha))
    return entries


def result_of(entries: list[FileEntry], location: str = "registry") -> JobResult:
    return JobResult(
        location=location,
        files=[FileSpec(path=e.path, size=e.size, sha256=e.sha256) for e in entries],
        size=sum(e.size for e in entries),
        device="cpu",
    )


def claim_only(client: Registry, worker: str, job: JobOut, lease_s: int = 60) -> JobOut:
    claim = client.claim_job(worker, device="cpu", lease_s=lease_s)
    assert claim is not None and claim.job.id == job.id, claim
    assert claim.lease_s == lease_s
    return claim.job


def blob_bytes(server: RunningServer, sha256: str) -> bytes | None:
    response = httpx.get(f"{server.url}/api/v1/blobs/sha256:{sha256}", follow_redirects=True)
    return response.content if response.status_code == 200 else None


def actions(client: Registry, ref: str) -> list[str]:
    return [event.action for event in client.audit(subject=ref, limit=500).items]


# --- pure parts --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "canonical", "kind"),
    [
        ("registry", "registry", "registry"),
        ("dir:/data/out/", "dir:/data/out", "dir"),
        ("dir:/data/./a/../out", "dir:/data/out", "dir"),
        ("s3://bucket-1/merged/llama/", "s3://bucket-1/merged/llama", "s3"),
        ("s3://bucket-1", "s3://bucket-1", "s3"),
        ("hub:org/model", "hub:org/model", "hub"),
        ("hub:org/model@dev", "hub:org/model@dev", "hub"),
    ],
)
def test_targets_parse_to_a_canonical_form(text: str, canonical: str, kind: str) -> None:
    target = parse_target(text)
    assert (str(target), target.kind) == (canonical, kind)
    assert parse_target(str(target)) == target


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Registry",
        "dir:relative/out",
        "dir:/",
        "s3://",
        "s3://B!/x",
        "s3://b/../x",
        "hub:org",
        "hub:org/m@",
        "hub:../x",
        "ftp://x",
        "dir:/a\nb",
    ],
)
def test_invalid_targets_are_refused_with_a_clear_message(text: str) -> None:
    with pytest.raises(InvalidTarget, match="invalid merge target"):
        parse_target(text)


def test_memo_key_depends_on_every_input() -> None:
    args = ("sha256:" + "a" * 64, "org/base", "v1", MergeOptions(), "registry")
    key = memo_key(*args)
    assert key == memo_key(*args) and len(key) == 64
    assert memo_key(args[0], args[1], args[2], args[3], "dir:/x/") == memo_key(
        args[0], args[1], args[2], args[3], "dir:/x"
    )
    others = {
        memo_key("sha256:" + "b" * 64, *args[1:]),
        memo_key(args[0], "org/other", *args[2:]),
        memo_key(args[0], args[1], "v2", *args[3:]),
        memo_key(*args[:3], MergeOptions(dtype="float16"), args[4]),
        memo_key(*args[:3], MergeOptions(untie=True), args[4]),
        memo_key(*args[:4], "dir:/x"),
    }
    assert key not in others and len(others) == 6


# --- the job's life ----------------------------------------------------------------------------


def test_request_claim_heartbeat_finish_into_the_registry(
    client: Registry, merge_server: RunningServer, adapter_ref: str, tmp_path: Path
) -> None:
    job = client.request_merge(adapter_ref)
    assert (job.status, job.created, job.memoized, job.attempts) == ("queued", True, False, 0)
    assert job.adapter == adapter_ref and job.target == "registry"
    assert job.max_attempts == MAX_ATTEMPTS
    assert job.adapter_digest == client.get(adapter_ref).digest
    assert job.base == client.get(adapter_ref).compat_base
    assert client.job(job.id) == job.model_copy(update={"created": None})
    assert job.id in {j.id for j in client.jobs(status="queued").items}

    running = claim_only(client, "worker-a", job)
    assert (running.status, running.worker, running.attempts) == ("running", "worker-a", 1)
    assert running.started_at is not None and running.lease_expires_at is not None
    assert client.claim_job("worker-b") is None  # one queued job, already taken

    progress = Progress(tensors_done=3, tensors_total=10, bytes_done=300, bytes_total=1000)
    beat = client.heartbeat(job.id, "worker-a", progress)
    assert beat.cancel_requested is False
    assert beat.lease_expires_at >= running.lease_expires_at
    assert client.job(job.id).progress == progress
    with pytest.raises(LeaseLost):
        client.heartbeat(job.id, "worker-b")

    folder = tmp_path / "merged"
    entries = write_files(folder)
    with pytest.raises(LeaseLost):
        client.upload_merged(job.id, folder, entries, worker="worker-b")
    client.upload_merged(job.id, folder, entries, worker="worker-a")
    missing = FileEntry("extra.json", 2, hashlib.sha256(b"{}").hexdigest())
    with pytest.raises(BlobMissing) as caught:  # the worker uploads every file first
        client.finish_job(job.id, "worker-a", "succeeded", result=result_of([*entries, missing]))
    assert caught.value.details["paths"] == ["extra.json"]
    assert client.job(job.id).status == "running"
    with pytest.raises(LeaseLost):
        client.finish_job(job.id, "worker-b", "succeeded", result=result_of(entries))

    done = client.finish_job(job.id, "worker-a", "succeeded", result=result_of(entries))
    assert done.status == "succeeded" and done.finished_at is not None
    assert done.result is not None and done.error is None
    digest = manifest_digest(entries)
    assert done.result.artifact == digest
    assert done.result.size == sum(e.size for e in entries)
    # A finish repeated after a lost answer returns the job; any other change is refused.
    assert client.finish_job(job.id, "worker-a", "succeeded", result=result_of(entries)) == done
    with pytest.raises(LeaseLost):
        client.finish_job(job.id, "worker-a", "failed")
    with pytest.raises(JobFinished):
        client.cancel_job(job.id)

    artifact = client.artifact(digest)
    assert artifact.stored and artifact.job_id == job.id and artifact.adapter == adapter_ref
    assert [f.path for f in artifact.files] == [e.path for e in entries]
    out = client.pull_artifact(digest, tmp_path / "pulled")
    for entry in entries:
        data = (out / entry.path).read_bytes()
        assert data == (folder / entry.path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry.sha256
        assert blob_bytes(merge_server, entry.sha256) == data
    with pytest.raises(ArtifactNotFound):
        client.artifact("sha256:" + "0" * 64)

    # identify recognises the merged checkpoint, whole, changed, or one file of it.
    exact = client.identify(out)
    assert exact.status == "exact" and exact.matches == []
    assert [(m.digest, m.adapter, m.job_id) for m in exact.merged] == [
        (digest, adapter_ref, job.id)
    ]
    (out / "notes.txt").write_text("local notes")
    changed = client.identify(out)
    assert changed.status == "modified" and changed.merged[0].extra == ["notes.txt"]
    single = client.identify(out / entries[0].path)
    assert single.status == "file" and single.merged[0].identical == [entries[0].path]

    log = actions(client, adapter_ref)
    for action in ("merge.requested", "merge.started", "merge.succeeded"):
        assert log.count(action) == 1, log
    succeeded = client.audit(subject=adapter_ref, action="merge.succeeded").items[0]
    assert succeeded.details["job"] == job.id and succeeded.details["artifact"] == digest


def test_gc_keeps_the_blobs_of_merged_artifacts(
    client: Registry, merge_server: RunningServer, adapter_ref: str, tmp_path: Path
) -> None:
    job = client.request_merge(adapter_ref)
    claim_only(client, "worker-a", job)
    entries = write_files(tmp_path / "merged")
    client.upload_merged(job.id, tmp_path / "merged", entries)
    orphan = write_files(tmp_path / "orphan", 1)  # uploaded for the job, never reported
    client.upload_merged(job.id, tmp_path / "orphan", orphan)
    client.upload_merged(job.id, tmp_path / "orphan", orphan)  # S3: recorded on the next plan
    client.finish_job(job.id, "worker-a", "succeeded", result=result_of(entries))

    assert client.gc(older_than_s=0).deleted >= 1
    assert blob_bytes(merge_server, orphan[0].sha256) is None
    for entry in entries:
        data = blob_bytes(merge_server, entry.sha256)
        assert data is not None and hashlib.sha256(data).hexdigest() == entry.sha256


def test_a_matching_succeeded_merge_is_memoized_unless_forced(
    client: Registry, merge_server: RunningServer, adapter_ref: str, tmp_path: Path
) -> None:
    target = f"dir:{tmp_path}/out"
    first = client.request_merge(adapter_ref, target=target)
    # The same merge while it is queued: the same job, no duplicate work.
    again = client.request_merge(adapter_ref, target=target)
    assert (again.id, again.created, again.memoized) == (first.id, False, False)
    claim_only(client, "worker-a", first)
    entries = write_files(tmp_path / "staged")
    done = client.finish_job(
        first.id, "worker-a", "succeeded", result=result_of(entries, f"{tmp_path}/out")
    )
    assert done.result is not None and done.result.location == f"{tmp_path}/out"

    memo = client.request_merge(adapter_ref, target=target + "/")  # same target, canonically
    assert (memo.id, memo.status, memo.memoized, memo.created) == (
        first.id,
        "succeeded",
        True,
        False,
    )
    assert memo.result == done.result
    raw = httpx.post(
        f"{merge_server.url}/api/v1/merges", json={"adapter": adapter_ref, "target": target}
    )
    assert raw.status_code == 200 and raw.json()["memoized"] is True

    forced = client.request_merge(adapter_ref, target=target, force=True)
    assert forced.id != first.id and (forced.created, forced.memoized) == (True, False)
    assert forced.status == "queued"
    other = client.request_merge(adapter_ref, target=target, options={"dtype": "float16"})
    assert other.id not in (first.id, forced.id) and other.options.dtype == "float16"
    elsewhere = client.request_merge(adapter_ref, target="registry")
    assert elsewhere.id not in (first.id, forced.id, other.id)
    created = httpx.post(
        f"{merge_server.url}/api/v1/merges",
        json={"adapter": adapter_ref, "target": target, "options": {"untie": True}},
    )
    assert created.status_code == 201 and created.json()["options"]["untie"] is True

    # Recorded for lineage, but its bytes live on the worker: nothing to download here.
    digest = manifest_digest(entries)
    artifact = client.artifact(digest)
    assert not artifact.stored and artifact.location == f"{tmp_path}/out"
    with pytest.raises(ArtifactNotFound, match="not stored in the registry"):
        client.pull_artifact(digest, tmp_path / "pulled")
    assert actions(client, adapter_ref).count("merge.requested") == 5


def test_refused_requests_queue_nothing(
    client: Registry,
    merge_server: RunningServer,
    adapter_dir: Callable[..., Path],
    base_dir: Callable[..., Path],
    adapter_ref: str,
) -> None:
    wide = f"{unique('org')}/wide@v1"
    client.add_base(wide, base_dir("llama", hidden_size=96))
    name = unique_name()
    client.push(adapter_dir("llama"), name, base=wide)  # stored, flagged incompatible
    with pytest.raises(Incompatible) as caught:
        client.request_merge(f"{name}@1")
    assert caught.value.details["report"]["errors"][0]["code"] == "shape_mismatch"
    assert caught.value.details["report"]["profile"] == "merge"
    raw = httpx.post(f"{merge_server.url}/api/v1/merges", json={"adapter": f"{name}@1"})
    assert raw.status_code == 422 and raw.json()["code"] == "incompatible"
    # ... and against another, registered and compatible base, it is accepted.
    compatible = client.request_merge(f"{name}@1", base=client.get(adapter_ref).compat_base)
    assert compatible.status == "queued"

    unregistered = unique_name()
    client.push(adapter_dir("llama"), unregistered, base=f"{unique('nobody')}/base@v1")
    with pytest.raises(BaseNotFound):
        client.request_merge(f"{unregistered}@1")
    raw = httpx.post(f"{merge_server.url}/api/v1/merges", json={"adapter": f"{unregistered}@1"})
    assert raw.status_code == 404 and raw.json()["code"] == "base_not_found"
    with pytest.raises(BaseNotFound):
        client.request_merge(adapter_ref, base=f"{unique('nobody')}/base")

    with pytest.raises(InvalidTarget):  # refused before any request
        client.request_merge(adapter_ref, target="dir:relative/path")
    raw = httpx.post(
        f"{merge_server.url}/api/v1/merges",
        json={"adapter": adapter_ref, "target": "dir:relative/path"},
    )
    assert raw.status_code == 422 and raw.json()["code"] == "invalid_target"
    bad_option = httpx.post(
        f"{merge_server.url}/api/v1/merges",
        json={"adapter": adapter_ref, "options": {"dtype": "int8"}},
    )
    assert bad_option.status_code == 422 and bad_option.json()["code"] == "invalid_input"

    client.yank(adapter_ref, "trained on the wrong split")
    with pytest.raises(VersionYanked):
        client.request_merge(adapter_ref)

    mine = {name, unregistered, adapter_ref.split("@")[0]}
    queued = [j for j in client.jobs(limit=500).items if j.adapter.split("@")[0] in mine]
    assert [j.id for j in queued] == [compatible.id]
    with pytest.raises(JobNotFound):
        client.job("0" * 32)


def test_cancel_a_queued_job_and_a_running_one(
    client: Registry, adapter_ref: str, tmp_path: Path
) -> None:
    queued = client.request_merge(adapter_ref, target=f"dir:{tmp_path}/a")
    cancelled = client.cancel_job(queued.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    with pytest.raises(JobFinished):
        client.cancel_job(queued.id)
    assert client.claim_job("worker-a") is None
    # A cancelled job is no answer to the same request: a new one is queued.
    again = client.request_merge(adapter_ref, target=f"dir:{tmp_path}/a")
    assert again.id != queued.id and (again.created, again.status) == (True, "queued")
    client.cancel_job(again.id)

    job = client.request_merge(adapter_ref, target=f"dir:{tmp_path}/b")
    claim_only(client, "worker-a", job)
    asked = client.cancel_job(job.id)
    assert (asked.status, asked.cancel_requested) == ("running", True)
    assert client.cancel_job(job.id).cancel_requested  # asking twice changes nothing
    assert client.heartbeat(job.id, "worker-a").cancel_requested is True
    ended = client.finish_job(job.id, "worker-a", "cancelled")
    assert ended.status == "cancelled" and ended.error is not None
    assert ended.error.code == "cancelled"
    with pytest.raises(LeaseLost):
        client.heartbeat(job.id, "worker-a")

    log = actions(client, adapter_ref)
    assert log.count("merge.cancelled") == 3 and log.count("merge.cancel_requested") == 1, log


def test_a_failed_merge_keeps_its_error(client: Registry, adapter_ref: str) -> None:
    job = client.request_merge(adapter_ref)
    claim_only(client, "worker-a", job)
    error = JobError(code="non_finite", message="tensor x holds NaN")
    failed = client.finish_job(job.id, "worker-a", "failed", error=error)
    assert failed.status == "failed" and failed.error == error and failed.result is None
    # A failed job is not a memoized answer.
    assert client.request_merge(adapter_ref).id != job.id
    event = client.audit(subject=adapter_ref, action="merge.failed").items[0]
    assert event.details["error"]["code"] == "non_finite"


def _workers(server: RunningServer) -> dict[str, dict[str, object]]:
    answer = httpx.get(
        f"{server.url}/api/v1/merges/workers",
        headers={"Authorization": f"Bearer {server.token}"} if server.token else {},
    )
    answer.raise_for_status()
    return {worker["name"]: worker for worker in answer.json()["items"]}


def test_the_registry_records_every_worker_that_calls_in(
    client: Registry, merge_server: RunningServer, adapter_ref: str
) -> None:
    idle, busy = unique("idle-worker"), unique("busy-worker")
    before = datetime.now(UTC) - timedelta(seconds=1)
    assert client.claim_job(idle, device="cuda:0") is None  # nothing queued: still seen
    job = client.request_merge(adapter_ref)
    claim_only(client, busy, job)
    workers = _workers(merge_server)
    assert workers[idle]["running"] == 0 and workers[idle]["device"] == "cuda:0"
    assert workers[busy]["running"] == 1 and workers[busy]["device"] == "cpu"
    seen = datetime.fromisoformat(str(workers[busy]["last_seen"]))
    assert seen >= before
    time.sleep(0.05)
    client.heartbeat(job.id, busy, None)
    assert datetime.fromisoformat(str(_workers(merge_server)[busy]["last_seen"])) > seen
    client.cancel_job(job.id)


def wait_for_claim(client: Registry, worker: str, deadline_s: float = 60) -> JobOut:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        claim = client.claim_job(worker, lease_s=LEASE_S)
        if claim is not None:
            return claim.job
        time.sleep(0.25)
    raise AssertionError(f"{worker} claimed nothing before the deadline")


def test_expired_leases_requeue_until_attempts_run_out(client: Registry, adapter_ref: str) -> None:
    job = client.request_merge(adapter_ref)
    claim_only(client, "worker-a", job, lease_s=LEASE_S)

    # While worker-a renews its lease, nobody else gets the job, past the first lease's end.
    renewed_until = time.monotonic() + LEASE_S + 1.5
    while time.monotonic() < renewed_until:
        assert client.heartbeat(job.id, "worker-a").cancel_requested is False
        assert client.claim_job("worker-c", lease_s=LEASE_S) is None
        time.sleep(0.5)
    assert (client.job(job.id).worker, client.job(job.id).attempts) == ("worker-a", 1)

    # worker-a goes silent: once its lease runs out, the next claim takes the job again.
    second = wait_for_claim(client, "worker-b")
    assert (second.id, second.attempts, second.worker) == (job.id, 2, "worker-b")
    with pytest.raises(LeaseLost, match="worker-b"):
        client.heartbeat(job.id, "worker-a")
    with pytest.raises(LeaseLost):
        client.finish_job(job.id, "worker-a", "succeeded", result=result_of([]))
    with pytest.raises(LeaseLost):
        client.upload_merged(job.id, Path("."), [], worker="worker-a")

    # Then worker-b goes silent too: no attempts are left, so the job fails.
    deadline = time.monotonic() + 60
    while client.job(job.id).status == "running" and time.monotonic() < deadline:
        assert client.claim_job("worker-c", lease_s=LEASE_S) is None
        time.sleep(0.25)
    failed = client.job(job.id)
    assert failed.status == "failed" and failed.attempts == MAX_ATTEMPTS
    assert failed.error is not None and failed.error.code == "lease_expired"
    with pytest.raises(LeaseLost):
        client.heartbeat(job.id, "worker-b")
    log = actions(client, adapter_ref)
    assert log.count("merge.requeued") == 1 and log.count("merge.failed") == 1, log
    assert log.count("merge.started") == MAX_ATTEMPTS


def test_cancelling_jobs_whose_worker_died(
    client: Registry, adapter_ref: str, tmp_path: Path
) -> None:
    first = client.request_merge(adapter_ref, target=f"dir:{tmp_path}/a")
    second = client.request_merge(adapter_ref, target=f"dir:{tmp_path}/b")
    claim_only(client, "worker-a", first, lease_s=LEASE_S)
    held = claim_only(client, "worker-b", second, lease_s=LEASE_S)
    assert client.cancel_job(first.id).cancel_requested  # worker-a is told... and never answers

    # Once worker-b's lease has run out, a cancel ends its job at once, with no claim between.
    assert held.lease_expires_at is not None
    deadline = time.monotonic() + 60
    while datetime.now(UTC) <= held.lease_expires_at + timedelta(seconds=0.5):
        assert time.monotonic() < deadline
        time.sleep(0.25)
    ended = client.cancel_job(second.id)
    assert (ended.status, ended.worker) == ("cancelled", None)

    # The first job is never requeued: the claim that finds its lease expired cancels it.
    while client.job(first.id).status == "running" and time.monotonic() < deadline:
        assert client.claim_job("worker-c", lease_s=LEASE_S) is None
        time.sleep(0.25)
    assert client.job(first.id).status == "cancelled"
    assert actions(client, adapter_ref).count("merge.cancelled") == 2


def test_concurrent_claims_give_every_job_to_exactly_one_worker(
    client: Registry, merge_server: RunningServer, adapter_ref: str, tmp_path: Path
) -> None:
    jobs = [client.request_merge(adapter_ref, target=f"dir:{tmp_path}/j{i}") for i in range(12)]
    assert len({job.id for job in jobs}) == 12
    claimed: list[tuple[str, str]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def worker(name: str) -> None:
        with Registry(merge_server.url, cache_dir=tmp_path / "c") as own:
            start.wait()
            try:
                while (claim := own.claim_job(name, lease_s=600)) is not None:
                    claimed.append((claim.job.id, name))
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(job_id for job_id, _ in claimed) == sorted(job.id for job in jobs)
    for job_id, name in claimed:
        stored = client.job(job_id)
        assert (stored.status, stored.worker, stored.attempts) == ("running", name, 1)
