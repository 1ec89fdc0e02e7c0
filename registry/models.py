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
