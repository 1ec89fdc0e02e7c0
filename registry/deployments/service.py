"""Observed deployments: engine instances report their full loaded set; the registry keeps it,
records every load and unload as an event, and shows where what runs differs from what the
aliases mean (drift).

Called by `registry.deployments.api` inside one request transaction; flushes, never commits. A
report replaces the instance's loaded set (the instance row is locked, so two reports of one
instance apply one after the other); the events are the difference between the old set and the
new one, so a report repeated is recorded once.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlmodel import Session, col, select

from registry.access import Caller
from registry.core import events
from registry.core.errors import InvalidInput, NotFound
from registry.core.names import AdapterName, parse_name, parse_reference
from registry.core.schemas import (
    DeploymentOut,
    DeploymentReport,
    LoadedAdapter,
    LoadedOut,
    Page,
    make_page,
)
from registry.events.service import record
from registry.models import (
    Adapter,
    AdapterVersion,
    Alias,
    Deployment,
    DeploymentAdapter,
    as_utc,
    utcnow,
)
from registry.repository import count, for_update, insert_ignore

DEPLOYMENT_TTL_S = 90  # an instance that has not reported for this long is shown as gone


def report(
    session: Session, caller: Caller, instance_id: str, body: DeploymentReport
) -> DeploymentOut:
    """Replace `instance_id`'s loaded set with `body.loaded`, recording what changed."""
    names = [loaded.name for loaded in body.loaded]
    if len(set(names)) != len(names):
        raise InvalidInput("a deployment report lists one name twice: each loaded name once")
    for loaded in body.loaded:
        parse_name(loaded.adapter)
        parse_reference(loaded.reference)
    now = utcnow()
    fields = {
        "host": body.host,
        "port": body.port,
        "engine": body.engine,
        "engine_version": body.engine_version,
        "served_model": body.served_model,
        "base_signature": body.base_signature,
        "reported_by": caller.name,
    }
    insert_ignore(
        session,
        Deployment,
        [{"instance_id": instance_id, "first_seen_at": now, "last_seen_at": now, **fields}],
    )
    statement = select(Deployment).where(Deployment.instance_id == instance_id)
    row: Deployment = session.exec(for_update(session, statement)).one()
    for key, value in fields.items():
        setattr(row, key, value)
    row.last_seen_at = now
    session.add(row)
    before = {
        loaded.name: loaded
        for loaded in session.exec(
            select(DeploymentAdapter)
            .where(DeploymentAdapter.instance_id == instance_id)
            .order_by(col(DeploymentAdapter.name))
        ).all()
    }
    after = {loaded.name: loaded for loaded in sorted(body.loaded, key=lambda x: x.name)}
    for name, gone in before.items():
        if name not in after or after[name].digest != gone.digest:
            session.delete(gone)
            if name not in after:
                record(
                    session,
                    caller.name,
                    events.AdapterUnloaded(
                        subject=f"{gone.adapter}@{gone.version}",
                        instance=instance_id,
                        name=name,
                        digest=gone.digest,
                    ),
                )
    session.flush()
    for name, new in after.items():
        old = before.get(name)
        if old is not None and old.digest == new.digest:
            continue
        session.add(
            DeploymentAdapter(
                instance_id=instance_id,
                **new.model_dump(exclude={"loaded_at"}),
                loaded_at=new.loaded_at,
            )
        )
        record(
            session,
            caller.name,
            events.AdapterLoaded(
                subject=f"{new.adapter}@{new.version}",
                instance=instance_id,
                name=name,
                reference=new.reference,
                digest=new.digest,
                previous=old.digest if old is not None else None,
            ),
        )
    session.flush()
    return _deployment_outs(session, [row], now)[0]


def forget(session: Session, caller: Caller, instance_id: str) -> None:
    """An instance that shut down cleanly: its loaded set is unloaded, its row removed."""
    row = session.exec(
        for_update(session, select(Deployment).where(Deployment.instance_id == instance_id))
    ).first()
    if row is None:
        raise NotFound(f"no deployment {instance_id!r} has reported (see lora-reg deployments)")
    empty = DeploymentReport(
        host=row.host, engine=row.engine, served_model=row.served_model, loaded=[]
    )
    report(session, caller, instance_id, empty)
    session.delete(row)
    session.flush()


def list_deployments(
    session: Session,
    *,
    adapter: AdapterName | None,
    alias: str | None,
    limit: int,
    offset: int,
) -> Page[DeploymentOut]:
    """Instances, most recently seen first, with what each has loaded and its drift. With
    `adapter`, only instances that loaded it (and only those rows); with `alias`, only loaded
    adapters that have that alias."""
    query: Any = select(Deployment)
    wanted: Any = select(DeploymentAdapter.instance_id)
    if adapter is not None:
        wanted = wanted.where(DeploymentAdapter.adapter == str(adapter))
    if adapter is not None or alias is not None:
        query = query.where(col(Deployment.instance_id).in_(wanted))
    total = count(session, query)
    rows = session.exec(
        query.order_by(col(Deployment.last_seen_at).desc(), col(Deployment.instance_id))
        .limit(limit)
        .offset(offset)
    ).all()
    items = _deployment_outs(session, list(rows), utcnow())
    for item in items:
        item.loaded = [
            loaded
            for loaded in item.loaded
            if (adapter is None or loaded.adapter == str(adapter))
            and (alias is None or _has_alias(session, loaded.adapter, alias))
        ]
    if alias is not None:
        items = [item for item in items if item.loaded]
    return make_page(items, total, limit, offset)


@dataclass(frozen=True)
class _Meant:
    """What the registry means for one adapter: where each alias points, the latest version
    that is not yanked, and the yanked versions."""

    aliases: dict[str, int]
    latest: int | None
    yanked: set[int]


def _meant(session: Session, adapter: str) -> _Meant:
    name = parse_name(adapter)
    row = session.exec(
        select(Adapter).where(Adapter.namespace == name.namespace, Adapter.name == name.name)
    ).first()
    if row is None:
        return _Meant({}, None, set())
    pointing = session.exec(
        select(Alias.name, AdapterVersion.number)
        .join(AdapterVersion, col(AdapterVersion.id) == Alias.version_id)
        .where(Alias.adapter_id == row.id)
    ).all()
    versions = session.exec(
        select(AdapterVersion.number, AdapterVersion.yanked_at).where(
            AdapterVersion.adapter_id == row.id
        )
    ).all()
    live = [number for number, yanked in versions if yanked is None]
    return _Meant(
        aliases=dict(pointing),
        latest=max(live) if live else None,
        yanked={number for number, yanked in versions if yanked is not None},
    )


def _has_alias(session: Session, adapter: str, alias: str) -> bool:
    return alias in _meant(session, adapter).aliases


def drift(loaded: LoadedAdapter, meant: _Meant) -> str | None:
    """Why what an engine runs differs from what the registry means now, or None."""
    if loaded.version in meant.yanked:
        return f"@{loaded.version} is yanked"
    selector = parse_reference(loaded.reference).selector
    if selector.kind == "alias":
        now = meant.aliases.get(selector.value)
        if now is None:
            return f"alias {selector.value} was removed; this runs @{loaded.version}"
        if now != loaded.version:
            return f"{selector.value} points at @{now} now; this still runs @{loaded.version}"
        return None
    if selector.kind == "latest" and meant.latest not in (None, loaded.version):
        return f"latest is @{meant.latest} now; this still runs @{loaded.version}"
    if loaded.version not in meant.aliases.values():
        return f"no alias points at @{loaded.version}"
    return None


def _deployment_outs(
    session: Session, rows: list[Deployment], now: datetime
) -> list[DeploymentOut]:
    ids = [row.instance_id for row in rows]
    loaded: dict[str, list[DeploymentAdapter]] = {instance: [] for instance in ids}
    for item in session.exec(
        select(DeploymentAdapter)
        .where(col(DeploymentAdapter.instance_id).in_(ids))
        .order_by(col(DeploymentAdapter.name))
    ).all():
        loaded[item.instance_id].append(item)
    meant: dict[str, _Meant] = {}
    outs = []
    for row in rows:
        items = []
        for item in loaded[row.instance_id]:
            if item.adapter not in meant:
                meant[item.adapter] = _meant(session, item.adapter)
            base = LoadedAdapter(
                name=item.name,
                reference=item.reference,
                adapter=item.adapter,
                version=item.version,
                digest=item.digest,
                loaded_at=as_utc(item.loaded_at),
            )
            items.append(LoadedOut(**base.model_dump(), drift=drift(base, meant[item.adapter])))
        last_seen = as_utc(row.last_seen_at)
        outs.append(
            DeploymentOut(
                instance_id=row.instance_id,
                host=row.host,
                port=row.port,
                engine=row.engine,
                engine_version=row.engine_version,
                served_model=row.served_model,
                base_signature=row.base_signature,
                reported_by=row.reported_by,
                first_seen=as_utc(row.first_seen_at),
                last_seen=last_seen,
                alive=now - last_seen <= timedelta(seconds=DEPLOYMENT_TTL_S),
                loaded=items,
            )
        )
    return outs
