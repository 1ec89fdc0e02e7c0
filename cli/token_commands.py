"""`lora-reg token create|ls|revoke` and `lora-reg whoami`: who may do what.

Thin: flags in, `cli.client.Registry` calls, tables or `--json` out. Secrets are printed once, on
stdout only, so `lora-reg token create ci --scope write --json | jq -r .token` works.
"""

from __future__ import annotations

from typing import Annotated, cast

import typer
from rich.table import Table

from cli.console import JsonOpt, emit_json, emit_list, err, escape, out, registry, when
from registry.core.schemas import SCOPES, Scope

token_app = typer.Typer(
    help="API tokens (admin): create, list, revoke. Scopes: read < write < admin, and worker.",
    no_args_is_help=True,
)


def _scope(value: str) -> str:
    if value not in SCOPES:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(SCOPES)}")
    return value


ScopeOpt = Annotated[
    str,
    typer.Option(
        callback=_scope,
        help="read (pull, show), write (push, aliases, merges), admin (tokens, gc, protected "
        "aliases) or worker (merge workers).",
    ),
]


@token_app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="Who will use it, e.g. ci-push (the audit actor).")],
    scope: ScopeOpt = "read",
    as_json: JsonOpt = False,
) -> None:
    """Create a token and print its secret (shown once: store it now)."""
    with registry() as client:
        created = client.create_token(name, cast(Scope, scope))
    if as_json:
        emit_json(created)
        return
    err.print(
        f"created token {escape(repr(created.name))} ({created.scope}); its secret, shown once:"
    )
    out.print(created.token, markup=False, highlight=False)


@token_app.command("ls")
def list_tokens(
    revoked: Annotated[bool, typer.Option("--revoked", help="Include revoked tokens.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Tokens, never their secrets (--json: the page shape of every list, all in one page)."""
    with registry() as client:
        tokens = list(client.tokens(revoked=revoked))
    if as_json:
        emit_list(tokens)
        return
    table = Table("name", "scope", "created", "by", "revoked")
    for token in tokens:
        revoked_text = (
            f"{when(token.revoked_at)} by {token.revoked_by or '-'}" if token.revoked_at else "-"
        )
        table.add_row(
            escape(token.name),
            token.scope,
            when(token.created_at),
            escape(token.created_by or "-"),
            escape(revoked_text),
        )
    out.print(table)


@token_app.command("revoke")
def revoke(
    name: Annotated[str, typer.Argument(help="The token's name (see lora-reg token ls).")],
    as_json: JsonOpt = False,
) -> None:
    """Revoke a token: it stops working at once (its row stays, for the audit log)."""
    with registry() as client:
        token = client.revoke_token(name)
    if as_json:
        emit_json(token)
        return
    assert token.revoked_at is not None
    out.print(f"revoked {escape(token.name)} ({token.scope}) at {when(token.revoked_at)}")


def whoami(as_json: JsonOpt = False) -> None:
    """The name and scope of the token you are using."""
    with registry() as client:
        me = client.whoami()
    if as_json:
        emit_json(me)
        return
    if not me.auth:
        out.print("auth is off on this server: every local caller is an admin")
        return
    out.print(f"{escape(me.name or '-')} ({me.scope})")
