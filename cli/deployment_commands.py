"""`lora-reg deployments` and `who-runs --observed`: what serving engines really run, and
where that differs from what the aliases mean (drift)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from cli.console import JsonOpt, emit_json, escape, out, page_footer, registry, when
from registry.core.schemas import DeploymentOut, Page


def deployments(
    adapter: Annotated[
        str | None, typer.Argument(help="Only engines that loaded this adapter (ns/name).")
    ] = None,
    alias: Annotated[
        str | None, typer.Option(help="Only adapters that have this alias, e.g. production.")
    ] = None,
    limit: Annotated[int, typer.Option(help="Page size.")] = 50,
    offset: Annotated[int, typer.Option(help="Skip this many.")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Serving engine instances and the adapter versions each has loaded, with drift."""
    with registry() as client:
        page = client.deployments(adapter, alias=alias, limit=limit, offset=offset)
    if as_json:
        emit_json(page)
        return
    show_deployments(page)


def show_deployments(page: Page[DeploymentOut]) -> None:
    if not page.items:
        out.print(
            "no serving engine has reported yet (the vLLM plugin reports what it loads; see "
            "README: Serving with vLLM)"
        )
        return
    table = Table("instance", "engine", "serves", "version", "digest", "since", "drift")
    for item in page.items:
        where = f"{escape(item.instance_id)}\n{escape(item.host)}" + (
            f":{item.port}" if item.port else ""
        )
        engine = f"{escape(item.engine)} {escape(item.engine_version)}"
        if not item.alive:
            engine += f"\n[red]gone[/red] (last seen {when(item.last_seen)})"
        if not item.loaded:
            table.add_row(where, engine, "-", "-", "-", "-", "")
        for loaded in item.loaded:
            table.add_row(
                where,
                engine,
                escape(loaded.name),
                f"{escape(loaded.adapter)}@{loaded.version}",
                loaded.digest[:19],
                when(loaded.loaded_at),
                f"[yellow]{escape(loaded.drift)}[/yellow]" if loaded.drift else "",
            )
            where = engine = ""
    out.print(table)
    page_footer(page.total, page.offset, len(page.items), page.next_offset)
