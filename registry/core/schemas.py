"""Wire shapes of the REST API, shared by the server and the Python client.

Pydantic models only; validation that needs no I/O (names, metric values, file entries) happens
here so that the CLI rejects bad input before uploading a byte, with the same message the server
would give.
"""

from __future__ import annotations

import math
import re
from datetime import datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from registry.core.basemodel import BaseTensor
from registry.core.compat import CompatReport
from registry.core.errors import InvalidInput, InvalidMetric
from registry.core.manifest import FileEntry, check_path, check_sha256

KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/-]{0,63}")
MAX_LABEL_VALUE = 256
MAX_LINEAGE_VALUE = 2048
MAX_DESCRIPTION = 10_000
MAX_ENTRIES = 100
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)")


def _integral(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _not_a_number(value: Any) -> Any:
    # pydantic reads a number as Unix seconds; the API takes ISO 8601 date-times only.
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    if numeric or (isinstance(value, str) and _NUMBER.fullmatch(value)):
        raise ValueError("expected an ISO 8601 date-time such as 2026-11-20T10:00Z")
    return value


# Request values as JSON Schema (and the OpenAPI document) reads them, where lax pydantic would
# take more: an integer is 5 or 5.0, never "5" or false; a boolean is true or false, never 0 or
# "yes"; a time is an ISO 8601 date-time, never a number.
JsonInt = Annotated[int, BeforeValidator(_integral), Field(strict=True)]
JsonBool = Annotated[bool, Field(strict=True)]
IsoDatetime = Annotated[datetime, BeforeValidator(_not_a_number)]


def check_key(kind: str, key: str) -> str:
    if not KEY_RE.fullmatch(key):
        raise InvalidInput(
            f"invalid {kind} name {key!r}: use 1-64 of letters, digits, '_', '.', ':', '/', '-' "
            "starting with a letter or digit",
            key=key,
        )
    return key


def check_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Metric name -> finite number; booleans, strings, NaN and infinities are refused."""
    if len(metrics) > MAX_ENTRIES:
        raise InvalidMetric(f"at most {MAX_ENTRIES} metrics per version")
    clean: dict[str, float] = {}
    for key, value in metrics.items():
        check_key("metric", key)
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise InvalidMetric(f"metric {key}={value!r} is not a number", metric=key) from None
        try:
            finite = (
                not isinstance(value, bool)
                and isinstance(value, int | float)
                and math.isfinite(value)
            )
        except OverflowError:  # an integer too large for a float
            finite = False
        if not finite:
            raise InvalidMetric(
                f"metric {key}={value!r} is not a finite number; metrics must be finite numbers "
                "such as rougeL=0.41",
                metric=key,
            )
        clean[key] = float(value)
    return clean


def check_strings(kind: str, values: dict[str, Any], max_value: int) -> dict[str, str]:
    if len(values) > MAX_ENTRIES:
        raise InvalidInput(f"at most {MAX_ENTRIES} {kind} entries per version")
    clean: dict[str, str] = {}
    for key, value in values.items():
        check_key(kind, key)
        if not isinstance(value, str) or len(value) > max_value:
            raise InvalidInput(
                f"{kind} {key}: the value must be a string of at most {max_value} characters",
                key=key,
            )
        clean[key] = value
    return clean


def parse_pairs(kind: str, pairs: list[str]) -> dict[str, str]:
    """`["k=v", ...]` (CLI flags, query parameters) -> `{"k": "v"}`; `kind` names them in errors."""
    result: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidInput(f"{kind} {pair!r}: expected key=value")
        result[key] = value
    return result


class FileSpec(BaseModel):
    path: str
    size: JsonInt = Field(ge=0)
    sha256: str

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        return check_path(value)

    @field_validator("sha256")
    @classmethod
    def _sha(cls, value: str) -> str:
        return check_sha256(value)

    def entry(self) -> FileEntry:
        return FileEntry(self.path, self.size, self.sha256)


class UploadPlanRequest(BaseModel):
    files: list[FileSpec]


class UploadPart(BaseModel):
    part_number: int
    url: str
    offset: int
    size: int


class UploadInstruction(BaseModel):
    """How to upload one missing blob.

    `single`: send the whole blob with `method` to `url` with `headers` (a relative URL is on
    the API server). `multipart`: send each part to its URL, then POST the collected ETags to
    `complete_url`.
    """

    sha256: str
    size: int
    kind: Literal["single", "multipart"]
    method: str = "PUT"
    url: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    upload_id: str | None = None
    key: str | None = None
    parts: list[UploadPart] = Field(default_factory=list)
    complete_url: str | None = None


class UploadPlan(BaseModel):
    missing: list[UploadInstruction]
    present: list[str]  # sha256 hex of blobs already stored


class CompletedPart(BaseModel):
    part_number: JsonInt
    etag: str


class CompleteMultipart(BaseModel):
    upload_id: str
    key: str
    size: JsonInt
    parts: list[CompletedPart]


class CommitRequest(BaseModel):
    files: list[FileSpec]
    base: str | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    labels: dict[str, Any] = Field(default_factory=dict)
    lineage: dict[str, Any] = Field(default_factory=dict)
    description: str | None = Field(default=None, max_length=MAX_DESCRIPTION)
    # Refuse the push unless the version is proven compatible with its registered base.
    require_compatible: JsonBool = False
    alias: str | None = None  # point this alias at the pushed version


class VersionFileOut(BaseModel):
    path: str
    size: int
    sha256: str
    # Where to GET the bytes (relative URLs are on the API server); None for a merged artifact
    # published elsewhere (a folder, S3, the Hub), whose bytes this registry does not hold.
    url: str | None


class VersionOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    adapter: str  # ns/name
    number: int
    digest: str
    base_model_id: str | None
    base_model_revision: str | None
    peft_type: str
    task_type: str | None
    r: int
    lora_alpha: float
    target_modules: list[str] | str | None
    use_dora: bool
    use_rslora: bool
    adapter_config: dict[str, Any]
    metrics: dict[str, float]
    labels: dict[str, str]
    lineage: dict[str, str]
    description: str | None
    size: int
    file_count: int
    created_at: datetime
    created_by: str | None
    # "compatible" / "incompatible" against compat_base, or None when no base was registered.
    compat_status: str | None = None
    compat_base: str | None = None
    compat_report: CompatReport | None = None  # with the files, on single-version reads
    yanked_at: datetime | None = None
    yanked_by: str | None = None
    yank_reason: str | None = None
    files: list[VersionFileOut] | None = None
    created: bool | None = None  # set on commit: False when identical content already existed
    note: str | None = None  # e.g. which newer yanked versions `latest` skipped


class AdapterOut(BaseModel):
    name: str  # ns/name
    namespace: str
    created_at: datetime
    version_count: int
    latest: VersionOut | None


class BaseRegisterRequest(BaseModel):
    """Register a base: `source` is `s3://bucket/prefix` (the server reads the headers), or the
    client sends `config` + `tensors` it read itself (a local folder, the Hub), or `files` it
    uploaded (`--upload`: the server reads the headers from the stored blobs)."""

    base: str  # id[@revision]
    source: str = Field(max_length=2048)
    config: dict[str, Any] | None = None
    tensors: dict[str, BaseTensor] | None = None
    files: list[FileSpec] = Field(default_factory=list)


class BaseOut(BaseModel):
    id: str
    revision: str | None
    source: str
    stored: bool
    model_type: str | None
    parameter_count: int
    tensor_count: int
    shards: list[str]
    dtypes: dict[str, int]  # dtype -> number of tensors
    config: dict[str, Any]
    created_at: datetime
    created_by: str | None
    created: bool | None = None  # on register: False when it was already registered
    tensors: dict[str, BaseTensor] | None = None  # with ?tensors=true
    files: list[VersionFileOut] | None = None  # stored weights

    @property
    def ref(self) -> str:
        return f"{self.id}@{self.revision}" if self.revision else self.id


class GcRequest(BaseModel):
    """Destructive, so nothing is implied: the age is required and unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", strict=True)  # dry_run: true or false, not 0

    older_than_s: JsonInt = Field(ge=0, le=100 * 365 * 86400)  # recorded at least this long ago
    dry_run: bool = False


class GcOut(BaseModel):
    deleted: int
    deleted_bytes: int
    dry_run: bool
    more: bool  # a batch limit was reached: run again


class YankRequest(BaseModel):
    reason: str = Field(min_length=1, max_length=1000)


class AliasSetRequest(BaseModel):
    version: str  # a number, sha256:<hex>, or another alias


class AliasOut(BaseModel):
    adapter: str
    alias: str
    version: int
    digest: str
    since: datetime
    by: str | None


class AliasMoveOut(BaseModel):
    adapter: str
    alias: str
    previous: int | None  # None: first set
    version: int | None  # None: removed
    at: datetime
    actor: str | None


class AuditEventOut(BaseModel):
    id: int
    at: datetime
    actor: str | None
    action: str
    subject: str
    details: dict[str, Any]


class EventPage(BaseModel):
    """Events after a cursor, oldest first; ask again with `after=last_id`."""

    items: list[AuditEventOut]
    last_id: int


class IdentifyRequest(BaseModel):
    files: list[FileSpec]  # what is on disk: (path, size, sha256) of each file


class IdentifyMatch(BaseModel):
    adapter: str
    version: int
    digest: str
    lineage: dict[str, str]
    aliases: list[str]  # aliases pointing at this version now
    identical: list[str]  # paths whose bytes match
    differing: list[str]  # same path, other bytes
    missing: list[str]  # in the version, not on disk
    extra: list[str]  # on disk, not in the version
    yanked: bool = False  # the version must not be used


class MergedMatch(BaseModel):
    """A merged checkpoint (a merge job's output) that shares files with what was identified."""

    digest: str  # the artifact's manifest digest (lora-reg pull sha256:...)
    adapter: str  # ns/name@N that was merged
    adapter_digest: str
    base: str  # id[@revision] it was merged into
    options: dict[str, Any]
    job_id: str
    location: str  # where it was published
    stored: bool  # its bytes are in this registry
    identical: list[str]
    differing: list[str]
    missing: list[str]
    extra: list[str]


class IdentifyOut(BaseModel):
    """`exact`: the files are exactly a version or a merged artifact; `modified`: closest ones and
    what differs; `file`: a single file found in them; `unknown`: nothing in the registry shares
    a byte. Adapter versions are in `matches`, merged checkpoints in `merged`."""

    status: Literal["exact", "modified", "file", "unknown"]
    digest: str  # of the files as a manifest
    matches: list[IdentifyMatch]
    merged: list[MergedMatch] = Field(default_factory=list)


class CheckRequest(BaseModel):
    base: str | None = None  # id[@revision]; default: the version's base
    profile: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)


T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    items: list[T]
    total: int
    limit: int
    offset: int
    next_offset: int | None


def make_page(items: list[T], total: int, limit: int, offset: int) -> Page[T]:
    return Page[T](
        items=items,
        total=total,
        limit=limit,
        offset=offset,
        next_offset=offset + limit if offset + limit < total else None,
    )


class Problem(BaseModel):
    """RFC 9457 problem details, plus the registry's stable error `code`."""

    type: str
    title: str
    status: int
    detail: str
    code: str
    details: dict[str, Any] = Field(default_factory=dict)


# --- tokens ------------------------------------------------------------------------------------

Scope = Literal["read", "write", "admin", "worker", "serving"]
SCOPES: tuple[Scope, ...] = ("read", "write", "admin", "worker", "serving")
TOKEN_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


def check_token_name(name: str) -> str:
    if not TOKEN_NAME_RE.fullmatch(name):
        raise InvalidInput(
            f"invalid token name {name!r}: use 1-64 of lower-case letters, digits, '.', '_', '-' "
            "starting with a letter or digit (e.g. ci-push or merge-worker-1)",
            name=name,
        )
    return name


class TokenCreate(BaseModel):
    name: str
    scope: Scope

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_token_name(value)


class TokenOut(BaseModel):
    name: str
    scope: Scope
    created_at: datetime
    created_by: str | None
    revoked_at: datetime | None
    revoked_by: str | None


class TokenCreated(TokenOut):
    token: str  # the secret: shown once, never stored


class WhoAmI(BaseModel):
    name: str | None  # None: the server runs with LORA_REG_AUTH=off
    scope: Scope
    auth: bool


# --- deployments (what serving engines report they loaded) -----------------------------------

MAX_LOADED = 1000  # adapters one engine instance may report at once
INSTANCE_ID_RE = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$"
DIGEST_PATTERN = r"^sha256:[0-9a-f]{64}$"


class LoadedAdapter(BaseModel):
    """An adapter version an engine has loaded, under the name it serves it by."""

    name: str = Field(min_length=1, max_length=300)  # e.g. ns/name@production
    reference: str = Field(min_length=1, max_length=300)  # as asked
    adapter: str = Field(min_length=3, max_length=200)  # ns/name
    version: JsonInt = Field(ge=1, le=999_999_999)
    digest: str = Field(pattern=DIGEST_PATTERN)
    loaded_at: IsoDatetime


class DeploymentReport(BaseModel):
    """An engine instance's full loaded set, as it is now (reports are idempotent)."""

    host: str = Field(min_length=1, max_length=255)
    port: JsonInt | None = Field(default=None, ge=0, le=65535)
    engine: str = Field(min_length=1, max_length=32)
    engine_version: str = Field(default="", max_length=64)
    served_model: str = Field(min_length=1, max_length=1024)
    base_signature: str | None = Field(default=None, pattern=DIGEST_PATTERN)
    loaded: list[LoadedAdapter] = Field(default_factory=list, max_length=MAX_LOADED)


class LoadedOut(LoadedAdapter):
    # Why what runs differs from what was meant, or None: the alias moved on, no alias points
    # at the version, the version is yanked.
    drift: str | None = None


class DeploymentOut(BaseModel):
    instance_id: str
    host: str
    port: int | None
    engine: str
    engine_version: str
    served_model: str
    base_signature: str | None
    reported_by: str | None
    first_seen: datetime
    last_seen: datetime
    alive: bool  # reported within the last DEPLOYMENT_TTL_S seconds
    loaded: list[LoadedOut]


# --- webhooks --------------------------------------------------------------------------------


class WebhookCreate(BaseModel):
    url: str = Field(min_length=8, max_length=2048, pattern=r"^https?://[^\s]+$")
    events: list[str] = Field(default_factory=list, max_length=100)  # actions; [] = all
    secret: str = Field(min_length=16, max_length=200)


class WebhookOut(BaseModel):
    id: int
    url: str
    events: list[str]
    created_by: str | None
    created_at: datetime
    pending: int  # deliveries waiting (or retrying)
    failed: int  # deliveries that ran out of attempts


class DeliveryOut(BaseModel):
    id: int
    webhook_id: int
    event_id: int
    action: str
    subject: str
    status: Literal["pending", "succeeded", "failed"]
    attempts: int
    next_attempt_at: datetime | None  # None once it is no longer pending
    last_status: int | None
    last_error: str | None
    delivered_at: datetime | None
