"""Symbolic links in a pushed folder: followed inside the folder (and from a Hugging Face cache
snapshot into its own blobs), refused anywhere else, with the link and its target named."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import RunningServer, copy_adapter, unique, unique_name
from tests.support.files import tree_digest


@pytest.fixture
def sqlite_server(servers: Callable[[str], RunningServer]) -> RunningServer:
    return servers("sqlite-folder")


def outside_file(tmp_path: Path) -> Path:
    secret = tmp_path / "elsewhere" / "hostname"
    secret.parent.mkdir(parents=True)
    secret.write_text("a file of the machine, not of the adapter\n")
    return secret


def test_a_link_to_a_file_outside_the_folder_is_refused_and_named(
    sqlite_server: RunningServer, adapter_dir: Callable[..., Path], tmp_path: Path
) -> None:
    folder = copy_adapter(adapter_dir("llama"), tmp_path / "adapter")
    secret = outside_file(tmp_path)
    (folder / "hostname").symlink_to(secret)
    name = unique_name()
    refused = sqlite_server.cli("push", str(folder), name)
    assert refused.returncode == 6, refused.stderr
    assert "(invalid_path)" in refused.stderr
    assert f"{folder / 'hostname'} is a symbolic link to {secret.resolve()}" in refused.stderr
    assert sqlite_server.cli("show", name).returncode == 3  # nothing was pushed
    left_out = sqlite_server.cli("push", str(folder), name, "--exclude", "hostname")
    assert left_out.returncode == 0, left_out.stderr


def test_a_link_to_a_folder_outside_is_refused(
    sqlite_server: RunningServer, adapter_dir: Callable[..., Path], tmp_path: Path
) -> None:
    folder = copy_adapter(adapter_dir("llama"), tmp_path / "adapter")
    secret = outside_file(tmp_path)
    (folder / "extra").symlink_to(secret.parent, target_is_directory=True)
    refused = sqlite_server.cli("push", str(folder), unique_name())
    assert refused.returncode == 6, refused.stderr
    assert f"{folder / 'extra'} is a symbolic link to {secret.parent.resolve()}" in refused.stderr


def test_links_inside_the_folder_are_followed(
    sqlite_server: RunningServer, adapter_dir: Callable[..., Path], tmp_path: Path
) -> None:
    folder = copy_adapter(adapter_dir("llama"), tmp_path / "adapter")
    (folder / "docs").mkdir()
    (folder / "docs" / "notes.md").write_text("# notes\n")
    (folder / "notes.md").symlink_to("docs/notes.md")
    (folder / "more").symlink_to("docs", target_is_directory=True)
    (folder / "loop").symlink_to(".", target_is_directory=True)
    refused = sqlite_server.cli("push", str(folder), unique_name())
    assert refused.returncode == 6 and "would never end" in refused.stderr
    (folder / "loop").unlink()

    name = unique_name()
    pushed = sqlite_server.cli("push", str(folder), name, "--json")
    assert pushed.returncode == 0, pushed.stderr
    files = {f["path"] for f in json.loads(pushed.stdout)["version"]["files"]}
    assert {"notes.md", "docs/notes.md", "more/notes.md"} <= files
    pulled = sqlite_server.cli(
        "pull",
        name,
        "-o",
        str(tmp_path / "pulled"),
        env={"LORA_REG_CACHE_DIR": str(tmp_path / "c")},
    )
    assert pulled.returncode == 0, pulled.stderr
    assert (tmp_path / "pulled" / "more" / "notes.md").read_text() == "# notes\n"


def hub_cache_snapshot(hub: Path, repository: str, adapter: Path) -> Path:
    """`adapter` laid out as huggingface_hub caches a download: files in blobs/ named by their
    hash, and a snapshots/<revision>/ folder of relative links to them."""
    snapshot = hub / repository / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (hub / repository / "blobs").mkdir()
    for file in adapter.iterdir():
        blob = hub / repository / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(Path("../..") / "blobs" / blob.name)
    return snapshot


def test_a_hugging_face_cache_snapshot_links_only_to_its_own_blobs(
    sqlite_server: RunningServer, adapter_dir: Callable[..., Path], tmp_path: Path
) -> None:
    hub = tmp_path / "hub"
    snapshot = hub_cache_snapshot(hub, f"models--org--{unique('lora')}", adapter_dir("llama"))
    name = unique_name()
    pushed = sqlite_server.cli("push", str(snapshot), name, "--json")
    assert pushed.returncode == 0, pushed.stderr
    out = tmp_path / "pulled"
    pulled = sqlite_server.cli(
        "pull", name, "-o", str(out), env={"LORA_REG_CACHE_DIR": str(tmp_path / "c")}
    )
    assert pulled.returncode == 0, pulled.stderr
    assert tree_digest(out) == tree_digest(adapter_dir("llama"))

    # A link into another repository's blobs is no part of this snapshot.
    other = hub_cache_snapshot(hub, "models--org--other", adapter_dir("gpt2"))
    stray = next((other.parent.parent / "blobs").iterdir())
    (snapshot / "borrowed.safetensors").symlink_to(stray)
    refused = sqlite_server.cli("push", str(snapshot), unique_name())
    assert refused.returncode == 6, refused.stderr
    assert (
        f"{snapshot / 'borrowed.safetensors'} is a symbolic link to {stray.resolve()}"
        in refused.stderr
    )


def test_base_add_refuses_a_link_outside_the_checkpoint(
    sqlite_server: RunningServer, base_dir: Callable[..., Path], tmp_path: Path
) -> None:
    folder = tmp_path / "base"
    shutil.copytree(base_dir("llama"), folder)
    secret = outside_file(tmp_path)
    (folder / "notes.txt").symlink_to(secret)
    base = f"{unique('org')}/tiny@v1"
    for upload in ((), ("--upload",)):
        refused = sqlite_server.cli("base", "add", base, "--from", str(folder), *upload)
        assert refused.returncode == 6, refused.stderr
        assert f"{folder / 'notes.txt'} is a symbolic link to {secret.resolve()}" in refused.stderr
    assert sqlite_server.cli("base", "show", base).returncode == 3
