"""Helpers for merge tests: a folder's bytes, the merge a registry worker would publish (same
provenance, so the same bytes), and killing a process at a point it announces."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Relative path -> content of every file under `folder`."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def merged_like_a_worker(
    adapter: Path, base: Path, out: Path, *, ref: str, digest: str, base_id: str
) -> dict[str, bytes]:
    """Merge locally with the provenance a worker stamps for job (ref, base_id): a worker's
    published output must be byte-identical to this."""
    from worker.engine import merge_to_folder

    provenance = {"adapter": ref, "adapter_digest": digest, "base": base_id}
    merge_to_folder(adapter, base, out, provenance=provenance)
    return folder_bytes(out)


def kill_when(marker: Path, process: subprocess.Popen[bytes], timeout: float = 120) -> None:
    """SIGKILL `process` as soon as it has written `marker` (no timing guesses)."""
    try:
        deadline = time.monotonic() + timeout
        while not marker.exists():
            assert process.poll() is None, "the process ended before it could be killed"
            assert time.monotonic() < deadline, f"{marker} never appeared"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
