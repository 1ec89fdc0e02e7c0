"""The README's Tour, run command by command against a server started as its first set-up command
starts one (`lora-reg server`: SQLite + folder store under ./.lora-reg, auth on, the embedded
merge worker on), with the real CLI, in one working directory, as a user would.

What the tour names but a test machine cannot have (the Hugging Face Hub, S3, other machines'
folders) is replaced by a local stand-in listed in STAND_INS, each with its reason; what happens
between commands in real life (training goes on, a version gets deployed) is done by BETWEEN.
Values the README abbreviates (`4f0c...`, `sha256:9a7e...`) are taken from the output an earlier
command printed where the README shows them, and that output must match what the README shows.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from registry.settings import Settings
from tests.conftest import ROOT, run_cli, start_server, stop_server
from tests.support.merging import folder_bytes
from tests.support.tour import (
    COMMAND_SUBSTITUTION,
    TourCommand,
    fill_placeholders,
    match_output,
    parse_tour,
)

README = ROOT / "README.md"

# The tour's base model ids (`--base` of the first push, `base_model_name_or_path` of ./out).
BASE_ID = "meta-llama/Llama-3.1-8B"

# Stand-ins: (README text (a regex), what runs instead, why). Applied in order to every command;
# each must be used at least once, so that none outlives the README text it was written for.
STAND_INS: list[tuple[str, str, str]] = [
    (
        r"--from hf\b",
        "--from {work}/hub/" + BASE_ID,
        "no Hugging Face Hub here: a folder with a tiny llama checkpoint stands in for the Hub "
        "repository (the client reads safetensors headers either way)",
    ),
    (
        r"--from s3://",
        "--from {work}/s3/",
        "no S3 in the default set-up: the same bucket/prefix as a local folder with a tiny base "
        "(server-read S3 sources: tests/test_base_sources.py)",
    ),
    (
        r"--to s3://",
        "--to dir:{work}/s3/",
        "no S3 in the default set-up: the merge goes to the same bucket/prefix as a folder on "
        "the worker (S3 targets: tests/test_merge_worker.py)",
    ),
    (
        r"--to hub:",
        "--to dir:{work}/hub/",
        "no Hugging Face Hub here: the merge goes to the same repo@branch as a folder on the "
        "worker (Hub targets: tests/test_merge_hub.py)",
    ),
    (
        r"(?<![\w.])/srv/",
        "{work}/srv/",
        "another machine's folders: the same paths under the working directory",
    ),
    (
        r" \[(--[^\]]+)\]",
        r" \1",
        "`[--flag]` marks an optional part: run with it",
    ),
]


@dataclass
class World:
    """The working directory the tour runs in and what it holds."""

    work: Path
    adapters: list[Path]  # ./out as training leaves it: first, after more training, ...
    trained: int = 0
    env: dict[str, str] = field(default_factory=dict)

    def retrain(self) -> None:
        """Training went on: ./out now holds other weights (same base, same layout)."""
        self.trained += 1
        shutil.rmtree(self.work / "out")
        shutil.copytree(self.adapters[self.trained], self.work / "out")

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, cwd=self.work, env=self.env)


# Things that happen between two commands of the tour in real life, done before the command named
# (README text as parse_tour gives it): (what, why). Each must be used.
BETWEEN: dict[str, tuple[Callable[[World], object], str]] = {
    "lora-reg push ./out team/summarizer --require-compatible": (
        World.retrain,
        "@2: ./out was trained further (the README's comment must say `retrained`)",
    ),
    "lora-reg push ./out team/summarizer --alias staging": (
        World.retrain,
        "@3, which `alias set team/summarizer@3` needs: ./out was trained further again",
    ),
    "lora-reg identify /srv/adapters/summarizer": (
        lambda world: _ok(
            world.cli(
                "pull", "team/summarizer@production", "-o", f"{world.work}/srv/adapters/summarizer"
            )
        ),
        "something must be deployed there: production's version, pulled as a deployment would",
    ),
}

# Exit codes the README documents for a tour command that is not 0 (none as the tour runs here:
# /srv/adapters/summarizer holds exactly production's version, so identify exits 0).
EXPECTED_EXIT: dict[str, int] = {}


def _ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"{result.args}: {result.stdout}\n{result.stderr}"
    return result


def _prepare(work: Path, adapter_dir: Callable[..., Path], base_dir: Callable[..., Path]) -> World:
    """The folders the tour takes for granted: ./out (a real PEFT adapter trained on a tiny llama
    standing in for BASE_ID), ./base-7b-v3 and the stand-ins of a Hub repo and an S3 prefix (that
    same tiny llama checkpoint)."""
    adapters = [
        adapter_dir("llama", seed=seed, base_model_name_or_path=BASE_ID) for seed in range(3)
    ]
    base = base_dir("llama")
    shutil.copytree(adapters[0], work / "out")
    for folder in ("base-7b-v3", f"hub/{BASE_ID}", "s3/models/base-7b-v2"):
        shutil.copytree(base, work / folder)
    return World(work, adapters)


def _substitute(text: str, work: Path, used: set[str]) -> str:
    for pattern, replacement, _why in STAND_INS:
        text, count = re.subn(pattern, replacement.replace("{work}", str(work)), text)
        if count:
            used.add(pattern)
    return text


def _expand(text: str, world: World) -> str:
    """`$(...)` runs in a shell, in the working directory, with the tour's environment."""

    def run(found: re.Match[str]) -> str:
        result = subprocess.run(
            ["bash", "-c", found.group(1)],
            cwd=world.work,
            env={**os.environ, **world.env},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 0, f"$({found.group(1)}): {result.stderr}"
        return result.stdout.strip()

    return COMMAND_SUBSTITUTION.sub(run, text)


def _describe(command: TourCommand, ran: str, result: subprocess.CompletedProcess[str]) -> str:
    return (
        f"README line {command.line}: {command.text}\n  ran: {ran}\n  exit {result.returncode}\n"
        f"  stdout:\n{result.stdout}\n  stderr:\n{result.stderr}"
    )


def _wait_for_jobs(world: World, timeout: float = 120) -> list[dict[str, object]]:
    deadline = time.monotonic() + timeout
    while True:
        jobs = json.loads(_ok(world.cli("jobs", "--json")).stdout)["items"]
        if all(job["status"] not in ("queued", "running") for job in jobs):
            return list(jobs)
        assert time.monotonic() < deadline, f"merge jobs still running: {jobs}"
        time.sleep(1)


def _check_merged(merged: Path, base: Path) -> None:
    """A merged checkpoint: the base's files, same tensors, the adapted ones changed."""
    from safetensors.numpy import load_file

    files = folder_bytes(merged)
    assert {"config.json", "model.safetensors"} <= set(files), sorted(files)
    merged_tensors = load_file(merged / "model.safetensors")
    base_tensors = load_file(base / "model.safetensors")
    assert set(merged_tensors) == set(base_tensors)
    changed = {
        name
        for name, tensor in merged_tensors.items()
        if tensor.shape != base_tensors[name].shape or (tensor != base_tensors[name]).any()
    }
    assert changed and all(name.endswith(("q_proj.weight", "v_proj.weight")) for name in changed)


@pytest.mark.slow
def test_the_readme_tour_runs_as_written(
    tmp_path: Path,
    adapter_dir: Callable[..., Path],
    base_dir: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    commands = parse_tour(Path(os.environ.get("LORA_REG_TEST_README", README)).read_text())
    assert len(commands) >= 40, f"the tour parsed into {len(commands)} commands only"
    # A reader must see where ./out changes: the comments of those pushes say so.
    for command in commands:
        if command.text in BETWEEN and BETWEEN[command.text][0] == World.retrain:
            assert "retrained" in command.comment, (
                f"README line {command.line}: `{command.text}` pushes new weights; its comment "
                "must say that ./out was retrained"
            )

    # A user's shell has no LORA_REG_* settings: nothing of the developer's may leak in.
    for name in [name for name in os.environ if name.startswith("LORA_REG_")]:
        monkeypatch.delenv(name)
    work = tmp_path / "work"
    work.mkdir()
    world = _prepare(work, adapter_dir, base_dir)
    # Every setting at its default; the token file is named only because start_server names one.
    token_file = Settings.model_fields["bootstrap_token_file"].default
    server = start_server(work, {"LORA_REG_BOOTSTRAP_TOKEN_FILE": str(token_file)}, "default")
    try:
        # Where this differs from a user's terminal: the server listens on a free port, not 8000,
        # and the blob cache goes under the working directory, not ~/.cache.
        world.env = {"LORA_REG_URL": server.url, "LORA_REG_CACHE_DIR": str(work / "cache")}
        _run_tour(commands, world)
    finally:
        stop_server(server.process)
    log = "\n".join(path.read_text() for path in work.glob("server-*.log"))
    assert "embedded merge worker" in log and "started" in log, log


def _run_tour(commands: list[TourCommand], world: World) -> None:
    work = world.work
    bindings: dict[str, str] = {}
    used_stand_ins: set[str] = set()
    used_between: set[str] = set()
    verbatim: list[str] = []
    stood_in: list[str] = []
    pulled_merge = False
    for command in commands:
        if command.text in BETWEEN:
            action, _why = BETWEEN[command.text]
            action(world)
            used_between.add(command.text)
        filled = fill_placeholders(command.text, bindings)
        ran = _substitute(filled, work, used_stand_ins)
        (verbatim if ran == filled else stood_in).append(ran)
        ran = _expand(ran, world)
        args = shlex.split(ran)
        if args[0] == "export":
            name, _, value = args[1].partition("=")
            world.env[name] = value
            continue
        assert args[0] == "lora-reg", command
        result = world.cli(*args[1:])
        expected = EXPECTED_EXIT.get(command.text, 0)
        assert result.returncode == expected, _describe(command, ran, result)
        bindings.update(match_output(command.output, result.stdout))
        if args[1] == "pull" and args[2].startswith("sha256:"):
            _check_merged(work / "merged", work / "base-7b-v3")
            pulled_merge = True
        if args[1] == "whoami":  # auth is on, and the tour's token is the bootstrap admin's
            assert "(admin)" in result.stdout, result.stdout
        if args[1] == "identify":
            # The README: identify exits 9 for a folder that is modified (or unknown).
            modified = shutil.copytree(Path(args[2]), work / "modified")
            (modified / "adapter_config.json").write_text("{}\n")
            assert world.cli("identify", str(modified)).returncode == 9

    # The bootstrap token file, as the tour's prose describes it.
    assert (work / ".lora-reg" / "admin-token").stat().st_mode & 0o777 == 0o600
    assert used_stand_ins == {pattern for pattern, _, _ in STAND_INS}, "an unused stand-in"
    assert used_between == set(BETWEEN), "a BETWEEN entry names no tour command"
    # The merge the tour waited for was pulled into ./merged (checked there).
    assert pulled_merge, "the tour never pulled its merge"
    # Merges that were queued without --wait finish too, and land where they were sent.
    jobs = _wait_for_jobs(world)
    assert jobs and all(job["status"] == "succeeded" for job in jobs), jobs
    assert all(str(job["worker"]).startswith("embedded-") for job in jobs), jobs
    for target in (
        "s3/models/summarizer-merged",
        "hub/acme/summarizer-7b@main",
        "srv/models/summarizer",
    ):
        assert (work / target / "model.safetensors").is_file(), sorted(work.rglob("*"))
    # Nearly every command runs as written; the rest only with the stand-ins above.
    assert len(verbatim) + len(stood_in) == len(commands)
    assert len(stood_in) <= len(commands) // 5, stood_in


# --- the parser, on a README of its own (fast: no server) ---------------------------------------

SAMPLE = """\
## Set-up

```sh
lora-reg server
```

## Tour

```sh
export TOKEN=$(cat file)   # the token
# prose under an export
lora-reg push ./out a/b \\
    --metric x=1   # a comment
# pushed a/b@1 sha256:6f1c...
#   uploaded 25.3 MiB in 3 file(s)

pip install something
lora-reg jobs 4f0c...   # a comment
                        # that goes on
```

```python
lora-reg not-shell
```

### A subsection

```sh
lora-reg whoami
```

## Next

```sh
lora-reg not-in-the-tour
```
"""


def test_the_tour_parser_keeps_commands_and_the_output_shown_under_them() -> None:
    commands = parse_tour(SAMPLE)
    assert [(c.line, c.text, c.comment, c.output) for c in commands] == [
        (10, "export TOKEN=$(cat file)", "the token", ()),
        (
            12,
            "lora-reg push ./out a/b --metric x=1",
            "a comment",
            ("pushed a/b@1 sha256:6f1c...", "uploaded 25.3 MiB in 3 file(s)"),
        ),
        (18, "lora-reg jobs 4f0c...", "a comment", ()),
        (29, "lora-reg whoami", "", ()),
    ]


def test_documented_output_binds_placeholders_and_catches_outdated_output() -> None:
    printed = "pushed a/b@1 sha256:" + "ab" * 32 + "\n  uploaded 1.0 KiB in 3 file(s)\n"
    shown = ("pushed a/b@1 sha256:6f1c...", "uploaded 25.3 MiB in 3 file(s)")
    assert match_output(shown, printed) == {"6f1c...": "ab" * 32}
    assert fill_placeholders("lora-reg pull sha256:6f1c...", {"6f1c...": "cd"}) == (
        "lora-reg pull sha256:cd"
    )
    with pytest.raises(AssertionError, match="README shows"):
        match_output(("created a/b@1",), printed)
    with pytest.raises(AssertionError, match="no earlier command"):
        fill_placeholders("lora-reg jobs 4f0c...", {})
