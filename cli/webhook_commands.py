"""`lora-reg webhook`: endpoints that get the registry's events, signed, at least once."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from cli.console import JsonOpt, emit_json, escape, out, page_footer, registry, when

webhook_app = typer.Typer(
    help="Webhooks: POST events (alias moves, pushes, merges...) to a URL (admin).",
    no_args_is_help=True,
)


@webhook_app.command("add")
def add(
    url: Annotated[str, typer.Argument(help="Where to POST, http(s)://...")],
    secret: Annotated[
        str,
        typer.Option(
            help="Shared secret (16+ characters, or whsec_<base64>) the deliveries are signed "
            "with (Standard Webhooks: webhook-id, webhook-timestamp, webhook-signature).",
            envvar="LORA_REG_WEBHOOK_SECRET",
        ),
    ],
    events: Annotated[
        str,
        typer.Option(help="Comma-separated actions, e.g. alias.set,version.push (default all)."),
    ] = "",
    as_json: JsonOpt = False,
) -> None:
    """Send every event from now on (or only --events) to URL."""
    wanted = [part.strip() for part in events.split(",") if part.strip()]
    with registry() as client:
        hook = client.add_webhook(url, wanted, secret)
    if as_json:
        emit_json(hook)
        return
    what = ", ".join(hook.events) or "every event"
    out.print(f"webhook {hook.id}: {escape(what)} -> {escape(hook.url)}")


@webhook_app.command("ls")
def list_webhooks(as_json: JsonOpt = False) -> None:
    """Every webhook, with its pending and failed deliveries (never its secret)."""
    with registry() as client:
        page = client.webhooks()
    if as_json:
        emit_json(page)
        return
    table = Table("id", "url", "events", "pending", "failed", "by", "since")
    for hook in page.items:
        table.add_row(
            str(hook.id),
            escape(hook.url),
            escape(", ".join(hook.events) or "all"),
            str(hook.pending),
            str(hook.failed),
            escape(hook.created_by or "-"),
            when(hook.created_at),
        )
    out.print(table)


@webhook_app.command("rm")
def remove(
    webhook_id: Annotated[int, typer.Argument(help="The webhook's id (webhook ls).")],
) -> None:
    """Stop sending to a webhook and forget its deliveries."""
    with registry() as client:
        client.remove_webhook(webhook_id)
    out.print(f"removed webhook {webhook_id}")


@webhook_app.command("deliveries")
def deliveries(
    webhook_id: Annotated[int, typer.Argument(help="The webhook's id (webhook ls).")],
    status: Annotated[
        str | None, typer.Option(help="Only pending, succeeded or failed ones.")
    ] = None,
    limit: Annotated[int, typer.Option(help="Page size.")] = 50,
    offset: Annotated[int, typer.Option(help="Skip this many.")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """A webhook's deliveries, newest first: attempts and the endpoint's last answer."""
    with registry() as client:
        page = client.webhook_deliveries(webhook_id, status=status, limit=limit, offset=offset)
    if as_json:
        emit_json(page)
        return
    table = Table("event", "action", "subject", "status", "attempts", "last answer")
    for item in page.items:
        answer = item.last_error or (str(item.last_status) if item.last_status else "-")
        if item.status == "pending" and item.next_attempt_at:
            answer += f" (next try {when(item.next_attempt_at)})"
        table.add_row(
            str(item.event_id),
            item.action,
            escape(item.subject),
            item.status,
            str(item.attempts),
            escape(answer),
        )
    out.print(table)
    page_footer(page.total, page.offset, len(page.items), page.next_offset)
