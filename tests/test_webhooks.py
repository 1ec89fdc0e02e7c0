"""Webhooks (docs/architecture.md §12): the server's delivery loop POSTs events to a real HTTP
endpoint run by the test, signed as Standard Webhooks says, at least once, in order, retried."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cli.client import Registry
from registry.core import webhooks
from registry.core.errors import InvalidInput
from tests.conftest import RunningServer, push_versions

SECRET = "a-long-shared-secret-for-tests"


class Receiver:
    """An HTTP endpoint that records what it got and fails the first `fail` requests."""

    def __init__(self, fail: int = 0) -> None:
        self.fail = fail
        self.received: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                failing = len(receiver.received) <= receiver.fail
                self.send_response(500 if failing else 204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, count: int, deadline_s: float = 60) -> None:
        deadline = time.monotonic() + deadline_s
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(self.received) >= count, f"got {len(self.received)} of {count} deliveries"

    def events(self) -> list[dict[str, object]]:
        return [json.loads(body) for _, body in self.received]


@pytest.fixture
def receiver() -> Iterator[Callable[..., Receiver]]:
    made: list[Receiver] = []

    def make(fail: int = 0) -> Receiver:
        made.append(Receiver(fail))
        return made[-1]

    yield make
    for item in made:
        item.server.shutdown()
        item.server.server_close()


def test_events_are_delivered_signed_and_recorded(
    client: Registry,
    adapter_dir: Callable[..., Path],
    receiver: Callable[..., Receiver],
) -> None:
    name = push_versions(client, adapter_dir, 1)
    endpoint = receiver()
    hook = client.add_webhook(endpoint.url, ["alias.set"], SECRET)
    try:
        client.set_alias(f"{name}@1", "staging")
        endpoint.wait_for(1)
        headers, body = endpoint.received[0]
        assert webhooks.verify(
            SECRET,
            headers["webhook-id"],
            int(headers["webhook-timestamp"]),
            body,
            headers["webhook-signature"],
        )
        assert not webhooks.verify(
            "another-secret-entirely",
            headers["webhook-id"],
            int(headers["webhook-timestamp"]),
            body,
            headers["webhook-signature"],
        )
        event = json.loads(body)
        assert (event["action"], event["subject"]) == ("alias.set", f"{name}@staging")
        assert event["details"]["digest"] == client.get(f"{name}@1").digest
        (delivery,) = client.webhook_deliveries(hook.id).items
        assert (delivery.status, delivery.attempts, delivery.last_status) == ("succeeded", 1, 204)
        assert SECRET not in json.dumps(client.webhooks().model_dump(mode="json"))
    finally:
        client.remove_webhook(hook.id)


def test_a_failing_endpoint_gets_retries_in_order_and_never_blocks_the_registry(
    client: Registry,
    adapter_dir: Callable[..., Path],
    receiver: Callable[..., Receiver],
) -> None:
    name = push_versions(client, adapter_dir, 2)
    endpoint = receiver(fail=1)
    hook = client.add_webhook(endpoint.url, ["alias.set"], SECRET)
    try:
        client.set_alias(f"{name}@1", "staging")  # delivered on the second attempt
        client.set_alias(f"{name}@2", "staging")  # waits for the first: order per endpoint
        endpoint.wait_for(3)
        ids = [headers["webhook-id"] for headers, _ in endpoint.received]
        assert ids[0] == ids[1] != ids[2]  # a retry keeps its id: receivers drop duplicates
        versions = [event["details"]["version"] for event in endpoint.events()]  # type: ignore[index]
        assert versions == [1, 1, 2]
        deliveries = client.webhook_deliveries(hook.id).items
        assert [(d.status, d.attempts) for d in deliveries] == [("succeeded", 1), ("succeeded", 2)]
        assert deliveries[1].last_status == 204
    finally:
        client.remove_webhook(hook.id)


def test_an_unreachable_endpoint_is_retried_and_shown_pending(
    client: Registry, adapter_dir: Callable[..., Path], receiver: Callable[..., Receiver]
) -> None:
    gone = receiver()
    gone.server.shutdown()
    gone.server.server_close()  # nothing listens there any more
    name = push_versions(client, adapter_dir, 1)
    hook = client.add_webhook(gone.url, [], SECRET)
    try:
        client.set_alias(f"{name}@1", "staging")  # the request does not wait for the endpoint
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            items = client.webhook_deliveries(hook.id).items
            if items and items[-1].attempts >= 1 and items[-1].last_error:
                break
            time.sleep(0.2)
        pending = client.webhook_deliveries(hook.id, status="pending").items
        assert pending and "ConnectError" in (pending[-1].last_error or "")
        assert client.webhooks().items[-1].pending >= 1
    finally:
        client.remove_webhook(hook.id)


def test_webhooks_name_known_actions_and_a_long_secret(client: Registry) -> None:
    with pytest.raises(InvalidInput, match="unknown event action"):
        client.add_webhook("http://127.0.0.1:9/x", ["alias.moved"], SECRET)
    with pytest.raises(InvalidInput):
        client.add_webhook("http://127.0.0.1:9/x", [], "short")


def test_the_cli_adds_lists_and_removes_webhooks(server: RunningServer) -> None:
    added = server.cli(
        "webhook",
        "add",
        "http://127.0.0.1:9/x",
        "--events",
        "alias.set",
        "--json",
        env={"LORA_REG_WEBHOOK_SECRET": SECRET},
    )
    assert added.returncode == 0, added.stderr
    hook = json.loads(added.stdout)
    listed = server.cli("webhook", "ls")
    assert "http://127.0.0.1:9/x" in listed.stdout and SECRET not in listed.stdout
    assert server.cli("webhook", "rm", str(hook["id"])).returncode == 0
    assert server.cli("webhook", "deliveries", str(hook["id"])).returncode == 3
