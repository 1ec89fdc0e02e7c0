"""Killed pushes and pulls (SIGKILL, no clean-up code runs) leave nothing half-visible, and the
re-run finishes the job doing only what is left."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx

from cli.client import PARTIAL_SUFFIX, Registry
from tests.conftest import ROOT, RunningServer, copy_adapter, unique_name
from tests.support.files import manifest, tree_digest


def run_until_killed(script: str, **values: str) -> subprocess.CompletedProcess[str]:
    """Run a client script in a subprocess that SIGKILLs itself at a chosen moment."""
    code = textwrap.dedent(script).format(**values)
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_push_killed_after_some_uploads_leaves_no_version_and_rerun_uploads_only_the_rest(
    server: RunningServer, client: Registry, adapter_dir, tmp_path: Path
) -> None:
    name = unique_name()
    folder = copy_adapter(adapter_dir("llama"), tmp_path / "adapter")
    for index in range(3):
        (folder / f"notes-{index}.txt").write_bytes(os.urandom(4096 + index))
    plan = httpx.post(
        f"{server.url}/api/v1/adapters/{name}/uploads", json={"files": manifest(folder)}
    ).json()
    missing_before = {item["sha256"] for item in plan["missing"]}
    assert len(missing_before) >= 3

    killed = run_until_killed(
        """
        import os, signal
        from cli.client import Registry

        original = Registry._upload_single

        def upload_then_die(self, item, path, progress):
            original(self, item, path, progress)
            os.kill(os.getpid(), signal.SIGKILL)

        Registry._upload_single = upload_then_die
        Registry({url!r}, concurrency=1).push({folder!r}, {name!r})
        """,
        url=server.url,
        folder=str(folder),
        name=name,
    )
    assert killed.returncode == -9, killed.stderr

    gone = httpx.get(f"{server.url}/api/v1/adapters/{name}")
    assert gone.status_code == 404 and gone.json()["code"] == "adapter_not_found"

    rerun = client.push(folder, name)
    assert rerun.created and rerun.version.number == 1
    assert rerun.uploaded_files == len(missing_before) - 1


def test_pull_killed_midway_leaves_no_partial_file_under_a_final_name(
    server: RunningServer, client: Registry, adapter_dir, tmp_path: Path
) -> None:
    name = unique_name()
    folder = copy_adapter(adapter_dir("llama"), tmp_path / "adapter")
    (folder / "big.safetensors.txt").write_bytes(os.urandom(6 * 1024 * 1024))
    version = client.push(folder, name).version
    expected = {f.path: f.sha256 for f in version.files or []}
    out, cache = tmp_path / "out", tmp_path / "cache"

    killed = run_until_killed(
        """
        import os, signal
        import httpx
        from cli.client import Registry

        original = httpx.Response.iter_bytes

        def die_after_two_chunks(self, *args, **kwargs):
            for index, chunk in enumerate(original(self, *args, **kwargs)):
                yield chunk
                if index == 1:
                    os.kill(os.getpid(), signal.SIGKILL)

        httpx.Response.iter_bytes = die_after_two_chunks
        Registry({url!r}, cache_dir={cache!r}, concurrency=1).pull({name!r}, {out!r})
        """,
        url=server.url,
        cache=str(cache),
        name=name,
        out=str(out),
    )
    assert killed.returncode == -9, killed.stderr

    # Whatever is under a final name, in the output or the cache, is complete and verified.
    placed = [p for p in out.rglob("*") if p.is_file() and not p.name.endswith(PARTIAL_SUFFIX)]
    for path in placed:
        assert hashlib.sha256(path.read_bytes()).hexdigest() == expected[path.name]
    assert "big.safetensors.txt" not in {p.name for p in placed}
    for path in (cache / "blobs").rglob("*"):  # stamps/ holds what was verified, not bytes
        if path.is_file() and not path.name.endswith(PARTIAL_SUFFIX):
            assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name

    with Registry(server.url, cache_dir=cache) as again:
        result = again.pull(name, out)
    assert tree_digest(out) == expected
    assert result.downloaded_bytes + result.cached_bytes == version.size
