"""The registry's events: one frozen dataclass per thing that happens, named by a stable action.

Every mutation records one (or more) of these with `registry.events.service.record`, in the same
transaction as the change: the append-only audit table is the event log (docs/architecture.md
§12). An event's `action` and `subject` are columns of its audit row; its other fields are the
row's `details`, in the order they are declared. Followers of the log (the CLI's `audit`, the event
stream, webhooks) match on `action`, so an action name never changes once released.

Pure: no SQL, no FastAPI. Imported by the services (to record) and by clients (to read).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True, kw_only=True)
class Event:
    """Something that happened to `subject` (an adapter version, an alias, a base, a token...)."""

    action: ClassVar[str]
    subject: str

    def details(self) -> dict[str, Any]:
        return {
            field.name: getattr(self, field.name)
            for field in dataclasses.fields(self)
            if field.name != "subject"
        }


# --- adapter versions --------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class VersionPushed(Event):
    """A new version was committed (`subject`: ns/name@N)."""

    action: ClassVar[str] = "version.push"
    digest: str
    size: int
    files: int


@dataclass(frozen=True, kw_only=True)
class VersionChecked(Event):
    """A compatibility report was recorded on a version."""

    action: ClassVar[str] = "version.check"
    base: str | None
    status: str


@dataclass(frozen=True, kw_only=True)
class VersionYanked(Event):
    action: ClassVar[str] = "version.yank"
    digest: str
    reason: str


# --- aliases (`subject`: ns/name@alias) --------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class AliasSet(Event):
    action: ClassVar[str] = "alias.set"
    alias: str
    previous: int | None  # the version number it pointed at before, if any
    version: int
    digest: str


@dataclass(frozen=True, kw_only=True)
class AliasRemoved(Event):
    action: ClassVar[str] = "alias.remove"
    alias: str
    previous: int | None
    version: None = None


# --- bases, blobs, tokens ----------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class BaseAdded(Event):
    action: ClassVar[str] = "base.add"
    source: str
    tensors: int
    stored: bool


@dataclass(frozen=True, kw_only=True)
class BaseUploaded(Event):
    action: ClassVar[str] = "base.upload"
    files: int
    size: int


@dataclass(frozen=True, kw_only=True)
class BlobsCollected(Event):
    action: ClassVar[str] = "gc"
    subject: str = "blobs"
    deleted: int
    bytes: int


@dataclass(frozen=True, kw_only=True)
class TokenCreated(Event):
    action: ClassVar[str] = "token.create"
    scope: str


@dataclass(frozen=True, kw_only=True)
class TokenRevoked(Event):
    action: ClassVar[str] = "token.revoke"
    scope: str


# --- deployments (`subject`: the adapter version, ns/name@N) ------------------------------------


@dataclass(frozen=True, kw_only=True)
class AdapterLoaded(Event):
    """A serving engine instance loaded a version (or reloaded a name onto another one)."""

    action: ClassVar[str] = "deployment.load"
    instance: str
    name: str  # what the engine serves it as
    reference: str
    digest: str
    previous: str | None  # the digest served under `name` before a reload


@dataclass(frozen=True, kw_only=True)
class AdapterUnloaded(Event):
    action: ClassVar[str] = "deployment.unload"
    instance: str
    name: str
    digest: str


# --- merge jobs (`subject`: the adapter, ns/name@N) --------------------------------------------


@dataclass(frozen=True, kw_only=True)
class JobEvent(Event):
    job: str
    base: str


@dataclass(frozen=True, kw_only=True)
class MergeRequested(JobEvent):
    action: ClassVar[str] = "merge.requested"
    target: str
    options: dict[str, Any]
    adapter_digest: str
    force: bool


@dataclass(frozen=True, kw_only=True)
class MergeStarted(JobEvent):
    """A worker claimed the job."""

    action: ClassVar[str] = "merge.started"
    worker: str
    attempt: int
    device: str | None


@dataclass(frozen=True, kw_only=True)
class MergeCancelRequested(JobEvent):
    """A running job's worker is asked to stop (it finishes the job as cancelled)."""

    action: ClassVar[str] = "merge.cancel_requested"
    worker: str | None


@dataclass(frozen=True, kw_only=True)
class MergeCancelled(JobEvent):
    """A queued job (or one whose worker's lease ran out) was cancelled by a user."""

    action: ClassVar[str] = "merge.cancelled"
    was: str  # the status it was in


@dataclass(frozen=True, kw_only=True)
class MergeLeaseCancelled(JobEvent):
    """A job whose cancel was asked for ended when its worker stopped renewing the lease."""

    action: ClassVar[str] = "merge.cancelled"
    worker: str | None
    reason: str = "lease_expired"
    noticed_by: str | None


@dataclass(frozen=True, kw_only=True)
class MergeLeaseFailed(JobEvent):
    """A job's worker stopped renewing its lease on the last attempt."""

    action: ClassVar[str] = "merge.failed"
    worker: str | None
    attempts: int
    error: dict[str, Any]
    noticed_by: str | None


@dataclass(frozen=True, kw_only=True)
class MergeRequeued(JobEvent):
    """A job's worker stopped renewing its lease; attempts remain, so it is queued again."""

    action: ClassVar[str] = "merge.requeued"
    worker: str | None
    attempts: int
    noticed_by: str | None


@dataclass(frozen=True, kw_only=True)
class MergeSucceeded(JobEvent):
    action: ClassVar[str] = "merge.succeeded"
    worker: str
    attempt: int
    location: str
    artifact: str | None
    size: int


@dataclass(frozen=True, kw_only=True)
class MergeFailed(JobEvent):
    """The worker finished the job as failed."""

    action: ClassVar[str] = "merge.failed"
    worker: str
    attempt: int
    error: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class MergeStopped(JobEvent):
    """The worker finished the job as cancelled (after a cancel was asked for)."""

    action: ClassVar[str] = "merge.cancelled"
    worker: str
    attempt: int
    error: dict[str, Any]


ACTIONS: frozenset[str] = frozenset(
    cls.action
    for cls in (
        VersionPushed,
        VersionChecked,
        VersionYanked,
        AliasSet,
        AliasRemoved,
        BaseAdded,
        BaseUploaded,
        BlobsCollected,
        TokenCreated,
        TokenRevoked,
        AdapterLoaded,
        AdapterUnloaded,
        MergeRequested,
        MergeStarted,
        MergeCancelRequested,
        MergeCancelled,
        MergeLeaseCancelled,
        MergeLeaseFailed,
        MergeRequeued,
        MergeSucceeded,
        MergeFailed,
        MergeStopped,
    )
)
