"""Object storage for blobs: one interface, a folder backend and an S3 backend.

Blobs are content-addressed (`registry.core.manifest.blob_key`) and become visible only when
whole and verified: the folder store writes a temporary file, checks its sha256, fsyncs and
renames; the S3 store relies on S3 checksums for single PUTs and hashes multipart uploads before
copying them under their final key. Only `registry.storage.s3` imports boto3.
"""

from __future__ import annotations

from urllib.parse import urlparse

from registry.settings import Settings
from registry.storage.base import ObjectStore

__all__ = ["ObjectStore", "open_store"]


def open_store(settings: Settings) -> ObjectStore:
    parsed = urlparse(settings.storage_url)
    if parsed.scheme == "file":
        from registry.storage.folder import FolderStore

        # file://relative/path keeps the netloc: join it back so both forms work.
        return FolderStore(parsed.netloc + parsed.path)
    from registry.storage.s3 import S3Store

    return S3Store(
        bucket=parsed.netloc,
        prefix=parsed.path.strip("/"),
        presign_expiry_s=settings.presign_expiry_s,
        public_endpoint=settings.s3_public_endpoint,
    )
