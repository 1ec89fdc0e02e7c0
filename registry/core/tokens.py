"""Token secrets: their shape, how they are made and how they are hashed (pure; no I/O).

Secrets look like `lrt_` + 43 URL-safe characters (256 random bits). Only their sha256 is
stored: with that much randomness a plain hash is enough (there is nothing to brute-force).
"""

from __future__ import annotations

import hashlib
import re
import secrets

# Audit actors of changes no token made. Parentheses never appear in token names, so these are
# never confused with one.
BOOTSTRAP_ACTOR = "(bootstrap)"  # the first start's admin token
DATABASE_ACTOR = "(database)"  # `lora-reg db create-token`
LEASE_EXPIRY_ACTOR = "(lease-expiry)"  # what expired merge-job leases cause
EMBEDDED_WORKER_ACTOR = "(embedded-worker)"  # the server's in-process merge worker

SECRET_PREFIX = "lrt_"
SECRET_RE = re.compile(r"lrt_[A-Za-z0-9_-]{43}")


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def secret_sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()
