"""Finding and locking adapters and their versions: the queries every use case starts with.

Called by the adapter, alias and merge services inside the request's transaction; reads and
takes row locks, never writes except `lock_or_create_adapter`'s insert of a new adapter row.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, NoReturn

import sqlalchemy as sa
from sqlmodel import Session, col, select

from registry.core.errors import AdapterNotFound, AliasNotFound, VersionNotFound
from registry.core.names import AdapterName, Reference
from registry.models import Adapter, AdapterVersion, Alias, VersionFile
from registry.repository import core_rows, for_update, insert_ignore

# Statements the reads run on every GET are built once, with bind parameters: building a select
# costs the server more CPU than PostgreSQL spends running it. The adapter is named by the
# parameters `namespace` and `name` (`NAMED`).
NAMED = sa.and_(
    col(Adapter.namespace) == sa.bindparam("namespace"), col(Adapter.name) == sa.bindparam("name")
)
# Joins the named adapter to its versions: `select(...).join(Adapter, VERSIONS_OF_NAMED)`.
VERSIONS_OF_NAMED = sa.and_(col(Adapter.id) == AdapterVersion.adapter_id, NAMED)
_ADAPTER_BY_NAME = select(Adapter).where(NAMED)


def get_adapter_row(session: Session, name: AdapterName) -> Adapter:
    params = {"namespace": name.namespace, "name": name.name}
    adapter = session.exec(_ADAPTER_BY_NAME, params=params).first()
    if adapter is None:
        raise AdapterNotFound(f"adapter {name} does not exist (see lora-reg ls)", adapter=str(name))
    return adapter


def lock_adapter(session: Session, name: AdapterName) -> Adapter:
    statement = select(Adapter).where(
        Adapter.namespace == name.namespace, Adapter.name == name.name
    )
    adapter: Adapter | None = session.exec(for_update(session, statement)).first()
    if adapter is None:
        raise AdapterNotFound(f"adapter {name} does not exist (see lora-reg ls)", adapter=str(name))
    return adapter


def lock_or_create_adapter(session: Session, name: AdapterName) -> Adapter:
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


_VERSIONS = select(AdapterVersion).join(Adapter, VERSIONS_OF_NAMED)
_VERSION_BY: dict[str, Any] = {
    # the newest version that is not yanked, as pip does
    "latest": _VERSIONS.where(col(AdapterVersion.yanked_at).is_(None))
    .order_by(col(AdapterVersion.number).desc())
    .limit(1),
    "number": _VERSIONS.where(col(AdapterVersion.number) == sa.bindparam("value")),
    "digest": _VERSIONS.where(col(AdapterVersion.digest) == sa.bindparam("value")),
    "alias": _VERSIONS.join(
        Alias,
        sa.and_(
            col(Alias.version_id) == AdapterVersion.id,
            col(Alias.adapter_id) == Adapter.id,
            col(Alias.name) == sa.bindparam("value"),
        ),
    ),
}


def _with_files(versions: Any) -> Any:
    """The version `versions` picks, with its files: one row per file, the version's columns and
    then the file's as `file_path`, `file_size`, `file_sha256` (None for a version without
    files), in path order."""
    chosen = versions.subquery("chosen")
    return (
        sa.select(
            chosen,
            col(VersionFile.path).label("file_path"),
            col(VersionFile.size).label("file_size"),
            col(VersionFile.sha256).label("file_sha256"),
        )
        .outerjoin(VersionFile, col(VersionFile.version_id) == chosen.c.id)
        .order_by(col(VersionFile.path))
    )


_VERSION_WITH_FILES_BY = {kind: _with_files(statement) for kind, statement in _VERSION_BY.items()}
FILE_COLUMNS = ("file_path", "file_size", "file_sha256")


def _params(ref: Reference) -> dict[str, Any]:
    selector = ref.selector
    value = selector.number if selector.kind == "number" else selector.value
    return {"namespace": ref.name.namespace, "name": ref.name.name, "value": value}


def resolve(session: Session, ref: Reference) -> AdapterVersion:
    """The version a reference points at, in one query; 404 with a specific code when there is
    none (the queries that tell which code run only then)."""
    version = session.exec(_VERSION_BY[ref.selector.kind], params=_params(ref)).first()
    if version is not None:
        return version  # type: ignore[no-any-return]
    _not_found(session, ref)


def resolve_with_files(session: Session, ref: Reference) -> Sequence[sa.Row[Any]]:
    """What `resolve` finds, with its files, in one query: rows of `_with_files`. For the reads
    that show a version whole (a GET of a version costs one statement)."""
    rows = core_rows(session, _VERSION_WITH_FILES_BY[ref.selector.kind], _params(ref))
    if rows:
        return rows
    _not_found(session, ref)


def _not_found(session: Session, ref: Reference) -> NoReturn:
    """The 404 for a reference that names no version: which one, found out only now."""
    selector = ref.selector
    adapter = get_adapter_row(session, ref.name)  # AdapterNotFound
    if selector.kind == "alias":
        raise AliasNotFound(
            f"{ref.name} has no alias {selector.value!r} (see lora-reg alias ls {ref.name})",
            adapter=str(ref.name),
            alias=selector.value,
        )
    if selector.kind == "latest" and yanked_after(session, adapter.id, 0):
        raise VersionNotFound(
            f"every version of {ref.name} is yanked: name one (NAME@N) and pass "
            f"--allow-yanked to pull it anyway (see lora-reg versions {ref.name})",
            reference=str(ref),
        )
    what = "no versions yet" if selector.kind == "latest" else f"no version {selector}"
    raise VersionNotFound(
        f"{ref.name} has {what} (see lora-reg versions {ref.name})", reference=str(ref)
    )


def yanked_after(session: Session, adapter_id: int | None, number: int) -> list[int]:
    """The numbers of the adapter's yanked versions newer than `number` (what `latest` skips)."""
    return list(
        session.exec(
            select(AdapterVersion.number)
            .where(
                col(AdapterVersion.adapter_id) == adapter_id,
                col(AdapterVersion.number) > number,
                col(AdapterVersion.yanked_at).is_not(None),
            )
            .order_by(col(AdapterVersion.number))
        ).all()
    )
