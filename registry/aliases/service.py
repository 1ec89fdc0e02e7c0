"""Aliases, their history, the audit log and `identify`: who runs what, since when, set by whom.

Called by `registry.aliases.api` and by the adapter service (`push --alias`, resolving
`ns/name@alias`) inside the request transaction; flushes, never commits. Every move writes the
alias row, an `alias_moves` row and an audit event in one transaction, with the adapter row
locked so moves of one adapter are serialised. `alias_moves` and `audit_events` are append-only
(PostgreSQL triggers refuse UPDATE and DELETE; nothing here issues them).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

import sqlalchemy as sa
from sqlmodel import Session, col, select

from registry.access import Caller, check_alias_move
from registry.adapters.repository import NAMED, get_adapter_row, lock_adapter, resolve
from registry.core import events
from registry.core.errors import (
    AliasNotFound,
    InvalidInput,
    InvalidReference,
    VersionYanked,
)
from registry.core.manifest import FileEntry, manifest_digest
from registry.core.names import ALIAS_RE, AdapterName, Reference, parse_selector
from registry.core.schemas import (
    AliasMoveOut,
    AliasOut,
    AuditEventOut,
    IdentifyMatch,
    IdentifyOut,
    MergedMatch,
    Page,
    make_page,
)
from registry.events.service import record
from registry.models import (
    Adapter,
    AdapterVersion,
    Alias,
    AliasMove,
    AuditEvent,
    MergedArtifact,
    MergedArtifactFile,
    VersionFile,
    as_utc,
)
from registry.repository import core_rows, count
from registry.settings import Settings


def check_alias(name: str) -> str:
    """An alias: `[a-z][a-z0-9-]*`, never all digits, never `latest`."""
    if name == "latest" or not ALIAS_RE.fullmatch(name):
        raise InvalidReference(
            f"invalid alias {name!r}: use a lower-case word such as production or staging "
            "(letters, digits and '-', starting with a letter; not 'latest')",
            alias=name,
        )
    return name


def _adapter_label(adapter: Adapter) -> str:
    return f"{adapter.namespace}/{adapter.name}"


def move_alias(
    session: Session,
    settings: Settings,
    caller: Caller,
    name: AdapterName,
    alias: str,
    version_text: str,
) -> AliasOut:
    """Point `alias` of `name` at the version `version_text` names (a number, `sha256:...` or
    another alias), if the caller may move that alias."""
    check_alias_move(settings, caller, check_alias(alias))
    adapter = lock_adapter(session, name)
    version = resolve(session, Reference(name, parse_selector(version_text)))
    return set_alias(session, adapter, version, alias, caller.name)


def delete_alias(
    session: Session, settings: Settings, caller: Caller, name: AdapterName, alias: str
) -> None:
    """Remove `alias` of `name`, if the caller may move that alias."""
    check_alias_move(settings, caller, check_alias(alias))
    remove_alias(session, lock_adapter(session, name), alias, caller.name)


def set_alias(
    session: Session,
    adapter: Adapter,
    version: AdapterVersion,
    alias: str,
    actor: str | None,
) -> AliasOut:
    """Point `alias` at `version` (the adapter row must be locked by the caller)."""
    check_alias(alias)
    assert adapter.id is not None and version.id is not None
    if version.yanked_at is not None:
        raise VersionYanked(
            f"{_adapter_label(adapter)}@{version.number} is yanked ({version.yank_reason}); "
            "no alias may point at it: pick another version",
            version=version.number,
        )
    row = session.exec(
        select(Alias).where(Alias.adapter_id == adapter.id, Alias.name == alias)
    ).first()
    previous = session.get(AdapterVersion, row.version_id) if row else None
    if row is not None and row.version_id == version.id:
        return _alias_out(adapter, row, version)
    now = _move_time(session, adapter, alias)
    if row is None:
        row = Alias(adapter_id=adapter.id, name=alias, version_id=version.id)
    row.version_id, row.updated_at, row.updated_by = version.id, now, actor
    session.add(row)
    _record(session, adapter, alias, previous, version, actor, now)
    session.flush()
    return _alias_out(adapter, row, version)


def remove_alias(session: Session, adapter: Adapter, alias: str, actor: str | None) -> None:
    row = session.exec(
        select(Alias).where(Alias.adapter_id == adapter.id, Alias.name == alias)
    ).first()
    if row is None:
        raise AliasNotFound(f"{_adapter_label(adapter)} has no alias {alias!r}", alias=alias)
    previous = session.get(AdapterVersion, row.version_id)
    session.delete(row)
    _record(session, adapter, alias, previous, None, actor, _move_time(session, adapter, alias))
    session.flush()


def _move_time(session: Session, adapter: Adapter, alias: str) -> datetime:
    """Now, but never before the alias's last move: replicas' clocks may drift, and history
    must read in the order the moves happened (the adapter row is locked)."""
    last = session.exec(
        select(sa.func.max(AliasMove.at)).where(
            AliasMove.adapter_id == adapter.id, AliasMove.name == alias
        )
    ).first()
    now = datetime.now(UTC)
    return max(now, as_utc(last)) if last else now


def _record(
    session: Session,
    adapter: Adapter,
    alias: str,
    previous: AdapterVersion | None,
    version: AdapterVersion | None,
    actor: str | None,
    at: datetime,
) -> None:
    assert adapter.id is not None
    session.add(
        AliasMove(
            adapter_id=adapter.id,
            name=alias,
            previous_number=previous.number if previous else None,
            version_number=version.number if version else None,
            at=at,
            actor=actor,
        )
    )
    subject = f"{_adapter_label(adapter)}@{alias}"
    before = previous.number if previous else None
    event: events.Event = (
        events.AliasSet(
            subject=subject,
            alias=alias,
            previous=before,
            version=version.number,
            digest=version.digest,
        )
        if version is not None
        else events.AliasRemoved(subject=subject, alias=alias, previous=before)
    )
    record(session, actor, event, at=at)


def _alias_out(adapter: Adapter, row: Alias, version: AdapterVersion) -> AliasOut:
    return AliasOut(
        adapter=_adapter_label(adapter),
        alias=row.name,
        version=version.number,
        digest=version.digest,
        since=as_utc(row.updated_at),
        by=row.updated_by,
    )


def _aliases(alias: str | None = None) -> Any:
    """Aliases set now, with only what `AliasOut` shows of their adapter and version (no
    configs or reports to load), in a stable order."""
    statement: Any = (
        sa.select(
            col(Adapter.namespace),
            col(Adapter.name).label("adapter_name"),
            col(Alias.name),
            col(Alias.updated_at),
            col(Alias.updated_by),
            col(AdapterVersion.number),
            col(AdapterVersion.digest),
        )
        .join(Adapter, col(Adapter.id) == Alias.adapter_id)
        .join(AdapterVersion, col(AdapterVersion.id) == Alias.version_id)
    )
    if alias is not None:
        statement = statement.where(Alias.name == check_alias(alias))
    return statement.order_by(col(Adapter.namespace), col(Adapter.name), col(Alias.name))


def _row_out(row: Any) -> AliasOut:
    return AliasOut(
        adapter=f"{row.namespace}/{row.adapter_name}",
        alias=row.name,
        version=row.number,
        digest=row.digest,
        since=as_utc(row.updated_at),
        by=row.updated_by,
    )


# Built once (see registry.adapters.repository): every alias of one adapter, and one alias.
_OF_ADAPTER = _aliases().where(NAMED)
_ONE_ALIAS = _OF_ADAPTER.where(col(Alias.name) == sa.bindparam("alias"))


def list_aliases(session: Session, name: AdapterName) -> list[AliasOut]:
    params = {"namespace": name.namespace, "name": name.name}
    rows = core_rows(session, _OF_ADAPTER, params)
    if not rows:
        get_adapter_row(session, name)  # AdapterNotFound, or an adapter without aliases
    return [_row_out(row) for row in rows]


def aliases_of(session: Session, names: list[str]) -> dict[str, list[AliasOut]]:
    """The aliases set now of several adapters (`ns/name`), in one query: for pages that list
    adapters with their aliases."""
    pairs = [tuple(name.split("/", 1)) for name in names if "/" in name]
    found: dict[str, list[AliasOut]] = {name: [] for name in names}
    if not pairs:
        return found
    statement = _aliases().where(sa.tuple_(Adapter.namespace, Adapter.name).in_(pairs))
    for row in session.execute(statement).all():
        out = _row_out(row)
        found.setdefault(out.adapter, []).append(out)
    return found


def current_alias(session: Session, name: AdapterName, alias: str) -> AliasOut:
    params = {"namespace": name.namespace, "name": name.name, "alias": alias}
    rows = core_rows(session, _ONE_ALIAS, params)
    if not rows:
        adapter = get_adapter_row(session, name)  # AdapterNotFound
        check_alias(alias)  # a malformed name is a 422, as before
        raise AliasNotFound(f"{_adapter_label(adapter)} has no alias {alias!r}", alias=alias)
    return _row_out(rows[0])


def who_runs(session: Session, alias: str, limit: int, offset: int) -> Page[AliasOut]:
    """Every adapter whose `alias` is set now, a page at a time."""
    statement = _aliases(alias=alias)
    rows = session.execute(statement.limit(limit).offset(offset)).all()
    items = [_row_out(row) for row in rows]
    return make_page(items, count(session, statement), limit, offset)


def history(
    session: Session, name: AdapterName, alias: str | None, limit: int, offset: int
) -> Page[AliasMoveOut]:
    """Every move of the adapter's aliases (or of one), newest first."""
    adapter = get_adapter_row(session, name)
    condition = col(AliasMove.adapter_id) == adapter.id
    if alias:
        condition = sa.and_(condition, col(AliasMove.name) == check_alias(alias))
    total = session.execute(sa.select(sa.func.count()).where(condition)).scalar_one()
    rows = session.execute(  # only the columns shown: the adapter's pages list hundreds of moves
        sa.select(
            col(AliasMove.name),
            col(AliasMove.previous_number),
            col(AliasMove.version_number),
            col(AliasMove.at),
            col(AliasMove.actor),
        )
        .where(condition)
        .order_by(col(AliasMove.at).desc(), col(AliasMove.id).desc())
        .limit(limit)
        .offset(offset)
    ).all()
    label = _adapter_label(adapter)
    items = [
        AliasMoveOut(
            adapter=label,
            alias=row.name,
            previous=row.previous_number,
            version=row.version_number,
            at=as_utc(row.at),
            actor=row.actor,
        )
        for row in rows
    ]
    return make_page(items, total, limit, offset)


def resolve_at(session: Session, name: AdapterName, alias: str, at: datetime) -> AliasOut:
    """What `alias` pointed at, at time `at`: the last move at or before it."""
    adapter = get_adapter_row(session, name)
    check_alias(alias)
    move = session.exec(
        select(AliasMove)
        .where(
            AliasMove.adapter_id == adapter.id,
            AliasMove.name == alias,
            col(AliasMove.at) <= _naive_utc(session, at),
        )
        .order_by(col(AliasMove.at).desc(), col(AliasMove.id).desc())
        .limit(1)
    ).first()
    label = _adapter_label(adapter)
    if move is None or move.version_number is None:
        state = "was not set yet" if move is None else "had been removed"
        raise AliasNotFound(
            f"{label}@{alias} {state} at {at.isoformat()} (see lora-reg history {label})",
            alias=alias,
        )
    version = session.exec(
        select(AdapterVersion).where(
            AdapterVersion.adapter_id == adapter.id, AdapterVersion.number == move.version_number
        )
    ).one()
    return AliasOut(
        adapter=label,
        alias=alias,
        version=version.number,
        digest=version.digest,
        since=as_utc(move.at),
        by=move.actor,
    )


def _naive_utc(session: Session, at: datetime) -> datetime:
    """SQLite stores timestamps naive (in UTC): compare like with like."""
    at = at if at.tzinfo else at.replace(tzinfo=UTC)
    try:
        utc = at.astimezone(UTC)
    except OverflowError:
        raise InvalidInput(f"time {at.isoformat()} is out of range") from None
    return utc.replace(tzinfo=None) if session.get_bind().dialect.name == "sqlite" else utc


def audit(
    session: Session,
    *,
    since: datetime | None,
    until: datetime | None,
    actor: str | None,
    action: str | None,
    subject: str | None,
    limit: int,
    offset: int,
    newest_first: bool = False,
) -> Page[AuditEventOut]:
    """Audit events, oldest first (or newest first), filtered; `subject` matches a prefix
    (`team/summarizer`)."""
    query: Any = select(AuditEvent)
    if since:
        query = query.where(col(AuditEvent.at) >= _naive_utc(session, since))
    if until:
        query = query.where(col(AuditEvent.at) < _naive_utc(session, until))
    if actor:
        query = query.where(AuditEvent.actor == actor)
    if action:
        query = query.where(AuditEvent.action == action)
    if subject:
        escaped = subject.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        query = query.where(col(AuditEvent.subject).like(f"{escaped}%", escape="\\"))
    total = count(session, query)
    columns = [col(AuditEvent.at), col(AuditEvent.id)]
    order = [column.desc() for column in columns] if newest_first else columns
    rows = session.exec(query.order_by(*order).limit(limit).offset(offset)).all()
    items = [
        AuditEventOut(
            id=row.id or 0,
            at=as_utc(row.at),
            actor=row.actor,
            action=row.action,
            subject=row.subject,
            details=row.details,
        )
        for row in rows
    ]
    return make_page(items, total, limit, offset)


# --- identify ----------------------------------------------------------------------------------

MAX_CANDIDATES = 5


def identify(session: Session, entries: list[FileEntry]) -> IdentifyOut:
    """Which version(s) or merged checkpoint(s) these files are: exactly (same manifest digest),
    or the closest ones (most files in common) with the files that differ; a single file is
    looked up by content."""
    digest = manifest_digest(entries)
    exact = session.exec(
        select(AdapterVersion)
        .where(AdapterVersion.digest == digest)
        .order_by(col(AdapterVersion.id).desc())  # newest first
        .limit(MAX_CANDIDATES)
    ).all()
    exact_merged = session.exec(
        select(MergedArtifact).where(MergedArtifact.digest == digest).limit(MAX_CANDIDATES)
    ).all()
    if exact or exact_merged:
        return IdentifyOut(
            status="exact",
            digest=digest,
            matches=[_match(session, v, entries) for v in exact],
            merged=[_merged_match(session, a, entries) for a in exact_merged],
        )
    versions = [
        session.get(AdapterVersion, version_id)
        for version_id in _closest(session, VersionFile, col(VersionFile.version_id), entries)
    ]
    matches = [_match(session, v, entries) for v in versions if v is not None]
    artifacts = [
        session.get(MergedArtifact, artifact_id)
        for artifact_id in _closest(
            session, MergedArtifactFile, col(MergedArtifactFile.artifact_id), entries
        )
    ]
    merged = [_merged_match(session, a, entries) for a in artifacts if a is not None]
    status: Literal["modified", "file", "unknown"] = "unknown"
    if matches or merged:
        status = "file" if len(entries) == 1 else "modified"
    return IdentifyOut(status=status, digest=digest, matches=matches, merged=merged)


def _closest(session: Session, table: Any, owner: Any, entries: list[FileEntry]) -> list[Any]:
    """The owners (versions, artifacts) sharing most files with `entries`, most first."""
    if len(entries) == 1:  # one file: by content, wherever it sits
        matching = col(table.sha256) == entries[0].sha256
    else:  # the same file at the same path
        matching = sa.tuple_(col(table.path), col(table.sha256)).in_(
            [(entry.path, entry.sha256) for entry in entries]
        )
    shared = session.execute(
        sa.select(owner, sa.func.count())
        .where(matching)
        .group_by(owner)
        .order_by(sa.func.count().desc(), owner.desc())
        .limit(MAX_CANDIDATES)
    ).all()
    return [owner_id for owner_id, _ in shared]


def _compare(stored: dict[str, str], entries: list[FileEntry]) -> dict[str, list[str]]:
    """identical / differing / missing / extra paths of `entries` against stored path -> sha."""
    local = {entry.path: entry.sha256 for entry in entries}
    if len(entries) == 1:  # a single file: compare by content, wherever it sits
        (sha,) = local.values()
        local = {path: sha for path, stored_sha in stored.items() if stored_sha == sha} or local
    return {
        "identical": sorted(p for p in local if stored.get(p) == local[p]),
        "differing": sorted(p for p in local if p in stored and stored[p] != local[p]),
        "missing": sorted(p for p in stored if p not in local),
        "extra": sorted(p for p in local if p not in stored),
    }


def _merged_match(
    session: Session, artifact: MergedArtifact, entries: list[FileEntry]
) -> MergedMatch:
    version = session.get(AdapterVersion, artifact.adapter_version_id)
    adapter = session.get(Adapter, version.adapter_id) if version else None
    stored = {
        f.path: f.sha256
        for f in session.exec(
            select(MergedArtifactFile).where(MergedArtifactFile.artifact_id == artifact.id)
        )
    }
    revision = artifact.base_revision
    return MergedMatch(
        digest=artifact.digest,
        adapter=f"{_adapter_label(adapter)}@{version.number}" if adapter and version else "?",
        adapter_digest=artifact.adapter_digest,
        base=f"{artifact.base_id}@{revision}" if revision else artifact.base_id,
        options=artifact.options,
        job_id=artifact.job_id,
        location=artifact.location,
        stored=artifact.stored,
        **_compare(stored, entries),
    )


def _match(session: Session, version: AdapterVersion, entries: list[FileEntry]) -> IdentifyMatch:
    adapter = session.get(Adapter, version.adapter_id)
    assert adapter is not None
    stored = {
        f.path: f.sha256
        for f in session.exec(select(VersionFile).where(VersionFile.version_id == version.id))
    }
    names = session.exec(
        select(Alias.name).where(Alias.version_id == version.id).order_by(col(Alias.name))
    ).all()
    return IdentifyMatch(
        adapter=_adapter_label(adapter),
        version=version.number,
        digest=version.digest,
        lineage=version.lineage,
        aliases=list(names),
        **_compare(stored, entries),
        yanked=version.yanked_at is not None,
    )
