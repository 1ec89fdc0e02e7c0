"""`lora-reg alias ...`, `history`, `resolve`, `who-runs`, `audit`, `identify`: who runs what,
since when, and what a folder on disk really is.

Thin: flags in, `cli.client.Registry` calls, tables or `--json` out. `resolve` reads the
server's JSON with `cli.console.get_json` instead, to answer without importing the client.
"""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from cli.console import (
    JsonOpt,
    emit_json,
    emit_list,
    escape,
    get_json,
    out,
    page_footer,
    progress,
    registry,
    timestamp,
    when,
)
from registry.core.errors import InvalidInput, InvalidReference
from registry.core.names import parse_reference

if TYPE_CHECKING:  # the schemas import pydantic: `resolve` does without them
    from registry.core.schemas import AliasOut, IdentifyOut

alias_app = typer.Typer(
    help="Aliases (production, staging...): set, remove, list.", no_args_is_help=True
)


def _timestamp(text: str | None, flag: str) -> datetime | None:
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidInput(
            f"{flag} {text!r}: use an ISO 8601 time such as 2026-11-20T10:00Z"
        ) from None
    # Without a zone it is local time, as the tables print it.
    return moment if moment.tzinfo else moment.astimezone()


def _alias_table(items: list[AliasOut]) -> Table:
    table = Table("adapter", "alias", "version", "digest", "since", "by")
    for item in items:
        table.add_row(
            escape(item.adapter),
            escape(item.alias),
            f"@{item.version}",
            item.digest[:19],
            when(item.since),
            escape(item.by or "-"),
        )
    return table


@alias_app.command("set")
def set_alias(
    ref: Annotated[
        str, typer.Argument(help="The version: ns/name@7, ns/name@sha256:..., ns/name.")
    ],
    alias: Annotated[str, typer.Argument(help="Alias name, e.g. production.")],
    as_json: JsonOpt = False,
) -> None:
    """Point an alias at a version (recorded in its history and the audit log)."""
    with registry() as client:
        result = client.set_alias(ref, alias)
    if as_json:
        emit_json(result)
        return
    target = f"{result.adapter}@{result.alias}"
    out.print(f"{escape(target)} -> @{result.version} {result.digest}")


@alias_app.command("rm")
def remove_alias(
    name: Annotated[str, typer.Argument(help="ns/name")],
    alias: Annotated[str, typer.Argument(help="Alias name.")],
) -> None:
    """Remove an alias (the removal stays in its history)."""
    with registry() as client:
        client.remove_alias(name, alias)
    out.print(f"removed {escape(name)}@{escape(alias)}")


@alias_app.command("ls")
def list_aliases(
    name: Annotated[str, typer.Argument(help="ns/name")],
    as_json: JsonOpt = False,
) -> None:
    """List an adapter's aliases (--json: the page shape of every list, all in one page)."""
    with registry() as client:
        items = list(client.aliases(name))
    if as_json:
        emit_list(items)
        return
    out.print(_alias_table(items))


def history(
    name: Annotated[str, typer.Argument(help="ns/name")],
    alias: Annotated[str | None, typer.Option(help="Only this alias.")] = None,
    limit: Annotated[int, typer.Option(help="Page size.")] = 50,
    offset: Annotated[int, typer.Option(help="Skip this many.")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Every alias move of an adapter, newest first: time, actor, previous and new version."""
    with registry() as client:
        page = client.history(name, alias=alias, limit=limit, offset=offset)
    if as_json:
        emit_json(page)
        return
    table = Table("at", "alias", "from", "to", "by")
    for move in page.items:
        table.add_row(
            move.at.isoformat(timespec="seconds"),
            escape(move.alias),
            f"@{move.previous}" if move.previous else "-",
            f"@{move.version}" if move.version else "(removed)",
            escape(move.actor or "-"),
        )
    out.print(table)
    page_footer(page.total, page.offset, len(page.items), page.next_offset)


def resolve(
    ref: Annotated[str, typer.Argument(help="ns/name@alias")],
    at: Annotated[
        str | None, typer.Option(help="Point in time (ISO 8601, e.g. 2026-11-20T10:00Z).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Which version an alias points at, now or at a point in time."""
    moment = _timestamp(at, "--at")
    # The request `cli.client.Registry.resolve` sends; the answer printed as it came.
    parsed = parse_reference(ref)
    if parsed.selector.kind != "alias":
        raise InvalidReference(f"{ref} names no alias: use ns/name@alias")
    path = f"/api/v1/adapters/{parsed.name}/aliases/{parsed.selector.value}"
    result = get_json(path, {"at": moment.isoformat()} if moment else {})
    if as_json:
        emit_json(result)
        return
    since = timestamp(result["since"]).isoformat(timespec="seconds")
    out.print(
        f"{escape(result['adapter'])}@{escape(result['alias'])} -> @{result['version']} "
        f"{result['digest']} (since {since} by {escape(result['by'] or '-')})"
    )


def who_runs(
    alias: Annotated[str, typer.Argument(help="Alias name, e.g. production.")],
    observed: Annotated[
        bool,
        typer.Option(
            "--observed",
            help="What serving engines report they run for adapters with this alias, and drift.",
        ),
    ] = False,
    limit: Annotated[int, typer.Option(help="Page size.")] = 100,
    offset: Annotated[int, typer.Option(help="Skip this many.")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Every adapter whose alias is set: version, digest, since when, by whom (--observed:
    what the serving engines really run)."""
    if observed:
        from cli.deployment_commands import deployments

        deployments(None, alias=alias, limit=limit, offset=offset, as_json=as_json)
        return
    with registry() as client:
        page = client.who_runs(alias, limit=limit, offset=offset)
    if as_json:
        emit_json(page)
        return
    out.print(_alias_table(page.items))
    page_footer(page.total, page.offset, len(page.items), page.next_offset)


def audit(
    since: Annotated[str | None, typer.Option(help="From this time (ISO 8601).")] = None,
    until: Annotated[str | None, typer.Option(help="Before this time (ISO 8601).")] = None,
    actor: Annotated[str | None, typer.Option(help="Only this actor (token name).")] = None,
    action: Annotated[
        str | None, typer.Option(help="Only this action, e.g. version.push, alias.set.")
    ] = None,
    subject: Annotated[
        str | None, typer.Option(help="Only subjects starting with this, e.g. team/summarizer.")
    ] = None,
    limit: Annotated[int, typer.Option(help="Page size.")] = 100,
    offset: Annotated[int, typer.Option(help="Skip this many.")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """The append-only audit log of every mutation, oldest first."""
    with registry() as client:
        page = client.audit(
            since=_timestamp(since, "--since"),
            until=_timestamp(until, "--until"),
            actor=actor,
            action=action,
            subject=subject,
            limit=limit,
            offset=offset,
        )
    if as_json:
        emit_json(page)
        return
    table = Table("at", "actor", "action", "subject", "details")
    for event in page.items:
        table.add_row(
            event.at.isoformat(timespec="seconds"),
            escape(event.actor or "-"),
            escape(event.action),
            escape(event.subject),
            escape(" ".join(f"{k}={v}" for k, v in sorted(event.details.items()))),
        )
    out.print(table)
    page_footer(page.total, page.offset, len(page.items), page.next_offset)


IDENTIFY_UNMATCHED_EXIT = 9


def identify(
    path: Annotated[Path, typer.Argument(help="An adapter folder, a checkpoint folder or a file.")],
    as_json: JsonOpt = False,
) -> None:
    """Which registry version a folder or file is (hashes only are sent).

    Exit 0 when it is exactly a version (or a file of one), 9 when it is modified or unknown.
    """
    with registry() as client:
        result = client.identify(path, progress=progress())
    if as_json:
        emit_json(result)
    else:
        _print_identity(str(path), result)
    if result.status not in ("exact", "file"):
        sys.exit(IDENTIFY_UNMATCHED_EXIT)


def _print_identity(path: str, result: IdentifyOut) -> None:
    """Exact and single-file matches are all listed; a modified folder shows its closest version
    (and merge) with the files that differ, and counts the other near ones (--json lists them)."""
    where = escape(path)
    if result.status == "unknown":
        out.print(
            f"{where}: [red]unknown[/red]: no registry version or merge shares a file with it"
        )
        return
    modified = result.status == "modified"
    for match in result.matches[:1] if modified else result.matches:
        ref = escape(f"{match.adapter}@{match.version}")
        aliases = f" (aliases: {escape(', '.join(match.aliases))})" if match.aliases else ""
        if match.yanked:
            aliases += " [red](yanked: must not be used)[/red]"
        lineage = " ".join(f"{k}={v}" for k, v in sorted(match.lineage.items()))
        if result.status == "exact":
            out.print(f"{where}: [green]exactly[/green] {ref} {match.digest}{aliases}")
        elif result.status == "file":
            out.print(f"{where}: file {escape(', '.join(match.identical))} of {ref}{aliases}")
        else:
            out.print(f"{where}: [yellow]modified[/yellow]: closest {ref}{aliases}")
            _print_differences(match.differing, match.missing, match.extra, "not in the version")
        if lineage:
            out.print(f"  lineage: {escape(lineage)}")
    if modified and len(result.matches) > 1:
        _print_others(len(result.matches) - 1, "version")
    for merged in result.merged[:1] if modified else result.merged:
        what = escape(f"the merge of {merged.adapter} into {merged.base} {merged.digest}")
        where_stored = "" if merged.stored else f" (published to {escape(merged.location)})"
        if result.status == "exact":
            out.print(f"{where}: [green]exactly[/green] {what}{where_stored}")
        elif result.status == "file":
            identical = escape(", ".join(merged.identical))
            out.print(f"{where}: file {identical} of {what}{where_stored}")
        else:
            out.print(f"{where}: [yellow]modified[/yellow]: closest {what}{where_stored}")
            _print_differences(merged.differing, merged.missing, merged.extra, "not in the merge")
    if modified and len(result.merged) > 1:
        _print_others(len(result.merged) - 1, "merged checkpoint")


def _print_differences(
    differing: list[str], missing: list[str], extra: list[str], extra_label: str
) -> None:
    for label, paths in (("differ", differing), ("missing", missing), (extra_label, extra)):
        if paths:
            out.print(f"  {label}: {escape(', '.join(paths))}")


def _print_others(count: int, kind: str) -> None:
    plural = "s share" if count > 1 else " shares"
    out.print(f"  and {count} other {kind}{plural} files with it (--json lists them)")


def yank(
    ref: Annotated[str, typer.Argument(help="ns/name@7 or ns/name@sha256:...")],
    reason: Annotated[str, typer.Option(help="Why it must not be used (kept in the audit log).")],
    as_json: JsonOpt = False,
) -> None:
    """Mark a version as not to be used: pull refuses it and no alias may point at it."""
    with registry() as client:
        version = client.yank(ref, reason)
    if as_json:
        emit_json(version)
        return
    out.print(
        f"yanked {escape(version.adapter)}@{version.number} {version.digest}: "
        f"{escape(version.yank_reason or '')}"
    )


def gc(
    older_than: Annotated[
        int, typer.Option(help="Only blobs recorded more than this many seconds ago.")
    ] = 3600,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count, delete nothing.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Delete stored blobs that no version or stored base references (safe during pushes)."""
    with registry() as client:
        result = client.gc(older_than_s=older_than, dry_run=dry_run)
    if as_json:
        emit_json(result)
        return
    verb = "would delete" if result.dry_run else "deleted"
    out.print(
        f"{verb} {result.deleted} blob(s), {result.deleted_bytes} bytes"
        + ("; more remain: run again" if result.more else "")
    )
