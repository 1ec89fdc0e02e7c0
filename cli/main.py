"""`lora-reg`: the command line (typer). The entry point only: the global options, the table of
commands (`COMMANDS`) and the one handler that turns errors into messages and exit codes.

Each command lives in a `cli.*_commands` module that is imported only when that command runs:
the root group looks commands up in `LazyCommands`, which imports a command's module the first
time its name is looked up. `lora-reg ls` then pays for `ls` alone, not for the client, pydantic's
models, the compatibility checker and the server-side imports of every other command
(`tests/test_cli_imports.py` pins this; `bench/cli.py` times it). `--help` and anything that
walks `commands` look every name up, and so load every module, as before.

Human output is rich tables on stdout and progress bars on stderr; `--json` prints machine output
on stdout. Errors print one line on stderr and exit with the code of their class
(`registry.core.errors`); `-v` adds the traceback.
"""

from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import Iterator, MutableMapping
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from cli.console import (
    DEFAULT_URL,
    JSON_HELP,
    QUIET_OPTION,
    TOKEN_OPTION,
    URL_OPTION,
    VERBOSE_OPTION,
    VERSION_OPTION,
    err,
    escape,
    print_findings,
    state,
    with_global_options,
)
from registry.core.errors import RegistryError

# Command name -> "module:attribute", a function (a command) or a `typer.Typer` (a group), in the
# order `lora-reg --help` lists them.
COMMANDS = {
    "push": "cli.adapter_commands:push",
    "pull": "cli.adapter_commands:pull",
    "ls": "cli.adapter_commands:list_adapters",
    "show": "cli.adapter_commands:show",
    "versions": "cli.adapter_commands:versions",
    "history": "cli.alias_commands:history",
    "resolve": "cli.alias_commands:resolve",
    "audit": "cli.alias_commands:audit",
    "identify": "cli.alias_commands:identify",
    "yank": "cli.alias_commands:yank",
    "gc": "cli.alias_commands:gc",
    "who-runs": "cli.alias_commands:who_runs",
    "deployments": "cli.deployment_commands:deployments",
    "check": "cli.base_commands:check",
    "merge": "cli.merge_commands:merge",
    "jobs": "cli.merge_commands:jobs",
    "worker": "cli.merge_commands:worker",
    "server": "cli.server_commands:server",
    "whoami": "cli.token_commands:whoami",
    "alias": "cli.alias_commands:alias_app",
    "base": "cli.base_commands:base_app",
    "db": "cli.server_commands:db_app",
    "token": "cli.token_commands:token_app",
    "webhook": "cli.webhook_commands:webhook_app",
}
# The root app's settings; each command is built with them too (`_holder`).
SETTINGS: dict[str, Any] = {"pretty_exceptions_enable": False, "rich_markup_mode": None}


class LazyCommands(MutableMapping[str, Any]):
    """The root group's commands by name, each built (its module imported) when first looked up.

    Values are typer's click commands and groups (typer vendors click: no public type for them).
    """

    def __init__(self) -> None:
        self._built: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Any:
        if name not in self._built:
            if name not in COMMANDS:
                raise KeyError(name)
            self._built[name] = typer.main.get_group(_holder(name)).commands[name]
        return self._built[name]

    def __iter__(self) -> Iterator[str]:
        return iter(COMMANDS)

    def __len__(self) -> int:
        return len(COMMANDS)

    def __setitem__(self, name: str, command: Any) -> None:
        raise TypeError(f"add {name!r} to cli.main.COMMANDS")

    def __delitem__(self, name: str) -> None:
        raise TypeError(f"remove {name!r} from cli.main.COMMANDS")


class LazyGroup(TyperGroup):
    """The root group: its commands come from `LazyCommands`."""

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        self.commands = LazyCommands()

    def list_commands(self, ctx: Any) -> list[str]:
        return list(self.commands)  # the names only: typer's own builds every command


@functools.cache
def _holder(name: str) -> typer.Typer:
    """An app holding only command `name`, registered as the root app once registered them all
    (so typer builds the same command), with the global options added to it. Cached: the
    options are added once per process however many times the CLI runs in it (tests)."""
    module, attribute = COMMANDS[name].split(":")
    target = getattr(importlib.import_module(module), attribute)
    holder = typer.Typer(**SETTINGS)
    if isinstance(target, typer.Typer):
        _global_options_everywhere(target)
        holder.add_typer(target, name=name)
    else:
        holder.command(name)(with_global_options(target))
    return holder


def _global_options_everywhere(typer_app: typer.Typer) -> None:
    """Every command (not the groups) also takes the global options after its name."""
    for command in typer_app.registered_commands:
        assert command.callback is not None
        command.callback = with_global_options(command.callback)
    for group in typer_app.registered_groups:
        assert group.typer_instance is not None
        _global_options_everywhere(group.typer_instance)


app = typer.Typer(
    cls=LazyGroup,
    name="lora-reg",
    help="Push, pull and browse versioned LoRA adapters.\n\nThe options below also work after the "
    "command: lora-reg ls --token X.",
    no_args_is_help=True,
    **SETTINGS,
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
            print_findings(exc.details["report"], console=err)
        sys.exit(exc.exit_code)
    except OSError as exc:
        if state.verbose:
            err.print_exception()
        err.print(f"[red]error[/red]: {escape(str(exc))}", highlight=False)
        sys.exit(1)


if __name__ == "__main__":
    main()
