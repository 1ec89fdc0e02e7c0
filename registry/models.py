"""SQL tables (SQLModel). The schema is created only by Alembic migrations in `migrations/`.

Imported by repositories and services; never by `registry.core`, the CLI or workers. Rows are
immutable where the design says so (versions, files, blobs, audit events): nothing here updates
them, and later migrations add the database-level guards.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """SQLite hands timestamps back naive; they were written in UTC."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _json(nullable: bool = False) -> Any:
    return sa.Column(sa.JSON(), nullable=nullable)


def _timestamp() -> Any:
    return sa.Column(sa.DateTime(timezone=True), nullable=False)


class Adapter(SQLModel, table=True):
    __tablename__ = "adapters"
    __table_args__ = (sa.UniqueConstraint("namespace", "name", name="uq_adapters_namespace_name"),)

    id: int | None = Field(default=None, primary_key=True)
    namespace: str = Field(max_length=64, index=True)
    name: str = Field(max_length=64)
    created_at: datetime = Field(default_factory=utcnow, sa_column=_timestamp())


class Blob(SQLModel, table=True):
    """A verified object in the store: present here only once its bytes matched its sha256."""

    __tablename__ = "blobs"

    sha256: str = Field(primary_key=True, max_length=64)
    size: int = Field(sa_type=sa.BigInteger)
    storage_key: str = Field(max_length=200)
    created_at: datetime = Field(default_factory=utcnow, sa_column=_timestamp())


class AdapterVersion(SQLModel, table=True):
    __tablename__ = "adapter_versions"
    __table_args__ = (
        sa.UniqueConstraint("adapter_id", "number", name="uq_versions_adapter_number"),
        sa.UniqueConstraint("adapter_id", "digest", name="uq_versions_adapter_digest"),
    )

    id: int | None = Field(default=None, primary_key=True)
    adapter_id: int = Field(foreign_key="adapters.id", index=True)
    number: int
    digest: str = Field(max_length=71, index=True)
    base_model_id: str | None = Field(default=None, max_length=200, index=True)
    base_model_revision: str | None = Field(default=None, max_length=200)
    peft_type: str = Field(max_length=32)
    task_type: str | None = Field(default=None, max_length=64)
    r: int
    lora_alpha: float
    target_modules: Any = Field(default=None, sa_column=_json(nullable=True))
    use_dora: bool = False
    use_rslora: bool = False
    adapter_config: dict[str, Any] = Field(sa_column=_json())
    metrics: dict[str, float] = Field(default_factory=dict, sa_column=_json())
    labels: dict[str, str] = Field(default_factory=dict, sa_column=_json())
    lineage: dict[str, str] = Field(default_factory=dict, sa_column=_json())
    description: str | None = Field(default=None, sa_type=sa.Text)
    size: int = Field(sa_type=sa.BigInteger)
    file_count: int
    created_at: datetime = Field(default_factory=utcnow, sa_column=_timestamp())
    created_by: str | None = Field(default=None, max_length=200)
    # The compatibility report against the version's registered base (None: not checked).
    compat_status: str | None = Field(default=None, max_length=16, index=True)
    compat_base: str | None = Field(default=None, max_length=401)
    compat_report: dict[str, Any] | None = Field(default=None, sa_column=_json(nullable=True))
    # Yanked: kept (nothing is deleted) but not to be used; pull refuses it without a flag.
    yanked_at: datetime | None = Field(
        default=None, sa_column=sa.Column(sa.DateTime(timezone=True), nullable=True)
    )
    yanked_by: str | None = Field(default=None, max_length=200)
    yank_reason: str | None = Field(default=None, max_length=1000)


class VersionFile(SQLModel, table=True):
    __tablename__ = "version_files"

    version_id: int = Field(foreign_key="adapter_versions.id", primary_key=True)
    path: str = Field(primary_key=True, max_length=255)
    size: int = Field(sa_type=sa.BigInteger)
    sha256: str = Field(foreign_key="blobs.sha256", max_length=64, index=True)


class VersionMetric(SQLModel, table=True):
    """Metrics again, one row each, so versions can be sorted by a metric in SQL."""

    __tablename__ = "version_metrics"
    __table_args__ = (sa.Index("ix_version_metrics_name_value", "name", "value"),)

    version_id: int = Field(foreign_key="adapter_versions.id", primary_key=True)
    name: str = Field(primary_key=True, max_length=64)
    value: float


class VersionLabel(SQLModel, table=True):
    """Labels again, one row each, so adapters can be filtered by label in SQL."""

    __tablename__ = "version_labels"
    __table_args__ = (sa.Index("ix_version_labels_key_value", "key", "value"),)

    version_id: int = Field(foreign_key="adapter_versions.id", primary_key=True)
    key: str = Field(primary_key=True, max_length=64)
    value: str = Field(max_length=256)


class AuditEvent(SQLModel, table=True):
    """Append-only record of every mutation."""

    __tablename__ = "audit_events"

    id: int | None = Field(default=None, primary_key=True)
    at: datetime = Field(default_factory=utcnow, sa_column=_timestamp())
    actor: str | None = Field(default=None, max_length=200)
    action: str = Field(max_length=64, index=True)
    subject: str = Field(max_length=300, index=True)
    details: dict[str, Any] = Field(default_factory=dict, sa_column=_json())


class BaseModelRow(SQLModel, table=True):
    """A registered base model: its config.json and tensor signature, immutable once written.

    `revision` is "" when the source named none (a local folder). `source` says where the weights
    live: `file://`, `s3://`, `hf://` or `registry` (stored here, listed in base_model_files).
    """

    __tablename__ = "base_models"
    __table_args__ = (
        sa.UniqueConstraint("model_id", "revision", name="uq_base_models_id_revision"),
    )

    id: int | None = Field(default=None, primary_key=True)
    model_id: str = Field(max_length=200, index=True)
    revision: str = Field(default="", max_length=200)
    source: str = Field(max_length=2048)
    config: dict[str, Any] = Field(sa_column=_json())
    tensors: dict[str, Any] = Field(sa_column=_json())  # name -> {dtype, shape, shard}
    parameter_count: int = Field(sa_type=sa.BigInteger)
    stored: bool = False
    created_at: datetime = Field(default_factory=utcnow, sa_column=_timestamp())
    created_by: str | None = Field(default=None, max_length=200)


class BaseModelFile(SQLModel, table=True):
    """A file of a base whose weights are stored in the registry (`base add --upload`)."""

    __tablename__ = "base_model_files"

    base_id: int = Field(foreign_key="base_models.id", primary_key=True)
    path: str = Field(primary_key=True, max_length=255)
    size: int = Field(sa_type=sa.BigInteger)
    sha256: str = Field(foreign_key="blobs.sha256", max_length=64, index=True)


class Alias(SQLModel, table=True):
    """A movable name (`production`, `staging`) for one version of an adapter."""

    __tablename__ = "aliases"
    __table_args__ = (sa.UniqueConstraint("adapter_id", "name", name="uq_aliases_adapter_name"),)

    id: int | None = Field(default=None, primary_key=True)
    adapter_id: int = Field(foreign_key="adapters.id", index=True)
    name: str = Field(max_length=64, index=True)
    version_id: int = Field(foreign_key="adapter_versions.id")
    updated_at: datetime = Field(default_factory=utcnow, sa_column=_timestamp())
    updated_by: str | None = Field(default=None, max_length=200)


class AliasMove(SQLModel, table=True):
    """Append-only history of alias moves: what an alias pointed at, from when, set by whom.

    `version_number` is None for a removal; `previous_number` is None for a first set.
    """

    __tablename__ = "alias_moves"
    __table_args__ = (sa.Index("ix_alias_moves_adapter_name_at", "adapter_id", "name", "at"),)

    id: int | None = Field(default=None, primary_key=True)
    adapter_id: int = Field(foreign_key="adapters.id")
    name: str = Field(max_length=64)
    previous_number: int | None = None
    version_number: int | None = None
    at: datetime = Field(default_factory=utcnow, sa_column=_timestamp())
    actor: str | None = Field(default=None, max_length=200)


class MergeJob(SQLModel, table=True):
    """A request to merge one adapter version into one base, and its run (docs/architecture.md §9).

    queued -> running (a worker holds a lease until `lease_expires_at`, renewed by heartbeats)
    -> succeeded | failed | cancelled. `memo_key` identifies the output (adapter digest, base,
    options, target), so a request matching a succeeded job returns that job.
    """

    __tablename__ = "merge_jobs"
    __table_args__ = (sa.Index("ix_merge_jobs_status_created_at", "status", "created_at"),)

    id: str = Field(primary_key=True, max_length=32)  # uuid4 hex
    status: str = Field(max_length=16)
    adapter_version_id: int = Field(foreign_key="adapter_versions.id", index=True)
    adapter: str = Field(max_length=200)  # ns/name@N
    adapter_digest: str = Field(max_length=71)
    base_id: str = Field(max_length=200)
    base_revision: str = Field(default="", max_length=200)
    target: str = Field(max_length=2048)
    options: dict[str, Any] = Field(sa_column=_json())
    memo_key: str = Field(max_length=64, index=True)
    attempts: int = 0
    max_attempts: int
    lease_s: int = 60  # the lease a worker asked for when it claimed the job
    worker: str | None = Field(default=None, max_length=200)
    # The token that claimed the job: only it may heartbeat, upload for and finish the job.
    claimed_by: str | None = Field(default=None, max_length=200)
    device: str | None = Field(default=None, max_length=200)
    lease_expires_at: datetime | None = Field(
        default=None, sa_column=sa.Column(sa.DateTime(timezone=True), nullable=True)
    )
    heartbeat_at: datetime | None = Field(
        default=None, sa_column=sa.Column(sa.DateTime(timezone=True), nullable=True)
    )
    progress: dict[str, Any] | None = Field(default=None, sa_column=_json(nullable=True))
    cancel_requested: bool = False
    error: dict[str, Any] | None = Field(default=None, sa_column=_json(nullable=True))
    result: dict[str, Any] | None = Field(default=None, sa_column=_json(nullable=True))
    requested_by: str | None = Field(default=None, max_length=200)
    created_at: datetime = Field(default_factory=utcnow, sa_column=_timestamp())
    started_at: datetime | None = Field(
        default=None, sa_column=sa.Column(sa.DateTime(timezone=True), nullable=True)
    )
    finished_at: datetime | None = Field(
        default=None, sa_column=sa.Column(sa.DateTime(timezone=True), nullable=True)
    )


class MergeWorker(SQLModel, table=True):
    """A merge worker the registry has heard from: every claim (a job or none) and heartbeat
    records when, so a request that no worker picks up can say so (`lora-reg merge --wait`)."""

    __tablename__ = "merge_workers"

    name: str = Field(primary_key=True, max_length=200)  # ClaimRequest.worker
    token: str | None = Field(default=None, max_length=200)  # the token it last called with
    device: str | None = Field(default=None, max_length=200)
    last_seen_at: datetime = Field(default_factory=utcnow, sa_column=_timestamp())


class Deployment(SQLModel, table=True):
    """A serving engine instance (e.g. vLLM with the lora_registry plugin) that reports what it
    has loaded. `last_seen_at` moves on every report; one that stops reporting is gone."""

    __tablename__ = "deployments"

    instance_id: str = Field(primary_key=True, max_length=64)
    host: str = Field(max_length=255)
    port: int | None = None
    engine: str = Field(max_length=32)
    engine_version: str = Field(max_length=64)
    served_model: str = Field(max_length=1024)
    base_signature: str | None = Field(default=None, max_length=71)
    reported_by: str | None = Field(default=None, max_length=200)  # the token name
    first_seen_at: datetime = Field(default_factory=utcnow, sa_column=_timestamp())
    last_seen_at: datetime = Field(default_factory=utcnow, sa_column=_timestamp())


class DeploymentAdapter(SQLModel, table=True):
    """An adapter version a deployment has loaded now, under the name the engine knows it by."""

    __tablename__ = "deployment_adapters"

    instance_id: str = Field(foreign_key="deployments.instance_id", primary_key=True, max_length=64)
    name: str = Field(primary_key=True, max_length=300)  # e.g. ns/name@production
    reference: str = Field(max_length=300)  # as asked
    adapter: str = Field(max_length=200, index=True)  # ns/name
    version: int
    digest: str = Field(max_length=71)
    loaded_at: datetime = Field(sa_column=_timestamp())


class Webhook(SQLModel, table=True):
    """An endpoint the registry POSTs events to, signed with its secret (Standard Webhooks).

    `cursor` is the id of the last event considered for it: the delivery loop turns the events
    after it that match `events` into delivery rows, then moves it on.
    """

    __tablename__ = "webhooks"

    id: int | None = Field(default=None, primary_key=True)
    url: str = Field(max_length=2048)
    events: list[str] = Field(sa_column=_json())  # actions, e.g. ["alias.set"]; [] = every one
    secret: str = Field(max_length=200)  # needed to sign; never returned by the API
    cursor: int = Field(default=0, sa_type=sa.BigInteger)
    created_by: str | None = Field(default=None, max_length=200)
    created_at: datetime = Field(default_factory=utcnow, sa_column=_timestamp())


class WebhookDelivery(SQLModel, table=True):
    """One event for one webhook: pending until delivered (2xx) or out of attempts (failed)."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        sa.UniqueConstraint("webhook_id", "event_id", name="uq_deliveries_webhook_event"),
        sa.Index("ix_webhook_deliveries_status_next", "status", "next_attempt_at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    webhook_id: int = Field(foreign_key="webhooks.id", index=True)
    event_id: int = Field(sa_type=sa.BigInteger)
    status: str = Field(default="pending", max_length=16)  # pending | succeeded | failed
    attempts: int = 0
    next_attempt_at: datetime = Field(default_factory=utcnow, sa_column=_timestamp())
    last_status: int | None = None  # the endpoint's HTTP status on the last attempt
    last_error: str | None = Field(default=None, max_length=500)
    delivered_at: datetime | None = Field(
        default=None, sa_column=sa.Column(sa.DateTime(timezone=True), nullable=True)
    )


class MergedArtifact(SQLModel, table=True):
    """A merged checkpoint: lineage (adapter digest + base revision + options) -> its files.

    `digest` is the sha256 of its canonical manifest, like a version's. `stored`: the files are
    blobs in this registry (target `registry`); otherwise `location` says where they were
    published and the files are recorded for lineage and `identify` only.
    """

    __tablename__ = "merged_artifacts"

    id: int | None = Field(default=None, primary_key=True)
    digest: str = Field(max_length=71, unique=True)
    job_id: str = Field(foreign_key="merge_jobs.id", max_length=32, index=True)
    adapter_version_id: int = Field(foreign_key="adapter_versions.id", index=True)
    adapter_digest: str = Field(max_length=71)
    base_id: str = Field(max_length=200)
    base_revision: str = Field(default="", max_length=200)
    options: dict[str, Any] = Field(sa_column=_json())
    target: str = Field(max_length=2048)
    location: str = Field(sa_type=sa.Text)
    stored: bool = False
    size: int = Field(sa_type=sa.BigInteger)
    created_at: datetime = Field(default_factory=utcnow, sa_column=_timestamp())


class MergedArtifactFile(SQLModel, table=True):
    """A file of a merged artifact. No foreign key to `blobs`: an artifact published elsewhere
    (a folder, S3, the Hub) lists files whose bytes the registry never held."""

    __tablename__ = "merged_artifact_files"

    artifact_id: int = Field(foreign_key="merged_artifacts.id", primary_key=True)
    path: str = Field(primary_key=True, max_length=255)
    size: int = Field(sa_type=sa.BigInteger)
    sha256: str = Field(max_length=64, index=True)


class ApiToken(SQLModel, table=True):
    """A bearer token: its name (the audit actor), its scope and the sha256 of its secret.

    The secret itself is shown once, when the token is created, and never stored. Revoked tokens
    keep their row (the audit log names them), so a name is never reused.
    """

    __tablename__ = "api_tokens"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=64, unique=True)
    scope: str = Field(max_length=16)
    secret_sha256: str = Field(max_length=64, unique=True)
    created_at: datetime = Field(default_factory=utcnow, sa_column=_timestamp())
    created_by: str | None = Field(default=None, max_length=200)
    revoked_at: datetime | None = Field(default=None, sa_type=sa.DateTime(timezone=True))
    revoked_by: str | None = Field(default=None, max_length=200)
