"""The pure parts of jobs: validation, fingerprint, message encoding, backoff."""

from __future__ import annotations

import pytest
from chatq import errors, jobs
from pydantic import ValidationError


@pytest.mark.parametrize("body", [
    {"message": "hi"},
    {"messages": [{"role": "user", "content": "hi"}]},
    {"message": "hi", "model": "m", "system": "be brief", "temperature": 0.5, "max_tokens": 5,
     "metadata": {"k": "v"}},
])
def test_valid_requests(body: dict[str, object]) -> None:
    req = jobs.ChatRequest.model_validate(body)
    assert req.chat_messages()[-1] == {"role": "user", "content": "hi"}


@pytest.mark.parametrize(("body", "problem"), [
    ({}, "exactly one"),
    ({"message": "a", "messages": [{"role": "user", "content": "b"}]}, "exactly one"),
    ({"message": ""}, "at least 1"),
    ({"message": "   "}, "blank"),
    ({"message": 5}, "valid string"),
    ({"messages": []}, "at least 1"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "role"),
    ({"message": "a", "temperature": 3}, "less than or equal"),
    ({"message": "a", "unknown": 1}, "Extra inputs"),
    ({"message": "a", "metadata": {str(i): "v" for i in range(17)}}, "at most 16"),
])
def test_invalid_requests(body: dict[str, object], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        jobs.ChatRequest.model_validate(body)


def test_system_prompt_comes_first() -> None:
    req = jobs.ChatRequest(message="q", system="s")
    assert req.chat_messages() == [{"role": "system", "content": "s"},
                                   {"role": "user", "content": "q"}]


def test_fingerprint_ignores_key_order_and_defaults() -> None:
    a = jobs.ChatRequest.model_validate({"message": "q", "temperature": 0.1})
    b = jobs.ChatRequest.model_validate({"temperature": 0.1, "message": "q", "model": None})
    c = jobs.ChatRequest.model_validate({"message": "q", "temperature": 0.2})
    assert jobs.fingerprint(a) == jobs.fingerprint(b)
    assert jobs.fingerprint(a) != jobs.fingerprint(c)


def test_job_ids_are_unique_hex_and_time_ordered() -> None:
    ids = [jobs.new_job_id() for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    assert ids[0][:12] <= ids[-1][:12]  # the leading 48 bits are milliseconds


def test_message_round_trip() -> None:
    body = jobs.encode_message("abc123", now=10.5)
    msg = jobs.decode_message(body)
    assert (msg.job_id, msg.enqueued_at) == ("abc123", 10.5)


@pytest.mark.parametrize("body", ["", "not json", "{}", '{"job_id": "../etc"}', "[1,2]",
                                  '{"job_id": "ab", "enqueued_at": "soon"}'])
def test_malformed_messages_are_permanent(body: str) -> None:
    with pytest.raises(errors.MalformedMessage):
        jobs.decode_message(body)


@pytest.mark.parametrize(("attempt", "retry_after", "jitter", "expected"), [
    (1, None, 0.0, 0.25),    # half of base, no jitter
    (1, None, 0.5, 0.375),   # jitter spreads over the upper half
    (2, None, 0.0, 0.5),
    (3, None, 0.0, 1.0),
    (10, None, 0.0, 15.0),   # capped: min(30, 0.5 * 2^9) = 30, half of it
    (10, None, 1.0, 30.0),
    (1, 2.0, 0.0, 2.0),      # retry-after is a floor
    (3, 0.1, 0.0, 1.0),      # but never shortens our own backoff
    (1, 100.0, 0.0, 30.0),   # and never passes the cap
])
def test_backoff(attempt: int, retry_after: float | None, jitter: float, expected: float) -> None:
    assert jobs.backoff_delay(attempt, 0.5, 30.0, retry_after, jitter) == pytest.approx(expected)


def test_statuses() -> None:
    assert {s for s in jobs.Status if s.terminal} == {
        jobs.Status.SUCCEEDED, jobs.Status.FAILED, jobs.Status.CANCELLED}
