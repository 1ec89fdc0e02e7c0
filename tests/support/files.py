"""Describing folders the way the registry does, independently of its code: used by tests to
compare what was pushed with what was pulled."""

from __future__ import annotations

import hashlib
from pathlib import Path

from cli.client import PARTIAL_SUFFIX


def tree_digest(directory: Path) -> dict[str, str]:
    """Relative path -> sha256 hex of every file under `directory` (partial files excluded)."""
    return {
        path.relative_to(directory).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file() and not path.name.endswith(PARTIAL_SUFFIX)
    }


def manifest(directory: Path) -> list[dict[str, object]]:
    """The `files` list of the push protocol for a folder."""
    return [
        {"path": path, "size": (directory / path).stat().st_size, "sha256": sha}
        for path, sha in tree_digest(directory).items()
    ]
