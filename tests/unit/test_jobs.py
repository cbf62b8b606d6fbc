"""The pure parts of jobs: validation, fingerprint, message encoding, backoff."""

from __future__ import annotations

import json

import pytest
from chatq import errors, jobs
from chatq.api.routes import chat
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


# --- the job record ----------------------------------------------------------------------


def _full_record() -> jobs.JobRecord:
    request = jobs.ChatRequest(message="q", metadata={"k": "v"})
    queued = jobs.JobRecord.queued("ab12", "owner1", request, "m1", simulated=True, now=100.25)
    return queued.model_copy(update={
        "status": jobs.Status.FAILED, "answer": "a", "usage": {"completion_tokens": 3},
        "error": jobs.JobError(code="x", message="y"), "attempts": 2, "started_at": 101.5,
        "finished_at": 102.0, "lease": "w1:t", "lease_expires_at": 130.0, "model_seconds": 0.5})


def test_record_round_trips_through_its_redis_hash() -> None:
    record = _full_record()
    raw = record.to_redis()
    assert all(isinstance(v, str) for v in raw.values())
    assert jobs.JobRecord.from_redis(raw) == record


def test_record_hash_names_and_encodings() -> None:
    raw = _full_record().to_redis()
    # Redis spellings the Lua scripts rely on.
    assert raw["_lease"] == "w1:t" and raw["_lease_expires_at"] == "130.0"
    assert raw["_model_seconds"] == "0.5" and raw["status"] == "failed"
    assert raw["simulated"] == "1" and raw["attempts"] == "2"
    assert json.loads(raw["error"]) == {"code": "x", "message": "y"}
    assert json.loads(raw["request"]) == {"message": "q", "metadata": {"k": "v"}}
    # None is absent, never the string "None".
    assert "answer" not in jobs.JobRecord(id="a", status=jobs.Status.QUEUED).to_redis()


def test_queued_record_uses_the_default_model_and_flags_the_simulator() -> None:
    mine = jobs.JobRecord.queued("a", "o", jobs.ChatRequest(message="q"), "sim", True, now=1.0)
    asked = jobs.JobRecord.queued("a", "o", jobs.ChatRequest(message="q", model="gpt"), "sim",
                                  True, now=1.0)
    assert (mine.model, mine.simulated, mine.status) == ("sim", True, jobs.Status.QUEUED)
    assert (asked.model, asked.simulated) == ("gpt", False)


def test_record_ignores_unknown_hash_fields() -> None:
    raw = {"id": "a", "status": "running", "_lease_until": "123", "someday": "x"}
    assert jobs.JobRecord.from_redis(raw).status is jobs.Status.RUNNING


def test_a_new_field_needs_no_encoding_code() -> None:
    class Extended(jobs.JobRecord):
        finish_reason: str | None = None
        usage_estimated: bool = False
        batch: dict[str, int] | None = None

    record = Extended(id="a", status=jobs.Status.QUEUED, finish_reason="length",
                      usage_estimated=True, batch={"line": 3})
    assert Extended.from_redis(record.to_redis()) == record


def test_the_public_view_shows_every_field_that_is_not_private() -> None:
    # Adding a field to JobRecord means deciding: a client sees it (add it to the view)
    # or not (JobRecord.PRIVATE).
    record_fields = set(jobs.JobRecord.model_fields)
    assert jobs.JobRecord.PRIVATE <= record_fields
    assert set(chat.Job.model_fields) == record_fields - jobs.JobRecord.PRIVATE


def test_the_public_view_renders_times_as_iso_and_hides_private_fields() -> None:
    view = chat.Job.of(_full_record()).model_dump(mode="json")
    assert view["created_at"] == "1970-01-01T00:01:40.250+00:00"
    assert view["error"] == {"code": "x", "message": "y"}
    assert not jobs.JobRecord.PRIVATE & set(view)
    created = chat.JobCreated.of(_full_record()).model_dump(mode="json")
    assert created == {"id": "ab12", "status": "failed",
                       "created_at": "1970-01-01T00:01:40.250+00:00"}


def test_outcome_done_event() -> None:
    outcome = jobs.Outcome(status=jobs.Status.SUCCEEDED, answer="hi", model_seconds=1.0)
    assert outcome.done_event() == {"status": "succeeded", "answer": "hi", "error": None,
                                    "usage": None, "finish_reason": None}
