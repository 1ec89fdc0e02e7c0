"""Adapter versions: commit (the last step of a push), resolution of references, listings.

Called by `registry.adapters.api` inside one request transaction; services flush, never commit.
Storage reads (config and safetensors headers) happen before any row is written, and a version
row is written only once every blob it lists is verified in the store, together with its files,
metrics, labels and audit event.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col, select

from registry.blobs.service import adopt_stored, blob_url
from registry.core.errors import (
    AdapterNotFound,
    AliasNotFound,
    BlobMissing,
    BlobNotFound,
    InvalidAdapterConfig,
    InvalidInput,
    VersionNotFound,
)
from registry.core.manifest import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    FileEntry,
    check_manifest,
    manifest_digest,
)
from registry.core.names import AdapterName, Reference, parse_base
from registry.core.peft import (
    MAX_CONFIG_BYTES,
    AdapterConfigSummary,
    check_lora_tensors,
    parse_adapter_config,
)
from registry.core.safetensors_header import SafetensorsHeader, header_length, parse_header
from registry.core.schemas import (
    MAX_LABEL_VALUE,
    MAX_LINEAGE_VALUE,
    AdapterOut,
    CommitRequest,
    Page,
    VersionFileOut,
    VersionOut,
    check_metrics,
    check_strings,
)
from registry.models import (
    Adapter,
    AdapterVersion,
    AuditEvent,
    VersionFile,
    VersionLabel,
    VersionMetric,
)
from registry.repository import count, for_update, insert_ignore
from registry.settings import Settings
from registry.storage import ObjectStore

MAX_PAGE = 500


# --- push: commit ------------------------------------------------------------------------------


def read_adapter(
    store: ObjectStore, entries: list[FileEntry]
) -> tuple[AdapterConfigSummary, SafetensorsHeader]:
    """Parse the stored adapter_config.json and the weights' header (header bytes only)."""
    by_path = {entry.path: entry for entry in entries}
    config_entry = by_path[CONFIG_FILE]
    if config_entry.size > MAX_CONFIG_BYTES:
        raise InvalidAdapterConfig(f"{CONFIG_FILE} is larger than {MAX_CONFIG_BYTES} bytes")
    summary = parse_adapter_config(store.read_blob(config_entry.sha256, config_entry.size))
    weights = by_path[WEIGHTS_FILE]
    length = header_length(
        store.read_range(weights.sha256, 0, 8), file_size=weights.size, name=WEIGHTS_FILE
    )
    header = parse_header(
        store.read_range(weights.sha256, 8, length), file_size=weights.size, name=WEIGHTS_FILE
    )
    check_lora_tensors(header, name=WEIGHTS_FILE)
    return summary, header


def commit_version(
    session: Session,
    store: ObjectStore,
    settings: Settings,
    name: AdapterName,
    request: CommitRequest,
    actor: str | None,
) -> VersionOut:
    """Create the next version of `name` from uploaded blobs, or return the identical one."""
    entries = check_manifest(
        (spec.entry() for spec in request.files),
        max_files=settings.max_files,
        max_bytes=settings.max_version_bytes,
    )
    metrics = check_metrics(request.metrics)
    labels = check_strings("label", request.labels, MAX_LABEL_VALUE)
    lineage = check_strings("lineage", request.lineage, MAX_LINEAGE_VALUE)
    base = parse_base(request.base) if request.base else None

    # Storage reads first, so no database lock is held while they run. What they read only
    # counts once adopt_stored has verified every blob below.
    try:
        summary, _header = read_adapter(store, entries)
    except BlobNotFound:
        raise _missing([e for e in entries if e.path in (CONFIG_FILE, WEIGHTS_FILE)]) from None
    _, missing = adopt_stored(session, store, entries)
    if missing:
        raise _missing([entry for entry in entries if entry.sha256 in missing])
    digest = manifest_digest(entries)

    adapter = _lock_or_create_adapter(session, name)
    assert adapter.id is not None
    existing = session.exec(
        select(AdapterVersion).where(
            col(AdapterVersion.adapter_id) == adapter.id, AdapterVersion.digest == digest
        )
    ).first()
    if existing is not None:
        return version_out(session, name, existing, with_files=True, created=False)

    latest = session.execute(
        sa.select(sa.func.max(AdapterVersion.number)).where(
            col(AdapterVersion.adapter_id) == adapter.id
        )
    ).scalar_one()
    version = AdapterVersion(
        adapter_id=adapter.id,
        number=(latest or 0) + 1,
        digest=digest,
        base_model_id=base.id if base else summary.base_model_name_or_path,
        base_model_revision=base.revision if base and base.revision else summary.revision,
        peft_type=summary.peft_type,
        task_type=summary.task_type,
        r=summary.r,
        lora_alpha=summary.lora_alpha,
        target_modules=summary.target_modules,
        use_dora=summary.use_dora,
        use_rslora=summary.use_rslora,
        adapter_config=summary.raw,
        metrics=metrics,
        labels=labels,
        lineage=lineage,
        description=request.description,
        size=sum(entry.size for entry in entries),
        file_count=len(entries),
        created_by=actor,
    )
    session.add(version)
    session.flush()
    assert version.id is not None
    session.add_all(
        [
            VersionFile(version_id=version.id, path=e.path, size=e.size, sha256=e.sha256)
            for e in entries
        ]
    )
    session.add_all(
        [VersionMetric(version_id=version.id, name=k, value=v) for k, v in metrics.items()]
    )
    session.add_all(
        [VersionLabel(version_id=version.id, key=k, value=v) for k, v in labels.items()]
    )
    session.add(
        AuditEvent(
            actor=actor,
            action="version.push",
            subject=f"{name}@{version.number}",
            details={"digest": digest, "size": version.size, "files": len(entries)},
        )
    )
    session.flush()
    return version_out(session, name, version, with_files=True, created=True)


def _missing(entries: list[FileEntry]) -> BlobMissing:
    paths = sorted(entry.path for entry in entries)
    return BlobMissing(
        f"{len(paths)} file(s) not uploaded yet: {', '.join(paths[:5])}"
        + (" ..." if len(paths) > 5 else "")
        + "; upload them (lora-reg push does this) and commit again",
        paths=paths,
    )


def _lock_or_create_adapter(session: Session, name: AdapterName) -> Adapter:
    """The adapter row, locked until commit so version numbers are assigned one at a time."""
    insert_ignore(
        session,
        Adapter,
        [{"namespace": name.namespace, "name": name.name, "created_at": datetime.now(UTC)}],
    )
    statement = select(Adapter).where(
        Adapter.namespace == name.namespace, Adapter.name == name.name
    )
    adapter: Adapter = session.exec(for_update(session, statement)).one()
    return adapter


# --- reads -------------------------------------------------------------------------------------


def get_adapter_row(session: Session, name: AdapterName) -> Adapter:
    adapter = session.exec(
        select(Adapter).where(Adapter.namespace == name.namespace, Adapter.name == name.name)
    ).first()
    if adapter is None:
        raise AdapterNotFound(f"adapter {name} does not exist (see lora-reg ls)", adapter=str(name))
    return adapter


def resolve(session: Session, ref: Reference) -> AdapterVersion:
    """The version a reference points at; 404 with a specific code when there is none."""
    adapter = get_adapter_row(session, ref.name)
    query = select(AdapterVersion).where(col(AdapterVersion.adapter_id) == adapter.id)
    selector = ref.selector
    if selector.kind == "latest":
        query = query.order_by(col(AdapterVersion.number).desc()).limit(1)
    elif selector.kind == "number":
        query = query.where(AdapterVersion.number == selector.number)
    elif selector.kind == "digest":
        query = query.where(AdapterVersion.digest == selector.value)
    else:
        raise AliasNotFound(
            f"{ref.name} has no alias {selector.value!r}",
            adapter=str(ref.name),
            alias=selector.value,
        )
    version = session.exec(query).first()
    if version is None:
        what = "no versions yet" if selector.kind == "latest" else f"no version {selector}"
        raise VersionNotFound(
            f"{ref.name} has {what} (see lora-reg versions {ref.name})", reference=str(ref)
        )
    return version


def version_out(
    session: Session,
    name: AdapterName,
    version: AdapterVersion,
    *,
    with_files: bool = False,
    created: bool | None = None,
) -> VersionOut:
    files = None
    if with_files:
        rows = session.exec(
            select(VersionFile)
            .where(VersionFile.version_id == version.id)
            .order_by(col(VersionFile.path))
        ).all()
        files = [
            VersionFileOut(path=f.path, size=f.size, sha256=f.sha256, url=blob_url(f.sha256))
            for f in rows
        ]
    return VersionOut(
        adapter=str(name),
        number=version.number,
        digest=version.digest,
        base_model_id=version.base_model_id,
        base_model_revision=version.base_model_revision,
        peft_type=version.peft_type,
        task_type=version.task_type,
        r=version.r,
        lora_alpha=version.lora_alpha,
        target_modules=version.target_modules,
        use_dora=version.use_dora,
        use_rslora=version.use_rslora,
        adapter_config=version.adapter_config,
        metrics=version.metrics,
        labels=version.labels,
        lineage=version.lineage,
        description=version.description,
        size=version.size,
        file_count=version.file_count,
        created_at=_utc(version.created_at),
        created_by=version.created_by,
        files=files,
        created=created,
    )


def _utc(value: datetime) -> datetime:
    # SQLite hands timestamps back naive; they were written in UTC.
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _page_bounds(limit: int, offset: int) -> tuple[int, int]:
    if not 1 <= limit <= MAX_PAGE or offset < 0:
        raise InvalidInput(f"limit must be 1..{MAX_PAGE} and offset >= 0")
    return limit, offset


def list_adapters(
    session: Session,
    *,
    namespace: str | None,
    base: str | None,
    labels: dict[str, str],
    limit: int,
    offset: int,
) -> Page[AdapterOut]:
    limit, offset = _page_bounds(limit, offset)
    query: Any = select(Adapter)
    if namespace:
        query = query.where(Adapter.namespace == namespace)
    if base:
        parsed = parse_base(base)
        condition = sa.and_(
            col(AdapterVersion.adapter_id) == Adapter.id,
            col(AdapterVersion.base_model_id) == parsed.id,
        )
        if parsed.revision:
            condition = sa.and_(
                condition, col(AdapterVersion.base_model_revision) == parsed.revision
            )
        query = query.where(sa.exists().where(condition))
    for key, value in labels.items():
        query = query.where(
            sa.exists().where(
                col(AdapterVersion.adapter_id) == Adapter.id,
                col(VersionLabel.version_id) == AdapterVersion.id,
                col(VersionLabel.key) == key,
                col(VersionLabel.value) == value,
            )
        )
    total = count(session, query)
    rows = session.exec(
        query.order_by(col(Adapter.namespace), col(Adapter.name)).limit(limit).offset(offset)
    ).all()
    items = [adapter_out(session, row) for row in rows]
    return Page[AdapterOut](
        items=items,
        total=total,
        limit=limit,
        offset=offset,
        next_offset=offset + limit if offset + limit < total else None,
    )


def adapter_out(session: Session, adapter: Adapter) -> AdapterOut:
    name = AdapterName(adapter.namespace, adapter.name)
    versions = session.execute(
        sa.select(sa.func.count()).where(col(AdapterVersion.adapter_id) == adapter.id)
    ).scalar_one()
    latest = session.exec(
        select(AdapterVersion)
        .where(col(AdapterVersion.adapter_id) == adapter.id)
        .order_by(col(AdapterVersion.number).desc())
        .limit(1)
    ).first()
    return AdapterOut(
        name=str(name),
        namespace=adapter.namespace,
        created_at=_utc(adapter.created_at),
        version_count=int(versions),
        latest=version_out(session, name, latest) if latest else None,
    )


def get_adapter(session: Session, name: AdapterName) -> AdapterOut:
    return adapter_out(session, get_adapter_row(session, name))


def list_versions(
    session: Session, name: AdapterName, *, sort: str, limit: int, offset: int
) -> Page[VersionOut]:
    """Versions of one adapter, sorted by `number`, `created` or `metrics.<name>` (prefix `-` for
    descending); versions without the metric come last either way."""
    limit, offset = _page_bounds(limit, offset)
    adapter = get_adapter_row(session, name)
    descending = sort.startswith("-")
    key = sort.lstrip("-+")
    query: Any = select(AdapterVersion).where(col(AdapterVersion.adapter_id) == adapter.id)
    if key in ("number", "created"):
        column = col(AdapterVersion.number) if key == "number" else col(AdapterVersion.created_at)
        order = [column.desc() if descending else column.asc()]
    elif key.startswith("metrics.") and len(key) > len("metrics."):
        metric = VersionMetric.__table__.alias("sort_metric")  # type: ignore[attr-defined]
        query = query.outerjoin(
            metric,
            sa.and_(
                metric.c.version_id == col(AdapterVersion.id),
                metric.c.name == key[len("metrics.") :],
            ),
        )
        value = metric.c.value.desc() if descending else metric.c.value.asc()
        order = [value.nulls_last(), col(AdapterVersion.number).desc()]
    else:
        raise InvalidInput(
            f"cannot sort by {sort!r}: use number, created or metrics.<name>, with '-' for "
            "descending (e.g. -metrics.rougeL)"
        )
    total = count(session, query)
    rows = session.exec(query.order_by(*order).limit(limit).offset(offset)).all()
    return Page[VersionOut](
        items=[version_out(session, name, row) for row in rows],
        total=total,
        limit=limit,
        offset=offset,
        next_offset=offset + limit if offset + limit < total else None,
    )
