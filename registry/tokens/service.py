"""Token rows: creation, listing, revocation and the bootstrap admin token.

Called by `registry.tokens.api` inside the request transaction (flushes, never commits) and by
`registry.server` at start-up (`bootstrap_admin`). Secrets are returned once and only their
sha256 is stored; every creation and revocation writes an audit event.

`REVOCATIONS` is a stamp that changes when a revocation commits in this process or in a sibling
worker process of the same `lora-reg server` (they share its 8 bytes through a file the server
maps into each of them): `registry.auth` keeps a token it found valid only while the stamp it
saw then is unchanged.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa
from sqlmodel import Session, col, select

from registry.core import events
from registry.core.errors import Conflict, NotFound
from registry.core.schemas import Scope, TokenCreated, TokenOut, check_token_name
from registry.core.tokens import BOOTSTRAP_ACTOR, new_secret, secret_sha256
from registry.events.service import record
from registry.models import ApiToken, as_utc
from registry.repository import for_update

BOOTSTRAP_NAME = "admin"
# The file whose 8 bytes the worker processes of one `lora-reg server` share (set by the server).
STAMP_FILE_ENV = "LORA_REG_REVOCATION_STAMP_FILE"


class RevocationStamp:
    """8 bytes that change whenever a token revocation commits: in this process, or (when
    `share` mapped the server's stamp file) in any process that mapped the same file. Reading
    it costs no system call."""

    def __init__(self) -> None:
        self._bytes: mmap.mmap | bytearray = bytearray(8)

    def share(self, path: Path) -> None:
        """Use the 8 bytes of `path` (made by `make_stamp_file`), shared with every process
        that maps it."""
        with open(path, "r+b") as file:
            self._bytes = mmap.mmap(file.fileno(), 8)

    def read(self) -> bytes:
        return bytes(self._bytes[:8])

    def change(self) -> None:
        # Random rather than counted: two processes changing it at once can never write back a
        # value that a reader saw before.
        self._bytes[:8] = os.urandom(8)


def make_stamp_file(path: Path) -> None:
    path.write_bytes(bytes(8))


REVOCATIONS = RevocationStamp()
if os.environ.get(STAMP_FILE_ENV):
    REVOCATIONS.share(Path(os.environ[STAMP_FILE_ENV]))


def token_out(row: ApiToken) -> TokenOut:
    return TokenOut(
        name=row.name,
        scope=row.scope,  # type: ignore[arg-type]  # checked on insert
        created_at=as_utc(row.created_at),
        created_by=row.created_by,
        revoked_at=as_utc(row.revoked_at) if row.revoked_at else None,
        revoked_by=row.revoked_by,
    )


def create_token(session: Session, name: str, scope: Scope, actor: str | None) -> TokenCreated:
    check_token_name(name)
    if session.exec(select(ApiToken.id).where(ApiToken.name == name)).first() is not None:
        raise Conflict(
            f"a token named {name!r} exists or existed (names are never reused, so the audit "
            "log stays unambiguous): pick another name",
            name=name,
        )
    secret = new_secret()
    row = ApiToken(name=name, scope=scope, secret_sha256=secret_sha256(secret), created_by=actor)
    session.add(row)
    record(session, actor, events.TokenCreated(subject=name, scope=scope))
    session.flush()
    return TokenCreated(**token_out(row).model_dump(), token=secret)


def find_token(session: Session, secret: str) -> ApiToken | None:
    """The token row whose secret this is (revoked ones included), by the secret's hash."""
    digest = secret_sha256(secret)
    return session.exec(select(ApiToken).where(col(ApiToken.secret_sha256) == digest)).first()


def list_tokens(session: Session, include_revoked: bool) -> list[TokenOut]:
    query = select(ApiToken).order_by(col(ApiToken.name))
    if not include_revoked:
        query = query.where(col(ApiToken.revoked_at).is_(None))
    return [token_out(row) for row in session.exec(query).all()]


def revoke_token(session: Session, name: str, actor: str | None) -> TokenOut:
    """Revoke a token (it stops working at once); revoking twice keeps the first revocation.

    The last active admin token cannot be revoked: nobody could create tokens any more.
    """
    row = session.exec(select(ApiToken).where(ApiToken.name == name)).first()
    if row is None:
        raise NotFound(f"no token named {name!r} (see lora-reg token ls)", name=name)
    admins: Sequence[ApiToken] = ()
    if row.scope == "admin":
        # Lock every active admin row, always in id order (two admins revoking two admin tokens
        # at once must not deadlock), so the count below stays true until we commit.
        admins = session.exec(
            for_update(
                session,
                select(ApiToken)
                .where(ApiToken.scope == "admin", col(ApiToken.revoked_at).is_(None))
                .order_by(col(ApiToken.id)),
            )
        ).all()
    else:
        session.exec(for_update(session, select(ApiToken).where(ApiToken.id == row.id))).one()
    session.refresh(row)
    if row.revoked_at is not None:
        return token_out(row)
    if row.scope == "admin" and len(admins) <= 1:
        raise Conflict(
            f"{name!r} is the last admin token: create another admin token first "
            "(lora-reg token create NAME --scope admin), then revoke this one",
            name=name,
        )
    row.revoked_at, row.revoked_by = datetime.now(UTC), actor
    session.add(row)
    record(session, actor, events.TokenRevoked(subject=name, scope=row.scope))
    session.flush()
    # Once the revocation is visible to every reader, no process may trust what it saw before.
    sa.event.listen(session, "after_commit", lambda _session: REVOCATIONS.change(), once=True)
    return token_out(row)


def bootstrap_admin(session: Session) -> TokenCreated | None:
    """On a database with no token at all, create the admin token; None when there are tokens.

    Replicas starting together race on the unique name: the loser's commit fails, which its
    session scope raises as `Conflict` (the caller treats that as 'someone else bootstrapped').
    """
    if session.exec(select(sa.func.count()).select_from(ApiToken)).one():
        return None
    return create_token(session, BOOTSTRAP_NAME, "admin", actor=BOOTSTRAP_ACTOR)
