"""`lora-reg`: the command line (typer). Thin: parses flags, calls `cli.client.Registry`, prints.

Human output is rich tables on stdout and progress bars on stderr; `--json` prints machine output
on stdout. Errors print one line on stderr and exit with the code of their class
(`registry.core.errors`); `-v` adds the traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from cli.base_commands import base_app, check, print_findings
from cli.client import DEFAULT_URL
from cli.console import (
    JSON_HELP,
    QUIET_OPTION,
    TOKEN_OPTION,
    URL_OPTION,
    VERBOSE_OPTION,
    VERSION_OPTION,
    JsonOpt,
    emit_json,
    err,
    escape,
    out,
    page_footer,
    progress,
    registry,
    size,
    state,
    when,
    with_global_options,
)
from registry.core.compat import CompatReport
from registry.core.errors import RegistryError
from registry.core.schemas import VersionOut, parse_pairs

app = typer.Typer(
    name="lora-reg",
    help="Push, pull and browse versioned LoRA adapters.\n\nThe options below also work after the "
    "command: lora-reg ls --token X.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


@app.callback()
def main_options(
    url: Annotated[str, URL_OPTION] = DEFAULT_URL,
    token: Annotated[str | None, TOKEN_OPTION] = None,
    verbose: Annotated[bool, VERBOSE_OPTION] = False,
    quiet: Annotated[bool, QUIET_OPTION] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help=JSON_HELP + " Same as COMMAND --json.")
    ] = False,
    version: Annotated[bool, VERSION_OPTION] = False,
) -> None:
    state.url, state.token, state.verbose, state.quiet = url, token, verbose, quiet
    state.json = as_json


def _metrics(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:g}" for k, v in sorted(metrics.items()))


def _compat(version: VersionOut) -> str:
    if version.compat_status is None:
        return "unchecked (base not registered: lora-reg base add)"
    return f"{version.compat_status} with {version.compat_base}" + (
        f" ({len(version.compat_report.errors)} error(s), {len(version.compat_report.warnings)} "
        "warning(s))"
        if version.compat_report
        else ""
    )


def _base(version: VersionOut) -> str:
    if not version.base_model_id:
        return "-"
    return version.base_model_id + (
        f"@{version.base_model_revision}" if version.base_model_revision else ""
    )


# --- commands ----------------------------------------------------------------------------------


@app.command()
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
    metrics: dict[str, Any] = parse_pairs("--metric", metric)
    with registry() as client:
        result = client.push(
            directory,
            name,
            base=base,
            metrics=metrics,
            labels=parse_pairs("--label", label),
            lineage=parse_pairs("--lineage", lineage),
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
        f"  {escape(_compat(v))}"
    )


@app.command()
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


@app.command("ls")
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
    with registry() as client:
        page = client.list(
            namespace,
            base=base,
            labels=parse_pairs("--label", label),
            compat=compat,
            limit=limit,
            offset=offset,
        )
    if as_json:
        emit_json(page)
        return
    table = Table("adapter", "versions", "latest", "base", "compat", "metrics", "created")
    for item in page.items:
        latest = item.latest
        table.add_row(
            escape(item.name),
            str(item.version_count),
            f"@{latest.number}" if latest else "-",
            escape(_base(latest)) if latest else "-",
            escape(latest.compat_status or "unchecked") if latest else "",
            escape(_metrics(latest.metrics)) if latest else "",
            when(latest.created_at) if latest else "",
        )
    out.print(table)
    page_footer(page.total, page.offset, len(page.items), page.next_offset)


@app.command()
def show(
    ref: Annotated[str, typer.Argument(help="ns/name[@version|@sha256:...]")],
    as_json: JsonOpt = False,
) -> None:
    """Show one version: metadata, metrics, lineage and files."""
    with registry() as client:
        version = client.get(ref)
    if version.note:
        err.print(f"note: {escape(version.note)}")
    if as_json:
        emit_json(version)
        return
    targets = version.target_modules
    rows = [
        ("version", f"{version.adapter}@{version.number}"),
        ("digest", version.digest),
        ("base model", _base(version)),
        ("peft", f"{version.peft_type} task={version.task_type or '-'}"),
        (
            "rank / alpha",
            f"r={version.r} alpha={version.lora_alpha:g}"
            + (" rslora" if version.use_rslora else "")
            + (" dora" if version.use_dora else ""),
        ),
        ("target modules", ", ".join(targets) if isinstance(targets, list) else str(targets)),
        ("metrics", _metrics(version.metrics) or "-"),
        ("labels", " ".join(f"{k}={v}" for k, v in sorted(version.labels.items())) or "-"),
        ("lineage", " ".join(f"{k}={v}" for k, v in sorted(version.lineage.items())) or "-"),
        ("description", version.description or "-"),
        ("created", f"{when(version.created_at)} by {version.created_by or '-'}"),
        ("size", f"{size(version.size)} in {version.file_count} file(s)"),
        ("compatibility", _compat(version)),
    ]
    if version.yanked_at:
        rows.append(
            (
                "yanked",
                f"{when(version.yanked_at)} by {version.yanked_by or '-'}: {version.yank_reason}",
            )
        )
    table = Table(show_header=False, box=None)
    for key, value in rows:
        table.add_row(f"[bold]{key}[/bold]", escape(value))
    out.print(table)
    files = Table("file", "size", "sha256")
    for file in version.files or []:
        files.add_row(escape(file.path), size(file.size), file.sha256[:16])
    out.print(files)
    if version.compat_report:
        print_findings(version.compat_report)


@app.command()
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
    with registry() as client:
        page = client.versions(name, sort=sort, limit=limit, offset=offset)
    if as_json:
        emit_json(page)
        return
    table = Table("version", "digest", "base", "r", "metrics", "created", "by")
    for v in page.items:
        table.add_row(
            f"@{v.number}" + (" (yanked)" if v.yanked_at else ""),
            v.digest[:19],
            escape(_base(v)),
            str(v.r),
            escape(_metrics(v.metrics)),
            when(v.created_at),
            escape(v.created_by or "-"),
        )
    out.print(table)
    page_footer(page.total, page.offset, len(page.items), page.next_offset)


def _register_commands() -> None:
    from cli.alias_commands import (
        alias_app,
        audit,
        gc,
        history,
        identify,
        resolve,
        who_runs,
        yank,
    )
    from cli.deployment_commands import deployments
    from cli.merge_commands import jobs, merge, worker
    from cli.server_commands import db_app, server
    from cli.token_commands import token_app, whoami
    from cli.webhook_commands import webhook_app

    app.add_typer(alias_app, name="alias")
    for command in (history, resolve, audit, identify, yank, gc):
        app.command()(command)
    app.command("who-runs")(who_runs)
    app.command()(deployments)
    app.command()(check)
    app.add_typer(base_app, name="base")
    app.command()(merge)
    app.command()(jobs)
    app.command()(worker)
    app.command()(server)
    app.add_typer(db_app, name="db")
    app.add_typer(token_app, name="token")
    app.add_typer(webhook_app, name="webhook")
    app.command()(whoami)
    _global_options_everywhere(app)


def _global_options_everywhere(typer_app: typer.Typer) -> None:
    """Every command (not the groups) also takes the global options after its name."""
    for command in typer_app.registered_commands:
        assert command.callback is not None
        command.callback = with_global_options(command.callback)
    for group in typer_app.registered_groups:
        assert group.typer_instance is not None
        _global_options_everywhere(group.typer_instance)


_register_commands()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: one place that turns errors into messages and exit codes.

    Usage errors are click's (exit 2); registry errors exit with their class's code.
    """
    try:
        app(args=argv, prog_name="lora-reg")
    except RegistryError as exc:
        if state.verbose:
            err.print_exception()
        err.print(f"[red]error[/red] ({exc.code}): {escape(exc.message)}", highlight=False)
        if isinstance(exc.details.get("report"), dict):  # push --require-compatible
            print_findings(CompatReport.model_validate(exc.details["report"]), console=err)
        sys.exit(exc.exit_code)
    except OSError as exc:
        if state.verbose:
            err.print_exception()
        err.print(f"[red]error[/red]: {escape(str(exc))}", highlight=False)
        sys.exit(1)


if __name__ == "__main__":
    main()
