"""The `lora-reg` command line and the `Registry` HTTP client for training jobs and workers.

Imports only `registry.core` from the service side: a training job installs this without the
server's dependencies. (`cli.server_commands` starts the server; it imports `registry.server`
lazily, inside its commands, and only works with the `[server]` extra.)

`from cli import Registry` imports the client on first use, not with the package: `lora-reg`
commands that do not use it (`ls`, `show`...) then start without its imports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cli.client import PullResult, PushResult, Registry

__all__ = ["PullResult", "PushResult", "Registry"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from cli import client

        return getattr(client, name)
    raise AttributeError(f"module 'cli' has no attribute {name!r}")
