"""What a serving engine (the vLLM plugin, a sidecar) needs beyond `cli.client.Registry`.

`ServingClient` wraps a `Registry` (whose `events`, `report_deployment` and `forget_deployment`
it uses as they are) and adds: resolve a reference to the version it names now, and materialise
a version as a verified folder named by its digest, shared safely by several engine processes on
one cache (each pulls into its own temporary folder; the first rename wins).

`base_signature_digest` names a served base by its tensor signature, so the registry can tell
which base a deployment really runs. Imports only `cli` and `registry.core`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path

from cli.client import Registry
from cli.folders import walk_files
from registry.core.basemodel import BaseSignature
from registry.core.errors import InvalidInput, VersionYanked
from registry.core.manifest import FileEntry, hash_stream, manifest_digest
from registry.core.names import parse_name, parse_reference
from registry.core.schemas import INSTANCE_ID_RE, VersionOut

SERVING_DIR = "serving"  # under the cache dir: one folder per version digest


def base_signature_digest(signature: BaseSignature) -> str:
    """`sha256:<hex>` of a base's tensor signature: every tensor's name, dtype and shape.

    Shard names and config.json are left out, so re-sharding or editing generation settings
    does not change it; a different architecture, size or dtype does.
    """
    canonical = json.dumps(
        {name: [t.dtype, list(t.shape)] for name, t in sorted(signature.tensors.items())},
        separators=(",", ":"),
        sort_keys=True,
    )
    return "sha256:" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def check_instance_id(text: str) -> str:
    if not re.fullmatch(INSTANCE_ID_RE, text):
        raise InvalidInput(
            f"invalid instance id {text!r}: up to 64 of A-Z a-z 0-9 . _ : -, starting with a "
            "letter or digit"
        )
    return text


def folder_digest(folder: Path) -> str:
    """The manifest digest of the files in `folder` (what the registry calls a version digest)."""
    entries = []
    for path in walk_files(folder):
        with open(path, "rb") as handle:
            size, sha = hash_stream(handle, lambda _n: None)
        entries.append(FileEntry(path.relative_to(folder).as_posix(), size, sha))
    return manifest_digest(entries)


class ServingClient:
    """Registry calls for a serving engine; every method blocks (run them in a thread)."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    @property
    def url(self) -> str:
        return self.registry.url

    def close(self) -> None:
        self.registry.close()

    # --- versions ------------------------------------------------------------------------------

    def resolve(self, ref: str, *, allow_yanked: bool = False) -> VersionOut:
        """The version `ref` names now (a yanked one raises `VersionYanked` unless allowed)."""
        version = self.registry.get(ref)
        if version.yanked_at is not None and not allow_yanked:
            raise VersionYanked(
                f"{version.adapter}@{version.number} ({version.digest}) was yanked: "
                f"{version.yank_reason}",
                version=version.number,
            )
        return version

    def folder(self, digest: str) -> Path:
        """Where the verified folder of the version with `digest` lives (it may not exist yet)."""
        hex_digest = _hex(digest)
        return self.registry.cache_dir / SERVING_DIR / hex_digest[:2] / hex_digest

    def materialise(self, adapter: str, digest: str) -> Path:
        """The version's files in a folder named by its digest, pulled through the verified blob
        cache. Several processes may call this at once: each pulls into its own temporary folder
        and renames it into place; the first rename wins and the others remove theirs. A folder
        already in place is re-hashed and replaced if its files no longer match the digest."""
        parse_name(adapter)
        final = self.folder(digest)
        if final.is_dir() and _is_version(final, digest):
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        partial = final.with_name(f".{final.name}.{uuid.uuid4().hex}.partial")
        try:
            self.registry.pull(f"{adapter}@{digest}", partial)
            if final.is_dir() and not _is_version(final, digest):
                # Damaged (edited by hand, a full disk...): move it aside, never serve it.
                stale = final.with_name(f".{final.name}.{uuid.uuid4().hex}.stale")
                try:
                    os.rename(final, stale)
                except FileNotFoundError:
                    pass
                else:
                    shutil.rmtree(stale, ignore_errors=True)
            try:
                os.rename(partial, final)
            except OSError:
                if not (final.is_dir() and _is_version(final, digest)):
                    raise
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        return final


def reference_name(ref: str) -> str:
    """`ns/name` of a reference."""
    return str(parse_reference(ref).name)


def _hex(digest: str) -> str:
    if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        raise InvalidInput(f"invalid version digest {digest!r}")
    return digest.removeprefix("sha256:")


def _is_version(folder: Path, digest: str) -> bool:
    try:
        return folder_digest(folder) == digest
    except (OSError, InvalidInput):
        return False
