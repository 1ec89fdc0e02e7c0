"""UI benchmark: how long each main page of the web UI takes on a large registry, side by side with
the REST API call(s) that return the same data (issue 17: every page in <= 50 ms with 1,000
adapters and 10,000 versions in PostgreSQL).

It makes a fresh PostgreSQL database (127.0.0.1:5432, trust, user postgres), migrates it and
seeds it with 4 base models (one the adapters fit, three they do not, so versions carry
compatibility reports of both kinds), 1,000 adapters in 20 namespaces with 10,000 versions (one
adapter with 1,000, the others 9 or 10), each version with three metrics, two labels, lineage
and a description; staging and production moved on every adapter (hundreds of moves on the big
one), a few versions yanked and 200 merge jobs queued. Seeding runs in-process. Through the app's
own REST routes over ASGI (`TestClient(create_app(...))`: the routes, services and SQL a push
uses, without sockets): the blobs, the bases, the first version on each base, every alias move,
yank and merge request. The other versions (a push costs 20-60 ms here, 10,000 of them ten
minutes) are written in bulk through the registry's models as the push writes them: the version
row with what its base's pushed version computed (config, compatibility report), its files,
metrics and labels rows, and its `version.push` event through `registry.events.service.record`.
Every version is made of the same two uploaded blobs plus one under a path of its own (a
version's digest covers its paths), so seeding uploads three blobs in all.

Then it starts a real `lora-reg server` on that database (auth off, no embedded worker) and,
for every page, times from one keep-alive httpx client on loopback the page and, right after it,
the API request(s) returning the same data as near as the API allows (listed per page in the
table), `--rounds` times after a warm-up: median and p95 of the client-observed wall time
(request sent to last byte read; the server adds nothing). Last, the same pages in-process
(`TestClient` on an app built on the same database: no socket, no second process) with the SQL
statements each runs (an engine event listener) and the time spent rendering Jinja templates
(`jinja2.Template.render` wrapped for the run), so a slow page shows where its time goes.

From the repository root, with the dev environment installed::

    python -m bench.ui                       # seed, measure, drop the database
    python -m bench.ui --work /tmp/ui-bench  # keep the seeded database and reuse it next time
    python -m bench.ui --rounds 50 --out /tmp/ui.json

It prints one table and the target as PASS/FAIL per page (median of the client-observed time
<= 50 ms), and writes JSON to bench/results/ui.json.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import signal
import statistics
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
import psycopg

from bench.common import fmt_ratio, machine_info, print_table

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "ui.json"
PG_ADMIN_URL = os.environ.get("LORA_REG_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
DB_PREFIX = "ui_bench_"
TARGET_MS = 50.0
NAMESPACES = 20
KINDS = ("summarizer", "translator", "classifier", "coder")
HIDDEN = 256
FIT_BASE = "bench/base-0"  # the adapters' shapes fit it; the other bases they do not
SEEDED_MARK = "seeded.json"


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# --- PostgreSQL ----------------------------------------------------------------------------------


def create_database() -> str:
    name = f"{DB_PREFIX}{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return name


def drop_database(name: str) -> None:
    assert name.startswith(DB_PREFIX)
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def database_exists(name: str) -> bool:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as connection:
        row = connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
    return row is not None


def database_url(name: str) -> str:
    return PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"


def postgres_version() -> str:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as connection:
        row = connection.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "?"


# --- what is seeded ------------------------------------------------------------------------------


def base_signature(hidden: int) -> dict[str, Any]:
    """A 2-layer Llama-shaped base's config and tensor headers (what `base add` sends)."""
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "vocab_size": 1000,
        "tie_word_embeddings": False,
    }
    tensors: dict[str, Any] = {
        "model.embed_tokens.weight": [1000, hidden],
        "model.norm.weight": [hidden],
        "lm_head.weight": [1000, hidden],
    }
    for layer in range(2):
        prefix = f"model.layers.{layer}"
        for module in ("q_proj", "k_proj", "v_proj", "o_proj"):
            tensors[f"{prefix}.self_attn.{module}.weight"] = [hidden, hidden]
        tensors[f"{prefix}.mlp.gate_proj.weight"] = [2 * hidden, hidden]
        tensors[f"{prefix}.mlp.up_proj.weight"] = [2 * hidden, hidden]
        tensors[f"{prefix}.mlp.down_proj.weight"] = [hidden, 2 * hidden]
        tensors[f"{prefix}.input_layernorm.weight"] = [hidden]
        tensors[f"{prefix}.post_attention_layernorm.weight"] = [hidden]
    return {
        "config": config,
        "tensors": {
            name: {"dtype": "BF16", "shape": shape, "shard": "model.safetensors"}
            for name, shape in tensors.items()
        },
    }


def adapter_files() -> dict[str, bytes]:
    """A small valid PEFT LoRA adapter for the fitting base (r=8 on q/v of both layers)."""
    rng = random.Random(17)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": FIT_BASE,
        "r": 8,
        "lora_alpha": 16,
        "target_modules": ["q_proj", "v_proj"],
    }
    header: dict[str, Any] = {}
    offset = 0
    for layer in range(2):
        for module in ("q_proj", "v_proj"):
            key = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            for part, shape in (("lora_A", [8, HIDDEN]), ("lora_B", [HIDDEN, 8])):
                size = 4 * shape[0] * shape[1]
                header[f"{key}.{part}.weight"] = {
                    "dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size],
                }  # fmt: skip
                offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return {
        "adapter_config.json": json.dumps(config, indent=2).encode(),
        "adapter_model.safetensors": struct.pack("<Q", len(raw)) + raw + rng.randbytes(offset),
        "README.md": b"# A benchmark adapter\n",
    }


@dataclass(frozen=True)
class Sizes:
    adapters: int
    versions: int
    big_versions: int  # on the first adapter, whose page shows "many versions"
    jobs: int


FULL = Sizes(adapters=1_000, versions=10_000, big_versions=1_000, jobs=200)
QUICK = Sizes(adapters=100, versions=1_000, big_versions=200, jobs=20)  # for trying changes


def adapter_names(sizes: Sizes) -> list[str]:
    """team00/big first, then the others spread over the namespaces and kinds."""
    names = ["team00/big"]
    for index in range(1, sizes.adapters):
        names.append(f"team{index % NAMESPACES:02d}/{KINDS[index % len(KINDS)]}-{index:04d}")
    return names


def version_counts(sizes: Sizes) -> list[int]:
    """big_versions for the first adapter, the rest split as evenly as possible."""
    rest, extra = divmod(sizes.versions - sizes.big_versions, sizes.adapters - 1)
    return [sizes.big_versions] + [
        rest + (1 if i < extra else 0) for i in range(sizes.adapters - 1)
    ]


@dataclass
class Seed:
    """What a benchmark database holds, as written to `seeded.json` next to it."""

    database: str
    adapters: int
    versions: int
    big_versions: int
    alias_moves: int
    yanked: int
    jobs: int
    audit_events: int
    seconds: float
    big: str = "team00/big"

    @property
    def version_page(self) -> str:
        return f"{self.big}@{self.big_versions // 2}"


class Api:
    """The app's REST API in-process (ASGI), raising on any unexpected status."""

    def __init__(self, http: Any) -> None:
        self.http = http

    def call(self, method: str, path: str, expect: tuple[int, ...] = (200, 201), **kw: Any) -> Any:
        response = self.http.request(method, path, **kw)
        if response.status_code not in expect:
            raise RuntimeError(f"{method} {path}: {response.status_code} {response.text[:500]}")
        return response.json() if response.content else None


def seed(api: Api, engine: Any, database: str, sizes: Sizes) -> Seed:
    """Blobs, bases, each base's first version and then aliases, yanks and merge jobs through
    the REST API; the other versions in bulk through the models (`insert_versions`)."""
    started = time.perf_counter()
    entries = upload_blobs(api)
    for index, hidden in enumerate((HIDDEN, 512, 1024, 2048)):
        body = {"base": f"bench/base-{index}", "source": "file:///nowhere"}
        api.call("POST", "/api/v1/bases", json={**body, **base_signature(hidden)})
    names, counts = adapter_names(sizes), version_counts(sizes)
    rng = random.Random(1)
    # The first adapter of each base gets its v1 through the API: real rows, compatibility
    # reports included, that the bulk insert copies.
    pushed: set[int] = set()
    for index, name in enumerate(names):
        if base_for(index) not in {base_for(i) for i in pushed}:
            body = version_body(name, index, 1, entries, rng)
            api.call("POST", f"/api/v1/adapters/{name}/versions", json=body)
            pushed.add(index)
    log(f"pushed {len(pushed)} versions through the API; inserting the others")
    made = len(pushed) + insert_versions(engine, names, counts, pushed, entries, rng)
    log(f"{made:,} versions ({time.perf_counter() - started:.0f} s); moving aliases")
    moves = yanked = 0
    for index, (name, count) in enumerate(zip(names, counts, strict=True)):
        moves += move_aliases(api, name, count)
        for number in yanked_numbers(index, count):
            body = {"reason": "regressed on rougeL"}
            api.call("POST", f"/api/v1/adapters/{name}/versions/{number}/yank", json=body)
            yanked += 1
    fitting = [(n, c) for i, (n, c) in enumerate(zip(names, counts, strict=True)) if i % 4 != 3]
    for n in range(sizes.jobs):
        name, count = fitting[n % len(fitting)]
        api.call("POST", "/api/v1/merges", json={"adapter": f"{name}@{count}"})
    audit = api.call("GET", "/api/v1/audit", params={"limit": 1})["total"]
    # Bulk inserts outrun autovacuum: without fresh statistics the planner guesses one row per
    # label and picks nested loops 10x slower than a registry that grew over weeks would see.
    with engine.connect() as connection:
        connection.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("ANALYZE")
    seconds = time.perf_counter() - started
    return Seed(
        database, len(names), made, sizes.big_versions, moves, yanked, sizes.jobs, audit, seconds
    )


def upload_blobs(api: Api) -> list[dict[str, Any]]:
    """The adapter's files, uploaded once: [{path, size, sha256}], README.md last."""
    entries = []
    for path, data in adapter_files().items():
        digest = hashlib.sha256(data).hexdigest()
        api.call("PUT", f"/api/v1/blobs/sha256:{digest}", expect=(201, 204), content=data)
        entries.append({"path": path, "size": len(data), "sha256": digest})
    return entries


def base_for(index: int) -> str:
    """Three adapters in four on the base they fit; the fourth on one they do not."""
    return FIT_BASE if index % 4 != 3 else f"bench/base-{1 + (index // 4) % 3}"


def version_body(
    name: str, index: int, number: int, entries: list[dict[str, Any]], rng: random.Random
) -> dict[str, Any]:
    """What a push of version `number` of adapter `index` commits (POST .../versions)."""
    kind = name.split("/")[1].split("-")[0]
    readme = entries[-1]
    return {
        # The same blobs; one under a path of this version's own makes its digest.
        "files": [*entries[:-1], {**readme, "path": f"notes/{name}/v{number}.md"}],
        "base": base_for(index),
        "metrics": {
            "rougeL": round(rng.uniform(0.3, 0.5), 4),
            "bleu": round(rng.uniform(0.1, 0.3), 4),
            "loss": round(rng.uniform(0.8, 2.0), 4),
        },
        "labels": {"task": kind, "lang": ("en", "de", "fr")[number % 3]},
        "lineage": {
            "run": f"https://ci.example/runs/{index}-{number}",
            "dataset": "cnn_dailymail",
            "commit": f"{rng.getrandbits(40):010x}",
        },
        "description": f"{kind} trained on cnn_dailymail, run {number}",
    }


# What a version copies from its base's pushed version (what the push computed from the files).
FROM_TEMPLATE = (
    "base_model_id", "base_model_revision", "peft_type", "task_type", "r", "lora_alpha",
    "target_modules", "use_dora", "use_rslora", "adapter_config", "size", "file_count",
    "compat_status", "compat_base", "compat_report",
)  # fmt: skip


def insert_versions(
    engine: Any,
    names: list[str],
    counts: list[int],
    pushed: set[int],
    entries: list[dict[str, Any]],
    rng: random.Random,
) -> int:
    """Every version not pushed through the API, written as the push writes it (the version,
    its files, metrics and labels rows, its `version.push` event), 100 adapters a transaction.
    Returns how many were inserted."""
    from sqlmodel import col, select

    from registry.db import session_scope
    from registry.models import Adapter, AdapterVersion

    with session_scope(engine) as session:
        templates = {}
        for index in pushed:
            namespace, name = names[index].split("/")
            row = session.exec(
                select(AdapterVersion)
                .join(Adapter, col(Adapter.id) == AdapterVersion.adapter_id)
                .where(Adapter.namespace == namespace, Adapter.name == name)
            ).one()
            templates[base_for(index)] = {key: getattr(row, key) for key in FROM_TEMPLATE}
    inserted = 0
    for first in range(0, len(names), 100):
        with session_scope(engine) as session:
            for index in range(first, min(first + 100, len(names))):
                start = 2 if index in pushed else 1
                numbers = range(start, counts[index] + 1)
                inserted += insert_adapter(session, names, index, numbers, templates, entries, rng)
        log(f"inserted {first + 100} adapters, {inserted:,} versions")
    return inserted


def insert_adapter(
    session: Any,
    names: list[str],
    index: int,
    numbers: range,
    templates: dict[str, dict[str, Any]],
    entries: list[dict[str, Any]],
    rng: random.Random,
) -> int:
    """Versions `numbers` of adapter `index` (the adapter row too, when it is new)."""
    from sqlmodel import select

    from registry.core import events
    from registry.core.manifest import FileEntry, manifest_digest
    from registry.events.service import record
    from registry.models import Adapter, AdapterVersion, VersionFile, VersionLabel, VersionMetric

    namespace, name = names[index].split("/")
    adapter = session.exec(
        select(Adapter).where(Adapter.namespace == namespace, Adapter.name == name)
    ).first()
    if adapter is None:
        adapter = Adapter(namespace=namespace, name=name)
        session.add(adapter)
        session.flush()
    assert adapter.id is not None
    rows = []
    for number in numbers:
        body = version_body(names[index], index, number, entries, rng)
        files = [FileEntry(**entry) for entry in body["files"]]
        version = AdapterVersion(
            adapter_id=adapter.id,
            number=number,
            digest=manifest_digest(files),
            metrics=body["metrics"],
            labels=body["labels"],
            lineage=body["lineage"],
            description=body["description"],
            **templates[body["base"]],
        )
        rows.append((version, files))
    session.add_all([version for version, _ in rows])
    session.flush()  # one multi-row INSERT, and the ids
    for version, files in rows:
        assert version.id is not None
        made: list[Any] = [
            VersionFile(version_id=version.id, path=f.path, size=f.size, sha256=f.sha256)
            for f in files
        ]
        made += [
            VersionMetric(version_id=version.id, name=k, value=v)
            for k, v in version.metrics.items()
        ]
        made += [
            VersionLabel(version_id=version.id, key=k, value=v) for k, v in version.labels.items()
        ]
        session.add_all(made)
        event = events.VersionPushed(
            subject=f"{names[index]}@{version.number}",
            digest=version.digest,
            size=version.size,
            files=len(files),
        )
        record(session, None, event)
    return len(rows)


def yanked_numbers(index: int, count: int) -> list[int]:
    """Every 50th version of the big adapter; v1 of every tenth other adapter."""
    if count >= 100:
        return list(range(50, count, 50))
    return [1] if index % 10 == 0 else []


def move_aliases(api: Api, name: str, count: int) -> int:
    """staging through the first versions, production to the second-newest then the newest; on
    the big adapter, hundreds of moves. Returns the number of moves."""
    path = f"/api/v1/adapters/{name}/aliases"
    staged = list(range(1, count + 1, 5)) if count >= 100 else list(range(1, min(count, 3) + 1))
    promoted = list(range(2, count + 1, 20)) if count >= 100 else [max(count - 1, 1), count]
    for number in staged:
        api.call("PUT", f"{path}/staging", json={"version": str(number)})
    for number in promoted:
        api.call("PUT", f"{path}/production", json={"version": str(number)})
    return len(staged) + len(promoted)


# --- pages and their API counterparts ------------------------------------------------------------


@dataclass
class Case:
    """A page, and the API requests that return the same data (as near as the API allows)."""

    label: str
    page: str
    api: list[str]
    note: str = ""


def cases(seeded: Seed, audit_total: int) -> list[Case]:
    big = seeded.big
    name, number = seeded.version_page.split("@")
    newest_audit = max(audit_total - 50, 0)  # the API lists the audit log oldest first
    history = f"/api/v1/adapters/{big}/history?limit=500"
    return [
        Case("adapters", "/ui/adapters", ["/api/v1/adapters?limit=50"], "aliases: no API call"),
        Case(
            "adapters, searched + filtered",
            "/ui/adapters?q=summarizer&label=lang%3Den&compat=compatible",
            ["/api/v1/adapters?q=summarizer&label=lang%3Den&compat=compatible&limit=50"],
        ),
        Case(
            "adapters, page 10",
            "/ui/adapters?offset=450",
            ["/api/v1/adapters?limit=50&offset=450"],
        ),
        Case(
            f"adapter ({seeded.big_versions:,} versions)",
            f"/ui/adapters/{big}",
            [
                f"/api/v1/adapters/{big}",
                f"/api/v1/adapters/{big}/versions?limit=50",
                f"/api/v1/adapters/{big}/versions?limit=500",
                f"/api/v1/adapters/{big}/aliases",
                history,
            ],
            "versions, chart (500), aliases, history (500)",
        ),
        Case(
            "adapter, sorted by a metric",
            f"/ui/adapters/{big}?sort=-metrics.rougeL",
            [
                f"/api/v1/adapters/{big}",
                f"/api/v1/adapters/{big}/versions?limit=50&sort=-metrics.rougeL",
                f"/api/v1/adapters/{big}/versions?limit=500",
                f"/api/v1/adapters/{big}/aliases",
                history,
            ],
        ),
        Case(
            "version",
            f"/ui/adapters/{name}/versions/{number}",
            [
                f"/api/v1/adapters/{name}/versions/{number}",
                f"/api/v1/adapters/{name}/aliases",
                f"/api/v1/deployments?adapter={name}&limit=100",
            ],
            "merges of it: no API filter",
        ),
        Case("bases", "/ui/bases", ["/api/v1/bases?limit=50"]),
        Case(
            "base",
            f"/ui/bases/{FIT_BASE}",
            [f"/api/v1/bases/{FIT_BASE}", f"/api/v1/adapters?base={FIT_BASE}&limit=50"],
        ),
        Case("jobs", "/ui/jobs", ["/api/v1/merges?limit=50"]),
        Case("audit", "/ui/audit", [f"/api/v1/audit?limit=50&offset={newest_audit}"]),
        Case(
            "audit, filtered",
            f"/ui/audit?action=alias.set&subject={big}%40production",
            [f"/api/v1/audit?action=alias.set&subject={big}%40production&limit=50"],
        ),
    ]


# --- measuring -----------------------------------------------------------------------------------


def percentile(samples: list[float], share: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


@dataclass
class Result:
    label: str
    page: str
    api: list[str]
    note: str
    page_ms: list[float] = field(default_factory=list)
    api_ms: list[float] = field(default_factory=list)  # the API requests of a round, summed
    page_bytes: int = 0
    api_bytes: int = 0
    inprocess_ms: list[float] = field(default_factory=list)
    jinja_ms: list[float] = field(default_factory=list)
    page_queries: int = 0
    api_queries: int = 0

    def summary(self) -> dict[str, Any]:
        page, api = statistics.median(self.page_ms), statistics.median(self.api_ms)
        return {
            "page_median_ms": page,
            "page_p95_ms": percentile(self.page_ms, 0.95),
            "api_median_ms": api,
            "api_p95_ms": percentile(self.api_ms, 0.95),
            "ratio": page / api if api else None,
            "inprocess_median_ms": statistics.median(self.inprocess_ms)
            if self.inprocess_ms
            else None,
            "jinja_median_ms": statistics.median(self.jinja_ms) if self.jinja_ms else None,
            "pass": page <= TARGET_MS,
        }


def timed_get(http: httpx.Client, path: str) -> tuple[float, int]:
    started = time.perf_counter()
    response = http.get(path)
    body = response.content
    elapsed = (time.perf_counter() - started) * 1000
    if response.status_code != 200:
        raise RuntimeError(f"GET {path}: {response.status_code} {response.text[:300]}")
    return elapsed, len(body)


def measure_server(url: str, all_cases: list[Case], rounds: int, warmup: int) -> list[Result]:
    results = [Result(c.label, c.page, c.api, c.note) for c in all_cases]
    with httpx.Client(base_url=url, timeout=120) as http:
        for case in all_cases:
            for _ in range(warmup):
                timed_get(http, case.page)
                for path in case.api:
                    timed_get(http, path)
        for round_ in range(rounds):
            for case, result in zip(all_cases, results, strict=True):
                ms, size = timed_get(http, case.page)
                result.page_ms.append(ms)
                result.page_bytes = size
                total = 0.0
                result.api_bytes = 0
                for path in case.api:
                    ms, size = timed_get(http, path)
                    total += ms
                    result.api_bytes += size
                result.api_ms.append(total)
            if (round_ + 1) % 10 == 0:
                log(f"round {round_ + 1} of {rounds}")
    return results


@contextlib.contextmanager
def jinja_timer(spent: list[float]) -> Iterator[None]:
    """Adds the milliseconds spent in `jinja2.Template.render` to spent[0] while active."""
    import jinja2

    original = jinja2.Template.render

    def render(self: jinja2.Template, *args: Any, **kwargs: Any) -> str:
        started = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            spent[0] += (time.perf_counter() - started) * 1000

    jinja2.Template.render = render  # type: ignore[method-assign]
    try:
        yield
    finally:
        jinja2.Template.render = original  # type: ignore[method-assign]


def measure_in_process(
    settings: Any, all_cases: list[Case], results: list[Result], rounds: int
) -> None:
    """The same requests through the ASGI app in this process: time, SQL statements, Jinja."""
    import sqlalchemy as sa
    from fastapi.testclient import TestClient

    from registry.app import create_app

    app = create_app(settings)
    statements = [0]

    def count(*_args: Any) -> None:
        statements[0] += 1

    sa.event.listen(app.state.engine, "before_cursor_execute", count)
    spent = [0.0]
    with TestClient(app, base_url="http://127.0.0.1") as http, jinja_timer(spent):
        for case, result in zip(all_cases, results, strict=True):
            http.get(case.page)  # warm
            statements[0] = 0
            http.get(case.page)
            result.page_queries = statements[0]
            statements[0] = 0
            for path in case.api:
                http.get(path)
            result.api_queries = statements[0]
        for _ in range(rounds):
            for case, result in zip(all_cases, results, strict=True):
                spent[0] = 0.0
                started = time.perf_counter()
                response = http.get(case.page)
                result.inprocess_ms.append((time.perf_counter() - started) * 1000)
                result.jinja_ms.append(spent[0])
                assert response.status_code == 200, (case.page, response.status_code)
    app.state.engine.dispose()


# --- the server ----------------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def lora_reg() -> list[str]:
    script = Path(sys.executable).parent / "lora-reg"
    return [str(script)] if script.exists() else [sys.executable, "-m", "cli.main"]


def server_env(database: str, work: Path) -> dict[str, str]:
    return {
        "LORA_REG_DATABASE_URL": database_url(database),
        "LORA_REG_STORAGE_URL": f"file://{work}/objects",
        "LORA_REG_AUTH": "off",
        "LORA_REG_EMBEDDED_WORKER": "false",
    }


@contextlib.contextmanager
def running_server(database: str, work: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = work / "server.log"
    with open(log_path, "wb") as output:
        process = subprocess.Popen(
            [*lora_reg(), "server", "--port", str(port), "--log-level", "warning"],
            cwd=work, env={**os.environ, **server_env(database, work)},
            stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited: {log_path.read_text()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {log_path.read_text()}")
            time.sleep(0.2)
        yield url, process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


# --- the run -------------------------------------------------------------------------------------


def settings_for(database: str, work: Path) -> Any:
    from registry.settings import Settings

    return Settings(
        database_url=database_url(database), storage_url=f"file://{work}/objects", auth=False
    )


def prepare(work: Path, sizes: Sizes) -> Seed:
    """The seeded database of `work` (reused when its mark says it is complete), or a new one."""
    from fastapi.testclient import TestClient

    from registry.app import create_app
    from registry.db import upgrade

    mark = work / SEEDED_MARK
    if mark.exists():
        found = Seed(**json.loads(mark.read_text()))
        if (found.adapters, found.versions) != (sizes.adapters, sizes.versions):
            raise SystemExit(f"{work} holds another size: use another --work folder")
        if database_exists(found.database):
            log(f"reusing {found.database} (seeded in {found.seconds:.0f} s)")
            return found
    database = create_database()
    log(f"seeding {database}: {sizes.adapters:,} adapters, {sizes.versions:,} versions")
    try:
        settings = settings_for(database, work)
        upgrade(settings)
        app = create_app(settings)
        with TestClient(app, base_url="http://127.0.0.1") as http:
            seeded = seed(Api(http), app.state.engine, database, sizes)
        app.state.engine.dispose()
    except BaseException:
        drop_database(database)
        raise
    mark.write_text(json.dumps(asdict(seeded), indent=2))
    log(f"seeded in {seeded.seconds:.0f} s")
    return seeded


def report(seeded: Seed, results: list[Result], rounds: int) -> list[dict[str, Any]]:
    rows, summaries = [], []
    for result in results:
        s = result.summary()
        summaries.append(s)
        rows.append([
            result.label,
            f"{s['page_median_ms']:.1f}",
            f"{s['page_p95_ms']:.1f}",
            f"{s['api_median_ms']:.1f}",
            str(len(result.api)),
            fmt_ratio(s["ratio"]),
            f"{s['inprocess_median_ms']:.1f}" if s["inprocess_median_ms"] is not None else "-",
            f"{s['jinja_median_ms']:.1f}" if s["jinja_median_ms"] is not None else "-",
            f"{result.page_queries} / {result.api_queries}",
            f"{result.page_bytes / 1000:.0f} kB",
            "PASS" if s["pass"] else "FAIL",
        ])  # fmt: skip
    print()
    print(
        f"{seeded.adapters:,} adapters, {seeded.versions:,} versions ({seeded.big_versions:,} on "
        f"{seeded.big}), {seeded.alias_moves:,} alias moves, {seeded.yanked} yanked, "
        f"{seeded.jobs} jobs, {seeded.audit_events:,} audit events; PostgreSQL "
        f"{postgres_version()}; {rounds} rounds; times in ms, client-observed on loopback "
        "(keep-alive), except in-process"
    )
    load = os.getloadavg()[0]
    print(f"Machine load average (1 min) at the end: {load:.1f} on {os.cpu_count()} CPUs")
    print()
    print_table(
        ["page", "page med", "page p95", "API med", "API calls", "page/API",
         "in-process", "Jinja", "SQL page / API", "page size", f"<= {TARGET_MS:.0f} ms"],
        rows,
    )  # fmt: skip
    print()
    for result in results:
        if result.note:
            print(f"  {result.label}: API side = {', '.join(result.api)} ({result.note})")
    slowest = max(results, key=lambda r: statistics.median(r.page_ms))
    failed = [r.label for r, s in zip(results, summaries, strict=True) if not s["pass"]]
    print()
    print(
        ("PASS" if not failed else "FAIL")
        + f"  every page's median <= {TARGET_MS:.0f} ms"
        + (f" (over: {', '.join(failed)})" if failed else "")
        + f"; slowest: {slowest.label} {statistics.median(slowest.page_ms):.1f} ms, "
        f"{slowest.page_queries} SQL statements"
    )
    return summaries


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30, help="measured rounds (default 30)")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up requests per URL")
    parser.add_argument("--inprocess-rounds", type=int, default=10)
    parser.add_argument(
        "--work", type=Path, help="keep the seeded database and files here, reuse them next time"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--quick", action="store_true", help="100 adapters, 1,000 versions: to try a change"
    )
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL

    work = args.work or Path(tempfile.mkdtemp(prefix="ui-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    seeded: Seed | None = None
    try:
        seeded = prepare(work, sizes)
        with running_server(seeded.database, work) as (url, _process):
            total = httpx.get(f"{url}/api/v1/audit?limit=1", timeout=60).json()["total"]
            all_cases = cases(seeded, total)
            log(f"measuring {len(all_cases)} pages, {args.rounds} rounds, on {url}")
            results = measure_server(url, all_cases, args.rounds, args.warmup)
        log(f"in-process: {args.inprocess_rounds} rounds")
        measure_in_process(
            settings_for(seeded.database, work), all_cases, results, args.inprocess_rounds
        )
        summaries = report(seeded, results, args.rounds)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps(
                {
                    "benchmark": "ui",
                    "target_ms": TARGET_MS,
                    "seed": asdict(seeded),
                    "seeding": "in-process through the app's REST routes over ASGI (TestClient)",
                    "timing": "client-observed wall time on loopback, keep-alive httpx client",
                    "rounds": args.rounds,
                    "load_average_1min_at_end": os.getloadavg()[0],
                    "postgres": postgres_version(),
                    "machine": machine_info(["httpx", "fastapi", "jinja2", "sqlalchemy"]),
                    "pages": [
                        {**asdict(result), **summary}
                        for result, summary in zip(results, summaries, strict=True)
                    ],
                },
                indent=2,
            )
        )
        log(f"wrote {args.out}")
    finally:
        if args.work is None:
            if seeded is not None:
                drop_database(seeded.database)
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
