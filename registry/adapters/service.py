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

from registry.aliases import service as aliases
from registry.bases import service as bases
from registry.blobs import service as blobs
from registry.blobs.service import adopt_stored, blob_url
from registry.core import events
from registry.core.compat import CompatReport, check_compatibility
from registry.core.errors import (
    AdapterNotFound,
    AliasNotFound,
    BaseNotFound,
    BlobMissing,
    BlobNotFound,
    Incompatible,
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
from registry.core.names import AdapterName, BaseModelId, Reference, parse_base
from registry.core.peft import (
    AdapterConfigSummary,
    check_config_size,
    check_lora_tensors,
    parse_adapter_config,
)
from registry.core.profiles import bind
from registry.core.safetensors_header import SafetensorsHeader, header_length, parse_header
from registry.core.schemas import (
    MAX_LABEL_VALUE,
    MAX_LINEAGE_VALUE,
    AdapterOut,
    CheckRequest,
    CommitRequest,
    FileSpec,
    Page,
    UploadPlan,
    VersionFileOut,
    VersionOut,
    check_metrics,
    check_strings,
    make_page,
)
from registry.events.service import record
from registry.models import (
    Adapter,
    AdapterVersion,
    BaseModelRow,
    VersionFile,
    VersionLabel,
    VersionMetric,
    as_utc,
)
from registry.repository import count, for_update, insert_ignore
from registry.settings import Settings
from registry.storage import ObjectStore

# --- push: commit ------------------------------------------------------------------------------


def read_adapter(
    store: ObjectStore, entries: list[FileEntry]
) -> tuple[AdapterConfigSummary, SafetensorsHeader]:
    """Parse the stored adapter_config.json and the weights' header (header bytes only)."""
    by_path = {entry.path: entry for entry in entries}
    config_entry = by_path[CONFIG_FILE]
    check_config_size(config_entry.size)
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


def checked_entries(files: list[FileSpec], settings: Settings) -> list[FileEntry]:
    """The manifest of a push request, validated against this server's limits."""
    return check_manifest(
        (spec.entry() for spec in files),
        max_files=settings.max_files,
        max_bytes=settings.max_version_bytes,
    )


def plan_upload(
    session: Session, store: ObjectStore, settings: Settings, files: list[FileSpec]
) -> UploadPlan:
    """Push step 1: which blobs are missing, and how to upload each of them."""
    return blobs.plan_upload(session, store, settings, checked_entries(files, settings))


def commit_version(
    session: Session,
    store: ObjectStore,
    settings: Settings,
    name: AdapterName,
    request: CommitRequest,
    actor: str | None,
) -> VersionOut:
    """Create the next version of `name` from uploaded blobs, or return the identical one."""
    entries = checked_entries(request.files, settings)
    metrics = check_metrics(request.metrics)
    labels = check_strings("label", request.labels, MAX_LABEL_VALUE)
    lineage = check_strings("lineage", request.lineage, MAX_LINEAGE_VALUE)
    base = parse_base(request.base) if request.base else None
    if request.alias:
        aliases.check_alias(request.alias)

    # Storage reads first, so no database lock is held while they run. What they read only
    # counts once adopt_stored has verified every blob below.
    try:
        summary, header = read_adapter(store, entries)
    except BlobNotFound:
        raise _missing([e for e in entries if e.path in (CONFIG_FILE, WEIGHTS_FILE)]) from None
    _, missing = adopt_stored(session, store, entries)
    if missing:
        raise _missing([entry for entry in entries if entry.sha256 in missing])
    digest = manifest_digest(entries)
    base_id = base.id if base else summary.base_model_name_or_path
    base_revision = base.revision if base else summary.revision
    if base and not base.revision and base.id == summary.base_model_name_or_path:
        base_revision = summary.revision  # --base named the config's model without a revision
    report = _push_check(session, summary, header, base_id, base_revision)
    if request.require_compatible or settings.require_compatible:
        _require_compatible(base_id, base_revision, report)

    adapter = _lock_or_create_adapter(session, name)
    assert adapter.id is not None
    existing = session.exec(
        select(AdapterVersion).where(
            col(AdapterVersion.adapter_id) == adapter.id, AdapterVersion.digest == digest
        )
    ).first()
    if existing is not None:
        if request.alias:
            aliases.set_alias(session, adapter, existing, request.alias, actor)
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
        base_model_id=base_id,
        base_model_revision=base_revision,
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
        compat_status=report.status if report else None,
        compat_base=report.base if report else None,
        compat_report=report.model_dump(mode="json") if report else None,
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
    record(
        session,
        actor,
        events.VersionPushed(
            subject=f"{name}@{version.number}",
            digest=digest,
            size=version.size,
            files=len(entries),
        ),
    )
    session.flush()
    if request.alias:
        aliases.set_alias(session, adapter, version, request.alias, actor)
    return version_out(session, name, version, with_files=True, created=True)


def _push_check(
    session: Session,
    summary: AdapterConfigSummary,
    header: SafetensorsHeader,
    base_id: str | None,
    base_revision: str | None,
) -> CompatReport | None:
    """The report against the pushed version's base, when that base is registered."""
    row = bases.find_base_row(session, base_id, base_revision) if base_id else None
    if row is None:
        return None
    return _run_check(summary.raw, header, row, (base_id, base_revision), None, {})


def _run_check(
    config: dict[str, Any],
    header: SafetensorsHeader,
    row: BaseModelRow,
    claimed: tuple[str | None, str | None],
    profile: str | None,
    options: dict[str, Any],
) -> CompatReport:
    bound, values = bind(profile, options)
    return check_compatibility(
        config,
        header.tensors,
        bases.signature_of(row),
        base_id=row.model_id,
        base_revision=row.revision or None,
        claimed_base=claimed,
        profile=bound,
        options=values,
    )


def _require_compatible(
    base_id: str | None, base_revision: str | None, report: CompatReport | None
) -> None:
    if report is None:
        ref = base_id + (f"@{base_revision}" if base_revision else "") if base_id else None
        raise _base_not_registered(ref)
    if not report.compatible:
        first = report.errors[0].message
        raise Incompatible(
            f"the adapter is not compatible with {report.base}: {first}"
            + (f" (and {len(report.errors) - 1} more error(s))" if len(report.errors) > 1 else ""),
            report=report.model_dump(mode="json"),
        )


def _base_not_registered(ref: str | None) -> BaseNotFound:
    if ref is None:
        return BaseNotFound(
            "compatibility is required but the adapter names no base model: push with --base ID"
        )
    return BaseNotFound(
        f"compatibility is required but base {ref} is not registered: register it first "
        f"(lora-reg base add {ref} --from DIR|s3://...|hf)",
        base=ref,
    )


def check_version(
    session: Session,
    store: ObjectStore,
    ref: Reference,
    request: CheckRequest,
    actor: str | None,
    save: bool = True,
) -> CompatReport:
    """Check a stored version against a registered base (by default its own), headers only.

    A plain check (no profile) against the version's own base is recorded on the version when
    `save` (the caller may write).
    """
    version = resolve(session, ref)
    files = session.exec(select(VersionFile).where(VersionFile.version_id == version.id)).all()
    entries = [FileEntry(f.path, f.size, f.sha256) for f in files]
    target = parse_base(request.base) if request.base else None
    if target is None and not version.base_model_id:
        raise InvalidInput(
            f"{ref} records no base model: pass --base ID[@REVISION] to check it against one"
        )
    wanted = target or BaseModelId(version.base_model_id or "", version.base_model_revision)
    row = bases.get_base_row(session, wanted)
    summary, header = read_adapter(store, entries)
    claimed = (version.base_model_id, version.base_model_revision)
    report = _run_check(summary.raw, header, row, claimed, request.profile, dict(request.options))
    # The report is recorded only against the base a push would pick for this version.
    own = bases.find_base_row(session, version.base_model_id or "", version.base_model_revision)
    if (
        save
        and request.profile is None
        and own is not None
        and own.id == row.id
        and version.compat_report != report.model_dump(mode="json")
    ):
        version.compat_status = report.status
        version.compat_base = report.base
        version.compat_report = report.model_dump(mode="json")
        session.add(version)
        record(
            session,
            actor,
            events.VersionChecked(
                subject=f"{ref.name}@{version.number}", base=report.base, status=report.status
            ),
        )
        session.flush()
    return report


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
        assert adapter.id is not None
        aliased = aliases.alias_version(session, adapter.id, selector.value)
        if aliased is None:
            raise AliasNotFound(
                f"{ref.name} has no alias {selector.value!r} (see lora-reg alias ls {ref.name})",
                adapter=str(ref.name),
                alias=selector.value,
            )
        return aliased
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
    fields = version.model_dump()
    if not with_files:
        fields["compat_report"] = None  # listings stay small; single reads carry the report
    return VersionOut.model_validate(
        {
            **fields,
            "adapter": str(name),
            "created_at": as_utc(version.created_at),
            "files": files,
            "created": created,
        }
    )


def list_adapters(
    session: Session,
    *,
    namespace: str | None,
    base: str | None,
    labels: dict[str, str],
    limit: int,
    offset: int,
    compat: str | None = None,
) -> Page[AdapterOut]:
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
    if compat:
        query = query.where(_latest_compat(compat))
    total = count(session, query)
    rows = session.exec(
        query.order_by(col(Adapter.namespace), col(Adapter.name)).limit(limit).offset(offset)
    ).all()
    return make_page(adapter_outs(session, list(rows)), total, limit, offset)


COMPAT_FILTERS = ("compatible", "incompatible", "unchecked")


def _latest_compat(compat: str) -> Any:
    """Adapters whose latest version has this compatibility status."""
    if compat not in COMPAT_FILTERS:
        raise InvalidInput(f"compat filter {compat!r}: use one of {', '.join(COMPAT_FILTERS)}")
    newer = sa.orm.aliased(AdapterVersion)
    latest = (
        sa.select(sa.func.max(col(newer.number)))
        .where(col(newer.adapter_id) == Adapter.id)
        .correlate(Adapter)
        .scalar_subquery()
    )
    status = col(AdapterVersion.compat_status)
    return sa.exists().where(
        col(AdapterVersion.adapter_id) == Adapter.id,
        col(AdapterVersion.number) == latest,
        status.is_(None) if compat == "unchecked" else status == compat,
    )


def adapter_outs(session: Session, adapters: list[Adapter]) -> list[AdapterOut]:
    """Adapters with their version count and latest version, in two queries for the page."""
    ids = [adapter.id for adapter in adapters]
    stats = {
        adapter_id: (int(versions), newest_number)
        for adapter_id, versions, newest_number in session.execute(
            sa.select(
                col(AdapterVersion.adapter_id),
                sa.func.count(),
                sa.func.max(col(AdapterVersion.number)),
            )
            .where(col(AdapterVersion.adapter_id).in_(ids))
            .group_by(col(AdapterVersion.adapter_id))
        ).all()
    }
    latest = {
        version.adapter_id: version
        for version in session.exec(
            select(AdapterVersion).where(
                sa.tuple_(AdapterVersion.adapter_id, AdapterVersion.number).in_(
                    [(adapter_id, number) for adapter_id, (_, number) in stats.items()]
                )
            )
        ).all()
    }
    items = []
    for adapter in adapters:
        assert adapter.id is not None
        name = AdapterName(adapter.namespace, adapter.name)
        newest = latest.get(adapter.id)
        items.append(
            AdapterOut(
                name=str(name),
                namespace=adapter.namespace,
                created_at=as_utc(adapter.created_at),
                version_count=stats.get(adapter.id, (0, None))[0],
                latest=version_out(session, name, newest) if newest else None,
            )
        )
    return items


def get_adapter(session: Session, name: AdapterName) -> AdapterOut:
    return adapter_outs(session, [get_adapter_row(session, name)])[0]


def list_versions(
    session: Session, name: AdapterName, *, sort: str, limit: int, offset: int
) -> Page[VersionOut]:
    """Versions of one adapter, sorted by `number`, `created` or `metrics.<name>` (prefix `-` for
    descending); versions without the metric come last either way."""
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
    return make_page([version_out(session, name, row) for row in rows], total, limit, offset)
