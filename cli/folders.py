"""Which files of a local folder the client reads: `walk_files`, shared by push, identify,
`base add` (headers and `--upload`) and `check` on a folder (`cli.client`, `cli.bases`).

Symbolic links are followed only where they stay inside the folder, or, in a Hugging Face cache
snapshot (`models--org--name/snapshots/<rev>/...`), where they lead into that repository's
`blobs/`; any other link is refused (`InvalidPath`), so a push never sends a file from elsewhere
on the machine. Reads directory entries only; no file contents. Imports only `registry.core`.
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path

from registry.core.errors import InvalidInput, InvalidPath

HF_REPO_PREFIX = "models--"  # a Hugging Face cache repository folder: models--org--name


def walk_files(directory: Path, exclude: tuple[str, ...] = ()) -> list[Path]:
    """Regular files under `directory` (recursively, sorted), minus `exclude` globs (matched
    against the relative path or the name; an excluded link is neither followed nor refused).

    Returned paths sit under `directory` as written (`path.relative_to(directory)` holds),
    through any link followed; a link that is refused raises `InvalidPath` naming it and its
    target, and a link back to a folder being walked raises it too (no endless walk).
    """
    if not directory.is_dir():
        raise InvalidInput(f"{directory} is not a directory")
    root = directory.resolve()
    found: list[Path] = []

    def visit(folder: Path, real: Path, walking: tuple[Path, ...]) -> None:
        for path in sorted(folder.iterdir()):
            relative = path.relative_to(directory).as_posix()
            if any(
                fnmatch.fnmatch(relative, pattern) or fnmatch.fnmatch(path.name, pattern)
                for pattern in exclude
            ):
                continue
            target = real / path.name
            if path.is_symlink():
                target = Path(os.path.realpath(path))
                if not _link_allowed(real, target, root):
                    raise InvalidPath(
                        f"{path} is a symbolic link to {target}, outside {directory}: only links "
                        "that stay inside the folder (or Hugging Face cache snapshot links to "
                        "their blobs) are followed; copy the file in, or leave the link out "
                        "(push --exclude)",
                        path=relative,
                        target=str(target),
                    )
            if path.is_dir():
                if target in walking:
                    raise InvalidPath(
                        f"{path} is a symbolic link to {target}, a folder that holds it: "
                        "following it would never end; remove the link, or leave it out "
                        "(push --exclude)",
                        path=relative,
                        target=str(target),
                    )
                visit(path, target, (*walking, target))
            elif path.is_file():  # a link to nothing, a socket or a device is no file
                found.append(path)

    visit(directory, root, (root,))
    return sorted(found)


def _link_allowed(folder: Path, target: Path, root: Path) -> bool:
    """Whether a link in `folder` (resolved) may lead to `target` (resolved): inside `root`, or
    from a Hugging Face cache snapshot into its own repository's `blobs/`."""
    if target.is_relative_to(root):
        return True
    for snapshot in (folder, *folder.parents):
        snapshots = snapshot.parent
        repository = snapshots.parent
        if (
            snapshot != snapshots
            and snapshots.name == "snapshots"
            and repository.name.startswith(HF_REPO_PREFIX)
        ):
            blobs = repository / "blobs"
            return target != blobs and target.is_relative_to(blobs)
    return False
