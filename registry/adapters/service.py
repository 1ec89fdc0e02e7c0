"""Adapter versions: commit (the last step of a push), resolution of references, listings.

Called by `registry.adapters.api` inside one request transaction; services flush, never commit.
Storage reads (config and safetensors headers) happen before any row is written, and a version
row is written only once every blob it lists is verified in the store, together with its files,
metrics, labels and audit event.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col, select

from registry.access import Caller, check_alias_move
from registry.adapters.repository import (
    FILE_COLUMNS,
    VERSIONS_OF_NAMED,
    get_adapter_row,
    lock_adapter,
    lock_or_create_adapter,
    resolve,
    resolve_with_files,
    yanked_after,
)
from registry.aliases import service as aliases
from registry.bases import service as bases
from registry.blobs import service as blobs
from registry.blobs.service import adopt_stored, blob_url
from registry.core import events
from registry.core.compat import CompatReport, check_compatibility
from registry.core.errors import (
    BaseNotFound,
    BlobMissing,
    BlobNotFound,
    Conflict,
    Incompatible,
    InvalidInput,
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
    Alias,
    BaseModelRow,
    VersionFile,
    VersionLabel,
    VersionMetric,
    as_utc,
)
from registry.repository import core_rows, count
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


@dataclass(frozen=True)
class _Push:
    """A commit request, validated: nothing about it has been read from storage yet."""

    entries: list[FileEntry]
    metrics: dict[str, float]
    labels: dict[str, str]
    lineage: dict[str, str]
    base: BaseModelId | None
    description: str | None


def commit_version(
    session: Session,
    store: ObjectStore,
    settings: Settings,
    caller: Caller,
    name: AdapterName,
    request: CommitRequest,
) -> VersionOut:
    """Push step 3: create the next version of `name` from uploaded blobs, or return the
    identical one (same digest), and move `request.alias` to it.

    In this order: validate the request and the caller's right to move the alias; read and
    verify the bytes (no database lock is held while storage is read); check compatibility with
    the base; lock the adapter row (version numbers are assigned one at a time); write.

    Content that already is a version keeps that version's base (a version never changes): a
    push naming another base is refused, and `require_compatible` proves the existing version
    compatible with its own base, recording the report on it when the caller may write.
    """
    push = _validate_push(settings, caller, request)
    summary, header, digest = _read_pushed(session, store, push.entries)
    existing = _version_with_digest(session, name, digest)
    if existing is not None:
        base_id, base_revision = _repushed_base(name, existing, push.base)
    else:
        base_id, base_revision = _pushed_base(push.base, summary)
    report = _push_check(session, summary, header, base_id, base_revision)
    if request.require_compatible or settings.require_compatible:
        _require_compatible(base_id, base_revision, report)

    adapter = lock_or_create_adapter(session, name)
    # Again under the lock: a concurrent push of the same bytes may have created it.
    version = existing or _version_with_digest(session, name, digest)
    created = version is None
    if version is None:
        version = _insert_version(
            session, adapter, name, push, summary, digest, (base_id, base_revision), report, caller
        )
    elif report is not None and caller.may_write:
        _save_report(session, caller, name, version, report)
    if request.alias:
        aliases.set_alias(session, adapter, version, request.alias, caller.name)
    return version_out(session, name, version, created=created)


def _version_with_digest(session: Session, name: AdapterName, digest: str) -> AdapterVersion | None:
    statement = (
        select(AdapterVersion)
        .join(Adapter, col(Adapter.id) == AdapterVersion.adapter_id)
        .where(
            Adapter.namespace == name.namespace,
            Adapter.name == name.name,
            AdapterVersion.digest == digest,
        )
    )
    return session.exec(statement).first()


def _repushed_base(
    name: AdapterName, version: AdapterVersion, base: BaseModelId | None
) -> tuple[str | None, str | None]:
    """The base of a version pushed again: its own; a push naming another one is refused."""
    recorded = (version.base_model_id, version.base_model_revision)
    if base is not None and (
        base.id != recorded[0] or (base.revision and base.revision != recorded[1])
    ):
        was = recorded[0] + (f"@{recorded[1]}" if recorded[1] else "") if recorded[0] else "none"
        raise Conflict(
            f"this content already is {name}@{version.number}, recorded with base {was}, and a "
            f"version's base never changes: push without --base (or with --base {was}) to get "
            f"@{version.number} back, or check it against {base} with lora-reg check "
            f"{name}@{version.number} --base {base}",
            version=version.number,
            base=was,
        )
    return recorded


def _validate_push(settings: Settings, caller: Caller, request: CommitRequest) -> _Push:
    if request.alias:
        aliases.check_alias(request.alias)
        check_alias_move(settings, caller, request.alias)
    return _Push(
        entries=checked_entries(request.files, settings),
        metrics=check_metrics(request.metrics),
        labels=check_strings("label", request.labels, MAX_LABEL_VALUE),
        lineage=check_strings("lineage", request.lineage, MAX_LINEAGE_VALUE),
        base=parse_base(request.base) if request.base else None,
        description=request.description,
    )


def _read_pushed(
    session: Session, store: ObjectStore, entries: list[FileEntry]
) -> tuple[AdapterConfigSummary, SafetensorsHeader, str]:
    """The pushed adapter's config and tensor header, and its digest, once every blob is
    verified in the store (what was read counts only then)."""
    try:
        summary, header = read_adapter(store, entries)
    except BlobNotFound:
        raise _missing([e for e in entries if e.path in (CONFIG_FILE, WEIGHTS_FILE)]) from None
    _, missing = adopt_stored(session, store, entries)
    if missing:
        raise _missing([entry for entry in entries if entry.sha256 in missing])
    return summary, header, manifest_digest(entries)


def _pushed_base(
    base: BaseModelId | None, summary: AdapterConfigSummary
) -> tuple[str | None, str | None]:
    """The base a pushed version records: `--base`, else the config's base_model_name_or_path
    (with the config's revision when `--base` named that model without one)."""
    if base is None:
        return summary.base_model_name_or_path, summary.revision
    if not base.revision and base.id == summary.base_model_name_or_path:
        return base.id, summary.revision
    return base.id, base.revision


def _insert_version(
    session: Session,
    adapter: Adapter,
    name: AdapterName,
    push: _Push,
    summary: AdapterConfigSummary,
    digest: str,
    base: tuple[str | None, str | None],
    report: CompatReport | None,
    caller: Caller,
) -> AdapterVersion:
    """Write the adapter's next version, its files, metrics and labels, and its event."""
    assert adapter.id is not None
    latest = session.execute(
        sa.select(sa.func.max(AdapterVersion.number)).where(
            col(AdapterVersion.adapter_id) == adapter.id
        )
    ).scalar_one()
    entries = push.entries
    version = AdapterVersion(
        adapter_id=adapter.id,
        number=(latest or 0) + 1,
        digest=digest,
        base_model_id=base[0],
        base_model_revision=base[1],
        peft_type=summary.peft_type,
        task_type=summary.task_type,
        r=summary.r,
        lora_alpha=summary.lora_alpha,
        target_modules=summary.target_modules,
        use_dora=summary.use_dora,
        use_rslora=summary.use_rslora,
        adapter_config=summary.raw,
        metrics=push.metrics,
        labels=push.labels,
        lineage=push.lineage,
        description=push.description,
        size=sum(entry.size for entry in entries),
        file_count=len(entries),
        created_by=caller.name,
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
        [VersionMetric(version_id=version.id, name=k, value=v) for k, v in push.metrics.items()]
    )
    session.add_all(
        [VersionLabel(version_id=version.id, key=k, value=v) for k, v in push.labels.items()]
    )
    record(
        session,
        caller.name,
        events.VersionPushed(
            subject=f"{name}@{version.number}", digest=digest, size=version.size, files=len(entries)
        ),
    )
    session.flush()
    return version


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
    caller: Caller,
    ref: Reference,
    request: CheckRequest,
) -> CompatReport:
    """Check a stored version against a registered base (by default its own), headers only.

    A plain check (no profile) against the version's own base is recorded on the version when
    the caller may write (read tokens get the report, unsaved).
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
    if caller.may_write and request.profile is None and own is not None and own.id == row.id:
        _save_report(session, caller, ref.name, version, report)
    return report


def _save_report(
    session: Session,
    caller: Caller,
    name: AdapterName,
    version: AdapterVersion,
    report: CompatReport,
) -> None:
    """Record a check against the version's own base on the version (unless it holds it)."""
    if version.compat_report == report.model_dump(mode="json"):
        return
    version.compat_status = report.status
    version.compat_base = report.base
    version.compat_report = report.model_dump(mode="json")
    session.add(version)
    record(
        session,
        caller.name,
        events.VersionChecked(
            subject=f"{name}@{version.number}", base=report.base, status=report.status
        ),
    )
    session.flush()


def _missing(entries: list[FileEntry]) -> BlobMissing:
    paths = sorted(entry.path for entry in entries)
    return BlobMissing(
        f"{len(paths)} file(s) not uploaded yet: {', '.join(paths[:5])}"
        + (" ..." if len(paths) > 5 else "")
        + "; upload them (lora-reg push does this) and commit again",
        paths=paths,
    )


# --- yank --------------------------------------------------------------------------------------


def yank_version(session: Session, caller: Caller, ref: Reference, reason: str) -> VersionOut:
    """Mark a version as not to be used: pull refuses it, no alias may point at it. Nothing is
    deleted; yanking twice keeps the first. Refused while an alias points at it."""
    lock_adapter(session, ref.name)
    version = resolve(session, ref)
    if version.yanked_at is None:
        pointing = session.exec(select(Alias.name).where(Alias.version_id == version.id)).all()
        label = f"{ref.name}@{version.number}"
        if pointing:
            raise Conflict(
                f"{label} is what {', '.join(pointing)} point(s) at: move those aliases to "
                f"another version first (lora-reg alias set {ref.name}@N ALIAS)",
                aliases=list(pointing),
            )
        version.yanked_at, version.yanked_by = datetime.now(UTC), caller.name
        version.yank_reason = reason
        session.add(version)
        record(
            session,
            caller.name,
            events.VersionYanked(subject=label, digest=version.digest, reason=reason),
        )
        session.flush()
    return version_out(session, ref.name, version)


# --- reads -------------------------------------------------------------------------------------


def get_version(session: Session, ref: Reference) -> VersionOut:
    """The version a reference points at, with its files; `latest` notes the newer yanked
    versions it skipped."""
    rows = resolve_with_files(session, ref)
    fields = {key: value for key, value in rows[0]._mapping.items() if key not in FILE_COLUMNS}
    files = [
        VersionFileOut(
            path=row.file_path,
            size=row.file_size,
            sha256=row.file_sha256,
            url=blob_url(row.file_sha256),
        )
        for row in rows
        if row.file_path is not None
    ]
    out = _out(ref.name, fields, files=files, created=None)
    if ref.selector.kind == "latest":
        skipped = yanked_after(session, fields["adapter_id"], out.number)
        if skipped:
            numbers = ", ".join(str(number) for number in skipped)
            out.note = (
                f"latest is @{out.number}: newer version(s) {numbers} are yanked "
                f"(see lora-reg show {ref.name}@{skipped[-1]})"
            )
    return out


# Built once (see registry.adapters.repository): a version's files, for every single-version read.
_FILES_OF_VERSION = (
    sa.select(col(VersionFile.path), col(VersionFile.size), col(VersionFile.sha256))
    .where(col(VersionFile.version_id) == sa.bindparam("version_id"))
    .order_by(col(VersionFile.path))
)


def version_out(
    session: Session,
    name: AdapterName,
    version: AdapterVersion,
    *,
    created: bool | None = None,
) -> VersionOut:
    """One version as single reads show it: with its files and its compatibility report."""
    rows = session.execute(_FILES_OF_VERSION, {"version_id": version.id}).all()
    files = [
        VersionFileOut(path=path, size=size, sha256=sha256, url=blob_url(sha256))
        for path, size, sha256 in rows
    ]
    return _out(name, version.model_dump(), files=files, created=created)


# What listings show of a version: every column but the compatibility report, which single reads
# carry (decoding fifty reports would cost a page more than all the rest it does).
_LISTED = [
    column
    for column in AdapterVersion.__table__.columns  # type: ignore[attr-defined]
    if column.name != "compat_report"
]


def _listed_out(name: AdapterName, row: Any) -> VersionOut:
    """A version as listings show it, from a row of the `_LISTED` columns."""
    return _out(name, dict(row._mapping), files=None, created=None)


def _out(
    name: AdapterName,
    fields: dict[str, Any],
    files: list[VersionFileOut] | None,
    created: bool | None,
) -> VersionOut:
    yanked_at = fields.get("yanked_at")
    return VersionOut.model_validate(
        {
            **fields,
            "adapter": str(name),
            "created_at": as_utc(fields["created_at"]),
            "yanked_at": as_utc(yanked_at) if yanked_at else None,
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
    search: str | None = None,
) -> Page[AdapterOut]:
    query: Any = select(Adapter)
    if search:  # part of `ns/name`, any case
        full = sa.func.lower(col(Adapter.namespace) + "/" + col(Adapter.name))
        query = query.where(full.like(_contains(search.lower()), escape="\\"))
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


def _contains(text: str) -> str:
    """A LIKE pattern that finds `text` anywhere (its `%`, `_` and `\\` taken literally)."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


COMPAT_FILTERS = ("compatible", "incompatible", "unchecked")


def _latest_compat(compat: str) -> Any:
    """Adapters whose latest version has this compatibility status."""
    if compat not in COMPAT_FILTERS:
        raise InvalidInput(f"compat filter {compat!r}: use one of {', '.join(COMPAT_FILTERS)}")
    newer = sa.orm.aliased(AdapterVersion)
    latest = (
        sa.select(sa.func.max(col(newer.number)))
        .where(col(newer.adapter_id) == Adapter.id, col(newer.yanked_at).is_(None))
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
    """Adapters with their version count and latest version (the newest not yanked), in two
    queries for the page."""
    ids = [adapter.id for adapter in adapters]
    stats = {
        adapter_id: (int(versions), newest_number)
        for adapter_id, versions, newest_number in session.execute(
            sa.select(
                col(AdapterVersion.adapter_id),
                sa.func.count(),
                sa.func.max(
                    sa.case((col(AdapterVersion.yanked_at).is_(None), col(AdapterVersion.number)))
                ),
            )
            .where(col(AdapterVersion.adapter_id).in_(ids))
            .group_by(col(AdapterVersion.adapter_id))
        ).all()
    }
    latest = {
        version.adapter_id: version
        for version in session.execute(
            sa.select(*_LISTED).where(
                sa.tuple_(AdapterVersion.adapter_id, AdapterVersion.number).in_(
                    [
                        (adapter_id, number)
                        for adapter_id, (_, number) in stats.items()
                        if number is not None
                    ]
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
                latest=_listed_out(name, newest) if newest else None,
            )
        )
    return items


def get_adapter(session: Session, name: AdapterName) -> AdapterOut:
    return adapter_outs(session, [get_adapter_row(session, name)])[0]


def _versions_sorted(key: str, descending: bool) -> Any:
    """One page of an adapter's versions (by `namespace`, `name`), with the count of all of them
    (a window over the rows before LIMIT: one query, not two), sorted by `key`: `number`,
    `created` or `metric` (the metric named by the `metric` parameter)."""
    total = sa.func.count().over().label("total")
    query: Any = sa.select(*_LISTED, total).join(Adapter, VERSIONS_OF_NAMED)
    if key == "metric":
        metric = VersionMetric.__table__.alias("sort_metric")  # type: ignore[attr-defined]
        query = query.outerjoin(
            metric,
            sa.and_(
                metric.c.version_id == col(AdapterVersion.id),
                metric.c.name == sa.bindparam("metric"),
            ),
        )
        value = metric.c.value.desc() if descending else metric.c.value.asc()
        order = [value.nulls_last(), col(AdapterVersion.number).desc()]
    else:
        column = col(AdapterVersion.number) if key == "number" else col(AdapterVersion.created_at)
        order = [column.desc() if descending else column.asc()]
    return query.order_by(*order).limit(sa.bindparam("limit")).offset(sa.bindparam("offset"))


# Built once per sort (see registry.adapters.repository).
_VERSIONS_SORTED = {
    (key, descending): _versions_sorted(key, descending)
    for key in ("number", "created", "metric")
    for descending in (False, True)
}


def list_versions(
    session: Session, name: AdapterName, *, sort: str, limit: int, offset: int
) -> Page[VersionOut]:
    """Versions of one adapter, sorted by `number`, `created` or `metrics.<name>` (prefix `-` for
    descending); versions without the metric come last either way."""
    descending = sort.startswith("-")
    key = sort.lstrip("-+")
    metric = None
    if key.startswith("metrics.") and len(key) > len("metrics."):
        key, metric = "metric", key[len("metrics.") :]
    elif key not in ("number", "created"):
        raise InvalidInput(
            f"cannot sort by {sort!r}: use number, created or metrics.<name>, with '-' for "
            "descending (e.g. -metrics.rougeL)"
        )
    params = {
        "namespace": name.namespace,
        "name": name.name,
        "metric": metric,
        "limit": limit,
        "offset": offset,
    }
    rows = core_rows(session, _VERSIONS_SORTED[key, descending], params)
    if rows:
        total = rows[0].total
    else:  # no rows to count with: no such adapter (404), no versions, or a page past the end
        adapter = get_adapter_row(session, name)
        versions = select(AdapterVersion).where(AdapterVersion.adapter_id == adapter.id)
        total = count(session, versions)
    return make_page([_listed_out(name, row) for row in rows], total, limit, offset)


@dataclass(frozen=True)
class MetricPoint:
    """One version's metrics, for charts across versions."""

    number: int
    metrics: dict[str, float]
    yanked: bool


def metric_series(session: Session, name: AdapterName, limit: int) -> list[MetricPoint]:
    """The newest `limit` versions' numbers and metrics, oldest first, in one narrow query (no
    configs, reports or files: a chart of hundreds of versions reads only what it draws)."""
    adapter = get_adapter_row(session, name)
    rows = session.execute(
        sa.select(
            col(AdapterVersion.number), col(AdapterVersion.metrics), col(AdapterVersion.yanked_at)
        )
        .where(col(AdapterVersion.adapter_id) == adapter.id)
        .order_by(col(AdapterVersion.number).desc())
        .limit(limit)
    ).all()
    return [
        MetricPoint(number=number, metrics=dict(metrics or {}), yanked=yanked_at is not None)
        for number, metrics, yanked_at in reversed(rows)
    ]
