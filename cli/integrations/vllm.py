"""vLLM plugin: serve registry adapters by reference (`"model": "ns/name@production"`).

Two entry points, both named `lora_registry`, so `VLLM_PLUGINS=lora_registry` selects both:

- `vllm.general_plugins` -> `register()`, run in every vLLM process: registers a LoRA resolver
  with vLLM's `LoRAResolverRegistry`. With VLLM_ALLOW_RUNTIME_LORA_UPDATING=true the API server
  asks it for a model name it does not serve yet (`ns/name`, `@7`, `@alias`, `@sha256:...`).
- `vllm.endpoint_plugins` -> `endpoint_plugin()`, run in the API server process only: hands the
  plugin vLLM's parsed arguments (port, --max-lora-rank) and its `OpenAIServingModels`, and starts
  the background tasks: the event follower (an alias moved: switch versions) and the deployment
  heartbeat. Without it the resolver still works, but nothing is reloaded or reported.

Resolving: reference -> version (a yanked one is refused) -> the version's verified folder,
named by its digest under LORA_REG_CACHE_DIR (several vLLM processes may share one cache) ->
preflight: `registry.core.compat.check_compatibility` with the vllm profile, against the
safetensors headers of the base this server really serves (a local folder, the Hugging Face
cache, or the registry's registered base of that id) and this server's --max-lora-rank -> the
LoRARequest. A refusal reaches the client as vLLM's HTTP error naming the compat codes and their
fixes, and is logged; the adapter is never loaded. Loaded adapters keep being served when the
registry is unreachable (vLLM does not ask again).

Rollouts: the follower long-polls `GET /api/v1/events`; when an alias moves (or a new version
arrives for a bare `ns/name`) each loaded reference of that adapter is resolved again, checked
and switched in place, without a restart: the new version is loaded under its own adapter id
from its own folder (both keyed by its digest, so no weights or prefix-cache entries of another
version are reused), then new requests get it while running ones finish on the old one (see
`_InProcessEngine.reload` for why not vLLM's `load_inplace`). A reference that no longer
resolves, or now names a yanked version, is unloaded; one whose new version fails the preflight
keeps serving the old one (the deployment report shows the drift).

Reporting: the full loaded set is PUT to `/api/v1/deployments/{instance}` after every load,
reload and unload and every LORA_REG_HEARTBEAT_S seconds (30); DELETE at a clean exit.

Configuration: LORA_REG_URL, LORA_REG_TOKEN (a `serving` token), LORA_REG_CACHE_DIR,
LORA_REG_INSTANCE_ID (default `<host>-<port>`), LORA_REG_HEARTBEAT_S. vLLM is imported only
inside the functions that talk to it: this module imports without vLLM (and is tested so).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import logging
import os
import re
import socket
import sys
import threading
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from pathlib import Path
from typing import Any, Protocol, TypeVar

from cli.bases import folder_signature, local_check
from cli.client import Registry
from cli.serving_client import (
    ServingClient,
    base_signature_digest,
    check_instance_id,
    reference_name,
)
from registry.core.basemodel import BaseSignature
from registry.core.compat import CompatReport, Finding
from registry.core.errors import (
    InvalidInput,
    InvalidReference,
    NotAuthenticated,
    NotFound,
    NotPermitted,
    RegistryError,
    Unavailable,
)
from registry.core.names import parse_reference
from registry.core.profiles import VLLM_DEFAULT_MAX_LORA_RANK
from registry.core.schemas import DeploymentReport, LoadedAdapter, VersionOut

log = logging.getLogger("vllm.lora_registry")  # a child of vLLM's logger: its handlers, its format

PLUGIN_NAME = "lora_registry"
FOLLOWED_ACTIONS = ("alias.set", "alias.remove", "version.push", "version.yank")
EVENT_WAIT_S = 25.0
DEFAULT_HEARTBEAT_S = 30.0
CONFIRM_S = 120.0  # how long a resolved adapter may take to appear in vLLM's loaded set
MAX_BACKOFF_S = 30.0
T = TypeVar("T")


class Refusal(Exception):
    """A reference this server will not load; `status` is the HTTP status for the client."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class ServerInfo:
    """What this vLLM serves and how (from its parsed arguments)."""

    served_model: str  # model_config.model: a local folder or a Hub id
    revision: str | None
    max_lora_rank: int
    host: str
    port: int | None
    engine_version: str


@dataclass
class Tracked:
    """An adapter this plugin handed to vLLM, and the folder it came from."""

    entry: LoadedAdapter
    path: Path
    confirmed: bool = False  # seen in vLLM's loaded set


class Engine(Protocol):
    """The parts of vLLM's API server the plugin drives (see `_InProcessEngine`)."""

    def loaded_paths(self) -> dict[str, str]: ...

    async def reload(self, name: str, path: Path) -> str | None: ...

    async def unload(self, name: str) -> str | None: ...


@dataclass
class _Plan:
    """What a refresh decided: keep, reload (with the new entry and folder), or unload."""

    action: str
    reason: str = ""
    entry: LoadedAdapter | None = None
    path: Path | None = None


def _now() -> datetime:
    return datetime.now(UTC)


def _short(digest: str) -> str:
    return digest[:19]


def _findings(findings: list[Finding]) -> str:
    """Findings by code: the first one's message and fix, and whether there are more."""
    by_code: dict[str, list[Finding]] = {}
    for finding in findings:
        by_code.setdefault(finding.code, []).append(finding)
    parts = []
    for code, group in by_code.items():
        first = group[0]
        text = f"[{code}] {first.message}"
        if first.fix and first.fix not in first.message:
            text += f" (fix: {first.fix})"
        if len(group) > 1:
            text += f" (and more {code} findings like it)"
        parts.append(text)
    return "; ".join(parts)


class RegistryServing:
    """The plugin's state in one vLLM API server process (vLLM-free, so it can be unit tested).

    `resolve` is what vLLM's resolver calls; `attach` + `start` (from the endpoint plugin) turn on
    rollouts and reporting.
    """

    def __init__(
        self,
        client: ServingClient | None = None,
        *,
        instance_id: str | None = None,
        heartbeat_s: float | None = None,
    ) -> None:
        self._client = client
        self._instance_id = instance_id
        self.heartbeat_s = heartbeat_s or float(
            os.environ.get("LORA_REG_HEARTBEAT_S") or DEFAULT_HEARTBEAT_S
        )
        self.server: ServerInfo | None = None
        self.engine: Engine | None = None
        self.tracked: dict[str, Tracked] = {}
        self._bases: dict[str, tuple[BaseSignature, str | None]] = {}
        self._base_lock = threading.Lock()
        self._cursor: int | None = None
        self._cursor_lock = threading.Lock()
        self._follow = True
        self._stale: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._dirty: asyncio.Event | None = None
        self._started = False
        self._down: dict[str, bool] = {}  # what is failing now (logged once per outage)
        # Registry calls block (the long-poll for 25 s): they get threads of their own, so they
        # never hold the event loop's default executor, which vLLM uses too.
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="lora-registry")

    # --- configuration -------------------------------------------------------------------------

    @property
    def client(self) -> ServingClient:
        if self._client is None:
            # LORA_REG_URL, LORA_REG_TOKEN, LORA_REG_CACHE_DIR; a short timeout: a request waits.
            self._client = ServingClient(Registry(timeout=60.0))
        return self._client

    @property
    def instance_id(self) -> str:
        if self._instance_id is None:
            configured = os.environ.get("LORA_REG_INSTANCE_ID")
            if configured:
                self._instance_id = check_instance_id(configured)
            else:
                host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()) or "host"
                port = self.server.port if self.server and self.server.port else os.getpid()
                self._instance_id = check_instance_id(f"{host.strip('.-_') or 'host'}-{port}")
        return self._instance_id

    def attach(self, server: ServerInfo, engine: Engine | None) -> None:
        self.server = server
        self.engine = engine

    def _server(self, base_model_name: str) -> ServerInfo:
        if self.server is None:
            # Only the general plugin runs (VLLM_PLUGINS does not name lora_registry): read the
            # limits from the command line; rollouts and reports stay off.
            log.warning(
                "lora_registry: the endpoint plugin is not loaded (set VLLM_PLUGINS=lora_registry):"
                " adapters are resolved and checked, but alias moves are not followed and "
                "deployments are not reported"
            )
            self.server = ServerInfo(
                served_model=base_model_name,
                revision=_argv_value("--revision"),
                max_lora_rank=int(_argv_value("--max-lora-rank") or VLLM_DEFAULT_MAX_LORA_RANK),
                host=socket.gethostname(),
                port=int(_argv_value("--port") or 8000),
                engine_version=_engine_version(),
            )
        return self.server

    # --- resolving -----------------------------------------------------------------------------

    async def resolve(self, base_model_name: str, lora_name: str) -> Path | None:
        """The verified folder to load for `lora_name`; None when it is no registry reference.
        Raises `Refusal` (logged) when the reference cannot or must not be served."""
        try:
            ref = str(parse_reference(lora_name))
        except InvalidReference:
            return None
        self._server(base_model_name)
        try:
            entry, path = await self._blocking(self._resolve, base_model_name, lora_name, ref)
        except Refusal as refusal:
            log.error("lora_registry: %s", refusal.message)
            raise
        self.tracked[lora_name] = Tracked(entry, path)
        log.info(
            "lora_registry: %s -> %s@%d (%s), preflight passed; handing %s to vLLM",
            lora_name,
            entry.adapter,
            entry.version,
            _short(entry.digest),
            path,
        )
        self._spawn(self._confirm(lora_name, path))
        return path

    def _resolve(
        self, base_model_name: str, lora_name: str, ref: str
    ) -> tuple[LoadedAdapter, Path]:
        """Blocking: version, yank check, verified folder, preflight."""
        try:
            self._ensure_cursor()  # before the lookup: no alias move after it can be missed
            version = self.client.resolve(ref, allow_yanked=True)
        except NotFound as exc:
            raise Refusal(
                HTTPStatus.NOT_FOUND, f"{lora_name}: not in the registry ({exc.message})"
            ) from exc
        except Unavailable as exc:
            raise Refusal(
                HTTPStatus.SERVICE_UNAVAILABLE,
                f"{lora_name}: the registry is unavailable ({exc.message}); adapters already "
                "loaded are still served, retry this one later",
            ) from exc
        except (NotAuthenticated, NotPermitted) as exc:
            raise Refusal(
                HTTPStatus.BAD_GATEWAY,
                f"{lora_name}: the registry refused this server's token [{exc.code}] "
                f"{exc.message} (fix: set LORA_REG_TOKEN to a token with the serving scope: "
                "lora-reg token create NAME --scope serving)",
            ) from exc
        except RegistryError as exc:
            raise Refusal(
                HTTPStatus.BAD_REQUEST,
                f"{lora_name}: the registry refused it [{exc.code}] {exc.message}",
            ) from exc
        label = f"{lora_name} ({version.adapter}@{version.number}, {_short(version.digest)})"
        if version.yanked_at is not None:
            raise Refusal(
                HTTPStatus.BAD_REQUEST,
                f"refused {label}: [version_yanked] it was yanked ({version.yank_reason}) "
                "(fix: ask for another version, or move the alias to one that is not yanked)",
            )
        path = self._materialise(lora_name, version)
        report = self.preflight(base_model_name, path)
        if not report.compatible:
            raise Refusal(
                HTTPStatus.BAD_REQUEST,
                f"refused {label}: it does not fit the model this server serves "
                f"({self._server(base_model_name).served_model}, max_lora_rank "
                f"{self._server(base_model_name).max_lora_rank}): {_findings(report.errors)}",
            )
        if report.warnings:
            log.warning("lora_registry: %s: %s", label, _findings(report.warnings))
        entry = LoadedAdapter(
            name=lora_name,
            reference=lora_name,
            adapter=version.adapter,
            version=version.number,
            digest=version.digest,
            loaded_at=_now(),
        )
        return entry, path

    def _materialise(self, lora_name: str, version: VersionOut) -> Path:
        try:
            return self.client.materialise(version.adapter, version.digest)
        except Unavailable as exc:
            raise Refusal(
                HTTPStatus.SERVICE_UNAVAILABLE,
                f"{lora_name}: cannot download {version.adapter}@{version.number} "
                f"({exc.message}); retry later",
            ) from exc
        except RegistryError as exc:
            raise Refusal(
                HTTPStatus.BAD_GATEWAY,
                f"{lora_name}: {version.adapter}@{version.number} could not be pulled "
                f"[{exc.code}] {exc.message}",
            ) from exc

    # --- preflight -----------------------------------------------------------------------------

    def preflight(self, base_model_name: str, folder: Path) -> CompatReport:
        """The compatibility report of an adapter folder against the served base, with the vllm
        profile and this server's --max-lora-rank (headers only)."""
        server = self._server(base_model_name)
        signature, base_id = self.served_base(base_model_name)
        report, _ = local_check(
            folder,
            signature,
            base_id=base_id,
            base_revision=server.revision if base_id else None,
            profile="vllm",
            options={"max_lora_rank": server.max_lora_rank},
        )
        return report

    def served_base(self, base_model_name: str) -> tuple[BaseSignature, str | None]:
        """(signature, Hub id or None for a local folder) of the model vLLM serves; cached."""
        with self._base_lock:
            if base_model_name not in self._bases:
                self._bases[base_model_name] = self._read_base(base_model_name)
            return self._bases[base_model_name]

    def _read_base(self, name: str) -> tuple[BaseSignature, str | None]:
        revision = self.server.revision if self.server else None
        folder = Path(name).expanduser()
        tried: list[str] = []
        if folder.is_dir():
            try:
                return folder_signature(folder).signature, None
            except RegistryError as exc:
                raise Refusal(
                    HTTPStatus.INTERNAL_SERVER_ERROR,
                    f"cannot read the served model's safetensors headers in {folder}: "
                    f"{exc.message}",
                ) from exc
        snapshot = _hf_cached_snapshot(name, revision)
        if snapshot is not None:
            try:
                return folder_signature(snapshot).signature, name
            except RegistryError as exc:
                tried.append(f"the Hugging Face cache ({exc.message})")
        else:
            tried.append("the Hugging Face cache (not there)")
        try:
            base = self.client.registry.base(
                f"{name}@{revision}" if revision else name, tensors=True
            )
        except RegistryError as exc:
            tried.append(f"the registry ({exc.message})")
        else:
            if base.tensors:
                return BaseSignature(config=base.config, tensors=base.tensors), name
            tried.append("the registry (no tensor signature)")
        raise Refusal(
            HTTPStatus.INTERNAL_SERVER_ERROR,
            f"cannot read the headers of the served model {name} to check adapters against it: "
            f"tried {'; '.join(tried)} (fix: lora-reg base add {name} --from hf)",
        )

    def base_digest(self) -> str | None:
        if self.server is None:
            return None
        try:
            signature, _ = self.served_base(self.server.served_model)
        except Refusal:
            return None
        return base_signature_digest(signature)

    # --- background tasks ----------------------------------------------------------------------

    def start(self) -> None:
        """Start the follower and the heartbeat on the running event loop (once)."""
        if self._started:
            return
        self._started = True
        self._dirty = asyncio.Event()
        self._spawn(self._follow_events())
        self._spawn(self._heartbeat())
        atexit.register(self._withdraw)
        log.info(
            "lora_registry: serving adapters from %s as instance %s (events followed, "
            "heartbeat every %.0f s)",
            self.client.url,
            self.instance_id,
            self.heartbeat_s,
        )

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _blocking(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> Awaitable[T]:
        call = functools.partial(function, *args, **kwargs)
        return asyncio.get_running_loop().run_in_executor(self._pool, call)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)  # a strong reference until it ends
        task.add_done_callback(self._tasks.discard)

    def _mark_dirty(self) -> None:
        if self._dirty is not None:
            self._dirty.set()

    def _ensure_cursor(self) -> None:
        """Blocking: where the event stream is now, taken once, before the first lookup."""
        if not (self._started and self._follow) or self._cursor is not None:
            return
        with self._cursor_lock:
            if self._cursor is not None:
                return
            try:
                self._cursor = self.client.registry.events(-1).last_id
            except NotFound:
                self._follow = False
                log.warning(
                    "lora_registry: this registry has no event stream; alias moves will not be "
                    "followed (upgrade the registry)"
                )

    async def _confirm(self, name: str, path: Path) -> None:
        """Report once vLLM holds the adapter (it may also fail to load it)."""
        if self.engine is None:
            return
        deadline = asyncio.get_running_loop().time() + CONFIRM_S
        while asyncio.get_running_loop().time() < deadline:
            if self.engine.loaded_paths().get(name) == str(path):
                tracked = self.tracked.get(name)
                if tracked is not None and tracked.path == path:
                    tracked.confirmed = True
                self._mark_dirty()
                return
            await asyncio.sleep(0.05)
        tracked = self.tracked.get(name)
        if tracked is not None and tracked.path == path and not tracked.confirmed:
            del self.tracked[name]
            log.warning("lora_registry: vLLM did not load %s from %s", name, path)

    def loaded(self) -> list[LoadedAdapter]:
        """What vLLM serves now, of what this plugin handed it (forgets what was unloaded)."""
        if self.engine is None:
            return [t.entry for t in self.tracked.values()]
        paths = self.engine.loaded_paths()
        current = []
        for name, tracked in list(self.tracked.items()):
            if paths.get(name) == str(tracked.path):
                tracked.confirmed = True
                current.append(tracked.entry)
            elif tracked.confirmed and name not in paths:
                del self.tracked[name]  # unloaded through vLLM's own API
        return sorted(current, key=lambda entry: entry.name)

    def deployment(self, base_signature: str | None) -> DeploymentReport:
        """The report of what runs now (on the event loop: it reads vLLM's loaded set)."""
        assert self.server is not None
        return DeploymentReport(
            host=self.server.host,
            port=self.server.port,
            engine="vllm",
            engine_version=self.server.engine_version,
            served_model=self.server.served_model,
            base_signature=base_signature,
            loaded=self.loaded(),
        )

    async def report(self) -> None:
        """PUT the full loaded set (idempotent); failures are logged once per outage."""
        if self.server is None:
            return
        body = self.deployment(await self._blocking(self.base_digest))
        send = self.client.registry.report_deployment
        await self._guard("report", lambda: self._blocking(send, self.instance_id, body))

    async def _guard(self, what: str, action: Callable[[], Awaitable[Any]]) -> bool:
        try:
            await action()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not self._down.get(what):
                log.warning(
                    "lora_registry: %s failed (%s: %s); will retry", what, type(exc).__name__, exc
                )
            self._down[what] = True
            return False
        if self._down.pop(what, False):
            log.info("lora_registry: %s works again", what)
        return True

    async def _heartbeat(self) -> None:
        assert self._dirty is not None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), timeout=self.heartbeat_s)
            self._dirty.clear()
            await self.report()

    async def _follow_events(self) -> None:
        backoff = 1.0
        while self._follow:
            ok = await self._guard("following the event stream", self._poll_once)
            if ok:
                backoff = 1.0
            else:
                await asyncio.sleep(backoff)
                backoff = min(MAX_BACKOFF_S, backoff * 2)

    async def _poll_once(self) -> None:
        for name in sorted(self._stale):
            await self.refresh(name)
        await self._blocking(self._ensure_cursor)
        if self._cursor is None:
            return
        wait = 1.0 if self._stale else EVENT_WAIT_S
        page = await self._blocking(
            self.client.registry.events, self._cursor, wait=wait, actions=FOLLOWED_ACTIONS
        )
        adapters: list[str] = []
        for event in page.items:
            try:
                adapter = reference_name(event.subject)
            except InvalidInput:
                continue
            log.info("lora_registry: event %d %s %s", event.id, event.action, event.subject)
            if adapter not in adapters:
                adapters.append(adapter)
        self._cursor = page.last_id
        for adapter in adapters:
            for name, tracked in list(self.tracked.items()):
                if tracked.entry.adapter == adapter:
                    await self.refresh(name)

    # --- rollouts ------------------------------------------------------------------------------

    async def refresh(self, name: str) -> None:
        """Resolve a loaded reference again; switch it to the new version, unload it, or keep
        it."""
        tracked = self.tracked.get(name)
        if tracked is None:
            self._stale.discard(name)
            return
        try:
            plan = await self._blocking(self._plan, tracked)
        except Unavailable as exc:
            if name not in self._stale:
                log.warning("lora_registry: cannot check %s now (%s); retrying", name, exc.message)
            self._stale.add(name)  # asked again on the next round of the follower
            return
        self._stale.discard(name)
        if plan.action == "keep":
            return
        if self.engine is None:
            log.warning(
                "lora_registry: %s should %s, but the endpoint plugin is not loaded",
                name,
                plan.action,
            )
            return
        if plan.action == "refuse":
            log.error(
                "lora_registry: keeping %s at @%d: %s", name, tracked.entry.version, plan.reason
            )
            return
        if plan.action == "unload":
            error = await self.engine.unload(name)
            if self.tracked.get(name) is tracked:
                del self.tracked[name]
            log.warning(
                "lora_registry: unloaded %s: %s%s",
                name,
                plan.reason,
                f" ({error})" if error else "",
            )
            self._mark_dirty()
            return
        assert plan.entry is not None and plan.path is not None
        error = await self.engine.reload(name, plan.path)
        if error is not None:
            log.error(
                "lora_registry: vLLM could not reload %s with %s@%d: %s; still serving @%d",
                name,
                plan.entry.adapter,
                plan.entry.version,
                error,
                tracked.entry.version,
            )
            return
        self.tracked[name] = Tracked(plan.entry, plan.path, confirmed=True)
        log.info(
            "lora_registry: switched %s from @%d (%s) to @%d (%s), no restart",
            name,
            tracked.entry.version,
            _short(tracked.entry.digest),
            plan.entry.version,
            _short(plan.entry.digest),
        )
        self._mark_dirty()

    def _plan(self, tracked: Tracked) -> _Plan:
        """Blocking: what to do with a loaded reference now."""
        entry = tracked.entry
        try:
            version = self.client.resolve(entry.reference, allow_yanked=True)
        except NotFound as exc:
            return _Plan("unload", f"{entry.reference} no longer resolves ({exc.message})")
        if version.yanked_at is not None:
            return _Plan(
                "unload",
                f"{version.adapter}@{version.number} was yanked ({version.yank_reason})",
            )
        if version.digest == entry.digest:
            return _Plan("keep")
        try:
            path = self._materialise(entry.name, version)
        except Refusal as refusal:
            if refusal.status == HTTPStatus.SERVICE_UNAVAILABLE:
                raise Unavailable(refusal.message) from refusal
            return _Plan("refuse", refusal.message)
        report = self.preflight(self.server.served_model if self.server else "", path)
        if not report.compatible:
            return _Plan(
                "refuse",
                f"{entry.reference} now names {version.adapter}@{version.number}, which does "
                f"not fit this server: {_findings(report.errors)}",
            )
        new = LoadedAdapter(
            name=entry.name,
            reference=entry.reference,
            adapter=version.adapter,
            version=version.number,
            digest=version.digest,
            loaded_at=_now(),
        )
        return _Plan("reload", entry=new, path=path)

    def _withdraw(self) -> None:
        """At exit: tell the registry this instance serves nothing any more (best effort)."""
        if self.server is None or self._client is None:
            return
        try:
            self._client.registry.forget_deployment(self.instance_id)
        except Exception as exc:  # the process is ending: never raise here
            log.debug("lora_registry: withdrawing the deployment failed: %s", exc)


# --- vLLM glue (imports vLLM) --------------------------------------------------------------------

SERVING = RegistryServing()  # one per process; vLLM calls into it


class _InProcessEngine:
    """vLLM's `OpenAIServingModels` of this API server: its loaded set, in-place reload, unload."""

    def __init__(self, models: Any) -> None:
        self.models = models

    def loaded_paths(self) -> dict[str, str]:
        return {name: str(request.lora_path) for name, request in self.models.lora_requests.items()}

    async def reload(self, name: str, path: Path) -> str | None:
        """Switch `name` to the adapter in `path`, under a new adapter id.

        Not vLLM's load_inplace: that keeps the adapter id and swaps the weights under requests
        still generating (their tokens then come from both versions), and vLLM 0.32 stores the
        request with the flag, so its worker reads the folder again at every later step. Here
        the new version is loaded first, beside the old one, then new requests get it; requests
        already running finish on the version they started with (its id stays in vLLM's cache
        until evicted, and its folder stays in the cache directory).
        """
        from vllm.lora.request import LoRARequest

        models = self.models
        async with models.lora_resolver_lock[name]:
            current = models.lora_requests.get(name)
            if current is None:
                return f"{name} is not loaded any more"
            request = LoRARequest(
                lora_name=name,
                lora_int_id=models.lora_id_counter.inc(1),
                lora_path=str(path),
                base_model_name=current.base_model_name,
            )
            try:
                await models.engine_client.add_lora(request)
            except Exception as exc:  # vLLM's own refusal: keep serving the old version
                return f"{type(exc).__name__}: {exc}"
            models.lora_requests[name] = request
        return None

    async def unload(self, name: str) -> str | None:
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse
        from vllm.entrypoints.serve.lora.protocol import UnloadLoRAAdapterRequest

        result = await self.models.unload_lora_adapter(UnloadLoRAAdapterRequest(lora_name=name))
        return str(result.error.message) if isinstance(result, ErrorResponse) else None


def _http_error(refusal: Refusal) -> Exception:
    """The exception vLLM's API server turns into an HTTP error with this status and message."""
    try:
        from vllm.exceptions import GracefulHTTPError
    except ImportError:  # an older vLLM: its handler answers 400 with the message
        return ValueError(refusal.message)
    error: Exception = GracefulHTTPError(refusal.message, refusal.status)
    return error


def _resolver() -> Any:
    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

    class RegistryResolver(LoRAResolver):  # type: ignore[misc]
        """Resolves `ns/name[@ref]` through the lora-registry (see cli.integrations.vllm)."""

        async def resolve_lora(self, base_model_name: str, lora_name: str) -> Any:
            try:
                path = await SERVING.resolve(base_model_name, lora_name)
            except Refusal as refusal:
                if (
                    refusal.status == HTTPStatus.NOT_FOUND
                    and len(LoRAResolverRegistry.get_supported_resolvers()) > 1
                ):
                    return None  # not ours: let the other resolvers try
                raise _http_error(refusal) from None
            if path is None:
                return None
            # vLLM replaces lora_int_id with its own counter.
            return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=str(path))

    return RegistryResolver()


def register() -> None:
    """`vllm.general_plugins` entry point: register the resolver (every vLLM process)."""
    from vllm.lora.resolver import LoRAResolverRegistry

    LoRAResolverRegistry.register_resolver(PLUGIN_NAME, _resolver())


class _EndpointPlugin:
    """`vllm.endpoint_plugins` entry point (API server process only): no routes of its own;
    `init_state` gives the plugin the server's arguments and its models, and starts rollouts."""

    name = PLUGIN_NAME
    required_tasks = None

    def attach_router(self, app: Any) -> None:
        return None

    async def init_state(self, engine_client: Any, state: Any, args: Any) -> None:
        models = getattr(state, "openai_serving_models", None)
        if engine_client is None or models is None or not hasattr(models, "lora_requests"):
            return
        if not getattr(args, "enable_lora", False):
            log.warning("lora_registry: --enable-lora is off: no adapter can be served")
            return
        model_config = engine_client.model_config
        host = getattr(args, "host", None)
        SERVING.attach(
            ServerInfo(
                served_model=str(model_config.model),
                revision=getattr(model_config, "revision", None),
                max_lora_rank=int(
                    getattr(args, "max_lora_rank", None) or VLLM_DEFAULT_MAX_LORA_RANK
                ),
                host=host if host and host not in ("0.0.0.0", "::") else socket.gethostname(),
                port=getattr(args, "port", None),
                engine_version=_engine_version(),
            ),
            _InProcessEngine(models),
        )
        SERVING.start()


def endpoint_plugin() -> _EndpointPlugin:
    return _EndpointPlugin()


# --- helpers -------------------------------------------------------------------------------------


def _engine_version() -> str:
    try:
        import vllm

        return str(vllm.__version__)
    except Exception:
        return "unknown"


def _argv_value(flag: str) -> str | None:
    """`--flag VALUE` or `--flag=VALUE` from this process's command line (last one wins)."""
    value = None
    arguments = sys.argv[1:]
    for index, argument in enumerate(arguments):
        if argument == flag and index + 1 < len(arguments):
            value = arguments[index + 1]
        elif argument.startswith(flag + "="):
            value = argument.split("=", 1)[1]
    return value


def _hf_cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The local snapshot folder of a Hub model in the Hugging Face cache, without the network."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            local_files_only=True,
            allow_patterns=["config.json", "*.safetensors", "*.safetensors.index.json"],
        )
    except Exception:
        return None
    return Path(folder)
