"""What every `lora-reg` command shares: the global options, the consoles, the client factory
and the small formatters for human output (used by `cli.main` and the `cli.*_commands` modules).

Rich reads `[...]` in printed strings as markup: every value that comes from a user, a folder or
the server (names, paths, messages) goes through `escape` before it is printed or put in a table.

Imported by every command, so it imports nothing heavy: the `Registry` client (httpx, pydantic's
models, the compatibility checker) is imported by `registry()` when a command asks for it, and
the read commands (`ls`, `show`, `versions`, `resolve`) skip it: `get_json` fetches the server's
JSON, which they print as it came (tests/test_cli_imports.py keeps it so).
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import sys
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape as escape  # re-exported: the one markup escape commands use

from cli.problems import DEFAULT_URL as DEFAULT_URL  # re-exported for cli.main
from cli.problems import raise_for_problem as raise_for_problem
from cli.progress import NoProgress, Progress, RichProgress
from registry import __version__
from registry.core.errors import Unavailable

if TYPE_CHECKING:
    import ssl

    from cli.client import Registry

TIMEOUT_S = 300.0  # the client's default timeout

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
    from cli.client import Registry

    return Registry(state.url, state.token, cache_dir=cache_dir)


def get_json(path: str, params: Mapping[str, Any] | None = None) -> Any:
    """GET an API path on the registry (`--url`, `--token`) and return its JSON as it came.

    For the read commands, which print what the server sent: the same request as the `Registry`
    client's (URL, token, timeout, redirects, certificates) and the same errors (an unreachable
    server is `Unavailable`, a problem+json answer its own `RegistryError` class), without
    importing it, and without loading CA certificates that a plain-HTTP request never uses.
    """
    import httpx

    url = (state.url or os.environ.get("LORA_REG_URL") or DEFAULT_URL).rstrip("/")
    token = state.token if state.token is not None else os.environ.get("LORA_REG_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        if _plain_http(url):
            # Only plain HTTP to the registry: no certificates to load. A redirect (perhaps to
            # https) is asked again below, by a client that checks certificates as usual.
            with httpx.Client(
                base_url=url, headers=headers, timeout=TIMEOUT_S, verify=_refusing_tls()
            ) as http:
                response = http.get(path, params=params)
            if not response.is_redirect:
                raise_for_problem(response)
                return response.json()
        with httpx.Client(
            base_url=url, headers=headers, timeout=TIMEOUT_S, follow_redirects=True
        ) as http:
            response = http.get(path, params=params)
    except httpx.TransportError as exc:
        raise Unavailable(
            f"cannot reach the registry at {url} ({type(exc).__name__}: {exc}); is "
            "`lora-reg server` running? (--url / LORA_REG_URL)"
        ) from exc
    raise_for_problem(response)
    return response.json()


def _plain_http(url: str) -> bool:
    """Whether a GET of `url` makes no TLS connection: http://, and no proxy for it in the
    environment (httpx would use it, and it may be https)."""
    import urllib.request  # httpx imports it anyway

    proxies = urllib.request.getproxies()
    return url.startswith("http://") and not (proxies.get("http") or proxies.get("all"))


def _refusing_tls() -> ssl.SSLContext:
    """A TLS context that trusts no certificate, so refuses every TLS peer. Given one, httpx
    skips loading its CA bundle, which it otherwise does for every client, even one that only
    speaks plain HTTP (15-20 ms here, a tenth of a `lora-reg ls`)."""
    import ssl

    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies certificates and host names


def progress() -> Progress:
    return NoProgress() if state.quiet or not sys.stderr.isatty() else RichProgress()


def dumped(value: Any) -> Any:
    """A pydantic model as JSON data (checked by its method: pydantic may not be imported)."""
    return value.model_dump(mode="json") if hasattr(value, "model_dump") else value


def emit_json(value: Any) -> None:
    sys.stdout.write(json.dumps(dumped(value), indent=2) + "\n")


def emit_list(items: list[Any]) -> None:
    """A whole (unpaged) list as the page shape every list command prints with `--json`:
    `{items, total, limit, offset, next_offset}` with total = limit = len(items), offset 0 and
    next_offset null."""
    data = [dumped(item) for item in items]
    emit_json(
        {
            "items": data,
            "total": len(data),
            "limit": len(data),
            "offset": 0,
            "next_offset": None,
        }
    )


def when(value: datetime | str) -> str:
    """A time (or the server's ISO 8601 text of one) in local time, to the minute."""
    return timestamp(value).astimezone().strftime("%Y-%m-%d %H:%M")


def timestamp(value: datetime | str) -> datetime:
    """The server's ISO 8601 text of a time (`2026-11-20T10:00:00.5Z`) as a datetime."""
    return datetime.fromisoformat(value) if isinstance(value, str) else value


def pairs(flag: str, given: list[str]) -> dict[str, str]:
    """`["k=v", ...]` given with a repeatable `flag` as a dict (`registry.core.schemas.parse_pairs`,
    imported only when the flag was given: the schemas import pydantic)."""
    if not given:
        return {}
    from registry.core.schemas import parse_pairs

    return parse_pairs(flag, given)


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


def print_findings(report: Any, console: Console = out) -> None:
    """The errors, then the warnings, of a compatibility report (a `CompatReport` or its JSON)."""
    data = dumped(report)
    for finding in data.get("errors") or []:
        console.print(
            f"[red]error[/red] {finding['code']}: {escape(finding['message'])}", highlight=False
        )
    for finding in data.get("warnings") or []:
        console.print(
            f"[yellow]warning[/yellow] {finding['code']}: {escape(finding['message'])}",
            highlight=False,
        )
