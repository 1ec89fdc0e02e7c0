"""lora-registry: the service side (settings, database, storage, API) and its pure core.

`registry.core` is importable without any server dependency; everything else here needs the
`[server]` extra.
"""

__version__ = "0.1.0"
