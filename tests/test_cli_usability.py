"""How `lora-reg` reads to a person and to a script: text printed as written (no rich markup
eaten), one `--json` page shape for every list, global options anywhere on the line, a short
`identify` answer, and `merge --wait` that neither hangs silently nor forever."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from cli.main import app
from tests.conftest import (
    ROOT,
    RunningServer,
    copy_adapter,
    free_port,
    own_server,
    run_cli,
    unique,
    unique_name,
)

PAGE_KEYS = {"items", "total", "limit", "offset", "next_offset"}


@pytest.fixture
def sqlite_server(servers: Callable[[str], RunningServer]) -> RunningServer:
    return servers("sqlite-folder")


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


# --- text printed as written (item 2) ----------------------------------------------------------


def test_an_install_hint_keeps_its_extra(tmp_path: Path) -> None:
    # A training box with the bare client install: torch cannot be imported.
    shim = tmp_path / "no-torch"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text("import sys\nsys.modules['torch'] = None\n")
    result = run_cli("worker", cwd=tmp_path, env={"PYTHONPATH": f"{shim}:{ROOT}"})
    assert result.returncode == 6, result.stderr
    assert "pip install 'lora-registry[worker]'" in result.stderr


def test_an_error_names_a_path_with_brackets_as_written(tmp_path: Path) -> None:
    missing = tmp_path / "runs[final]" / "[/ckpt]"  # a closing tag rich would choke on
    result = run_cli("push", str(missing), "team/x", cwd=tmp_path, env={"LORA_REG_URL": dead_url()})
    assert result.returncode == 6, result.stderr
    assert f"{missing} is not a directory" in result.stderr


def test_show_prints_a_description_with_brackets_as_written(
    sqlite_server: RunningServer, adapter_dir: Callable[..., Path]
) -> None:
    name = unique_name()
    description = "[draft] tuned on [bold]everything[/bold]"
    pushed = sqlite_server.cli(
        "push", str(adapter_dir("llama")), name, "--description", description
    )
    assert pushed.returncode == 0, pushed.stderr
    shown = sqlite_server.cli("show", name)
    assert shown.returncode == 0, shown.stderr
    assert description in shown.stdout


# --- one --json page shape, global options anywhere (item 5) ------------------------------------


def test_every_list_command_prints_the_page_shape(
    sqlite_server: RunningServer, adapter_dir: Callable[..., Path]
) -> None:
    name = unique_name()
    assert (
        sqlite_server.cli("push", str(adapter_dir("llama")), name, "--alias", "canary").returncode
        == 0
    )
    lists = [
        ("ls", name.split("/")[0]),
        ("versions", name),
        ("history", name),
        ("who-runs", "canary"),
        ("audit", "--subject", name),
        ("jobs",),
        ("base", "ls"),
        ("alias", "ls", name),
        ("token", "ls"),
    ]
    for command in lists:
        result = sqlite_server.cli(*command, "--json")
        assert result.returncode == 0, (command, result.stderr)
        page = json.loads(result.stdout)
        assert isinstance(page, dict) and set(page) == PAGE_KEYS, (command, page)
    aliases = json.loads(sqlite_server.cli("alias", "ls", name, "--json").stdout)
    assert [(a["alias"], a["version"]) for a in aliases["items"]] == [("canary", 1)]
    assert (aliases["total"], aliases["limit"], aliases["offset"]) == (1, 1, 0)
    assert aliases["next_offset"] is None


def test_global_options_work_after_the_command_too(
    sqlite_server: RunningServer, adapter_dir: Callable[..., Path], tmp_path: Path
) -> None:
    name = unique_name()
    namespace = name.split("/")[0]
    assert sqlite_server.cli("push", str(adapter_dir("llama")), name).returncode == 0
    nowhere = {"LORA_REG_URL": dead_url(), "LORA_REG_TOKEN": ""}

    def names(*args: str) -> list[str]:
        result = run_cli(*args, cwd=tmp_path, env=nowhere)
        assert result.returncode == 0, (args, result.stderr)
        return [item.get("name") or item["adapter"] for item in json.loads(result.stdout)["items"]]

    url = sqlite_server.url
    assert names("ls", namespace, "--url", url, "--token", "t", "-v", "-q", "--json") == [name]
    assert names("--url", url, "--token", "t", "-v", "-q", "ls", namespace, "--json") == [name]
    assert names("--json", "ls", namespace, "--url", url) == [name]  # --json before it too
    assert names("versions", name, "--json", "--url", url) == [name]
    assert names("alias", "ls", name, "--url", url, "--json") == []
    # An environment variable does not undo the flag given before the command.
    before = run_cli("--url", dead_url(), "ls", cwd=tmp_path, env={"LORA_REG_URL": url})
    assert before.returncode == 7 and "cannot reach the registry" in before.stderr


def _commands(group: object, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for name, command in getattr(group, "commands", {}).items():
        if getattr(command, "commands", None):
            yield from _commands(command, (*path, name))
        else:
            yield (*path, name)


def test_every_command_help_shows_the_global_options_and_their_environment() -> None:
    root = typer.main.get_command(app)
    commands = list(_commands(root))
    assert ("alias", "ls") in commands and ("push",) in commands
    runner = CliRunner()
    for command in commands:
        result = runner.invoke(app, [*command, "--help"], prog_name="lora-reg")
        assert result.exit_code == 0, (command, result.output)
        text = " ".join(result.output.split())
        for option, variable in (("--url", "LORA_REG_URL"), ("--token", "LORA_REG_TOKEN")):
            assert option in text and f"env var: {variable}" in text, (command, text)
        for flag in ("-v, --verbose", "-q, --quiet", "--version"):
            assert flag in text, (command, flag)


# --- identify: the closest version, and how many others (item 6) --------------------------------


def test_identify_a_modified_folder_shows_the_closest_version_and_counts_the_others(
    sqlite_server: RunningServer, adapter_dir: Callable[..., Path], tmp_path: Path
) -> None:
    name = unique_name()
    folder = copy_adapter(adapter_dir("llama"), tmp_path / "adapter")
    for run in range(3):
        (folder / "notes.txt").write_text(f"{name} run {run}\n")
        assert sqlite_server.cli("push", str(folder), name).returncode == 0
    (folder / "notes.txt").write_text(f"{name} run 0\n")  # as @1, with other weights
    weights = folder / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))

    found = json.loads(sqlite_server.cli("identify", str(folder), "--json").stdout)
    assert found["status"] == "modified" and len(found["matches"]) >= 3
    assert (found["matches"][0]["adapter"], found["matches"][0]["version"]) == (name, 1)
    human = sqlite_server.cli("identify", str(folder))
    assert human.returncode == 9
    assert human.stdout.count("closest") == 1
    assert f"closest {name}@1" in human.stdout and f"{name}@2" not in human.stdout
    assert "differ: adapter_model.safetensors" in human.stdout
    others = len(found["matches"]) - 1
    assert f"and {others} other versions share files with it" in human.stdout


# --- merge --wait with no worker (item 1) -------------------------------------------------------


@pytest.fixture(scope="module")
def idle_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    """A server of its own with no merge worker: jobs stay queued."""
    workdir = tmp_path_factory.mktemp("idle")
    with own_server(request, workdir, LORA_REG_EMBEDDED_WORKER="false") as running:
        yield running


@pytest.fixture
def queued_ref(
    idle_server: RunningServer,
    adapter_dir: Callable[..., Path],
    base_dir: Callable[..., Path],
    tmp_path: Path,
) -> Iterator[str]:
    """A pushed version, compatible with its registered base; its merge jobs are cancelled at
    the end so that the next test starts with an empty queue."""
    client = idle_server.client(tmp_path / "cache")
    base = f"{unique('org')}/tiny@v1"
    client.add_base(base, base_dir("llama"))
    name = unique_name()
    client.push(adapter_dir("llama"), name, base=base)
    yield f"{name}@1"
    for job in client.jobs(status="queued", limit=500).items:
        client.cancel_job(job.id)
    client.close()


def test_merge_wait_gives_up_after_its_timeout(idle_server: RunningServer, queued_ref: str) -> None:
    result = idle_server.cli("merge", queued_ref, "--wait", "--timeout", "2", "--json", timeout=60)
    assert result.returncode == 7, result.stderr
    assert "(unavailable)" in result.stderr and "after 2 s (--timeout)" in result.stderr
    assert result.stdout == ""
    jobs = json.loads(idle_server.cli("jobs", "--status", "queued", "--json").stdout)["items"]
    assert [job["adapter"] for job in jobs] == [queued_ref]  # still queued: not cancelled
    assert jobs[0]["id"] in result.stderr


def test_merge_wait_says_once_that_no_worker_runs(
    idle_server: RunningServer, queued_ref: str, tmp_path: Path
) -> None:
    idle = idle_server.cli("merge", queued_ref, "--timeout", "2", timeout=60)
    assert idle.returncode == 7, idle.stderr
    assert idle.stderr.count("no merge worker has called in") == 1, idle.stderr

    client = idle_server.client(tmp_path / "cache")
    for job in client.jobs(status="queued").items:
        client.cancel_job(job.id)
    assert client.claim_job(unique("worker")) is None  # a worker calls in; nothing to take
    busy = idle_server.cli("merge", queued_ref, "--timeout", "2", timeout=60)
    assert busy.returncode == 7, busy.stderr
    assert "no merge worker" not in busy.stderr
    client.close()
