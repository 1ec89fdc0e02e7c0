"""The `lora-reg` command line and the `Registry` HTTP client for training jobs and workers.

Imports only `registry.core` from the service side: a training job installs this without the
server's dependencies. (`cli.server_commands` starts the server; it imports `registry.server`
lazily, inside its commands, and only works with the `[server]` extra.)
"""

from cli.client import PullResult, PushResult, Registry

__all__ = ["PullResult", "PushResult", "Registry"]
