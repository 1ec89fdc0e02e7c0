"""Who may do what: callers, scopes, and the permission rules the use cases apply.

Every surface (the REST API today; the Hugging Face protocol, the web UI and the event stream as
they come) finds its `Caller` in its own way (`registry.auth`) and then calls the same services,
which apply these rules themselves, so a rule holds whichever surface a request came through.

Pure rules: no FastAPI, no SQL. Scopes: `read` < `write` < `admin`, `worker` (read + the merge
job endpoints) and `serving` (read + deployment reports). With `LORA_REG_AUTH=off` (loopback
only) every caller is `ANONYMOUS`, an admin.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from registry.core.errors import NotPermitted, ProtectedAlias
from registry.core.jobs import parse_target, target_within
from registry.core.schemas import Scope
from registry.settings import Settings

Need = Literal["public", "read", "write", "admin", "worker", "upload", "serving"]

# Which token scopes satisfy each need. `upload` is blob bytes: sent by pushes (write) and by
# merge workers publishing to the registry (worker).
ALLOWED: dict[Need, frozenset[Scope]] = {
    "read": frozenset({"read", "write", "admin", "worker", "serving"}),
    "write": frozenset({"write", "admin"}),
    "admin": frozenset({"admin"}),
    "worker": frozenset({"worker", "admin"}),
    "upload": frozenset({"write", "worker", "admin"}),
    # A serving engine (the vLLM plugin): read, plus reporting what it loaded.
    "serving": frozenset({"serving", "admin"}),
}


@dataclass(frozen=True)
class Caller:
    name: str | None  # the audit actor; None when auth is off
    scope: Scope

    @property
    def may_write(self) -> bool:
        return self.scope in ALLOWED["write"]


ANONYMOUS = Caller(name=None, scope="admin")


def require(caller: Caller, need: Need) -> Caller:
    """`caller` if its scope reaches `need`, else not_permitted."""
    if need == "public":
        return caller
    allowed = ALLOWED[need]
    if caller.scope not in allowed:
        raise NotPermitted(
            f"this needs a token with scope {' or '.join(sorted(allowed))}; "
            f"token {caller.name!r} has scope {caller.scope}",
            need=need,
            scope=caller.scope,
        )
    return caller


def check_alias_move(settings: Settings, caller: Caller, alias: str) -> None:
    """Protected aliases (LORA_REG_PROTECTED_ALIASES, default production) move only by admin."""
    if alias in settings.protected_alias_names and caller.scope != "admin":
        raise ProtectedAlias(
            f"{alias!r} is a protected alias: only an admin token may move or remove it "
            f"(token {caller.name!r} has scope {caller.scope}); ask an admin, or use another "
            "alias such as staging",
            alias=alias,
        )


def check_merge_target(settings: Settings, caller: Caller, text: str) -> None:
    """Workers publish with their own credentials (file system, S3, HF_TOKEN), so a write token
    may send merges only to the registry or inside LORA_REG_MERGE_TARGETS; admins anywhere."""
    target = parse_target(text)
    if caller.scope == "admin" or target.kind == "registry":
        return
    if any(target_within(target, allowed) for allowed in settings.merge_target_list):
        return
    allowed_text = settings.merge_targets or "nothing besides registry"
    raise NotPermitted(
        f"token {caller.name!r} (scope {caller.scope}) may send merges to the registry and to "
        f"LORA_REG_MERGE_TARGETS ({allowed_text}), not to {target}: use --to registry, or ask "
        "an admin to allow that destination",
        target=str(target),
    )
