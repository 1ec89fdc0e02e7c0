"""The `lora-reg` command run as a subprocess against a real server, as a user would."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import RunningServer, unique_name
from tests.support.files import tree_digest


def test_cli_tour_push_ls_show_versions_pull(
    server: RunningServer, adapter_dir, tmp_path: Path
) -> None:
    name = unique_name()
    namespace = name.split("/")[0]
    cache = {"LORA_REG_CACHE_DIR": str(tmp_path / "cache")}
    pushed = server.cli(
        "push",
        str(adapter_dir("llama")),
        name,
        "--base",
        "test-org/tiny@r1",
        "--metric",
        "rougeL=0.41",
        "--label",
        "team=search",
        "--lineage",
        "run=https://ci/1",
        "--description",
        "tour",
        "--json",
    )
    assert pushed.returncode == 0, pushed.stderr
    body = json.loads(pushed.stdout)
    assert body["created"] is True and body["version"]["number"] == 1
    digest = body["version"]["digest"]

    human = server.cli("push", str(adapter_dir("llama")), name)
    assert human.returncode == 0 and f"already exists as {name}@1" in human.stdout
    assert "uploaded 0 B in 0 file(s)" in human.stdout

    listing = server.cli("ls", namespace, "--json")
    assert [a["name"] for a in json.loads(listing.stdout)["items"]] == [name]
    assert name in server.cli("ls", namespace, "--label", "team=search").stdout
    assert json.loads(server.cli("ls", "--base", "test-org/tiny", "--json").stdout)["total"] >= 1

    shown = server.cli("show", f"{name}@1")
    assert shown.returncode == 0 and digest in shown.stdout and "rougeL=0.41" in shown.stdout
    assert json.loads(server.cli("show", f"{name}@{digest}", "--json").stdout)["number"] == 1

    versions = json.loads(
        server.cli("versions", name, "--sort", "-metrics.rougeL", "--json").stdout
    )
    assert [v["number"] for v in versions["items"]] == [1]

    out = tmp_path / "pulled"
    pulled = server.cli("pull", f"{name}@1", "-o", str(out), "--json", env=cache)
    assert pulled.returncode == 0, pulled.stderr
    assert json.loads(pulled.stdout)["downloaded_bytes"] > 0
    assert tree_digest(out) == tree_digest(adapter_dir("llama"))
    again = server.cli("pull", name, "-o", str(tmp_path / "again"), "--json", env=cache)
    assert json.loads(again.stdout)["downloaded_bytes"] == 0


def test_pull_without_output_writes_a_folder_named_after_the_adapter(
    server: RunningServer, adapter_dir, tmp_path: Path
) -> None:
    name = unique_name()
    assert server.cli("push", str(adapter_dir("gpt2")), name, "--json").returncode == 0
    result = server.cli("pull", name, cwd=tmp_path, env={"LORA_REG_CACHE_DIR": str(tmp_path / "c")})
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


def test_errors_exit_with_their_documented_codes(
    server: RunningServer, adapter_dir, tmp_path: Path
) -> None:
    missing = server.cli("show", unique_name())
    assert missing.returncode == 3
    assert "adapter_not_found" in missing.stderr and "does not exist" in missing.stderr
    assert server.cli("show", "Bad/Name").returncode == 6
    assert server.cli("push", str(tmp_path), unique_name()).returncode == 6
    assert server.cli("versions").returncode == 2  # usage: missing argument
    unreachable = server.cli("ls", env={"LORA_REG_URL": "http://127.0.0.1:9"})
    assert unreachable.returncode == 7 and "cannot reach the registry" in unreachable.stderr
    bad_metric = server.cli("push", str(adapter_dir("llama")), unique_name(), "--metric", "f1=nan")
    assert bad_metric.returncode == 6 and "finite" in bad_metric.stderr


def test_url_flag_overrides_environment(server: RunningServer) -> None:
    result = server.cli(
        "--url", server.url, "ls", "--json", env={"LORA_REG_URL": "http://127.0.0.1:9"}
    )
    assert result.returncode == 0, result.stderr
    assert "items" in json.loads(result.stdout)


def test_version_flag_prints_the_package_version(tmp_path: Path) -> None:
    from registry import __version__
    from tests.conftest import run_cli

    result = run_cli("--version", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == f"lora-reg {__version__}"
