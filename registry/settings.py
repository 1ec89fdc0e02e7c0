"""Server settings, read from `LORA_REG_*` environment variables and validated at start-up.

Owned by the server process; the CLI has its own light options (URL, token, cache) and never
imports this module.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from registry.core.errors import InvalidTarget
from registry.core.jobs import Target, parse_allowed_target, parse_s3_location
from registry.core.manifest import DEFAULT_MAX_FILES, DEFAULT_MAX_VERSION_BYTES
from registry.core.names import ALIAS_RE

DEFAULT_HOME = Path(".lora-reg")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORA_REG_", extra="ignore")

    database_url: str = Field(
        default=f"sqlite:///{DEFAULT_HOME}/registry.db",
        description="sqlite:///path or postgresql://user@host:port/db",
    )
    storage_url: str = Field(
        default=f"file://{DEFAULT_HOME}/objects",
        description="file://path or s3://bucket/prefix (endpoint from AWS_ENDPOINT_URL)",
    )
    max_files: int = Field(default=DEFAULT_MAX_FILES, ge=1)
    max_version_bytes: int = Field(default=DEFAULT_MAX_VERSION_BYTES, ge=1)
    # Largest base model stored with `lora-reg base add --upload`.
    max_base_bytes: int = Field(default=4 * 1024**4, ge=1)
    # Largest request body on every route but the two below, read only after the caller is
    # authenticated; 8 MiB is twice an identify of 10,000 files with 255-byte paths (3.7 MB).
    max_json_body: int = Field(default=8 * 1024**2, ge=64 * 1024)
    # Largest body of POST /api/v1/bases, whose tensor signature lists up to 200,000 tensors.
    max_base_signature_body: int = Field(default=64 * 1024**2, ge=64 * 1024)
    # (PUT /api/v1/blobs/{digest} streams to storage and is bounded by max_version_bytes.)
    # Refuse every push that is not proven compatible with a registered base.
    require_compatible: bool = False
    # Blobs above this size are uploaded in parts of `part_size` bytes (S3 store only).
    multipart_threshold: int = Field(default=64 * 1024**2, ge=5 * 1024**2)
    part_size: int = Field(default=64 * 1024**2, ge=5 * 1024**2)
    presign_expiry_s: int = Field(default=3600, ge=60)
    # Where clients reach S3 when it differs from the server's AWS_ENDPOINT_URL (containers,
    # private networks): presigned URLs are signed for this endpoint.
    s3_public_endpoint: str | None = None
    # How many times a merge job is claimed before an expired lease fails it (lease_expired).
    merge_max_attempts: int = Field(default=3, ge=1, le=100)
    # Bearer tokens are required on every route but /healthz and /readyz. `off` is for a server
    # on your own machine: the server refuses to bind anything but loopback with auth off.
    auth: bool = True
    # Who may read /metrics: `token` (a read-scoped token; Prometheus sends one from its
    # scrape config's `authorization: {credentials_file: ...}`) or `none` (whoever reaches the
    # port: for scrapers on a private network that carry no token). The metrics hold route
    # templates and counts, never adapter names or tokens. Ignored with auth off.
    metrics_auth: Literal["token", "none"] = "token"
    # Aliases that only admin tokens may move or remove (comma-separated).
    protected_aliases: str = "production"
    # Where write tokens may send merges besides the registry (comma-separated targets: a
    # dir:/path or s3://bucket/prefix covers what lies below it, hub:org/* every repo of an org).
    # Workers publish with their own credentials, so by default only admins pick other targets.
    merge_targets: str = ""
    # Where write tokens may have the server read a base (`base add --from s3://...`), comma-
    # separated s3://bucket/prefix entries, each covering what lies below it. The server reads
    # with its own credentials and any read token then sees the config.json, so by default only
    # admins name S3 sources; bases the client reads itself (a folder, the Hub) need no entry.
    base_sources: str = ""
    # Where the first start writes the bootstrap admin token (mode 0600).
    bootstrap_token_file: Path = DEFAULT_HOME / "admin-token"

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        scheme = urlparse(value).scheme.split("+")[0]
        if scheme not in ("sqlite", "postgresql", "postgres"):
            raise ValueError(
                f"LORA_REG_DATABASE_URL must start with sqlite:/// or postgresql://, got {value!r}"
            )
        return value

    @field_validator("storage_url")
    @classmethod
    def _storage_url(cls, value: str) -> str:
        parsed = urlparse(value)
        if parsed.scheme == "s3":
            if not parsed.netloc:
                raise ValueError(
                    f"LORA_REG_STORAGE_URL {value!r} names no bucket: s3://bucket/prefix"
                )
        elif parsed.scheme != "file":
            raise ValueError(
                f"LORA_REG_STORAGE_URL must start with file:// or s3://, got {value!r}"
            )
        return value

    @property
    def sqlalchemy_url(self) -> str:
        """The database URL with the driver SQLAlchemy should use (psycopg 3 for PostgreSQL)."""
        url = self.database_url
        for prefix in ("postgresql://", "postgres://"):
            if url.startswith(prefix):
                return "postgresql+psycopg://" + url[len(prefix) :]
        return url

    @field_validator("protected_aliases")
    @classmethod
    def _protected_aliases(cls, value: str) -> str:
        for name in _items(value):
            if not ALIAS_RE.fullmatch(name):
                raise ValueError(
                    f"LORA_REG_PROTECTED_ALIASES: {name!r} is not an alias (lower-case letters, "
                    "digits and '-', starting with a letter)"
                )
        return value

    @field_validator("merge_targets")
    @classmethod
    def _merge_targets(cls, value: str) -> str:
        for text in _items(value):
            try:
                parse_allowed_target(text)
            except InvalidTarget as exc:
                raise ValueError(f"LORA_REG_MERGE_TARGETS: {exc.message}") from None
        return value

    @field_validator("base_sources")
    @classmethod
    def _base_sources(cls, value: str) -> str:
        for text in _items(value):
            try:
                parse_s3_location(text)
            except ValueError as exc:
                raise ValueError(
                    f"LORA_REG_BASE_SOURCES: {exc} (use s3://bucket/prefix entries)"
                ) from None
        return value

    @property
    def protected_alias_names(self) -> frozenset[str]:
        return frozenset(_items(self.protected_aliases))

    @property
    def merge_target_list(self) -> list[Target]:
        return [parse_allowed_target(text) for text in _items(self.merge_targets)]

    @property
    def base_source_list(self) -> list[Target]:
        return [parse_s3_location(text) for text in _items(self.base_sources)]

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


def _items(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


@lru_cache
def get_settings() -> Settings:
    return Settings()
