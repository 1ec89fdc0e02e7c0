"""`lora-reg push`, `pull`, `ls`, `show`, `versions`: adapters and their versions.

`push` and `pull` go through `cli.client.Registry` (hashing, uploads, the verified cache). The
read commands (`ls`, `show`, `versions`) print the server's JSON as it came, fetched with
`cli.console.get_json`: the client and its pydantic models cost more to import than the whole
answer, and `--json` prints the same bytes either way (the client's models are the server's).
So this module imports nothing heavy at its top: `lora-reg ls` loads only what it uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from cli.console import (
    JsonOpt,
    dumped,
    emit_json,
    err,
    escape,
    get_json,
    out,
    page_footer,
    pairs,
    print_findings,
    progress,
    registry,
    size,
    when,
)
from registry.core.names import parse_name, parse_reference

Json = dict[str, Any]  # an object of the server's JSON (VersionOut, AdapterOut, Page...)


def _metrics(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:g}" for k, v in sorted(metrics.items()))


def _compat(version: Json) -> str:
    if version.get("compat_status") is None:
        return "unchecked (base not registered: lora-reg base add)"
    report = version.get("compat_report")
    return f"{version['compat_status']} with {version.get('compat_base')}" + (
        f" ({len(report.get('errors') or [])} error(s), {len(report.get('warnings') or [])} "
        "warning(s))"
        if report
        else ""
    )


def _base(version: Json) -> str:
    if not version["base_model_id"]:
        return "-"
    revision = version["base_model_revision"]
    return str(version["base_model_id"]) + (f"@{revision}" if revision else "")


def push(
    directory: Annotated[
        Path, typer.Argument(help="PEFT adapter folder (save_pretrained output).")
    ],
    name: Annotated[str, typer.Argument(help="Adapter name: namespace/name.")],
    base: Annotated[
        str | None, typer.Option(help="Base model id[@revision]; default from adapter_config.json.")
    ] = None,
    metric: Annotated[list[str], typer.Option(help="Eval metric name=number (repeatable).")] = [],  # noqa: B006
    label: Annotated[list[str], typer.Option(help="Label key=value (repeatable).")] = [],  # noqa: B006
    lineage: Annotated[
        list[str], typer.Option(help="Lineage key=value: run, dataset, commit... (repeatable).")
    ] = [],  # noqa: B006
    description: Annotated[str | None, typer.Option(help="Free-text description.")] = None,
    exclude: Annotated[
        list[str], typer.Option(help="Glob of files to leave out (repeatable).")
    ] = [],  # noqa: B006
    alias: Annotated[
        str | None, typer.Option(help="Point this alias (e.g. staging) at the pushed version.")
    ] = None,
    require_compatible: Annotated[
        bool,
        typer.Option(
            "--require-compatible",
            help="Refuse the push unless it is proven compatible with its registered base.",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Push an adapter folder as a new immutable version."""
    metrics: dict[str, Any] = pairs("--metric", metric)
    with registry() as client:
        result = client.push(
            directory,
            name,
            base=base,
            metrics=metrics,
            labels=pairs("--label", label),
            lineage=pairs("--lineage", lineage),
            description=description,
            exclude=tuple(exclude),
            require_compatible=require_compatible,
            alias=alias,
            progress=progress(),
        )
    if as_json:
        emit_json(
            {
                "version": result.version.model_dump(mode="json"),
                "created": result.created,
                "uploaded_bytes": result.uploaded_bytes,
                "uploaded_files": result.uploaded_files,
                "skipped_bytes": result.skipped_bytes,
            }
        )
        return
    v = result.version
    verb = "pushed" if result.created else "already exists as"
    out.print(
        f"{verb} {escape(v.adapter)}@{v.number} {v.digest}\n"
        f"  uploaded {size(result.uploaded_bytes)} in {result.uploaded_files} file(s), "
        f"{size(result.skipped_bytes)} already stored\n"
        f"  {escape(_compat(dumped(v)))}"
    )


def pull(
    ref: Annotated[
        str,
        typer.Argument(help="ns/name, ns/name@7, ns/name@sha256:..., or a merge's sha256:..."),
    ],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Folder to write (default ./<name>).")
    ] = None,
    cache_dir: Annotated[
        Path | None,
        typer.Option(envvar="LORA_REG_CACHE_DIR", help="Blob cache (default ~/.cache/lora-reg)."),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Remove files in the folder that are not in REF.")
    ] = False,
    allow_yanked: Annotated[
        bool, typer.Option("--allow-yanked", help="Pull a yanked version anyway.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Download a version (or a merged checkpoint, by its sha256:... digest), verified."""
    if ref.startswith("sha256:"):
        _pull_artifact(ref, output, cache_dir, force, as_json)
        return
    with registry(cache_dir) as client:
        result = client.pull(
            ref, output, force=force, allow_yanked=allow_yanked, progress=progress()
        )
    if result.version.note:
        err.print(f"note: {escape(result.version.note)}")
    if as_json:
        emit_json(
            {
                "version": result.version.model_dump(mode="json"),
                "path": str(result.path),
                "downloaded_bytes": result.downloaded_bytes,
                "cached_bytes": result.cached_bytes,
            }
        )
        return
    v = result.version
    out.print(
        f"pulled {escape(v.adapter)}@{v.number} {v.digest} into {escape(str(result.path))}\n"
        f"  downloaded {size(result.downloaded_bytes)}, {size(result.cached_bytes)} from cache"
    )


def _pull_artifact(
    digest: str, output: Path | None, cache_dir: Path | None, force: bool, as_json: bool
) -> None:
    target = output or Path(f"merged-{digest.removeprefix('sha256:')[:12]}")
    with registry(cache_dir) as client:
        path = client.pull_artifact(digest, target, progress(), force=force)
        artifact = client.artifact(digest)
    if as_json:
        emit_json({"artifact": artifact.model_dump(mode="json"), "path": str(path)})
        return
    out.print(
        f"pulled {escape(artifact.adapter)} merged into {escape(artifact.base)} ({digest[:19]}) "
        f"into {escape(str(path))}"
    )


def list_adapters(
    namespace: Annotated[str | None, typer.Argument(help="Only this namespace.")] = None,
    base: Annotated[str | None, typer.Option(help="Only adapters for this base model.")] = None,
    label: Annotated[list[str], typer.Option(help="Only with label key=value.")] = [],  # noqa: B006
    compat: Annotated[
        str | None,
        typer.Option(
            help="Only adapters whose latest version is compatible, incompatible or unchecked."
        ),
    ] = None,
    limit: Annotated[int, typer.Option(help="Page size.")] = 50,
    offset: Annotated[int, typer.Option(help="Skip this many.")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """List adapters."""
    # The query `cli.client.Registry.list` sends.
    params: dict[str, Any] = {"limit": limit, "offset": offset}
    if compat:
        params["compat"] = compat
    if namespace:
        params["namespace"] = namespace
    if base:
        params["base"] = base
    labels = pairs("--label", label)
    if labels:
        params["label"] = [f"{k}={v}" for k, v in labels.items()]
    page = get_json("/api/v1/adapters", params)
    if as_json:
        emit_json(page)
        return
    table = Table("adapter", "versions", "latest", "base", "compat", "metrics", "created")
    for item in page["items"]:
        latest = item["latest"]
        table.add_row(
            escape(item["name"]),
            str(item["version_count"]),
            f"@{latest['number']}" if latest else "-",
            escape(_base(latest)) if latest else "-",
            escape(latest.get("compat_status") or "unchecked") if latest else "",
            escape(_metrics(latest["metrics"])) if latest else "",
            when(latest["created_at"]) if latest else "",
        )
    out.print(table)
    _footer(page)


def show(
    ref: Annotated[str, typer.Argument(help="ns/name[@version|@sha256:...]")],
    as_json: JsonOpt = False,
) -> None:
    """Show one version: metadata, metrics, lineage and files."""
    # The request `cli.client.Registry.get` sends.
    parsed = parse_reference(ref)
    version = get_json(f"/api/v1/adapters/{parsed.name}/versions/{parsed.selector}")
    if version.get("note"):
        err.print(f"note: {escape(version['note'])}")
    if as_json:
        emit_json(version)
        return
    targets = version["target_modules"]
    rows = [
        ("version", f"{version['adapter']}@{version['number']}"),
        ("digest", version["digest"]),
        ("base model", _base(version)),
        ("peft", f"{version['peft_type']} task={version['task_type'] or '-'}"),
        (
            "rank / alpha",
            f"r={version['r']} alpha={version['lora_alpha']:g}"
            + (" rslora" if version["use_rslora"] else "")
            + (" dora" if version["use_dora"] else ""),
        ),
        ("target modules", ", ".join(targets) if isinstance(targets, list) else str(targets)),
        ("metrics", _metrics(version["metrics"]) or "-"),
        ("labels", " ".join(f"{k}={v}" for k, v in sorted(version["labels"].items())) or "-"),
        ("lineage", " ".join(f"{k}={v}" for k, v in sorted(version["lineage"].items())) or "-"),
        ("description", version["description"] or "-"),
        ("created", f"{when(version['created_at'])} by {version['created_by'] or '-'}"),
        ("size", f"{size(version['size'])} in {version['file_count']} file(s)"),
        ("compatibility", _compat(version)),
    ]
    if version.get("yanked_at"):
        rows.append(
            (
                "yanked",
                f"{when(version['yanked_at'])} by {version.get('yanked_by') or '-'}: "
                f"{version.get('yank_reason')}",
            )
        )
    table = Table(show_header=False, box=None)
    for key, value in rows:
        table.add_row(f"[bold]{key}[/bold]", escape(value))
    out.print(table)
    files = Table("file", "size", "sha256")
    for file in version.get("files") or []:
        files.add_row(escape(file["path"]), size(file["size"]), file["sha256"][:16])
    out.print(files)
    if version.get("compat_report"):
        print_findings(version["compat_report"])


def versions(
    name: Annotated[str, typer.Argument(help="ns/name")],
    sort: Annotated[
        str, typer.Option(help="number, created or metrics.<name>; prefix '-' for descending.")
    ] = "-number",
    limit: Annotated[int, typer.Option(help="Page size.")] = 50,
    offset: Annotated[int, typer.Option(help="Skip this many.")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """List the versions of an adapter."""
    # The request `cli.client.Registry.versions` sends.
    path = f"/api/v1/adapters/{parse_name(name)}/versions"
    page = get_json(path, {"sort": sort, "limit": limit, "offset": offset})
    if as_json:
        emit_json(page)
        return
    table = Table("version", "digest", "base", "r", "metrics", "created", "by")
    for v in page["items"]:
        table.add_row(
            f"@{v['number']}" + (" (yanked)" if v.get("yanked_at") else ""),
            v["digest"][:19],
            escape(_base(v)),
            str(v["r"]),
            escape(_metrics(v["metrics"])),
            when(v["created_at"]),
            escape(v["created_by"] or "-"),
        )
    out.print(table)
    _footer(page)


def _footer(page: Json) -> None:
    page_footer(page["total"], page["offset"], len(page["items"]), page["next_offset"])
