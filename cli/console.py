"""What every `lora-reg` command shares: the global options, the consoles, the client factory
and the small formatters for human output (used by `cli.main` and the `cli.*_commands` modules).

Rich reads `[...]` in printed strings as markup: every value that comes from a user, a folder or
the server (names, paths, messages) goes through `escape` before it is printed or put in a table.
"""

from __future__ import annotations

import functools
import inspect
import json
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.markup import escape as escape  # re-exported: the one markup escape commands use

from cli.client import DEFAULT_URL, Registry
from cli.progress import NoProgress, Progress, RichProgress
from registry import __version__

# Piped output is read by scripts and greps: never truncate or wrap it to a guessed width.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 240)
err = Console(stderr=True, soft_wrap=True)


class State:
    url: str = DEFAULT_URL
    token: str | None = None
    verbose: bool = False
    quiet: bool = False
    json: bool = False


state = State()

JSON_HELP = "Print machine-readable JSON on stdout."
JsonOpt = Annotated[bool, typer.Option("--json", help=JSON_HELP)]


def _print_version(value: bool) -> None:
    if value:
        out.print(f"lora-reg {__version__}", markup=False, highlight=False)
        raise typer.Exit()


# The global options, declared once: `cli.main`'s callback takes them before the subcommand
# (with their defaults), `with_global_options` adds them to every command after it.
URL_OPTION = typer.Option("--url", envvar="LORA_REG_URL", help="Registry API URL.")
TOKEN_OPTION = typer.Option(
    "--token", envvar="LORA_REG_TOKEN", help="Bearer token.", show_default=False
)
VERBOSE_OPTION = typer.Option("--verbose", "-v", help="Show tracebacks.")
QUIET_OPTION = typer.Option("--quiet", "-q", help="No progress bars.")
VERSION_OPTION = typer.Option(
    "--version", is_eager=True, callback=_print_version, help="Show the version."
)

_GLOBALS: dict[str, tuple[Any, Any]] = {  # parameter name -> (annotation, default) on a command
    "global_url": (Annotated[str | None, URL_OPTION], None),
    "global_token": (Annotated[str | None, TOKEN_OPTION], None),
    "global_verbose": (Annotated[bool, VERBOSE_OPTION], False),
    "global_quiet": (Annotated[bool, QUIET_OPTION], False),
    "global_version": (Annotated[bool, VERSION_OPTION], False),
}
_CONTEXT = "global_context"


def with_global_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """`command` that also takes the global options after its name (`lora-reg ls --token X`),
    and `--json` given before its name (`lora-reg --json ls`) when it has a `--json` of its own.

    A global option only counts when it is given on this command's line: its environment
    variable (shown in the help) was already read before the subcommand, and must not undo a
    flag given there.
    """
    signature = inspect.signature(command, eval_str=True)
    taken = set(signature.parameters) & {*_GLOBALS, _CONTEXT}
    if taken:
        raise TypeError(f"{command.__name__} already has parameters {sorted(taken)}")
    extra = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=kind)
        for name, (kind, default) in _GLOBALS.items()
    ]
    context = inspect.Parameter(_CONTEXT, inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        ctx: typer.Context = kwargs.pop(_CONTEXT)
        given = {}
        for name in _GLOBALS:
            value = kwargs.pop(name)
            source = ctx.get_parameter_source(name)
            if source is not None and source.name == "COMMANDLINE":
                given[name.removeprefix("global_")] = value
        for name, value in given.items():
            if name in ("url", "token") or value:  # flags only switch on
                setattr(state, name, value)
        if "as_json" in kwargs and state.json:
            kwargs["as_json"] = True
        return command(*args, **kwargs)

    parameters = [*signature.parameters.values(), *extra, context]
    run.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    return run


def registry(cache_dir: Path | None = None) -> Registry:
    return Registry(state.url, state.token, cache_dir=cache_dir)


def progress() -> Progress:
    return NoProgress() if state.quiet or not sys.stderr.isatty() else RichProgress()


def emit_json(value: Any) -> None:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    sys.stdout.write(json.dumps(value, indent=2) + "\n")


def emit_list(items: list[Any]) -> None:
    """A whole (unpaged) list as the page shape every list command prints with `--json`:
    `{items, total, limit, offset, next_offset}` with total = limit = len(items), offset 0 and
    next_offset null."""
    dumped = [
        item.model_dump(mode="json") if isinstance(item, BaseModel) else item for item in items
    ]
    emit_json(
        {
            "items": dumped,
            "total": len(dumped),
            "limit": len(dumped),
            "offset": 0,
            "next_offset": None,
        }
    )


def when(value: datetime) -> str:
    return value.astimezone().strftime("%Y-%m-%d %H:%M")


def size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(n)


def page_footer(total: int, offset: int, shown: int, next_offset: int | None) -> None:
    if next_offset is not None:
        err.print(f"{offset + 1}-{offset + shown} of {total}; next page: --offset {next_offset}")
