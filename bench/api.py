"""API benchmark: our server and MLflow's model registry server, side by side, under `wrk`.

Both servers run on the same PostgreSQL (127.0.0.1:5432, trust, user postgres), each on a fresh
database made for it, with each server's default configuration and again with equal process
counts (`--equal-workers`, default 1). MLflow is installed by the benchmark into its own virtual
environment under ~/.cache/lora-registry-bench/ (never a dependency of this project). Each
server gets 20 registered adapters / models with 3 versions each (metric rougeL, alias
production -> version 2). Then, for every workload at 1, 8 and 64 connections, `wrk` (a Lua
script adds the token and picks the requests) runs a warm-up and a measured run:

  - get      GET one version           ours: /api/v1/adapters/bench/aNN/versions/N
                                       MLflow: /api/2.0/mlflow/model-versions/get
  - list     list versions by metric   ours: .../versions?sort=-metrics.rougeL
                                       MLflow: model-versions/search, ordered by
                                       creation_timestamp (it cannot sort versions by a metric)
  - resolve  resolve an alias          ours: .../aliases/production
                                       MLflow: registered-models/alias
  - mix      9 GETs : 1 commit         ours: POST .../versions (the push's last step, blobs
                                       already uploaded; each commit makes a new version)
                                       MLflow: model-versions/create (registers a source URI)

Per run: requests per second, p50 and p99 latency, errors (non-2xx, socket errors, timeouts),
server CPU per request (user + system of the server's whole process tree, psutil), PostgreSQL
CPU per request (the backends of that database), transactions per request (the database's
pg_stat_database xact_commit + xact_rollback delta, over the warm-up and the run, after the
statistics settled, less what the idle server does on its own) and new PostgreSQL sessions
during the measured run (pg_stat_database.sessions delta, likewise). wrk's own CPU is reported
too: on a small machine the load tool competes with the server.

From the repository root, with the dev environment installed and `wrk` on PATH (apt-get install
wrk)::

    python -m bench.api                         # everything (~25 min; MLflow installs once)
    python -m bench.api --quick                 # 1 and 64 connections, 4 s runs
    python -m bench.api --servers ours --configs default --workloads get

It prints one table per workload, the targets as PASS/FAIL side by side with MLflow and the
figures measured before the work of issue 18, and writes JSON to bench/results/api.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import psycopg

from bench.common import fmt_ratio, machine_info, print_table
from cli.client import Registry

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "api.json"
PG_ADMIN_URL = os.environ.get("LORA_REG_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
CACHE = Path.home() / ".cache" / "lora-registry-bench"
MLFLOW_VERSION = "3.17.2"
ADAPTERS = 20
VERSIONS = 3
ALIAS = "production"
WRITE_EVERY = 10  # the mix: one commit per 10 requests
WORKLOADS = ("get", "list", "resolve", "mix")
READ_WORKLOADS = ("get", "list", "resolve")
# PostgreSQL writes a backend's counters to pg_stat_database at most once a second while it
# works, and 10 s after it went idle (PGSTAT_IDLE_INTERVAL): wait that long before reading them.
STATS_SETTLE_S = 11.0

# Targets at 64 connections (issue 18), checked on each read workload.
TARGET_RPS_VS_MLFLOW = 3.0
TARGET_P99_MS = 100.0
TARGET_CPU_MS = 1.5
TARGET_XACT = 1.0
TARGET_SESSIONS = 0

# The figures of issue 18, measured before this work on the same kind of 2-CPU VM (GET version,
# 64 connections): ours with one process (its default then) against MLflow 3.17's default (four
# workers) and with one process each.
BEFORE = {
    "rps": 150.0,
    "rps_vs_mlflow_default": 0.81,
    "rps_vs_mlflow_equal": 1.48,
    "p50_ms": 400.0,
    "p99_ms": "550-850",
    "cpu_ms": 6.6,
    "cpu_ms_1_connection": 4.4,
    "xact": 4.0,
    "sessions": "180-400 per 15 s",
}


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# --- PostgreSQL ----------------------------------------------------------------------------------


def create_database(role: str) -> str:
    name = f"api_bench_{role}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return name


def drop_database(name: str) -> None:
    assert name.startswith("api_bench_")
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def database_url(name: str, driver: str = "postgresql") -> str:
    return f"{driver}://postgres@127.0.0.1:5432/{name}"


@dataclass(frozen=True)
class PgStats:
    transactions: int
    sessions: int | None  # pg_stat_database.sessions (PostgreSQL 14+)


def pg_stats(database: str) -> PgStats:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as connection:
        connection.execute("SELECT pg_stat_clear_snapshot()")
        columns = {
            row[0]
            for row in connection.execute(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_name = 'pg_stat_database'"
            )
        }
        sessions = "sessions" if "sessions" in columns else "NULL::bigint"
        row = connection.execute(
            f"SELECT xact_commit + xact_rollback, {sessions} FROM pg_stat_database "
            "WHERE datname = %s",
            (database,),
        ).fetchone()
    assert row is not None
    return PgStats(int(row[0]), None if row[1] is None else int(row[1]))


def postgres_version() -> str:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as connection:
        row = connection.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "?"


# --- CPU -----------------------------------------------------------------------------------------


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by a process and all its descendants alive now."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def backends_cpu(database: str) -> dict[int, float]:
    """CPU seconds used so far by each PostgreSQL backend connected to `database`, by pid."""
    seconds: dict[int, float] = {}
    for process in psutil.process_iter(["cmdline", "cpu_times"]):
        cmdline = " ".join(process.info["cmdline"] or ())
        times = process.info["cpu_times"]
        if times is not None and cmdline.startswith("postgres: ") and f" {database} " in cmdline:
            seconds[process.pid] = times.user + times.system
    return seconds


def backends_cpu_used(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds the backends used between two `backends_cpu` readings (a backend that ended
    in between is missed: the figure is a lower bound when a pool churns)."""
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())


# --- servers -------------------------------------------------------------------------------------


@dataclass
class Server:
    """A running server under test: its process tree, its database, and what wrk needs."""

    kind: str  # "ours" | "mlflow"
    config: str  # "default" | "equal"
    workers: str  # how many processes serve, e.g. "4 processes"
    url: str
    database: str
    process: subprocess.Popen[bytes]
    workdir: Path
    headers: dict[str, str] = field(default_factory=dict)  # sent with every request
    requests: dict[str, list[str]] = field(default_factory=dict)  # workload -> read requests
    writes: list[str] = field(default_factory=list)  # the mix's commit requests, "POST\tpath\tbody"

    @property
    def label(self) -> str:
        name = "ours" if self.kind == "ours" else "MLflow"
        return f"{name}, {self.config}: {self.workers}"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(process: subprocess.Popen[bytes], url: str, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url} exited with {process.returncode}:\n{log_path.read_text()}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer in {timeout:.0f} s:\n{log_path.read_text()}")


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def lora_reg() -> list[str]:
    script = Path(sys.executable).parent / "lora-reg"
    return [str(script)] if script.exists() else [sys.executable, "-m", "cli.main"]


def processes(count: int | str) -> str:
    return f"{count} process" + ("" if str(count) == "1" else "es")


def has_workers_option() -> bool:
    """Whether `lora-reg server` takes --workers (before issue 18 it always ran one process)."""
    help_text = subprocess.run(
        [*lora_reg(), "server", "--help"], capture_output=True, text=True, check=False
    ).stdout
    return "--workers" in help_text


def our_default_workers(log_path: Path) -> str:
    """How many processes `lora-reg server` started without --workers (its start-up line says
    'with N worker processes'; a server without the option runs one)."""
    match = re.search(r"with (\d+) worker process", log_path.read_text(errors="replace"))
    return processes(match.group(1) if match else 1)


def start_ours(config: str, workers: int | None, work: Path) -> Server:
    database = create_database("ours")
    workdir = work / f"ours-{config}"
    workdir.mkdir(parents=True)
    env = {
        **os.environ,
        "LORA_REG_DATABASE_URL": database_url(database),
        "LORA_REG_STORAGE_URL": f"file://{workdir}/objects",
        "LORA_REG_BOOTSTRAP_TOKEN_FILE": str(workdir / "admin-token"),
    }
    migrate = subprocess.run(
        [*lora_reg(), "db", "upgrade"], cwd=workdir, env=env, capture_output=True, text=True
    )
    if migrate.returncode:
        raise RuntimeError(f"lora-reg db upgrade failed: {migrate.stderr}")
    port = free_port()
    command = [*lora_reg(), "server", "--port", str(port), "--log-level", "warning"]
    if workers is not None and (workers != 1 or has_workers_option()):
        command += ["--workers", str(workers)]
    log_path = workdir / "server.log"
    with open(log_path, "wb") as output:
        process = subprocess.Popen(
            command, cwd=workdir, env=env, stdout=output, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(process, f"{url}/healthz", log_path, 120)
    except BaseException:
        stop_process(process)
        drop_database(database)
        raise
    label = processes(workers) if workers is not None else our_default_workers(log_path)
    return Server("ours", config, label, url, database, process, workdir)


def mlflow_python(version: str) -> Path:
    """The python of a virtual environment holding MLflow `version` and psycopg2 (made once)."""
    venv = CACHE / f"mlflow-{version}"
    python = venv / "bin" / "python"
    done = venv / ".installed"
    if done.exists():
        return python
    log(f"installing MLflow {version} into {venv} (once; about a minute)")
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", f"mlflow=={version}", "psycopg2-binary"],
        capture_output=True,
        text=True,
    )
    if install.returncode:
        raise RuntimeError(f"pip install mlflow=={version} failed:\n{install.stderr}")
    done.write_text(version + "\n")
    return python


def start_mlflow(config: str, workers: int | None, work: Path, version: str) -> Server:
    python = mlflow_python(version)
    database = create_database("mlflow")
    workdir = work / f"mlflow-{config}"
    workdir.mkdir(parents=True)
    port = free_port()
    # Plain postgresql:// picks psycopg 3, which MLflow's environment lacks.
    command = [
        str(python.parent / "mlflow"), "server",
        "--backend-store-uri", database_url(database, "postgresql+psycopg2"),
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    if workers is not None:
        command += ["--workers", str(workers)]
    log_path = workdir / "server.log"
    with open(log_path, "wb") as output:
        process = subprocess.Popen(
            command, cwd=workdir, stdout=output, stderr=subprocess.STDOUT,
            env={**os.environ, "PATH": f"{python.parent}{os.pathsep}{os.environ['PATH']}"},
            start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(process, f"{url}/health", log_path, 300)
    except BaseException:
        stop_process(process)
        drop_database(database)
        raise
    label = processes(workers if workers is not None else 4)  # its documented default
    return Server("mlflow", config, label, url, database, process, workdir)


def stop(server: Server) -> None:
    stop_process(server.process)
    drop_database(server.database)


# --- seeding -------------------------------------------------------------------------------------


def write_adapter(directory: Path, seed: int) -> None:
    """A small valid LoRA adapter (r=8, two layers of q/v projections, random float32)."""
    rng = random.Random(seed)
    directory.mkdir(parents=True)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "bench/base",
        "r": 8,
        "lora_alpha": 16,
        "target_modules": ["q_proj", "v_proj"],
    }
    (directory / "adapter_config.json").write_text(json.dumps(config))
    header: dict[str, Any] = {}
    offset = 0
    for layer in range(2):
        for module in ("q_proj", "v_proj"):
            key = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            for part, shape in (("lora_A", [8, 256]), ("lora_B", [256, 8])):
                size = 4 * shape[0] * shape[1]
                header[f"{key}.{part}.weight"] = {
                    "dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size],
                }  # fmt: skip
                offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    data = struct.pack("<Q", len(raw)) + raw + rng.randbytes(offset)
    (directory / "adapter_model.safetensors").write_bytes(data)


def seed_ours(server: Server, work: Path) -> None:
    token = (server.workdir / "admin-token").read_text().strip()
    with Registry(server.url, token, cache_dir=work / "client-cache") as admin:
        # wrk sends a write token (the mix commits); every GET reads like a read token would.
        secret = admin.create_token(f"bench-{uuid.uuid4().hex[:6]}", "write").token
        folders = work / f"adapters-{server.config}"
        files: list[dict[str, Any]] = []
        for index in range(ADAPTERS):
            for number in range(1, VERSIONS + 1):
                folder = folders / f"a{index:02d}-v{number}"
                write_adapter(folder, seed=index * 100 + number)
                admin.push(
                    folder, f"bench/a{index:02d}", metrics={"rougeL": round(0.3 + number / 10, 2)}
                )
            admin.set_alias(f"bench/a{index:02d}@2", ALIAS)
        # The mix commits new versions of other adapters, so the read workloads see the same data.
        for index in range(ADAPTERS):
            folder = folders / f"m{index:02d}"
            write_adapter(folder, seed=10_000 + index)
            admin.push(folder, f"bench/m{index:02d}")
        version = admin.get("bench/m00@1")
        files = [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in version.files or []]
    server.headers = {"Authorization": f"Bearer {secret}"}
    prefix = "/api/v1/adapters/bench"
    pairs = [(index, number) for index in range(ADAPTERS) for number in range(1, VERSIONS + 1)]
    server.requests = {
        "get": [f"GET\t{prefix}/a{i:02d}/versions/{n}\t" for i, n in pairs],
        "list": [
            f"GET\t{prefix}/a{i:02d}/versions?sort=-metrics.rougeL\t" for i in range(ADAPTERS)
        ],
        "resolve": [f"GET\t{prefix}/a{i:02d}/aliases/{ALIAS}\t" for i in range(ADAPTERS)],
    }
    server.requests["mix"] = server.requests["get"]
    # The version's files plus a copy of one under a path of its own make a new version per
    # commit (the version's digest covers its paths), so the mix needs no uploads.
    server.writes = [
        "POST\t{path}\t{body}".format(
            path=f"{prefix}/m{n % ADAPTERS:02d}/versions",
            body=json.dumps(
                {"files": [*files, {**files[0], "path": f"mix/{n:06d}/{files[0]['path']}"}]},
                separators=(",", ":"),
            ),
        )
        for n in range(60_000)
    ]


def seed_mlflow(server: Server) -> None:
    api = f"{server.url}/api/2.0/mlflow"
    with httpx.Client(timeout=30) as http:

        def post(path: str, body: dict[str, Any]) -> dict[str, Any]:
            response = http.post(f"{api}/{path}", json=body)
            response.raise_for_status()
            result: dict[str, Any] = response.json()
            return result

        for prefix in ("a", "m"):
            for index in range(ADAPTERS):
                name = f"bench-{prefix}{index:02d}"
                post("registered-models/create", {"name": name})
                for number in range(1, VERSIONS + 1 if prefix == "a" else 2):
                    post(
                        "model-versions/create",
                        {"name": name, "source": f"s3://bench/{name}/{number}"},
                    )
                if prefix == "a":
                    post("registered-models/alias", {"name": name, "alias": ALIAS, "version": "2"})
    pairs = [(index, number) for index in range(ADAPTERS) for number in range(1, VERSIONS + 1)]
    base = "/api/2.0/mlflow"
    server.requests = {
        "get": [
            f"GET\t{base}/model-versions/get?name=bench-a{i:02d}&version={n}\t" for i, n in pairs
        ],
        "list": [
            f"GET\t{base}/model-versions/search?filter=name%3D%27bench-a{i:02d}%27"
            f"&order_by=creation_timestamp%20DESC&max_results=50\t"
            for i in range(ADAPTERS)
        ],
        "resolve": [
            f"GET\t{base}/registered-models/alias?name=bench-a{i:02d}&alias={ALIAS}\t"
            for i in range(ADAPTERS)
        ],
    }
    server.requests["mix"] = server.requests["get"]
    server.writes = [
        "POST\t{path}\t{body}".format(
            path=f"{base}/model-versions/create",
            body=json.dumps(
                {"name": f"bench-m{n % ADAPTERS:02d}", "source": f"s3://bench/mix/{n}"},
                separators=(",", ":"),
            ),
        )
        for n in range(60_000)
    ]


def check_requests(server: Server) -> None:
    """The first requests of every workload, and the mix's last commit, answer 2xx before
    anything is measured."""
    lines = [line for workload in READ_WORKLOADS for line in server.requests[workload][:3]]
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=30) as http:
        for line in [*lines, server.writes[-1]]:
            method, path, body = line.split("\t", 2)
            response = http.request(
                method, path, content=body or None, headers={"Content-Type": "application/json"}
            )
            if not response.is_success:
                raise RuntimeError(f"{server.label}: {method} {path}: {response.text[:300]}")


# --- wrk -----------------------------------------------------------------------------------------

LUA = r"""
-- Written by bench/api.py. Each wrk thread reads its requests from files in the folder given
-- after `--`: reads.tsv (cycled) and, for the mix, writes-<thread>.tsv (each sent once, every
-- WRITE_EVERY-th request). Lines are METHOD<TAB>PATH<TAB>BODY.
local headers = HEADERS
local write_every = WRITE_EVERY
local counter = 0
local reads, writes = {}, {}
local next_read, next_write = 1, 1
local threads = 0

function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end

local function load(path, into)
  local file = io.open(path, "r")
  if file == nil then return end
  for line in file:lines() do
    local method, target, body = line:match("^(%u+)\t([^\t]+)\t(.*)$")
    local h = {}
    for k, v in pairs(headers) do h[k] = v end
    if body == "" then body = nil else h["Content-Type"] = "application/json" end
    into[#into + 1] = wrk.format(method, target, h, body)
  end
  file:close()
end

function init(args)
  load(args[1] .. "/reads.tsv", reads)
  load(args[1] .. "/writes-" .. tid .. ".tsv", writes)
  next_read = (tid * 7) % #reads + 1
end

function request()
  counter = counter + 1
  if #writes > 0 and counter % write_every == 0 then
    local r = writes[next_write]
    next_write = next_write % #writes + 1
    return r
  end
  local r = reads[next_read]
  next_read = next_read % #reads + 1
  return r
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, ' ..
    '"max_us": %d, "connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.max, e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def lua_script(headers: dict[str, str]) -> str:
    table = ", ".join(f'["{key}"] = "{value}"' for key, value in headers.items())
    return LUA.replace("HEADERS", "{" + table + "}").replace("WRITE_EVERY", str(WRITE_EVERY))


@dataclass
class WrkResult:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int
    wrk_cpu_s: float


def run_wrk(
    server: Server, folder: Path, connections: int, seconds: float, threads: int
) -> WrkResult:
    command = [
        "wrk", "-t", str(min(threads, connections)), "-c", str(connections),
        "-d", f"{seconds:g}s", "--timeout", "10s", "-s", str(folder / "script.lua"),
        server.url, "--", str(folder),
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert process.stdout is not None
    output = process.stdout.read().decode()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    match = re.search(r"^BENCH_JSON (.*)$", output, re.MULTILINE)
    if process.returncode or match is None:
        raise RuntimeError(f"wrk failed ({process.returncode}):\n{output}")
    data = json.loads(match.group(1))
    errors = sum(data[key] for key in ("connect", "read", "write", "status", "timeout"))
    return WrkResult(
        requests=data["requests"],
        seconds=data["duration_us"] / 1e6,
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        errors=errors,
        wrk_cpu_s=usage.ru_utime + usage.ru_stime,
    )


def prepare_requests(server: Server, workload: str, folder: Path, threads: int, cell: int) -> None:
    """The files the Lua script reads: the workload's reads and, for the mix, commits that no
    earlier cell of the workload (`cell`: its index) sent, so each creates a version."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (folder / "script.lua").write_text(lua_script(server.headers))
    reads = list(server.requests[workload])
    random.Random(cell).shuffle(reads)
    (folder / "reads.tsv").write_text("\n".join(reads) + "\n")
    if workload != "mix":
        return
    share = len(server.writes) // (threads * 4)  # 3 connection counts, the last line checked
    for thread in range(threads):
        start = (cell * threads + thread) * share
        lines = server.writes[start : start + share]
        (folder / f"writes-{thread + 1}.tsv").write_text("\n".join(lines) + "\n")


# --- measuring -----------------------------------------------------------------------------------


@dataclass
class Cell:
    """One workload at one connection count against one server."""

    server: str
    kind: str
    config: str
    workload: str
    connections: int
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_ms: float  # server process tree, per request
    pg_cpu_ms: float  # the database's backends, per request
    wrk_cpu_ms: float
    xact: float | None  # PostgreSQL transactions per request
    sessions: float | None  # new PostgreSQL sessions during the measured run
    warmup_requests: int


@dataclass
class Background:
    """What an idle server does to its database on its own (its background threads)."""

    transactions_per_s: float
    sessions_per_s: float


def measure_background(server: Server, seconds: float) -> Background:
    started = pg_stats(server.database)
    began = time.monotonic()
    time.sleep(seconds + STATS_SETTLE_S)
    ended = pg_stats(server.database)
    elapsed = time.monotonic() - began
    sessions = (
        (ended.sessions - started.sessions) / elapsed
        if ended.sessions is not None and started.sessions is not None
        else 0.0
    )
    return Background((ended.transactions - started.transactions) / elapsed, sessions)


def measure(
    server: Server,
    workload: str,
    connections: int,
    args: argparse.Namespace,
    background: Background,
    cell: int,
    work: Path,
) -> Cell:
    folder = work / "wrk"
    threads = args.wrk_threads
    prepare_requests(server, workload, folder, threads, cell)
    # The statistics settled after the previous cell: count transactions from here, over the
    # warm-up too (same workload, same concurrency), so they need one settle per cell.
    before = pg_stats(server.database)
    began = time.monotonic()
    warmup = run_wrk(server, folder, connections, args.warmup, threads)
    # Sessions opened while warming up are flushed with their first transaction: count new
    # sessions from here, so a pool that reached its steady size shows 0.
    steady = pg_stats(server.database)
    steady_at = time.monotonic()
    cpu_before, pg_cpu_before = tree_cpu(server.process.pid), backends_cpu(server.database)
    result = run_wrk(server, folder, connections, args.duration, threads)
    cpu = tree_cpu(server.process.pid) - cpu_before
    pg_cpu = backends_cpu_used(pg_cpu_before, backends_cpu(server.database))
    time.sleep(STATS_SETTLE_S)
    after = pg_stats(server.database)
    ended = time.monotonic()
    total = warmup.requests + result.requests
    xact = (
        after.transactions - before.transactions - background.transactions_per_s * (ended - began)
    ) / max(total, 1)
    sessions = None
    if after.sessions is not None and steady.sessions is not None:
        sessions = max(
            0.0, after.sessions - steady.sessions - background.sessions_per_s * (ended - steady_at)
        )
    requests = max(result.requests, 1)
    return Cell(
        server=server.label,
        kind=server.kind,
        config=server.config,
        workload=workload,
        connections=connections,
        requests=result.requests,
        seconds=result.seconds,
        rps=result.requests / result.seconds,
        p50_ms=result.p50_ms,
        p99_ms=result.p99_ms,
        errors=result.errors,
        cpu_ms=cpu / requests * 1000,
        pg_cpu_ms=pg_cpu / requests * 1000,
        wrk_cpu_ms=result.wrk_cpu_s / requests * 1000,
        xact=xact,
        sessions=sessions,
        warmup_requests=warmup.requests,
    )


@contextlib.contextmanager
def running(kind: str, config: str, args: argparse.Namespace, work: Path) -> Iterator[Server]:
    workers = args.equal_workers if config == "equal" else None
    if kind == "ours":
        server = start_ours(config, workers, work)
    else:
        server = start_mlflow(config, workers, work, args.mlflow_version)
    try:
        yield server
    finally:
        stop(server)


def bench_server(
    kind: str, config: str, args: argparse.Namespace, work: Path
) -> tuple[list[Cell], dict[str, Any]]:
    with running(kind, config, args, work) as server:
        log(f"{server.label}: started on {server.url}, database {server.database}; seeding")
        if kind == "ours":
            seed_ours(server, work)
        else:
            seed_mlflow(server)
        check_requests(server)
        log(f"{server.label}: measuring what it does to the database when idle")
        background = measure_background(server, args.duration)
        cells: list[Cell] = []
        for workload in args.workloads:
            for index, connections in enumerate(args.connections):
                log(f"{server.label}: {workload} at {connections} connection(s)")
                cell = measure(server, workload, connections, args, background, index, work)
                log(
                    f"  {cell.rps:,.0f} rps, p50 {cell.p50_ms:.1f} ms, p99 {cell.p99_ms:.1f} ms,"
                    f" {cell.errors} errors, {cell.cpu_ms:.2f} ms CPU/req, xact/req "
                    f"{fmt(cell.xact)}, new sessions {fmt(cell.sessions, 0)}"
                )
                cells.append(cell)
        info = {
            "label": server.label,
            "workers": server.workers,
            "database": server.database,
            "background": asdict(background),
        }
    return cells, info


# --- the report ----------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def find(cells: list[Cell], kind: str, config: str, workload: str, connections: int) -> Cell | None:
    for cell in cells:
        if (cell.kind, cell.config, cell.workload, cell.connections) == (
            kind,
            config,
            workload,
            connections,
        ):
            return cell
    return None


def print_workload(cells: list[Cell], workload: str, connections: list[int]) -> None:
    head = ["server", "conns", "rps", "vs MLflow", "p50 ms", "p99 ms", "errors", "CPU ms/req"]
    head += ["PG CPU ms/req", "wrk CPU ms/req", "xact/req", "new sessions"]
    rows: list[list[str]] = []
    for config in ("default", "equal"):
        for count in connections:
            mlflow = find(cells, "mlflow", config, workload, count)
            for kind in ("ours", "mlflow"):
                cell = find(cells, kind, config, workload, count)
                if cell is None:
                    continue
                ratio = cell.rps / mlflow.rps if kind == "ours" and mlflow else None
                rows.append(
                    [
                        cell.server,
                        str(count),
                        f"{cell.rps:,.0f}",
                        fmt_ratio(ratio),
                        f"{cell.p50_ms:.1f}",
                        f"{cell.p99_ms:.1f}",
                        str(cell.errors),
                        f"{cell.cpu_ms:.2f}",
                        f"{cell.pg_cpu_ms:.2f}",
                        f"{cell.wrk_cpu_ms:.2f}",
                        fmt(cell.xact),
                        fmt(cell.sessions, 0),
                    ]
                )
    if rows:
        print(f"\n{workload}: {WORKLOAD_TITLES[workload]}")
        print_table(head, rows)


WORKLOAD_TITLES = {
    "get": "GET one version (MLflow: model-versions/get)",
    "list": "list an adapter's versions sorted by a metric (MLflow: model-versions/search "
    "ordered by creation_timestamp: it cannot sort versions by a metric)",
    "resolve": "resolve an alias (MLflow: registered-models/alias)",
    "mix": f"{WRITE_EVERY - 1} GETs of a version to 1 commit of a new version (ours: POST "
    ".../versions of uploaded blobs, the push's last step; MLflow: model-versions/create)",
}


def targets(cells: list[Cell], top: int) -> list[dict[str, Any]]:
    """Each target for each read workload at `top` connections, ours default vs MLflow's."""
    results: list[dict[str, Any]] = []
    for workload in READ_WORKLOADS:
        ours = find(cells, "ours", "default", workload, top)
        mlflow = find(cells, "mlflow", "default", workload, top)
        if ours is None:
            continue
        checks: list[tuple[str, Any, Any, bool | None, str]] = []
        ratio = ours.rps / mlflow.rps if mlflow else None
        checks.append(
            (
                f"rps >= {TARGET_RPS_VS_MLFLOW:g}x MLflow's default",
                f"{ours.rps:,.0f} ({fmt_ratio(ratio)})",
                f"{mlflow.rps:,.0f}" if mlflow else "-",
                None if ratio is None else ratio >= TARGET_RPS_VS_MLFLOW,
                f"{BEFORE['rps']:,.0f} ({fmt_ratio(BEFORE['rps_vs_mlflow_default'])})",
            )
        )
        checks.append(
            (
                f"p99 <= {TARGET_P99_MS:g} ms",
                f"{ours.p99_ms:.1f}",
                f"{mlflow.p99_ms:.1f}" if mlflow else "-",
                ours.p99_ms <= TARGET_P99_MS,
                str(BEFORE["p99_ms"]),
            )
        )
        checks.append(
            (
                f"server CPU <= {TARGET_CPU_MS:g} ms per request",
                f"{ours.cpu_ms:.2f}",
                f"{mlflow.cpu_ms:.2f}" if mlflow else "-",
                ours.cpu_ms <= TARGET_CPU_MS,
                f"{BEFORE['cpu_ms']}",
            )
        )
        checks.append(
            (
                f"{TARGET_XACT:g} transaction per request",
                fmt(ours.xact),
                fmt(mlflow.xact) if mlflow else "-",
                None if ours.xact is None else round(ours.xact, 1) <= TARGET_XACT,
                f"{BEFORE['xact']:g}",
            )
        )
        checks.append(
            (
                f"{TARGET_SESSIONS} new PostgreSQL sessions",
                fmt(ours.sessions, 0),
                fmt(mlflow.sessions, 0) if mlflow else "-",
                None if ours.sessions is None else round(ours.sessions) <= TARGET_SESSIONS,
                str(BEFORE["sessions"]),
            )
        )
        for name, ours_value, mlflow_value, passed, before in checks:
            results.append(
                {
                    "workload": workload,
                    "target": name,
                    "ours": ours_value,
                    "mlflow": mlflow_value,
                    "passed": passed,
                    # the issue measured GET version only
                    "before": before if workload == "get" else "-",
                }
            )
    return results


def print_targets(results: list[dict[str, Any]], top: int) -> None:
    if not results:
        return
    print(
        f"\nTargets at {top} connections, each server's default configuration (before: issue 18, "
        f"GET version, ours then one process; {BEFORE['cpu_ms_1_connection']} ms CPU/GET at 1 "
        f"connection; {fmt_ratio(BEFORE['rps_vs_mlflow_equal'])} MLflow with one process each)"
    )
    head = ["", "workload", "target", "ours", "MLflow", "before"]
    rows = [
        [
            {True: "PASS", False: "FAIL", None: "n/a"}[result["passed"]],
            result["workload"],
            result["target"],
            result["ours"],
            result["mlflow"],
            result["before"],
        ]
        for result in results
    ]
    print_table(head, rows, right={3, 4, 5})


def wrk_version() -> str:
    output = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
    return (output.stdout or output.stderr).splitlines()[0].strip()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.api",
        description="Our API server and MLflow's registry server side by side under wrk.",
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run (10)")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up (3)")
    parser.add_argument(
        "--connections", default="1,8,64", help="comma-separated connection counts (1,8,64)"
    )
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="get,list,resolve,mix")
    parser.add_argument("--servers", default="ours,mlflow", help="ours,mlflow")
    parser.add_argument("--configs", default="default,equal", help="default,equal")
    parser.add_argument(
        "--equal-workers", type=int, default=1, help="processes of each server in 'equal' (1)"
    )
    parser.add_argument("--wrk-threads", type=int, default=2, help="wrk threads (2)")
    parser.add_argument("--mlflow-version", default=MLFLOW_VERSION, help=f"({MLFLOW_VERSION})")
    parser.add_argument("--quick", action="store_true", help="1 and 64 connections, 4 s runs")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (path printed)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results path")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.warmup, args.connections = 4.0, 2.0, "1,64"
    args.connections = [int(count) for count in args.connections.split(",")]
    args.workloads = [name for name in args.workloads.split(",") if name]
    args.servers = [name for name in args.servers.split(",") if name]
    args.configs = [name for name in args.configs.split(",") if name]
    if len(args.connections) > 3:
        parser.error("--connections takes at most 3 counts (the mix has commits for 3 runs)")
    for name in args.workloads:
        if name not in WORKLOADS:
            parser.error(f"unknown workload {name!r}: use {', '.join(WORKLOADS)}")
    if not set(args.servers) <= {"ours", "mlflow"} or not set(args.configs) <= {"default", "equal"}:
        parser.error("--servers takes ours,mlflow and --configs default,equal")
    if shutil.which("wrk") is None:
        parser.error("wrk is not on PATH: apt-get install wrk")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    work = Path(tempfile.mkdtemp(prefix="lora-bench-api-"))
    log(f"load tool: {wrk_version()}; work dir {work}")
    cells: list[Cell] = []
    servers: list[dict[str, Any]] = []
    try:
        for config in args.configs:
            for kind in args.servers:
                server_cells, info = bench_server(kind, config, args, work)
                cells += server_cells
                servers.append(info)
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    top = max(args.connections)
    results = targets(cells, top)
    report = {
        "benchmark": "api",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "load_tool": wrk_version(),
        "machine": machine_info(("fastapi", "starlette", "uvicorn", "sqlalchemy", "psycopg"))
        | {"postgresql": postgres_version(), "mlflow": args.mlflow_version},
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "connections": args.connections,
        "wrk_threads": args.wrk_threads,
        "seed": {"adapters": ADAPTERS, "versions_each": VERSIONS, "alias": ALIAS},
        "servers": servers,
        "cells": [asdict(cell) for cell in cells],
        "targets": results,
        "before": BEFORE,
    }
    machine = report["machine"]
    print(
        f"Machine: {machine['cpu_count']} CPUs ({machine['cpu_model']}), Python "
        f"{machine['python']}, PostgreSQL {machine['postgresql']}, MLflow {args.mlflow_version}; "
        f"load tool: {report['load_tool']} ({args.wrk_threads} threads), {args.duration:g} s runs "
        f"after {args.warmup:g} s of warm-up"
    )
    for workload in args.workloads:
        print_workload(cells, workload, args.connections)
    print_targets(results, top)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
