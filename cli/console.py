"""What every `lora-reg` command shares: the global options, the consoles, the client factory
and the small formatters for human output (used by `cli.main` and `cli.base_commands`)."""

from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel
from rich.console import Console

from cli.client import DEFAULT_URL, Registry
from cli.progress import NoProgress, Progress, RichProgress

# Piped output is read by scripts and greps: never truncate or wrap it to a guessed width.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 240)
err = Console(stderr=True, soft_wrap=True)


class State:
    url: str = DEFAULT_URL
    token: str | None = None
    verbose: bool = False
    quiet: bool = False


state = State()

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]


def registry(cache_dir: Path | None = None) -> Registry:
    return Registry(state.url, state.token, cache_dir=cache_dir)


def progress() -> Progress:
    return NoProgress() if state.quiet or not sys.stderr.isatty() else RichProgress()


def emit_json(value: Any) -> None:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    sys.stdout.write(json.dumps(value, indent=2) + "\n")


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
