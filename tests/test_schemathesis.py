"""The OpenAPI document tells the truth: `schemathesis run --checks all` against real servers.

One server per backend (SQLite + folder store, PostgreSQL + SeaweedFS) with auth on, fuzzed as an
admin token and as a read token, a bounded number of examples per operation, must find nothing:
no 500, no undocumented status, content type or header, no response that breaks its schema, no
schema-valid request refused and no schema-violating one accepted (registry/openapi.py builds the
document). schemathesis runs as its CLI in a subprocess, as CI would run it; its report is printed.

What JSON Schema cannot say is handed to schemathesis explicitly, each with its reason
(`ACCEPTS_SEMANTIC_REFUSALS`, `HOOKS`); where a generated value would do harm or only wait, two
parameters are pinned and webhook URLs redirected (`config_toml`, `HOOKS`); no operation is
excluded.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import BACKENDS, RunningServer, own_server, unique

# Per operation in fuzzing and stateful; coverage sends its boundary cases whatever this is.
MAX_EXAMPLES = {"admin": 8, "read": 5}
REQUEST_TIMEOUT_S = 20
# The coverage phase (every parameter's boundaries, every undeclared method: ~1900 requests, most
# of a run) runs as admin, whose requests reach every handler; a read token's run fuzzes, and
# most of what coverage would send it is refused with 403 before its input is read.
PHASES = {"admin": "coverage,fuzzing,stateful", "read": "fuzzing,stateful"}
SEED = 20261203  # reproducible: a failure replays with the same cases

# schemathesis's positive_data_acceptance expects a schema-valid request to succeed (or be 401,
# 403, 404, 409). These operations also refuse, by design, schema-valid requests whose validity
# depends on rules JSON Schema cannot state (across items, or on stored state); their codes are
# documented on the operation.
_FILES = (
    "a list of files must name each path once, none both a file and a folder, and stay within "
    "the server's size limits"
)
_ADAPTER = _FILES + "; it includes adapter_config.json and adapter_model.safetensors"
_UPLOADED = "every file was uploaded first, with the declared size"
ACCEPTS_SEMANTIC_REFUSALS: dict[str, tuple[tuple[int, ...], str]] = {
    "POST /api/v1/adapters/{namespace}/{name}/uploads": ((413, 422), _ADAPTER),
    "POST /api/v1/adapters/{namespace}/{name}/versions": (
        (400, 413, 422),
        f"{_ADAPTER}; {_UPLOADED}; the stored config and weights are a LoRA adapter",
    ),
    "POST /api/v1/bases/uploads": ((413, 422), _FILES + "; it includes config.json"),
    "POST /api/v1/bases": (
        (400, 413, 422),
        f"{_FILES}; {_UPLOADED}; a source is readable and holds a safetensors checkpoint",
    ),
    "POST /api/v1/merges/{job_id}/finish": (
        (400, 413, 422),
        f"{_FILES}; a merge into the registry lists its files and {_UPLOADED}",
    ),
    "PUT /api/v1/deployments/{instance_id}": ((422,), "a report names each loaded name once"),
    "PUT /api/v1/blobs/{digest}": ((400,), "the bytes hash to the digest in the path"),
    "POST /api/v1/blobs/{digest}/multipart": (
        (400,),
        "the upload id, key and parts come from an upload plan of an S3 store (a folder store "
        "takes no multipart uploads)",
    ),
}

_DEFAULT_ACCEPTED = ("2xx", "3xx", "401", "403", "404", "409", "429", "5xx")

# Loaded by schemathesis (SCHEMATHESIS_HOOKS).
# - JSON Schema's maxLength counts characters, while registry.core.manifest.check_path allows
#   255 UTF-8 *bytes*: generated file paths beyond that are dropped rather than reported.
# - The server POSTs every event to a webhook's URL: a webhook the fuzzer registers points at port
#   9 (discard) on loopback, where nothing listens, in every phase (an invalid URL is left as it
#   is, to be refused). tests/test_webhooks.py covers delivery.
HOOKS = """
import re

import schemathesis

NOWHERE = "http://127.0.0.1:9/schemathesis"

MAX_PATH_BYTES = 255


def _paths_fit(value):
    if isinstance(value, dict):
        return all(
            _paths_fit(item)
            and not (
                key == "path"
                and isinstance(item, str)
                and len(item.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES
            )
            for key, item in value.items()
        )
    if isinstance(value, list):
        return all(_paths_fit(item) for item in value)
    return True


@schemathesis.hook
def filter_body(context, body):
    return _paths_fit(body)


@schemathesis.hook
def before_call(context, case, kwargs):
    body = case.body
    if (
        case.operation.path == "/api/v1/webhooks"
        and case.method.upper() == "POST"
        and isinstance(body, dict)
        and isinstance(body.get("url"), str)
        and re.fullmatch(r"https?://\\S+", body["url"])
    ):
        case.body = {**body, "url": NOWHERE}
"""


@dataclass(frozen=True)
class Fuzzed:
    server: RunningServer
    # Values that name what the server holds (a pushed version with an alias, its registered base,
    # its blobs, a queued merge job), offered to schemathesis for these parameters half the time,
    # so the requests reach past "not found" into the handlers and their real answers.
    seeds: dict[str, list[str]]


def seed_registry(
    server: RunningServer,
    cache: Path,
    adapter_dir: Callable[..., Path],
    base_dir: Callable[..., Path],
) -> dict[str, list[str]]:
    client = server.client(cache)
    try:
        base = f"{unique('org')}/tiny@v1"
        client.add_base(base, base_dir("llama"))
        namespace, name = unique("ns"), "adapter"
        pushed = client.push(
            adapter_dir("llama"),
            f"{namespace}/{name}",
            base=base,
            metrics={"rougeL": 0.41},
            labels={"team": "fuzz"},
        ).version
        client.set_alias(f"{namespace}/{name}@1", "staging")
        job = client.request_merge(f"{namespace}/{name}@1")
    finally:
        client.close()
    blobs = [f"sha256:{file.sha256}" for file in pushed.files or []]
    return {
        "path.namespace": [namespace],
        "query.namespace": [namespace],
        "path.name": [name],
        "path.selector": ["1", "latest", "staging", pushed.digest],
        "path.alias": ["staging"],
        "path.ref": [base, base.split("@")[0]],
        "query.base": [base],
        "query.id": [base.split("@")[0]],
        "path.digest": blobs,
        "path.job_id": [job.id],
        "body.adapter": [f"{namespace}/{name}@1", f"{namespace}/{name}@staging"],
    }


def config_toml(sacrificial_token: str, seeds: dict[str, list[str]]) -> str:
    """schemathesis.toml: the per-operation allowances above, the seeds, and a token of its own to
    revoke."""
    lines = []
    for key, values in sorted(seeds.items()):
        lines += [f'[dictionaries."{key}"]', f"values = {_toml_list(values)}", ""]
    lines += ["[parameters]"]
    lines += [f'"{key}" = {{ dictionary = "{key}", probability = 0.5 }}' for key in sorted(seeds)]
    lines += [""]
    for operation, (statuses, reason) in sorted(ACCEPTS_SEMANTIC_REFUSALS.items()):
        accepted = [*_DEFAULT_ACCEPTED, *map(str, statuses)]
        lines += [
            f"# {reason}",
            "[[operations]]",
            f'include-name = "{operation}"',
            f"checks.positive_data_acceptance.expected-statuses = {_toml_list(accepted)}",
            "",
        ]
    pinned = {
        # Revoking the run's own token would leave the rest of the run unauthenticated (every
        # answer a documented 401): it revokes a token made to be revoked instead.
        "DELETE /api/v1/tokens/{name}": ("path.name", sacrificial_token),
        # A long poll holds a request up to 30 s; tests/test_events.py covers waiting.
        "GET /api/v1/events": ("query.wait", "0"),
    }
    for operation, (parameter, value) in sorted(pinned.items()):
        lines += [
            "[[operations]]",
            f'include-name = "{operation}"',
            f'parameters = {{ "{parameter}" = "{value}" }}',
            "",
        ]
    return "\n".join(lines)


def _toml_list(values: list[str]) -> str:
    return "[" + ", ".join(f'"{value}"' for value in values) + "]"


@pytest.fixture(scope="module", params=BACKENDS)
def fuzzed(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    adapter_dir: Callable[..., Path],
    base_dir: Callable[..., Path],
) -> Iterator[Fuzzed]:
    workdir = tmp_path_factory.mktemp(f"schemathesis-{request.param}")
    with own_server(request, workdir, request.param, LORA_REG_AUTH="on") as server:
        yield Fuzzed(server, seed_registry(server, workdir / "cache", adapter_dir, base_dir))


def make_token(server: RunningServer, name: str, scope: str) -> str:
    response = httpx.post(
        f"{server.url}/api/v1/tokens",
        json={"name": name, "scope": scope},
        headers={"Authorization": f"Bearer {server.token}"},
        timeout=30,
    )
    response.raise_for_status()
    return str(response.json()["token"])


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("scope", ["admin", "read"])
def test_schemathesis_finds_nothing(fuzzed: Fuzzed, scope: str, tmp_path: Path) -> None:
    """Every operation, every check, as `scope`: 0 failures and 0 errors."""
    fuzzed_server = fuzzed.server
    suffix = f"{scope}-{int(time.time() * 1000) % 10**9}"
    token = make_token(fuzzed_server, f"schemathesis-{suffix}", scope)
    sacrificial = f"revoke-me-{suffix}"
    make_token(fuzzed_server, sacrificial, "read")
    config = tmp_path / "schemathesis.toml"
    config.write_text(config_toml(sacrificial, fuzzed.seeds))
    hooks = tmp_path / "hooks.py"
    hooks.write_text(HOOKS)
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "--config-file",
        str(config),
        "--no-color",
        "run",
        f"{fuzzed_server.url}/openapi.json",
        "--checks",
        "all",
        "--max-examples",
        str(MAX_EXAMPLES[scope]),
        "--request-timeout",
        str(REQUEST_TIMEOUT_S),
        "--seed",
        str(SEED),
        "--phases",
        PHASES[scope],
        # One worker: with two, hypothesis parses lambda sources in two threads at once, and
        # CPython 3.11.7's ast module can then fail with a spurious "SystemError: AST
        # constructor recursion depth mismatch" (python/cpython#106905), a crash of the tool.
        "--workers",
        "1",
        "--generation-database",
        "none",
        # PostgreSQL text cannot hold NUL: there such a value is a documented 422 invalid_input
        # (registry.db), on SQLite it is stored; the answers differ by backend, not by document.
        "--generation-allow-x00",
        "false",
        "--header",
        f"Authorization: Bearer {token}",
    ]
    started = time.monotonic()
    run = subprocess.run(
        command,
        cwd=tmp_path,  # reports and caches stay out of the checkout
        env={**os.environ, "SCHEMATHESIS_HOOKS": str(hooks), "NO_COLOR": "1"},
        capture_output=True,
        text=True,
        timeout=840,
    )
    elapsed = time.monotonic() - started
    report = run.stdout + run.stderr
    print(f"schemathesis on {fuzzed_server.backend} as {scope}: {elapsed:.0f} s\n{report[-3000:]}")
    assert run.returncode == 0, report[-20000:]
    # The run kept its authority to the end (a revoked token would make every answer a 401).
    whoami = httpx.get(
        f"{fuzzed_server.url}/api/v1/whoami",
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    assert whoami.status_code == 200, whoami.text
