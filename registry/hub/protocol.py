"""The Hugging Face protocol's wire rules: commit ids, LFS pointers, the JSON of repository info
and tree listings, and the headers huggingface_hub maps onto its own exceptions.

Pure (no FastAPI, no SQL): `registry.hub.service` builds a `Snapshot` (a repository at one
commit) and `registry.hub.api` renders it with these functions. What is written here follows
what the real clients read (huggingface_hub's `file_download.py`, `hf_api.py`, `constants.py`
and `utils/_http.py:hf_raise_for_status`):

- every file is served as an LFS file: its ETag is the quoted sha256 of its bytes (the name of
  the blob in the client's cache, and what `verify_repo_checksums` compares), its `oid` in tree
  listings is the git id of its LFS pointer, as on the Hub;
- a commit id is 40 hex, which the clients take for an immutable commit (they skip asking the
  server and cache refs by name): `commit_id` derives it from the content digest, so a pinned
  commit always names the same bytes and an alias resolves to the commit of its version now. A
  40-hex revision is always read as a commit id, as the clients read it;
- errors carry `X-Error-Code` (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo) and
  `X-Error-Message`; a refused token gets the Hub's own "Invalid credentials" message.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from registry.core.errors import (
    AdapterNotFound,
    AliasNotFound,
    ArtifactNotFound,
    BaseNotFound,
    InvalidInput,
    InvalidName,
    InvalidReference,
    NotAuthenticated,
    NotFound,
    RegistryError,
    VersionNotFound,
    VersionYanked,
)

MAIN = "main"  # the default branch: an adapter's newest version that is not yanked
MERGED_NAMESPACE = "merged"  # merged/<64 hex>: the merged artifact sha256:<64 hex>
COMMIT_RE = re.compile(r"[0-9a-f]{40}")
TREE_PAGE = 1000  # entries per tree page, as on the Hub

HEADER_COMMIT = "X-Repo-Commit"
HEADER_LINKED_ETAG = "X-Linked-Etag"
HEADER_LINKED_SIZE = "X-Linked-Size"
HEADER_ERROR_CODE = "X-Error-Code"
HEADER_ERROR_MESSAGE = "X-Error-Message"
# The Hub's words for a token it does not know: huggingface_hub then raises HfHubHTTPError (401)
# instead of taking the 401 for a repository it may not see.
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"
NO_TOKEN = (
    "this registry needs a token: set HF_TOKEN to a registry token (an admin creates one with "
    "lora-reg token create NAME --scope read)"
)
_LFS_SPEC = "https://git-lfs.github.com/spec/v1"
_PIPELINE_TAGS = {
    "CAUSAL_LM": "text-generation",
    "SEQ_2_SEQ_LM": "text2text-generation",
    "SEQ_CLS": "text-classification",
    "TOKEN_CLS": "token-classification",
    "QUESTION_ANS": "question-answering",
    "FEATURE_EXTRACTION": "feature-extraction",
}


def commit_id(digest: str) -> str:
    """The commit id of the content `digest` (`sha256:<64 hex>`: an adapter version's, a stored
    base's or a merged artifact's manifest digest): the first 40 hex of
    sha256("lora-registry version " + digest). Stable forever; never a real git commit."""
    return hashlib.sha256(f"lora-registry version {digest}".encode()).hexdigest()[:40]


def git_object_id(kind: str, data: bytes) -> str:
    """The git object id (sha1 of header and content) git would give `data`."""
    header = f"{kind} {len(data)}\0".encode()
    return hashlib.sha1(header + data, usedforsecurity=False).hexdigest()


def pipeline_tag(task_type: str | None) -> str | None:
    """The Hub's pipeline tag for a PEFT task type (None when there is none)."""
    return _PIPELINE_TAGS.get(task_type or "")


@dataclass(frozen=True)
class HubFile:
    """One file of a repository, served as an LFS file."""

    path: str
    size: int
    sha256: str

    @property
    def lfs_pointer(self) -> bytes:
        return f"version {_LFS_SPEC}\noid sha256:{self.sha256}\nsize {self.size}\n".encode()

    @property
    def blob_id(self) -> str:
        """The git id of the file's LFS pointer (what the Hub lists as an LFS file's oid)."""
        return git_object_id("blob", self.lfs_pointer)

    @property
    def etag(self) -> str:
        return f'"{self.sha256}"'

    def lfs(self, sha_key: str) -> dict[str, Any]:
        # Repository info names the sha256 `sha256`; tree listings name it `oid`.
        return {sha_key: self.sha256, "size": self.size, "pointerSize": len(self.lfs_pointer)}


Kind = Literal["adapter", "base", "merged"]


@dataclass(frozen=True)
class Snapshot:
    """A repository at one commit: what repository info, tree listings and file resolution
    answer. `title` says what the commit is (e.g. `ns/name@3 (sha256:...)`)."""

    repo_id: str
    kind: Kind
    commit: str
    title: str
    files: tuple[HubFile, ...]
    created_at: datetime
    last_modified: datetime
    library_name: str
    tags: tuple[str, ...]
    card: dict[str, Any]
    pipeline_tag: str | None = None
    config: dict[str, Any] | None = None
    safetensors: dict[str, Any] | None = None

    def file(self, path: str) -> HubFile:
        """The file at `path`; EntryNotFound (with this commit, which the client caches as
        the file's absence at it) when there is none."""
        for file in self.files:
            if file.path == path:
                return file
        raise NotFound(
            f"{self.repo_id} has no file {path!r} at {self.title}; its files: "
            + ", ".join(f.path for f in self.files[:20])
            + (" ..." if len(self.files) > 20 else ""),
            path=path,
            commit=self.commit,
        )


def hub_time(at: datetime) -> str:
    """The Hub's timestamp format (what huggingface_hub's `parse_datetime` reads)."""
    at = (at if at.tzinfo else at.replace(tzinfo=UTC)).astimezone(UTC)
    return f"{at:%Y-%m-%dT%H:%M:%S}.{at.microsecond // 1000:03d}Z"


def model_info(snapshot: Snapshot, *, private: bool) -> dict[str, Any]:
    """GET /api/models/{repo_id}[/revision/{revision}] (huggingface_hub's `ModelInfo`): the
    siblings always carry their sizes and LFS data, as with `files_metadata=True`."""
    info: dict[str, Any] = {
        "id": snapshot.repo_id,
        "modelId": snapshot.repo_id,
        "author": snapshot.repo_id.split("/")[0],
        "sha": snapshot.commit,
        "lastModified": hub_time(snapshot.last_modified),
        "createdAt": hub_time(snapshot.created_at),
        "private": private,
        "gated": False,
        "disabled": False,
        "library_name": snapshot.library_name,
        "tags": list(snapshot.tags),
        "cardData": snapshot.card,
        "siblings": [
            {
                "rfilename": file.path,
                "size": file.size,
                "blobId": file.blob_id,
                "lfs": file.lfs("sha256"),
            }
            for file in snapshot.files
        ],
        "usedStorage": sum(file.size for file in snapshot.files),
    }
    if snapshot.pipeline_tag:
        info["pipeline_tag"] = snapshot.pipeline_tag
    if snapshot.config is not None:
        info["config"] = snapshot.config
    if snapshot.safetensors is not None:
        info["safetensors"] = snapshot.safetensors
    return info


def tree(snapshot: Snapshot, path: str, *, recursive: bool, expand: bool) -> list[dict[str, Any]]:
    """GET /api/models/{repo_id}/tree/{revision}[/{path}]: the files and folders under `path`
    (its direct children, or everything below it with `recursive`), sorted by path. A `path`
    that is not a folder of the snapshot is EntryNotFound."""
    prefix = path.strip("/")
    below = [f for f in snapshot.files if not prefix or f.path.startswith(prefix + "/")]
    if prefix and not below:
        raise NotFound(
            f"{snapshot.repo_id} has no folder {prefix!r} at {snapshot.title}",
            path=prefix,
            commit=snapshot.commit,
        )
    start = len(prefix) + 1 if prefix else 0
    entries: dict[str, dict[str, Any]] = {}
    for file in below:
        parts = file.path[start:].split("/")
        for depth in range(1, len(parts) if recursive else min(2, len(parts))):
            folder = file.path[:start] + "/".join(parts[:depth])
            entries.setdefault(folder, _folder_entry(snapshot, folder))
        if recursive or len(parts) == 1:
            entries[file.path] = {
                "type": "file",
                "oid": file.blob_id,
                "size": file.size,
                "path": file.path,
                "lfs": file.lfs("oid"),
            }
    listing = [entries[key] for key in sorted(entries)]
    if expand:
        last_commit = {
            "id": snapshot.commit,
            "title": snapshot.title,
            "date": hub_time(snapshot.last_modified),
        }
        listing = [{**entry, "lastCommit": last_commit} for entry in listing]
    return listing


def _folder_entry(snapshot: Snapshot, folder: str) -> dict[str, Any]:
    # A stand-in for git's tree id: a function of the folder's content only.
    content = "".join(
        f"{f.path} {f.sha256}\n" for f in snapshot.files if f.path.startswith(folder + "/")
    )
    return {"type": "directory", "oid": git_object_id("tree", content.encode()), "path": folder}


def page(entries: Sequence[dict[str, Any]], cursor: str | None) -> tuple[list[Any], int | None]:
    """One page of a listing from `cursor` (an offset; None: the start), and the next page's
    cursor (None at the end)."""
    if cursor is None or cursor == "":
        start = 0
    elif cursor.isascii() and cursor.isdigit() and len(cursor) <= 9:
        start = int(cursor)
    else:
        raise InvalidInput(f"invalid cursor {cursor[:40]!r}: follow the Link header's next URL")
    end = start + TREE_PAGE
    return list(entries[start:end]), (end if end < len(entries) else None)


def safetensors_info(tensors: dict[str, Any]) -> dict[str, Any]:
    """The Hub's `safetensors` summary (parameters per dtype and in all) of a base's tensors
    (`name -> {dtype, shape}`)."""
    parameters: dict[str, int] = {}
    for tensor in tensors.values():
        dtype = str(tensor.get("dtype"))
        parameters[dtype] = parameters.get(dtype, 0) + math.prod(tensor.get("shape") or [])
    return {"parameters": parameters, "total": sum(parameters.values())}


# --- errors ------------------------------------------------------------------------------------

_REPO_ERRORS = (AdapterNotFound, BaseNotFound, ArtifactNotFound, InvalidName)
_REVISION_ERRORS = (VersionNotFound, AliasNotFound, VersionYanked, InvalidReference)


@dataclass(frozen=True)
class HubError:
    """A registry error as the Hub answers it: status, headers and the body's message."""

    status: int
    headers: dict[str, str]
    message: str


def hub_error(error: RegistryError, *, credential_sent: bool) -> HubError:
    """How the Hub would answer `error`, so that huggingface_hub raises its own exception:

    - a missing token: 401 GatedRepo (GatedRepoError, a RepositoryNotFoundError);
    - a malformed, unknown or revoked token: 401 "Invalid credentials in Authorization header"
      (HfHubHTTPError with status 401, as the Hub answers a bad token);
    - no such adapter, base or artifact: 404 RepoNotFound (RepositoryNotFoundError);
    - no such version, alias, digest or commit, or a yanked version: 404 RevisionNotFound
      (RevisionNotFoundError);
    - no such file or folder: 404 EntryNotFound (RemoteEntryNotFoundError), with X-Repo-Commit;
    - anything else keeps its status, with X-Error-Message.
    """
    status, code, message = error.status, None, error.message
    headers: dict[str, str] = {}
    if isinstance(error, NotAuthenticated):
        headers["WWW-Authenticate"] = 'Bearer realm="lora-registry"'
        if credential_sent:
            headers[HEADER_ERROR_MESSAGE] = INVALID_CREDENTIALS
            if "HF_TOKEN" not in message:
                message = f"{message} (huggingface_hub sends HF_TOKEN as this token)"
        else:
            code, message = "GatedRepo", NO_TOKEN
    elif isinstance(error, _REPO_ERRORS):
        status, code = 404, "RepoNotFound"
    elif isinstance(error, _REVISION_ERRORS):
        status, code = 404, "RevisionNotFound"
    elif isinstance(error, NotFound):
        status, code = 404, "EntryNotFound"
    if code is not None:
        headers[HEADER_ERROR_CODE] = code
    headers.setdefault(HEADER_ERROR_MESSAGE, header_text(message))
    commit = error.details.get("commit")
    if isinstance(commit, str) and COMMIT_RE.fullmatch(commit):
        headers[HEADER_COMMIT] = commit
    return HubError(status, headers, message)


def header_text(text: str, limit: int = 1000) -> str:
    """`text` as one line of printable ASCII (what an HTTP header may carry)."""
    flat = " ".join(text.split())
    ascii_text = flat.encode("ascii", "replace").decode("ascii")
    return ascii_text if len(ascii_text) <= limit else ascii_text[: limit - 3] + "..."
