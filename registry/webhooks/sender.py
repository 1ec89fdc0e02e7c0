"""The webhook delivery loop: a thread of `lora-reg server` (one per process; replicas share
the work through row locks) that turns new events into deliveries and POSTs them, signed.

Never inside a request, and never with a transaction open during a POST: each step of
`registry.webhooks.service` runs in its own short transaction. A slow or failing endpoint only
delays its own deliveries (each POST has a timeout; failures back off), never the registry.
"""

from __future__ import annotations

import json
import logging
import threading
import time

import httpx
from sqlalchemy.engine import Engine

from registry.core import webhooks
from registry.db import session_scope
from registry.models import utcnow
from registry.webhooks import service

log = logging.getLogger("registry.webhooks")

POST_TIMEOUT_S = 10.0
POLL_S = 1.0
BURST = 50  # deliveries attempted per round before looking for new events again


class WebhookSender:
    def __init__(self, engine: Engine, poll_s: float = POLL_S) -> None:
        self.engine = engine
        self.poll_s = poll_s
        self.http = httpx.Client(timeout=POST_TIMEOUT_S, follow_redirects=False)

    def run_once(self) -> int:
        """Enqueue new events, then attempt up to BURST due deliveries; how many were tried."""
        with session_scope(self.engine) as session:
            service.enqueue(session)
        tried = 0
        while tried < BURST:
            with session_scope(self.engine) as session:
                claimed = service.claim(session, utcnow())
            if claimed is None:
                break
            self._deliver(claimed)
            tried += 1
        return tried

    def _deliver(self, claimed: service.Claimed) -> None:
        body = json.dumps(claimed.event, separators=(",", ":")).encode()
        headers = webhooks.headers(
            claimed.secret, f"lrd_{claimed.delivery_id}", int(time.time()), body
        )
        status: int | None = None
        error: str | None = None
        try:
            response = self.http.post(claimed.url, content=body, headers=headers)
            status = response.status_code
            if not response.is_success:
                error = f"HTTP {status}: {response.text[:200]}"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        if error:
            log.warning(
                "webhook delivery %s to %s failed: %s", claimed.delivery_id, claimed.url, error
            )
        with session_scope(self.engine) as session:
            service.settle(session, claimed.delivery_id, utcnow(), status=status, error=error)

    def serve(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                busy = self.run_once()
            except Exception:  # the loop outlives a database hiccup; the next round retries
                log.exception("webhook delivery round failed")
                busy = 0
            if not busy:
                stop.wait(self.poll_s)
        self.http.close()


def start_webhook_sender(engine: Engine) -> threading.Event:
    """Run the delivery loop in a daemon thread; set the returned event to stop it."""
    stop = threading.Event()
    sender = WebhookSender(engine)
    threading.Thread(target=sender.serve, args=(stop,), name="webhooks", daemon=True).start()
    return stop
