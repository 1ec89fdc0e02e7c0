"""Base models: registration (from an S3 prefix, stored blobs, or a signature a client read),
look-up by `id[@revision]`, listings, and who may have the server read an S3 source
(`check_base_source`, called by the api before `register_base`).

Called by `registry.bases.api` and by the adapter service (compatibility checks) inside the
request transaction; flushes, never commits. Reads from storage (headers only) happen before the
first SQL statement that writes. A base is immutable: registering the same id and revision again
with the same signature returns it; with another signature it is a conflict.
"""

from __future__ import annotations

from collections import Counter
from typing import Any
from urllib.parse import urlparse

from sqlmodel import Session, col, select

from registry.access import Caller
from registry.blobs import service as blobs
from registry.blobs.service import adopt_stored, blob_url
from registry.core import events
from registry.core.basemodel import CONFIG_JSON, BaseSignature, BaseTensor, read_signature
from registry.core.errors import (
    BaseNotFound,
    BlobMissing,
    BlobNotFound,
    Conflict,
    InvalidBase,
    NotPermitted,
)
from registry.core.jobs import Target, parse_s3_location, target_within
from registry.core.manifest import FileEntry, check_manifest
from registry.core.names import BaseModelId, parse_base
from registry.core.safetensors_header import DTYPE_BITS
from registry.core.schemas import (
    BaseOut,
    BaseRegisterRequest,
    FileSpec,
    Page,
    UploadPlan,
    VersionFileOut,
    make_page,
)
from registry.events.service import record
from registry.models import BaseModelFile, BaseModelRow, as_utc, utcnow
from registry.repository import count, insert_ignore
from registry.settings import Settings
from registry.storage import ObjectStore

MAX_TENSORS = 200_000
MAX_PARAMETERS = 2**53  # far beyond any model; keeps counts exact in JSON and BigInteger
CLIENT_SOURCES = ("file://", "hf://")


def base_entries(files: list[FileSpec], settings: Settings) -> list[FileEntry]:
    """The manifest of a base upload, checked against this server's limits."""
    return check_manifest(
        (spec.entry() for spec in files),
        max_files=settings.max_files,
        max_bytes=settings.max_base_bytes,
        required=(CONFIG_JSON,),
        what="base",
        size_setting="LORA_REG_MAX_BASE_BYTES",
    )


def plan_upload(
    session: Session, store: ObjectStore, settings: Settings, files: list[FileSpec]
) -> UploadPlan:
    return blobs.plan_upload(session, store, settings, base_entries(files, settings))


def _server_read(request: BaseRegisterRequest) -> Target | None:
    """Where the server itself reads the base (an s3:// source), normalised; None when the client
    read it (a folder, the Hub) or uploaded its files (then `source` is not read at all)."""
    if request.files or not request.source.startswith("s3://"):
        return None
    try:
        return parse_s3_location(request.source)
    except ValueError as exc:
        raise InvalidBase(f"invalid base source: {exc}", source=request.source[:200]) from None


def check_base_source(settings: Settings, caller: Caller, request: BaseRegisterRequest) -> None:
    """The server reads an s3:// source with its own credentials, and every read token then gets
    its config.json back: a write token may name only places inside LORA_REG_BASE_SOURCES;
    admins anywhere. Sources the client reads itself need no permission."""
    location = _server_read(request)
    name, scope = caller.name, caller.scope
    if location is None or scope == "admin":
        return
    if any(target_within(location, allowed) for allowed in settings.base_source_list):
        return
    raise NotPermitted(
        f"token {name!r} (scope {scope}) may not have the server read {location}: write tokens "
        f"may name only S3 sources inside LORA_REG_BASE_SOURCES ({settings.base_sources or 'none'}"
        "); register from a copy the client reads (--from DIR [--upload], or --from hf), or ask "
        "an admin to register it or to add its bucket/prefix to LORA_REG_BASE_SOURCES",
        source=str(location),
    )


def _own_storage(settings: Settings) -> Target | None:
    """The registry's own bucket/prefix, normalised like a source (None for a folder store)."""
    if not settings.storage_url.startswith("s3://"):
        return None
    try:
        return parse_s3_location(settings.storage_url)
    except ValueError:  # a prefix this cannot place: keep sources out of the whole bucket
        return Target(kind="s3", bucket=urlparse(settings.storage_url).netloc, prefix="")


def _signature(
    store: ObjectStore, settings: Settings, request: BaseRegisterRequest
) -> tuple[BaseSignature, str, list[FileEntry]]:
    """(signature, source, stored files) for a registration; reads headers only."""
    if request.files:
        entries = base_entries(request.files, settings)
        by_path = {entry.path: entry for entry in entries}

        def read(path: str, start: int, length: int) -> bytes:
            return store.read_range(by_path[path].sha256, start, length)

        try:
            signature, _ = read_signature({e.path: e.size for e in entries}, read)
        except BlobNotFound:
            raise BlobMissing(
                "the base's files are not uploaded yet; upload them (lora-reg base add --upload "
                "does this) and register again"
            ) from None
        return signature, "registry", entries
    location = _server_read(request)
    if location is not None:
        from registry.storage.s3 import S3Folder

        own = _own_storage(settings)
        if own is not None and (target_within(location, own) or target_within(own, location)):
            raise InvalidBase(
                f"{request.source} is inside the registry's own storage ({settings.storage_url}); "
                "point --from at where the checkpoint was uploaded"
            )
        # Read exactly what was checked, and record it in that form.
        folder = S3Folder(str(location))
        signature, _ = read_signature(folder.files(), folder.read)
        return signature, str(location), []
    if not request.source.startswith(CLIENT_SOURCES):
        raise InvalidBase(
            f"unknown base source {request.source!r}: use s3://bucket/prefix, or let the client "
            "read a folder (file://) or the Hub (hf://)"
        )
    if request.config is None or request.tensors is None:
        raise InvalidBase(f"a {request.source.split(':')[0]} source needs config and tensors")
    return BaseSignature(config=request.config, tensors=request.tensors), request.source, []


def _check_signature(signature: BaseSignature) -> None:
    if not signature.tensors:
        raise InvalidBase("the base has no tensors")
    if len(signature.tensors) > MAX_TENSORS:
        raise InvalidBase(f"the base has more than {MAX_TENSORS} tensors")
    if signature.parameter_count >= MAX_PARAMETERS:
        raise InvalidBase(f"the base claims {signature.parameter_count} parameters")
    for name, tensor in signature.tensors.items():
        if tensor.dtype not in DTYPE_BITS or any(d < 0 for d in tensor.shape):
            raise InvalidBase(
                f"tensor {name}: invalid dtype {tensor.dtype!r} or shape {tensor.shape}",
                tensor=name,
            )


def register_base(
    session: Session,
    store: ObjectStore,
    settings: Settings,
    caller: Caller,
    request: BaseRegisterRequest,
) -> BaseOut:
    """Register a base from an S3 prefix the server reads (write tokens: inside
    LORA_REG_BASE_SOURCES), uploaded files, or a signature the client read."""
    check_base_source(settings, caller, request)
    actor = caller.name
    ref = parse_base(request.base)
    signature, source, entries = _signature(store, settings, request)
    _check_signature(signature)
    if entries:
        _, missing = adopt_stored(session, store, entries)
        if missing:
            raise BlobMissing(f"{len(missing)} file(s) of the base are not uploaded yet")
    tensors = {name: tensor.model_dump() for name, tensor in signature.tensors.items()}
    # Insert-or-keep, so two registrations of the same base at once both succeed.
    created = insert_ignore(
        session,
        BaseModelRow,
        [
            {
                "model_id": ref.id,
                "revision": ref.revision or "",
                "source": source,
                "config": signature.config,
                "tensors": tensors,
                "parameter_count": signature.parameter_count,
                "stored": False,
                "created_at": utcnow(),
                "created_by": actor,
            }
        ],
    )
    row = session.exec(
        select(BaseModelRow).where(
            BaseModelRow.model_id == ref.id, BaseModelRow.revision == (ref.revision or "")
        )
    ).one()
    if not created and (row.config != signature.config or row.tensors != tensors):
        raise Conflict(
            f"base {ref} is already registered with another config or other tensors; bases "
            "are immutable: register this one under its own revision (ID@REVISION)",
            base=str(ref),
        )
    if created:
        record(
            session,
            actor,
            events.BaseAdded(
                subject=str(ref), source=source, tensors=len(tensors), stored=bool(entries)
            ),
        )
    if entries and not row.stored:
        _attach_files(session, row, entries, actor)
    session.flush()
    return base_out(session, row, created=bool(created))


def _attach_files(
    session: Session, row: BaseModelRow, entries: list[FileEntry], actor: str | None
) -> None:
    assert row.id is not None
    session.add_all(
        [BaseModelFile(base_id=row.id, path=e.path, size=e.size, sha256=e.sha256) for e in entries]
    )
    row.stored = True
    session.add(row)
    record(
        session,
        actor,
        events.BaseUploaded(
            subject=_label(row), files=len(entries), size=sum(e.size for e in entries)
        ),
    )
    session.flush()


def _label(row: BaseModelRow) -> str:
    return f"{row.model_id}@{row.revision}" if row.revision else row.model_id


def get_base_row(session: Session, ref: BaseModelId) -> BaseModelRow:
    """The base `ref` names; without a revision, the one registered last under that id."""
    query = select(BaseModelRow).where(BaseModelRow.model_id == ref.id)
    if ref.revision:
        query = query.where(BaseModelRow.revision == ref.revision)
    row = session.exec(query.order_by(col(BaseModelRow.id).desc()).limit(1)).first()
    if row is None:
        raise BaseNotFound(
            f"base {ref} is not registered; register it with lora-reg base add {ref} --from ...",
            base=str(ref),
        )
    return row


def find_base_row(session: Session, model_id: str, revision: str | None) -> BaseModelRow | None:
    try:
        return get_base_row(session, BaseModelId(model_id, revision))
    except BaseNotFound:
        return None


def signature_of(row: BaseModelRow) -> BaseSignature:
    return BaseSignature(
        config=row.config,
        tensors={name: BaseTensor.model_validate(t) for name, t in row.tensors.items()},
    )


def base_out(
    session: Session,
    row: BaseModelRow,
    *,
    with_tensors: bool = False,
    created: bool | None = None,
) -> BaseOut:
    tensors: dict[str, Any] = row.tensors
    files = None
    if row.stored:
        files = [
            VersionFileOut(path=f.path, size=f.size, sha256=f.sha256, url=blob_url(f.sha256))
            for f in session.exec(
                select(BaseModelFile)
                .where(BaseModelFile.base_id == row.id)
                .order_by(col(BaseModelFile.path))
            ).all()
        ]
    model_type = row.config.get("model_type")
    return BaseOut(
        id=row.model_id,
        revision=row.revision or None,
        source=row.source,
        stored=row.stored,
        model_type=model_type if isinstance(model_type, str) else None,
        parameter_count=row.parameter_count,
        tensor_count=len(tensors),
        shards=sorted({t["shard"] for t in tensors.values() if t.get("shard")}),
        dtypes=dict(Counter(t["dtype"] for t in tensors.values())),
        config=row.config,
        created_at=as_utc(row.created_at),
        created_by=row.created_by,
        created=created,
        tensors=(
            {name: BaseTensor.model_validate(t) for name, t in tensors.items()}
            if with_tensors
            else None
        ),
        files=files,
    )


def list_bases(session: Session, *, model_id: str | None, limit: int, offset: int) -> Page[BaseOut]:
    query: Any = select(BaseModelRow)
    if model_id:
        query = query.where(BaseModelRow.model_id == model_id)
    total = count(session, query)
    rows = session.exec(
        query.order_by(col(BaseModelRow.model_id), col(BaseModelRow.id)).limit(limit).offset(offset)
    ).all()
    return make_page([base_out(session, row) for row in rows], total, limit, offset)
