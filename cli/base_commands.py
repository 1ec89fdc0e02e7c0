"""`lora-reg base ...` and `lora-reg check`: base models and compatibility reports.

Thin like the rest of the CLI: flags in, `cli.client.Registry` / `cli.bases` calls, tables or
`--json` out. `check` exits 0 when the adapter is compatible and 8 when it is not.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from cli.console import (
    JsonOpt,
    emit_json,
    escape,
    out,
    page_footer,
    print_findings,
    progress,
    registry,
    size,
    when,
)
from registry.core.compat import CompatReport
from registry.core.schemas import BaseOut, parse_pairs

base_app = typer.Typer(
    help="Base models: register (headers only), list, show.", no_args_is_help=True
)
INCOMPATIBLE_EXIT = 8


def _params(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


@base_app.command("add")
def add(
    base: Annotated[str, typer.Argument(help="Base model id[@revision], e.g. org/model@abc123.")],
    source: Annotated[
        str,
        typer.Option(
            "--from",
            help="A checkpoint folder, s3://bucket/prefix (read by the server), or 'hf' (the "
            "Hugging Face Hub; HF_TOKEN, HF_ENDPOINT).",
        ),
    ],
    upload: Annotated[
        bool, typer.Option("--upload", help="Also store the weights in the registry (folders).")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Register a base model from safetensors headers (no weights are read)."""
    with registry() as client:
        result = client.add_base(base, source, upload=upload, progress=progress())
    if as_json:
        emit_json(
            {
                "base": result.base.model_dump(mode="json"),
                "bytes_read": result.bytes_read,
                "uploaded_bytes": result.uploaded_bytes,
            }
        )
        return
    added = result.base
    verb = "registered" if added.created else "already registered:"
    out.print(
        f"{verb} {escape(added.ref)} ({escape(added.model_type or '?')}, "
        f"{_params(added.parameter_count)} parameters in {added.tensor_count} tensors, "
        f"{len(added.shards)} shard(s)) from {escape(added.source)}"
        + (f"\n  uploaded {size(result.uploaded_bytes)}" if upload else "")
    )


@base_app.command("ls")
def list_bases(
    model_id: Annotated[str | None, typer.Argument(help="Only this id.")] = None,
    limit: Annotated[int, typer.Option(help="Page size.")] = 50,
    offset: Annotated[int, typer.Option(help="Skip this many.")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """List registered base models."""
    with registry() as client:
        page = client.bases(model_id, limit=limit, offset=offset)
    if as_json:
        emit_json(page)
        return
    table = Table("base", "type", "parameters", "tensors", "dtypes", "weights", "registered")
    for item in page.items:
        table.add_row(
            escape(item.ref),
            escape(item.model_type or "-"),
            _params(item.parameter_count),
            str(item.tensor_count),
            escape(" ".join(f"{k}:{v}" for k, v in sorted(item.dtypes.items()))),
            "registry" if item.stored else escape(item.source),
            when(item.created_at),
        )
    out.print(table)
    page_footer(page.total, page.offset, len(page.items), page.next_offset)


@base_app.command("show")
def show(
    base: Annotated[str, typer.Argument(help="Base model id[@revision].")],
    tensors: Annotated[bool, typer.Option("--tensors", help="List every tensor.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Show a registered base: config summary, shards, tensor signature."""
    with registry() as client:
        found = client.base(base, tensors=tensors)
    if as_json:
        emit_json(found)
        return
    _print_base(found)


def _print_base(base: BaseOut) -> None:
    config = base.config
    rows = [
        ("base", base.ref),
        ("model type", f"{base.model_type or '-'} {' '.join(config.get('architectures') or [])}"),
        ("parameters", f"{_params(base.parameter_count)} in {base.tensor_count} tensors"),
        ("dtypes", " ".join(f"{k}:{v}" for k, v in sorted(base.dtypes.items()))),
        ("shards", ", ".join(base.shards) or "-"),
        ("vocab / hidden", f"{config.get('vocab_size', '-')} / {config.get('hidden_size', '-')}"),
        ("tied embeddings", str(config.get("tie_word_embeddings", "-"))),
        ("source", base.source + (" (weights stored in the registry)" if base.stored else "")),
        ("registered", f"{when(base.created_at)} by {base.created_by or '-'}"),
    ]
    table = Table(show_header=False, box=None)
    for key, value in rows:
        table.add_row(f"[bold]{key}[/bold]", escape(value))
    out.print(table)
    if base.tensors:
        listing = Table("tensor", "dtype", "shape", "shard")
        for name, tensor in base.tensors.items():
            listing.add_row(
                escape(name), escape(tensor.dtype), str(tensor.shape), escape(tensor.shard or "-")
            )
        out.print(listing)


def check(
    adapter: Annotated[
        str, typer.Argument(help="An adapter folder, or a registry reference ns/name[@version].")
    ],
    base: Annotated[
        str | None,
        typer.Option(
            help="A base checkpoint folder, or a registered base id[@revision] (default for a "
            "reference: its own base)."
        ),
    ] = None,
    profile: Annotated[
        str | None, typer.Option(help="Serving profile: vllm or merge.", show_default=False)
    ] = None,
    option: Annotated[
        list[str],
        typer.Option("--option", "-O", help="Profile option key=value, e.g. max_lora_rank=64."),
    ] = [],  # noqa: B006
    as_json: JsonOpt = False,
) -> None:
    """Check that an adapter fits a base model (and a serving engine), from headers only.

    Exit code 0 when compatible, 8 when not.
    """
    options: dict[str, Any] = parse_pairs("--option", option)
    extra: dict[str, Any] = {}
    with registry() as client:
        if Path(adapter).is_dir():
            if base is None:
                raise typer.BadParameter("checking a folder needs --base DIR or --base ID[@REV]")
            local = client.check_folder(adapter, base, profile=profile, options=options)
            report = local.report
            extra = {
                "adapter_bytes_read": local.adapter_bytes_read,
                "base_bytes_read": local.base_bytes_read,
            }
        else:
            if "@" not in adapter and (
                adapter.startswith((".", "/", "~")) or adapter.count("/") > 1
            ):
                raise typer.BadParameter(f"{adapter} is not a folder (nor an ns/name reference)")
            if base is not None and Path(base).is_dir():
                raise typer.BadParameter(
                    "a registry reference is checked against a registered base: register the "
                    "folder first (lora-reg base add ID --from DIR) and pass --base ID"
                )
            report = client.check(adapter, base=base, profile=profile, options=options)
    if as_json:
        emit_json({**report.model_dump(mode="json"), **extra})
    else:
        print_report(report, adapter)
    if not report.compatible:
        sys.exit(INCOMPATIBLE_EXIT)


def print_report(report: CompatReport, subject: str) -> None:
    """The report as a module table, then errors and warnings, then the verdict."""
    table = Table("module", "kind", "base tensor", "base", "A", "B", "r", "scale", "ok")
    for row in report.modules:
        table.add_row(
            escape(row.module),
            escape(row.kind + (f" +{'+'.join(row.variants)}" if row.variants else "")),
            escape(row.base_tensor or "-"),
            escape(f"{row.base_dtype or ''}{row.base_shape or ''}"),
            str(row.lora_a),
            str(row.lora_b),
            str(row.rank),
            f"{row.scale:g}",
            "yes" if row.ok else "[red]no[/red]",
        )
    if report.modules:
        out.print(table)
    if report.replaced:
        out.print(f"replaces base tensors: {escape(', '.join(report.replaced))}")
    print_findings(report)
    where = f" against {report.base}" if report.base else ""
    how = f" (profile {report.profile}" + (
        f" {' '.join(f'{k}={v}' for k, v in report.options.items())})" if report.options else ")"
    )
    verdict = "[green]compatible[/green]" if report.compatible else "[red]not compatible[/red]"
    out.print(f"{escape(subject + where)}: {verdict}{escape(how) if report.profile else ''}")
