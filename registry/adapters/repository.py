"""Finding and locking adapters and their versions: the queries every use case starts with.

Called by the adapter, alias and merge services inside the request's transaction; reads and
takes row locks, never writes except `lock_or_create_adapter`'s insert of a new adapter row.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlmodel import Session, col, select

from registry.core.errors import AdapterNotFound, AliasNotFound, VersionNotFound
from registry.core.names import AdapterName, Reference
from registry.models import Adapter, AdapterVersion, Alias
from registry.repository import for_update, insert_ignore


def get_adapter_row(session: Session, name: AdapterName) -> Adapter:
    adapter = session.exec(
        select(Adapter).where(Adapter.namespace == name.namespace, Adapter.name == name.name)
    ).first()
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


def alias_version(session: Session, adapter_id: int, alias: str) -> AdapterVersion | None:
    """The version an alias points at now (used to resolve `ns/name@alias`)."""
    statement = (
        select(AdapterVersion)
        .join(Alias, col(Alias.version_id) == AdapterVersion.id)
        .where(Alias.adapter_id == adapter_id, Alias.name == alias)
    )
    return session.exec(statement).first()


def resolve(session: Session, ref: Reference) -> AdapterVersion:
    """The version a reference points at; 404 with a specific code when there is none."""
    adapter = get_adapter_row(session, ref.name)
    query = select(AdapterVersion).where(col(AdapterVersion.adapter_id) == adapter.id)
    selector = ref.selector
    if selector.kind == "latest":  # the newest version that is not yanked, as pip does
        query = (
            query.where(col(AdapterVersion.yanked_at).is_(None))
            .order_by(col(AdapterVersion.number).desc())
            .limit(1)
        )
    elif selector.kind == "number":
        query = query.where(AdapterVersion.number == selector.number)
    elif selector.kind == "digest":
        query = query.where(AdapterVersion.digest == selector.value)
    else:
        assert adapter.id is not None
        aliased = alias_version(session, adapter.id, selector.value)
        if aliased is None:
            raise AliasNotFound(
                f"{ref.name} has no alias {selector.value!r} (see lora-reg alias ls {ref.name})",
                adapter=str(ref.name),
                alias=selector.value,
            )
        return aliased
    version = session.exec(query).first()
    if version is None:
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
    return version


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
