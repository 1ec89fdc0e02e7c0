"""What the client and the CLI's light read commands share about talking to a registry: its
default URL, and turning an error answer (problem+json) back into the `RegistryError` it
carries. Imports only httpx's types and the error taxonomy, so both stay cheap to import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from registry.core.errors import RegistryError, Unavailable, error_from_code

if TYPE_CHECKING:
    import httpx

DEFAULT_URL = "http://127.0.0.1:8000"


def raise_for_problem(response: httpx.Response) -> None:
    """Raise the `RegistryError` an error answer carries (by its stable `code`); answers that
    are not problem+json become `internal` (or `unavailable` for 5xx) with the status and text."""
    if response.status_code < 400:
        return
    try:
        body = response.json()
        code, detail = body["code"], body.get("detail") or body.get("title", "")
        details = body.get("details") or {}
    except (ValueError, KeyError, TypeError):
        message = f"registry answered HTTP {response.status_code}: {response.text[:300]}"
        if response.status_code >= 500:
            raise Unavailable(message) from None
        raise RegistryError(message) from None
    raise error_from_code(code, detail, details)
