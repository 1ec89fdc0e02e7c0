"""Webhook payloads and signatures, as the Standard Webhooks specification defines them.

Each delivery is a POST of the event as JSON with three headers: `webhook-id` (the delivery's
id, the same on every retry: receivers drop duplicates by it), `webhook-timestamp` (Unix
seconds) and `webhook-signature` (`v1,` + base64 HMAC-SHA256 of `id.timestamp.body` under the
secret; a secret written `whsec_<base64>` is those bytes, any other is its UTF-8). Pure: used by
the registry to sign and by receivers (and tests) to verify.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

MIN_SECRET = 16
MAX_SECRET = 200


def _key(secret: str) -> bytes:
    if secret.startswith("whsec_"):
        return base64.b64decode(secret.removeprefix("whsec_"))
    return secret.encode("utf-8")


def sign(secret: str, delivery_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header of a delivery."""
    message = f"{delivery_id}.{timestamp}.".encode() + body
    digest = hmac.new(_key(secret), message, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def verify(secret: str, delivery_id: str, timestamp: int, body: bytes, header: str) -> bool:
    """Whether one of the space-separated signatures in `header` is ours for this delivery."""
    expected = sign(secret, delivery_id, timestamp, body)
    return any(hmac.compare_digest(expected, candidate) for candidate in header.split())


def headers(secret: str, delivery_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    return {
        "content-type": "application/json",
        "webhook-id": delivery_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, delivery_id, timestamp, body),
    }
