"""Webhooks end to end: endpoints made with the openai SDK and by configuration, real HTTP
receivers on loopback, every delivery verified with the SDK's `client.webhooks.unwrap()`;
a receiver that is down and comes back gets every event; private and redirecting targets
are refused and dead-lettered.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import openai
import pytest

from tests import servers
from tests.conftest import BACKENDS, Stack, StackFactory

SECRET = "whsec_" + "c2VjcmV0LWZvci10ZXN0cy1vbmx5LTAxMjM0NTY3ODk="  # base64 of 32 bytes
FAST_RETRIES = {"CHATQ_WEBHOOK_RETRY_BASE_SECONDS": "0.2", "CHATQ_WEBHOOK_RETRY_MAX_SECONDS": "1",
                "CHATQ_WEBHOOK_TIMEOUT_SECONDS": "2"}


def sdk(stack: Stack, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=key, max_retries=0, timeout=30)


def until(check: Callable[[], Any], what: str, timeout: float = 40) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def verified(client: openai.OpenAI, delivery: servers.Delivery, secret: str) -> Any:
    """The event, after the SDK checked its signature (it raises on a bad one)."""
    return client.webhooks.unwrap(delivery.body, delivery.headers, secret=secret)


def dead_letter(stack: Stack, response_id: str) -> dict[str, Any]:
    """Wait for the dead letter of the event about this response."""
    def find() -> dict[str, Any] | None:
        with stack.client() as http:
            entries = http.get("/v1/webhook_endpoints/dead_letters").json()["data"]
        return next((e for e in entries if e["data"] == {"id": response_id}), None)
    found: dict[str, Any] = until(find, f"the dead letter of {response_id}")
    return found


def configured(url: str, key: str = "", events: list[str] | None = None) -> str:
    entry: dict[str, Any] = {"key": key, "url": url, "secret": SECRET}
    if events:
        entry["events"] = events
    return json.dumps([entry])


@pytest.mark.parametrize("backend", BACKENDS)
def test_signed_deliveries_verified_by_the_sdk(stack_factory: StackFactory, backend: str) -> None:
    with servers.WebhookReceiver() as receiver:
        stack = stack_factory(backend, CHATQ_API_KEYS="alice,bob",
                              CHATQ_WEBHOOK_ALLOW_PRIVATE="true",
                              CHATQ_WEBHOOK_ENDPOINTS=configured(receiver.url("/configured"),
                                                                 key="alice"),
                              **FAST_RETRIES)
        with sdk(stack, "alice") as alice, sdk(stack, "bob") as bob:
            made = alice.webhooks.create(url=receiver.url("/made"), name="answers",
                                         event_types=["response.completed",
                                                      "response.cancelled",
                                                      "response.failed"])
            assert made.signing_secret.startswith("whsec_") and made.url == receiver.url("/made")
            listed = alice.webhooks.list().data
            assert {e.id for e in listed} >= {made.id} and len(listed) == 2
            assert all(getattr(e, "signing_secret", None) is None for e in listed)
            assert alice.webhooks.retrieve(made.id).name == "answers"
            with pytest.raises(openai.NotFoundError):
                bob.webhooks.retrieve(made.id)

            done = alice.responses.create(input=f"hook {uuid.uuid4().hex}", background=True)
            slow = alice.responses.create(input="slow llmsim:ttft_ms=5000", background=True)
            alice.responses.cancel(slow.id)
            failed = alice.responses.create(input=f"down {uuid.uuid4().hex} llmsim:fail=500",
                                            background=True)
            cut = alice.responses.create(input=f"cut {uuid.uuid4().hex}", background=True,
                                         max_output_tokens=3)  # not subscribed by /made
            with stack.client("alice") as http:
                chat_id = http.post("/v1/chat", json={"message": "chat hook"}).json()["id"]
            bob.responses.create(input="not alice's", background=True)  # never reaches alice

            want = {("response.completed", done.id), ("response.cancelled", slow.id),
                    ("response.failed", failed.id)}
            until(lambda: len(receiver.received("/made")) >= 3, "three deliveries to /made")
            got = {(e.type, e.data.id) for e in
                   (verified(alice, d, made.signing_secret) for d in receiver.received("/made"))}
            assert got == want
            chat_want = want | {("chat.completed", chat_id), ("response.incomplete", cut.id)}
            until(lambda: len(receiver.received("/configured")) >= 5, "five to /configured")
            events = [verified(alice, d, SECRET) for d in receiver.received("/configured")]
            assert {(e.type, e.data.id) for e in events} == chat_want
            assert all(e.object == "event" and e.created_at > 0 for e in events)
            assert all(d.headers["webhook-id"] == e.id for d, e in
                       zip(receiver.received("/configured"), events, strict=True))
            with pytest.raises(openai.InvalidWebhookSignatureError):
                verified(alice, receiver.received("/made")[0], SECRET)  # other endpoint's key

            deleted = alice.webhooks.delete(made.id)
            assert deleted.deleted is True
            with pytest.raises(openai.ConflictError):
                alice.webhooks.delete(next(e.id for e in listed if e.id != made.id))
            after = alice.responses.create(input=f"after {uuid.uuid4().hex}", background=True)
            until(lambda: any(verified(alice, d, SECRET).data.id == after.id
                              for d in receiver.received("/configured")), "the last event")
            assert len(receiver.received("/made")) == 3  # the deleted endpoint got nothing


def test_receiver_down_then_up_gets_every_event(stack_factory: StackFactory) -> None:
    receiver = servers.WebhookReceiver()  # not listening yet: connections are refused
    stack = stack_factory("redis", CHATQ_WEBHOOK_ALLOW_PRIVATE="true",
                          CHATQ_WEBHOOK_ENDPOINTS=configured(receiver.url()), **FAST_RETRIES)
    with sdk(stack) as client:
        ids = [client.responses.create(input=f"q{i} {uuid.uuid4().hex}", background=True).id
               for i in range(5)]
        until(lambda: all(client.responses.retrieve(i).status == "completed" for i in ids),
              "five completed responses")
        time.sleep(3)  # several attempts fail meanwhile
        with receiver:
            until(lambda: len({d.headers["webhook-id"] for d in receiver.received()}) >= 5,
                  "every event after the receiver came back")
            events = [verified(client, d, SECRET) for d in receiver.received()]
    assert {e.data.id for e in events} == set(ids)
    with stack.client() as http:
        assert http.get("/v1/webhook_endpoints/dead_letters").json()["data"] == []


def test_private_and_redirecting_targets_are_refused(stack_factory: StackFactory) -> None:
    with servers.WebhookReceiver() as receiver:
        receiver.redirects["/moved"] = receiver.url("/target")
        guarded = stack_factory("redis", CHATQ_WEBHOOK_ENDPOINTS=configured(receiver.url()),
                                **FAST_RETRIES)
        with sdk(guarded) as client:
            for url in (receiver.url(), f"http://localhost:{receiver.port}/",
                        "http://169.254.169.254/latest/meta-data", "ftp://example.com/"):
                with pytest.raises(openai.BadRequestError) as refused:
                    client.webhooks.create(url=url, name="x", event_types=["response.completed"])
                assert refused.value.body["param"] == "url"  # type: ignore[index]
            with pytest.raises(openai.BadRequestError):
                client.webhooks.create(url="https://example.com/", name="x",
                                       event_types=["nope.happened"])  # type: ignore[list-item]
            done = client.responses.create(input=f"guarded {uuid.uuid4().hex}", background=True)
            dead = dead_letter(guarded, done.id)
            assert "refused" in dead["last_error"] and dead["attempts"] == 1
            assert dead["event_type"] == "response.completed"
        assert receiver.received() == []  # never called
        guarded.close()  # one configuration per Redis: the next stack shares this one

        moved = stack_factory("redis", CHATQ_WEBHOOK_ALLOW_PRIVATE="true",
                              CHATQ_WEBHOOK_ENDPOINTS=configured(receiver.url("/moved")),
                              **FAST_RETRIES)
        with sdk(moved) as client:
            done = client.responses.create(input=f"moved {uuid.uuid4().hex}", background=True)
            dead = dead_letter(moved, done.id)
        assert "redirect" in dead["last_error"]
        assert [d.path for d in receiver.received()] == ["/moved"]  # /target never requested
