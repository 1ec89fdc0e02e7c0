"""Merge jobs end to end: `lora-reg merge` against real servers, real workers, real stores.

A worker process (`lora-reg worker`) or the server's embedded worker claims the job, pulls the
adapter and the stored base through the registry, merges and publishes. The result must be
byte-identical to the same merge run locally, memoized, pullable, and survive a worker killed
with SIGKILL mid-merge (the job requeues once the lease expires and another worker finishes it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import (
    BACKENDS,
    ROOT,
    RunningServer,
    lora_reg_command,
    own_server,
    unique_name,
)
from tests.support.merging import folder_bytes, kill_when, merged_like_a_worker

pytestmark = pytest.mark.slow


@pytest.fixture(params=BACKENDS)
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RunningServer]:
    """A server of its own per test: workers claim the oldest queued job, so jobs left by other
    tests on a shared server would be claimed first."""
    with own_server(request, tmp_path / "server", request.param) as running:
        yield running


@pytest.fixture
def worker_process(
    server: RunningServer, tmp_path: Path
) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> subprocess.Popen[bytes]:
        env = {
            **os.environ,
            **server.env,
            "PYTHONPATH": str(ROOT),
            "LORA_REG_URL": server.url,
            "LORA_REG_CACHE_DIR": str(tmp_path / f"worker-cache-{len(started)}"),
            "TMPDIR": str(tmp_path),
        }
        process = subprocess.Popen([*lora_reg_command(), "worker", *args], env=env)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()
        process.wait(timeout=30)


def _register(server: RunningServer, base: Path, adapter: Path, base_id: str) -> str:
    name = unique_name()
    added = server.cli("base", "add", base_id, "--from", str(base), "--upload")
    assert added.returncode == 0, added.stderr
    pushed = server.cli("push", str(adapter), name, "--base", base_id, "--json")
    assert pushed.returncode == 0, pushed.stderr
    return f"{name}@{json.loads(pushed.stdout)['version']['number']}"


def test_merge_job_to_the_registry_matches_a_local_merge_and_is_memoized(
    server: RunningServer,
    worker_process: Callable[..., subprocess.Popen[bytes]],
    adapter_dir: Callable[..., Path],
    base_dir: Callable[..., Path],
    tmp_path: Path,
) -> None:
    base = base_dir("llama", max_shard_size="40KB")
    adapter = adapter_dir("llama")
    ref = _register(server, base, adapter, "org/tiny-llama")
    worker_process("--lease", "10")
    merged = server.cli("merge", ref, "--base", "org/tiny-llama", "--wait", "--json", timeout=300)
    assert merged.returncode == 0, merged.stderr
    job = json.loads(merged.stdout)
    assert job["status"] == "succeeded" and job["attempts"] == 1
    assert job["progress"]["tensors_done"] == job["progress"]["tensors_total"] > 0
    artifact = job["result"]["artifact"]
    assert artifact and artifact.startswith("sha256:")

    pulled = server.cli("pull", artifact, "-o", str(tmp_path / "pulled"))
    assert pulled.returncode == 0, pulled.stderr

    # The same merge run here, with the same provenance, gives the same bytes.
    version = json.loads(server.cli("show", ref, "--json").stdout)
    local = merged_like_a_worker(
        adapter,
        base,
        tmp_path / "local",
        ref=ref,
        digest=version["digest"],
        base_id="org/tiny-llama",
    )
    assert folder_bytes(tmp_path / "pulled") == local

    again = server.cli("merge", ref, "--base", "org/tiny-llama", "--json")
    assert again.returncode == 0, again.stderr
    memo = json.loads(again.stdout)
    assert memo["memoized"] is True and memo["id"] == job["id"]
    assert memo["result"]["artifact"] == artifact

    identified = server.cli("identify", str(tmp_path / "pulled"), "--json")
    assert identified.returncode == 0, identified.stderr
    assert artifact in identified.stdout


def test_merge_job_to_a_folder_on_the_worker(
    server: RunningServer,
    worker_process: Callable[..., subprocess.Popen[bytes]],
    adapter_dir: Callable[..., Path],
    base_dir: Callable[..., Path],
    tmp_path: Path,
) -> None:
    base, adapter = base_dir("gpt2"), adapter_dir("gpt2")
    ref = _register(server, base, adapter, "org/tiny-gpt2")
    worker_process("--once")
    out = tmp_path / "published"
    merged = server.cli(
        "merge",
        ref,
        "--base",
        "org/tiny-gpt2",
        "--to",
        f"dir:{out}",
        "--wait",
        "--json",
        timeout=300,
    )
    assert merged.returncode == 0, merged.stderr
    job = json.loads(merged.stdout)
    assert job["result"]["location"] == str(out)
    files = folder_bytes(out)
    assert {f["path"] for f in job["result"]["files"]} == set(files)
    assert "model.safetensors" in files and "config.json" in files
    assert not list(tmp_path.glob(".published.partial-*"))
    # Recorded (identify knows it) but not stored here: no download links, and pull says where.
    with server.client(tmp_path / "cache") as client:
        artifact = client.artifact(job["result"]["artifact"])
    assert not artifact.stored and artifact.files
    assert all(file.url is None for file in artifact.files)
    pulled = server.cli("pull", artifact.digest, "-o", str(tmp_path / "pulled"))
    assert pulled.returncode == 3 and str(out) in pulled.stderr


def test_a_retried_dir_job_removes_what_its_killed_attempt_left(tmp_path: Path) -> None:
    from worker.targets import DirTarget

    killed = tmp_path / ".published.partial-job-abc123-0f0f0f0f"  # this job, an earlier attempt
    other = tmp_path / ".published.partial-job-abc1234-1e1e1e1e"  # another job (longer id)
    for leftover in (killed, other):
        (leftover / "model.safetensors").parent.mkdir()
        (leftover / "model.safetensors").write_bytes(b"half written")
    staging = DirTarget(tmp_path / "published").staging(tmp_path / "work" / "job-abc123-2d2d2d2d")
    assert staging == tmp_path / ".published.partial-job-abc123-2d2d2d2d"
    assert not killed.exists() and other.exists()


def test_a_dir_merge_removes_staging_that_ended_jobs_left_and_no_other(
    server: RunningServer,
    adapter_dir: Callable[..., Path],
    base_dir: Callable[..., Path],
    tmp_path: Path,
) -> None:
    """A worker killed mid-merge into dir:PATH whose job is never retried (cancelled, or out of
    attempts) leaves a staging folder beside PATH: the next merge into PATH removes it once the
    registry says that job is over. A queued or running job's, or one the registry does not
    know (another registry's worker, on a shared file system), is left alone."""
    from registry.core.jobs import parse_target
    from worker.targets import make_target

    ref = _register(server, base_dir("llama"), adapter_dir("llama"), "org/tiny-llama")

    def request(to: str) -> str:
        done = server.cli("merge", ref, "--to", f"dir:{tmp_path / to}", "--json")
        assert done.returncode == 0, done.stderr
        job_id: str = json.loads(done.stdout)["id"]
        return job_id

    ended, live = request("first"), request("second")
    assert server.cli("jobs", "cancel", ended).returncode == 0
    leftovers = {
        name: tmp_path / f".published.partial-job-{job_id}-0f0f0f0f"
        for name, job_id in (("ended", ended), ("live", live), ("unknown", "f" * 32))
    }
    for leftover in leftovers.values():
        leftover.mkdir()
        (leftover / "model.safetensors").write_bytes(b"half written")
    with server.client(tmp_path / "cache") as client:
        target = make_target(
            parse_target(f"dir:{tmp_path / 'published'}"),
            client=client,
            job_id="a" * 32,
            worker="test",
            adapter=ref,
            base="org/tiny-llama",
        )
        staging = target.staging(tmp_path / "work" / f"job-{'a' * 32}-2d2d2d2d")
    assert staging == tmp_path / f".published.partial-job-{'a' * 32}-2d2d2d2d"
    assert not leftovers["ended"].exists()
    assert leftovers["live"].exists() and leftovers["unknown"].exists()


def test_cancel_a_queued_job_and_list_jobs(
    server: RunningServer, adapter_dir: Callable[..., Path], base_dir: Callable[..., Path]
) -> None:
    ref = _register(server, base_dir("llama"), adapter_dir("llama"), "org/tiny-llama")
    queued = server.cli("merge", ref, "--json")
    assert queued.returncode == 0, queued.stderr
    job = json.loads(queued.stdout)
    assert job["status"] == "queued"
    listed = server.cli("jobs", "--json")
    assert job["id"] in listed.stdout
    cancelled = server.cli("jobs", "cancel", job["id"], "--json")
    assert cancelled.returncode == 0, cancelled.stderr
    assert json.loads(cancelled.stdout)["status"] == "cancelled"
    shown = server.cli("jobs", job["id"])
    assert "cancelled" in shown.stdout
    again = server.cli("jobs", "cancel", job["id"])
    assert again.returncode == 4 and "job_finished" in again.stderr


# A worker whose base reads are slow and announce themselves: the test kills it mid-merge at a
# point it can see, with no timing guesses.
SLOW_WORKER = """
import sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from cli.client import Registry
from worker.runner import Worker
from worker.sources import FolderSource

class SlowSource(FolderSource):
    def read_into(self, path, start, buffer):
        super().read_into(path, start, buffer)
        Path({marker!r}).write_text("reading")
        time.sleep(0.5)

class SlowWorker(Worker):
    def _open_base(self, *args):
        return SlowSource(super()._open_base(*args).root)

worker = SlowWorker(Registry({url!r}), name="doomed", lease_s=5, work_dir=Path({work!r}))
worker.run_once()
"""


def test_a_worker_killed_mid_merge_loses_nothing(
    server: RunningServer,
    worker_process: Callable[..., subprocess.Popen[bytes]],
    adapter_dir: Callable[..., Path],
    base_dir: Callable[..., Path],
    tmp_path: Path,
) -> None:
    base = base_dir("llama", max_shard_size="40KB")
    adapter = adapter_dir("llama", seed=3)
    ref = _register(server, base, adapter, "org/tiny-llama")
    out = tmp_path / "published"
    requested = server.cli("merge", ref, "--base", "org/tiny-llama", "--to", f"dir:{out}", "--json")
    assert requested.returncode == 0, requested.stderr
    job_id = json.loads(requested.stdout)["id"]

    marker = tmp_path / "reading"
    script = SLOW_WORKER.format(
        root=str(ROOT), marker=str(marker), url=server.url, work=str(tmp_path / "doomed")
    )
    env = {**os.environ, **server.env, "LORA_REG_CACHE_DIR": str(tmp_path / "doomed-cache")}
    kill_when(marker, subprocess.Popen([sys.executable, "-c", script], env=env))
    running = json.loads(server.cli("jobs", job_id, "--json").stdout)
    assert running["status"] == "running" and running["worker"] == "doomed"
    assert not out.exists()

    worker_process("--name", "rescuer", "--lease", "10")
    waited = server.cli(
        "merge",
        ref,
        "--base",
        "org/tiny-llama",
        "--to",
        f"dir:{out}",
        "--wait",
        "--json",
        timeout=300,
    )
    assert waited.returncode == 0, waited.stderr
    job = json.loads(waited.stdout)
    assert job["id"] == job_id  # the same job, requeued and finished by the second worker
    assert job["status"] == "succeeded"
    assert job["attempts"] == 2 and job["worker"] == "rescuer"

    version = json.loads(server.cli("show", ref, "--json").stdout)
    uninterrupted = merged_like_a_worker(
        adapter,
        base,
        tmp_path / "uninterrupted",
        ref=ref,
        digest=version["digest"],
        base_id="org/tiny-llama",
    )
    assert folder_bytes(out) == uninterrupted


def test_the_embedded_worker_merges_without_a_second_process(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    adapter_dir: Callable[..., Path],
    base_dir: Callable[..., Path],
) -> None:
    with own_server(request, tmp_path, LORA_REG_EMBEDDED_WORKER="true") as server:
        ref = _register(server, base_dir("llama"), adapter_dir("llama"), "org/tiny-llama")
        merged = server.cli("merge", ref, "--wait", "--json", timeout=300)
        assert merged.returncode == 0, merged.stderr
        job = json.loads(merged.stdout)
        assert job["status"] == "succeeded" and job["worker"].startswith("embedded-")


def test_a_base_on_s3_merged_to_an_s3_prefix(
    server: RunningServer,
    worker_process: Callable[..., subprocess.Popen[bytes]],
    adapter_dir: Callable[..., Path],
    base_dir: Callable[..., Path],
    tmp_path: Path,
) -> None:
    """The worker streams the base with ranged GETs from its S3 prefix and publishes the merge
    under another prefix: complete objects only, no staging objects left."""
    if not server.backend.endswith("s3"):
        pytest.skip("needs the S3 backend")
    from tests.conftest import s3_client

    s3 = s3_client(server.env["AWS_ENDPOINT_URL"])
    bucket = server.bucket
    assert bucket is not None
    base = base_dir("llama", max_shard_size="40KB")
    for path in base.rglob("*"):
        if path.is_file():
            s3.upload_file(str(path), bucket, f"bases/tiny/{path.relative_to(base).as_posix()}")
    adapter = adapter_dir("llama", seed=5)
    name = unique_name()
    added = server.cli("base", "add", "org/tiny-s3", "--from", f"s3://{bucket}/bases/tiny")
    assert added.returncode == 0, added.stderr
    pushed = server.cli("push", str(adapter), name, "--base", "org/tiny-s3", "--json")
    assert pushed.returncode == 0, pushed.stderr
    ref = f"{name}@1"
    worker_process()
    merged = server.cli(
        "merge", ref, "--to", f"s3://{bucket}/merged/tiny", "--wait", "--json", timeout=300
    )
    assert merged.returncode == 0, merged.stderr
    job = json.loads(merged.stdout)
    assert job["result"]["location"] == f"s3://{bucket}/merged/tiny"
    listed = s3.list_objects_v2(Bucket=bucket, Prefix="merged/")
    keys = {item["Key"] for item in listed.get("Contents", [])}
    assert keys == {f"merged/tiny/{f['path']}" for f in job["result"]["files"]}

    version = json.loads(server.cli("show", ref, "--json").stdout)
    local = merged_like_a_worker(
        adapter, base, tmp_path / "local", ref=ref, digest=version["digest"], base_id="org/tiny-s3"
    )
    for path, data in local.items():
        body = s3.get_object(Bucket=bucket, Key=f"merged/tiny/{path}")["Body"].read()
        assert body == data, path


def test_a_result_the_server_refuses_fails_the_job_with_the_reason(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    adapter_dir: Callable[..., Path],
    base_dir: Callable[..., Path],
) -> None:
    """The worker merged, but the server will not record the output (larger than it accepts):
    the job ends failed with the server's code, instead of staying running until its lease."""
    with own_server(request, tmp_path, LORA_REG_MAX_BASE_BYTES="1000") as server:
        name = unique_name()
        added = server.cli("base", "add", "org/tiny-llama", "--from", str(base_dir("llama")))
        assert added.returncode == 0, added.stderr
        pushed = server.cli("push", str(adapter_dir("llama")), name, "--base", "org/tiny-llama")
        assert pushed.returncode == 0, pushed.stderr
        out = tmp_path / "published"
        queued = server.cli("merge", f"{name}@1", "--to", f"dir:{out}", "--json")
        assert queued.returncode == 0, queued.stderr
        worker = server.cli("worker", "--once", env={"TMPDIR": str(tmp_path)})
        assert worker.returncode == 0, worker.stderr
        job = json.loads(server.cli("jobs", json.loads(queued.stdout)["id"], "--json").stdout)
        assert job["status"] == "failed"
        assert job["error"]["code"] == "version_too_large"
        assert "merged checkpoint" in job["error"]["message"]
        assert "LORA_REG_MAX_BASE_BYTES" in job["error"]["message"]
