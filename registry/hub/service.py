"""The Hugging Face protocol's use cases: which repository a Hub repo id names, which commit a
revision is, which files that commit holds and where their bytes are.

Called by `registry.hub.api` inside the request's read-only transaction; reads only, never
imports FastAPI. Nothing is recorded: the registry records no pulls, so downloads through the
Hub protocol are not counted either. Repo ids and revisions (docs/architecture.md §14):

- `merged/<64 hex>`: the merged artifact `sha256:<64 hex>`, when it is stored in the registry
  (merge target `registry`); revisions `main`, its digest and its commit id.
- `ns/name` naming an adapter: its versions; revisions `main` (the newest version that is not
  yanked), a number (`3`), an alias (`production`), a digest (`sha256:<hex>`) and a version's
  commit id. A yanked version is refused however it is named, as pull refuses it.
- any other id: the base of that id whose weights are stored (`base add --upload`); revisions
  `main` (the one registered last), its registered revision (`v1`) and its commit id.

A commit id is `protocol.commit_id` of the content digest: finding the version of a commit id
hashes the digest of each of the adapter's versions (one small query).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlmodel import Session, col, select

from registry.adapters.repository import get_adapter_row, resolve
from registry.adapters.service import version_out
from registry.bases.service import base_out, find_base_row
from registry.core.errors import (
    AdapterNotFound,
    ArtifactNotFound,
    BaseNotFound,
    InvalidName,
    VersionNotFound,
    VersionYanked,
)
from registry.core.manifest import FileEntry, manifest_digest
from registry.core.names import AdapterName, Reference, Selector, parse_name, parse_selector
from registry.core.schemas import VersionFileOut
from registry.hub.protocol import (
    COMMIT_RE,
    MAIN,
    MERGED_NAMESPACE,
    HubFile,
    Snapshot,
    commit_id,
    pipeline_tag,
    safetensors_info,
)
from registry.merges.service import get_artifact
from registry.models import Adapter, AdapterVersion, BaseModelRow, as_utc
from registry.storage import ObjectStore
from registry.storage.folder import FolderStore

_HEX64 = re.compile(r"[0-9a-f]{64}")


def snapshot(session: Session, repo_id: str, revision: str) -> Snapshot:
    """The repository `repo_id` at `revision` (see the module docstring)."""
    namespace, _, name = repo_id.partition("/")
    if namespace == MERGED_NAMESPACE and _HEX64.fullmatch(name):
        return _merged(session, repo_id, f"sha256:{name}", revision)
    adapter = _adapter_row(session, repo_id)
    if adapter is not None:
        return _adapter(session, adapter, revision)
    return _base(session, repo_id, revision)


def resolve_file(
    session: Session, repo_id: str, revision: str, path: str
) -> tuple[Snapshot, HubFile]:
    """The file at `path` of `repo_id` at `revision`, and the snapshot it belongs to."""
    found = snapshot(session, repo_id, revision)
    return found, found.file(path)


def local_path(store: ObjectStore, file: HubFile) -> Path | None:
    """Where the file's bytes are on this machine (the folder store), else None."""
    return store.path(file.sha256) if isinstance(store, FolderStore) else None


def download_url(store: ObjectStore, file: HubFile) -> str | None:
    """A presigned URL the client downloads the bytes from (S3), else None."""
    return store.download_url(file.sha256)


def stream(store: ObjectStore, file: HubFile) -> Iterator[bytes]:
    """The file's bytes, for a store that has neither a local path nor download URLs."""
    return store.iter_blob(file.sha256)


def _files(files: list[VersionFileOut] | None) -> tuple[HubFile, ...]:
    return tuple(HubFile(f.path, f.size, f.sha256) for f in files or [])


# --- adapters ----------------------------------------------------------------------------------


def _adapter_row(session: Session, repo_id: str) -> Adapter | None:
    try:
        return get_adapter_row(session, parse_name(repo_id))
    except (InvalidName, AdapterNotFound):
        return None


def _adapter(session: Session, adapter: Adapter, revision: str) -> Snapshot:
    name = AdapterName(adapter.namespace, adapter.name)
    version = _version(session, adapter, name, revision)
    label = f"{name}@{version.number}"
    if version.yanked_at is not None:
        raise VersionYanked(
            f"{label} (revision {revision!r}) is yanked ({version.yank_reason}): it must not be "
            f"used; load another version (lora-reg versions {name}), or fetch it anyway with "
            f"lora-reg pull {label} --allow-yanked",
            version=version.number,
        )
    out = version_out(session, name, version)
    tags = ["peft", "lora", "lora-registry"]
    card: dict[str, Any] = {"library_name": "peft", "tags": tags}
    if version.base_model_id:
        card["base_model"] = version.base_model_id
        tags.append(f"base_model:adapter:{version.base_model_id}")
    return Snapshot(
        repo_id=str(name),
        kind="adapter",
        commit=commit_id(version.digest),
        title=f"{label} ({version.digest})",
        files=_files(out.files),
        created_at=as_utc(adapter.created_at),
        last_modified=out.created_at,
        library_name="peft",
        tags=tuple(tags),
        card=card,
        pipeline_tag=pipeline_tag(version.task_type),
    )


def _version(
    session: Session, adapter: Adapter, name: AdapterName, revision: str
) -> AdapterVersion:
    """The version a revision names: main (latest), a commit id, or a selector."""
    if revision == MAIN:
        selector = Selector("latest")
    elif COMMIT_RE.fullmatch(revision):
        numbers = session.exec(
            select(AdapterVersion.number, AdapterVersion.digest).where(
                col(AdapterVersion.adapter_id) == adapter.id
            )
        ).all()
        matching = [number for number, digest in numbers if commit_id(digest) == revision]
        if not matching:
            raise VersionNotFound(
                f"{name} has no commit {revision} (see lora-reg versions {name})",
                reference=f"{name}@{revision}",
            )
        selector = Selector("number", str(matching[0]))
    else:
        selector = parse_selector(revision)
    return resolve(session, Reference(name, selector))


# --- stored bases ------------------------------------------------------------------------------


def _base(session: Session, repo_id: str, revision: str) -> Snapshot:
    rows = session.exec(
        select(BaseModelRow)
        .where(BaseModelRow.model_id == repo_id, col(BaseModelRow.stored).is_(True))
        .order_by(col(BaseModelRow.id).desc())
    ).all()
    if not rows:
        if find_base_row(session, repo_id, None) is not None:
            raise BaseNotFound(
                f"base {repo_id} is registered but its weights are not stored in the registry: "
                f"load it from where it lives, or store it with lora-reg base add {repo_id} "
                "--from DIR --upload",
                base=repo_id,
            )
        raise AdapterNotFound(
            f"no adapter, stored base or merged artifact is named {repo_id} (see lora-reg ls "
            "and lora-reg base ls; merged artifacts are merged/<64 hex of their digest>)",
            adapter=repo_id,
        )
    snapshots = [_base_snapshot(session, row, rows[-1]) for row in rows]
    if revision == MAIN:
        return snapshots[0]
    for row, found in zip(rows, snapshots, strict=True):
        if revision in (row.revision, found.commit):
            return found
    registered = ", ".join(row.revision or "(none)" for row in rows)
    raise VersionNotFound(
        f"base {repo_id} has no stored revision {revision!r}: its stored revisions are main "
        f"(the one registered last) and {registered}, or their commit ids",
        reference=f"{repo_id}@{revision}",
    )


def _base_snapshot(session: Session, row: BaseModelRow, first: BaseModelRow) -> Snapshot:
    out = base_out(session, row)
    files = _files(out.files)
    digest = manifest_digest(FileEntry(f.path, f.size, f.sha256) for f in files)
    label = f"{row.model_id}@{row.revision}" if row.revision else row.model_id
    config: dict[str, Any] = {
        key: row.config[key] for key in ("architectures", "model_type") if key in row.config
    }
    return Snapshot(
        repo_id=row.model_id,
        kind="base",
        commit=commit_id(digest),
        title=f"base {label} ({digest})",
        files=files,
        created_at=as_utc(first.created_at),
        last_modified=out.created_at,
        library_name="transformers",
        tags=("transformers", "safetensors", "lora-registry"),
        card={"library_name": "transformers", "tags": ["lora-registry"]},
        config=config,
        safetensors=safetensors_info(row.tensors),
    )


# --- merged artifacts --------------------------------------------------------------------------


def _merged(session: Session, repo_id: str, digest: str, revision: str) -> Snapshot:
    artifact = get_artifact(session, digest)
    if not artifact.stored:
        raise ArtifactNotFound(
            f"merged artifact {digest} was published to {artifact.location}, not stored in "
            "the registry: load it from there, or merge again with --to registry",
            digest=digest,
        )
    commit = commit_id(artifact.digest)
    if revision not in (MAIN, commit, artifact.digest):
        raise VersionNotFound(
            f"{repo_id} has one revision: main ({artifact.digest}, commit {commit}), not "
            f"{revision!r}",
            reference=f"{repo_id}@{revision}",
        )
    base_id = artifact.base.split("@", 1)[0]
    return Snapshot(
        repo_id=repo_id,
        kind="merged",
        commit=commit,
        title=f"{artifact.adapter} merged into {artifact.base} ({artifact.digest})",
        files=_files(artifact.files),
        created_at=artifact.created_at,
        last_modified=artifact.created_at,
        library_name="transformers",
        tags=("transformers", "safetensors", "merge", "lora-registry"),
        card={
            "library_name": "transformers",
            "base_model": base_id,
            "tags": ["merge", "lora-registry"],
        },
    )
