"""Webhooks' pure parts: signatures (checked by the openai SDK), the SSRF guard, URLs,
event types, the retry window, endpoints from configuration."""

from __future__ import annotations

import json

import openai
import pytest
from chatq import settings as settings_mod
from chatq import webhooks
from chatq.api import deps


def test_signature_verifies_with_the_sdk() -> None:
    secret = webhooks.new_secret()
    body = webhooks.payload("evt_1", "response.completed", "resp_ab", 1_700_000_000)
    head = webhooks.headers(secret, "evt_1", body)
    event = openai.OpenAI(api_key="x").webhooks.unwrap(body, head, secret=secret)
    assert event.type == "response.completed" and event.data.id == "resp_ab"
    assert json.loads(body) == {"id": "evt_1", "object": "event", "created_at": 1_700_000_000,
                                "type": "response.completed", "data": {"id": "resp_ab"}}
    with pytest.raises(openai.InvalidWebhookSignatureError):
        openai.OpenAI(api_key="x").webhooks.unwrap(body + " ", head, secret=secret)


def test_signature_is_standard_webhooks_v1() -> None:
    # The Standard Webhooks specification's own example.
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = '{"test": 2432232314}'
    assert webhooks.sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body) == \
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


@pytest.mark.parametrize(("address", "public_only", "with_private"), [
    ("93.184.216.34", True, True),
    ("127.0.0.1", False, True), ("::1", False, True), ("10.1.2.3", False, True),
    ("172.16.0.1", False, True), ("192.168.1.1", False, True),
    ("169.254.169.254", False, True), ("fe80::1", False, True), ("fd00::1", False, True),
    ("100.64.0.1", False, True), ("::ffff:127.0.0.1", False, True),
    ("0.0.0.0", False, False), ("224.0.0.1", False, False), ("not-an-ip", False, False),
    ("2606:4700::1111", True, True),
])
def test_address_guard(address: str, public_only: bool, with_private: bool) -> None:
    assert webhooks.address_allowed(address, allow_private=False) is public_only
    assert webhooks.address_allowed(address, allow_private=True) is with_private


@pytest.mark.parametrize(("url", "problem"), [
    ("https://example.com/hook", None), ("http://example.com:8080/x?y=1", None),
    ("ftp://example.com/", "http or https"), ("https:///nohost", "no host"),
    ("https://user:pw@example.com/", "credentials"), ("http://example.com:99999/", "not a URL"),
])
def test_url_problems(url: str, problem: str | None) -> None:
    found = webhooks.url_problem(url)
    assert (found is None) if problem is None else (found is not None and problem in found)


@pytest.mark.parametrize(("kind", "status", "finish", "event"), [
    ("response", "succeeded", "stop", "response.completed"),
    ("response", "succeeded", "length", "response.incomplete"),
    ("response", "failed", "", "response.failed"),
    ("response", "cancelled", "", "response.cancelled"),
    ("chat", "succeeded", "", "chat.completed"), ("chat", "failed", "", "chat.failed"),
    ("chat", "cancelled", "", "chat.cancelled"), ("batch", "succeeded", "", None),
    ("response", "running", "", None),
])
def test_event_types(kind: str, status: str, finish: str, event: str | None) -> None:
    assert webhooks.event_type(kind, status, finish) == event


def test_retry_window() -> None:
    cfg = settings_mod.WebhookSettings(retry_base_seconds=5, retry_max_seconds=1800,
                                       max_age_seconds=86400)
    delays = [webhooks.next_attempt_delay(n, cfg, jitter=1.0) for n in range(1, 12)]
    assert delays[:3] == [5, 10, 20] and max(delays) == 1800
    assert [webhooks.next_attempt_delay(1, cfg, jitter=0.0)] == [2.5]
    assert not webhooks.gives_up(0, 3600, 1800, cfg)  # an hour down: still retried
    assert webhooks.gives_up(0, 86000, 1800, cfg)


def test_configured_endpoints() -> None:
    secret = webhooks.new_secret()
    raw = json.dumps([{"key": "alice", "url": "https://a.example/h", "secret": secret},
                      {"url": "https://open.example/h", "secret": secret,
                       "events": ["chat.failed"]}])
    alice, anyone = webhooks.configured_endpoints(settings_mod.WebhookSettings(endpoints=raw))
    assert alice.owner == deps.hash_key("alice")[:32]  # the owner the API derives
    assert anyone.owner == deps.OPEN_OWNER and anyone.event_types == ["chat.failed"]
    assert alice.configured and alice.wants("response.completed")
    assert not anyone.wants("response.completed")
    assert webhooks.owner_of_key("sha256:" + deps.hash_key("alice").upper()) == alice.owner
    assert "signing_secret" not in alice.public() and alice.public(True)["signing_secret"]


@pytest.mark.parametrize(("raw", "problem"), [
    ("{}", "not a list"), ('[{"url": "https://x.example/"}]', "not a list"),
    (json.dumps([{"url": "ftp://x/", "secret": "whsec_AAAA"}]), "http or https"),
    (json.dumps([{"url": "https://x/", "secret": "whsec_AAAA", "events": ["x.y"]}]),
     "unknown event"),
])
def test_configured_endpoints_refused(raw: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        webhooks.configured_endpoints(settings_mod.WebhookSettings(endpoints=raw))
