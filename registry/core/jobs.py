"""Merge jobs on the wire (docs/architecture.md §9): requests, claims, heartbeats, results,
and targets.

Pure: pydantic shapes shared by the server, the Python client and workers, plus the parsing of a
merge target (`registry`, `dir:/abs/path`, `s3://bucket/prefix`, `hub:org/repo[@branch]`) and the
memoization key. A job moves queued -> running (a worker holds a lease it renews with
heartbeats) -> succeeded | failed | cancelled; an expired lease puts it back in the queue until
its attempts run out.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from datetime import datetime
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from registry.core.errors import InvalidReference, InvalidTarget
from registry.core.names import parse_selector
from registry.core.schemas import FileSpec, JsonBool, JsonInt, VersionFileOut

FinishedStatus = Literal["succeeded", "failed", "cancelled"]
JobStatus = Literal["queued", "running", FinishedStatus]
JOB_STATUSES: tuple[JobStatus, ...] = get_args(JobStatus)
FINISHED: tuple[FinishedStatus, ...] = get_args(FinishedStatus)
MIN_LEASE_S = 5
MAX_LEASE_S = 3600
DEFAULT_LEASE_S = 60
MAX_WORKER_NAME = 200
MAX_TARGET = 2048
MAX_MESSAGE = 4000

TargetKind = Literal["registry", "dir", "s3", "hub"]
Dtype = Literal["bfloat16", "float16", "float32"]  # output dtypes a merge can write
DTYPES: tuple[Dtype, ...] = get_args(Dtype)
TARGET_FORMS = "registry, dir:/absolute/path, s3://bucket/prefix or hub:org/repo[@branch]"
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
# The Hub's own rules for a repository id (huggingface_hub's validate_repo_id) with the owner
# required, and a git branch name as the Hub accepts it, kept to a safe subset.
_HUB_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?"
_HUB_RE = re.compile(rf"({_HUB_PART}/{_HUB_PART})(?:@([A-Za-z0-9][A-Za-z0-9._/-]{{0,199}}))?")
_HUB_ORG_RE = re.compile(rf"hub:({_HUB_PART})/\*")


class MergeOptions(BaseModel):
    """What changes the merged bytes: the output dtype (None keeps each base tensor's dtype) and
    whether tied embeddings are untied (a separate lm_head) when the adapter touches them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dtype: Dtype | None = None
    untie: JsonBool = False


class Target(BaseModel):
    """Where a merge's output goes, parsed from its text form (`str(target)` gives it back)."""

    model_config = ConfigDict(frozen=True)

    kind: TargetKind
    path: str | None = None  # dir: an absolute path on the worker
    bucket: str | None = None  # s3
    prefix: str | None = None  # s3: "" for the bucket's top level
    repo: str | None = None  # hub: org/repo
    branch: str | None = None  # hub: None for the default branch

    def __str__(self) -> str:
        if self.kind == "dir":
            return f"dir:{self.path}"
        if self.kind == "s3":
            return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        if self.kind == "hub":
            return f"hub:{self.repo}@{self.branch}" if self.branch else f"hub:{self.repo}"
        return "registry"


def parse_target(text: str) -> Target:
    """A merge target: `registry`, `dir:/abs/path`, `s3://bucket/prefix`, `hub:org/repo[@branch]`.

    Raises `InvalidTarget` naming what is wrong. The result's `str()` is the canonical form
    (normalised path, no trailing slashes), which is what jobs record and memoize on.
    """

    def bad(why: str) -> InvalidTarget:
        return InvalidTarget(
            f"invalid merge target {text!r}: {why} (use {TARGET_FORMS})", target=text[:200]
        )

    if len(text) > MAX_TARGET:
        raise bad(f"longer than {MAX_TARGET} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise bad("contains a control character")
    if text == "registry":
        return Target(kind="registry")
    if text.startswith("dir:"):
        path = text[len("dir:") :]
        if not path.startswith("/"):
            raise bad("dir: needs an absolute path on the worker, such as dir:/data/merged")
        if "\\" in path:
            raise bad("use '/' as the path separator")
        normal = posixpath.normpath(path)
        if normal.startswith("//"):
            normal = "/" + normal.lstrip("/")
        if normal == "/":
            raise bad("dir: needs a folder below /, not / itself")
        return Target(kind="dir", path=normal)
    if text.startswith("s3://"):
        bucket, _, prefix = text[len("s3://") :].partition("/")
        if not _BUCKET_RE.fullmatch(bucket):
            raise bad(f"{bucket!r} is not an S3 bucket name")
        prefix = prefix.strip("/")
        if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
            raise bad("the prefix has empty, '.' or '..' parts")
        return Target(kind="s3", bucket=bucket, prefix=prefix)
    if text.startswith("hub:"):
        match = _HUB_RE.fullmatch(text[len("hub:") :])
        if not match or _bad_hub_target(match.group(1), match.group(2)):
            raise bad(
                "hub: needs a repository id such as hub:org/repo or hub:org/repo@branch (letters, "
                "digits, '-', '_', '.'; no '--' or '..'; not ending in .git)"
            )
        return Target(kind="hub", repo=match.group(1), branch=match.group(2))
    raise bad("unknown kind of target")


def parse_allowed_target(text: str) -> Target:
    """An entry of LORA_REG_MERGE_TARGETS: a target, or `hub:ORG/*` for every repo of an org."""
    org = _HUB_ORG_RE.fullmatch(text)
    if org:
        return Target(kind="hub", repo=f"{org.group(1)}/*")
    return parse_target(text)


def parse_s3_location(text: str) -> Target:
    """`s3://bucket/prefix` in the one form that places a user names are compared in (allow-lists,
    the registry's own storage) and then read at: empty and '.' parts of the prefix are dropped,
    so `s3://b//p/./q/` is `s3://b/p/q`. Raises ValueError for a bad bucket name, a '..' part or a
    control character."""
    if not text.startswith("s3://"):
        raise ValueError(f"{text!r} is not an s3://bucket/prefix URL")
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise ValueError(f"{text!r} contains a control character")
    bucket, _, prefix = text[len("s3://") :].partition("/")
    if not _BUCKET_RE.fullmatch(bucket):
        raise ValueError(f"{text!r}: {bucket!r} is not an S3 bucket name")
    parts = [part for part in prefix.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"{text!r}: the prefix has '..' parts")
    return Target(kind="s3", bucket=bucket, prefix="/".join(parts))


def target_within(target: Target, allowed: Target) -> bool:
    """Whether `target` is `allowed` or lies below it: a folder inside the folder, a prefix
    inside the bucket's prefix, the same Hub repo (any branch unless `allowed` names one) or any
    repo of the org for `hub:ORG/*`."""
    if target.kind != allowed.kind:
        return False
    if target.kind == "dir":
        assert target.path is not None and allowed.path is not None
        return target.path == allowed.path or target.path.startswith(allowed.path + "/")
    if target.kind == "s3":
        if target.bucket != allowed.bucket:
            return False
        inner, outer = target.prefix or "", allowed.prefix or ""
        return not outer or inner == outer or inner.startswith(outer + "/")
    if target.kind == "hub":
        assert target.repo is not None and allowed.repo is not None
        if allowed.repo.endswith("/*"):
            return target.repo.startswith(allowed.repo[:-1])
        return target.repo == allowed.repo and allowed.branch in (None, target.branch)
    return True


def _bad_hub_target(repo: str, branch: str | None) -> bool:
    if "--" in repo or ".." in repo or repo.endswith(".git"):
        return True
    return branch is not None and (
        ".." in branch or "//" in branch or branch.endswith(("/", ".", ".lock"))
    )


def memo_key(
    adapter_digest: str, base_id: str, base_revision: str, options: MergeOptions, target: str
) -> str:
    """sha256 hex of the canonical JSON of what a merge's output depends on, and where it goes:
    the same inputs give byte-identical output, so a succeeded job with this key is the answer."""
    identity = {
        "adapter_digest": adapter_digest,
        "base_id": base_id,
        "base_revision": base_revision,
        "options": options.model_dump(mode="json"),
        "target": str(parse_target(target)),
    }
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def parse_artifact_digest(text: str, *, bare: bool = False) -> str:
    """A merged artifact's digest, `sha256:<64 hex>`; with `bare`, 64 hex alone is one too.

    Raises `InvalidReference` for anything else.
    """
    full = f"sha256:{text}" if bare and not text.startswith("sha256:") else text
    selector = parse_selector(full)
    if selector.kind != "digest":
        raise InvalidReference(f"invalid artifact digest {text!r}: expected sha256:<64 hex>")
    return selector.value


# --- requests and answers ----------------------------------------------------------------------


class MergeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    adapter: str = Field(max_length=400)  # a reference: ns/name, @7, @alias, @sha256:...
    base: str | None = Field(default=None, max_length=401)  # default: the version's own base
    target: str = Field(default="registry", max_length=MAX_TARGET)
    options: MergeOptions = Field(default_factory=MergeOptions)
    force: JsonBool = False  # run again even when a matching job succeeded or is in flight


class Progress(BaseModel):
    tensors_done: JsonInt = Field(ge=0)
    tensors_total: JsonInt = Field(ge=0)
    bytes_done: JsonInt = Field(ge=0)
    bytes_total: JsonInt = Field(ge=0)


class JobError(BaseModel):
    code: str = Field(max_length=64)
    message: str = Field(max_length=MAX_MESSAGE)


class JobResult(BaseModel):
    """What a succeeded job produced. `artifact` (the digest of the files' manifest) is set by
    the server when it records the output; `files` are what was published."""

    location: str = Field(max_length=MAX_TARGET)
    artifact: str | None = None
    files: list[FileSpec] = Field(default_factory=list)
    size: JsonInt = Field(default=0, ge=0)
    device: str | None = Field(default=None, max_length=200)


class JobOut(BaseModel):
    id: str
    status: JobStatus
    adapter: str  # ns/name@N
    adapter_digest: str
    base: str  # id or id@revision
    target: str
    options: MergeOptions
    attempts: int
    max_attempts: int
    worker: str | None = None
    device: str | None = None  # what the worker said it merges on when it claimed the job
    lease_expires_at: datetime | None = None
    progress: Progress | None = None
    cancel_requested: bool = False
    error: JobError | None = None
    result: JobResult | None = None
    memoized: bool = False  # an earlier succeeded job's answer, returned instead of a new job
    created: bool | None = None  # on request: False when an existing job was returned
    requested_by: str | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


class WorkerOut(BaseModel):
    """A merge worker the registry has heard from (a claim or a heartbeat)."""

    name: str
    device: str | None = None
    last_seen: datetime
    running: int  # jobs it holds now


class ClaimRequest(BaseModel):
    worker: str = Field(min_length=1, max_length=MAX_WORKER_NAME)
    device: str | None = Field(default=None, max_length=200)
    lease_s: JsonInt = Field(default=DEFAULT_LEASE_S, ge=MIN_LEASE_S, le=MAX_LEASE_S)


class Claim(BaseModel):
    job: JobOut
    lease_s: int


class HeartbeatRequest(BaseModel):
    worker: str = Field(min_length=1, max_length=MAX_WORKER_NAME)
    progress: Progress | None = None


class HeartbeatOut(BaseModel):
    cancel_requested: bool
    lease_expires_at: datetime


class FinishRequest(BaseModel):
    worker: str = Field(min_length=1, max_length=MAX_WORKER_NAME)
    status: FinishedStatus
    result: JobResult | None = None
    error: JobError | None = None


class ArtifactOut(BaseModel):
    """A merged checkpoint recorded by a succeeded job, with its files. `stored`: its bytes are
    blobs in this registry (target `registry`), downloadable from each file's `url`."""

    digest: str
    job_id: str
    adapter: str
    adapter_digest: str
    base: str
    options: MergeOptions
    target: str
    location: str
    stored: bool
    size: int
    created_at: datetime
    files: list[VersionFileOut]
