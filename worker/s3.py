"""The worker's one door to S3 (a base under s3://, an s3:// merge target).

Credentials, region and endpoint come from the standard AWS_* environment (AWS_ENDPOINT_URL for
SeaweedFS, MinIO...), exactly as boto3 reads them; the registry's own store is never involved.
"""

from __future__ import annotations

from typing import Any


def s3_client() -> Any:
    import boto3

    return boto3.client("s3")
