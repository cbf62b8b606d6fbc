"""The Responses view of a job: request translation, status, the Response object, events.
Every Response and event is parsed with the openai SDK's own types."""

from __future__ import annotations

from typing import Any

import pytest
from chatq import jobs
from chatq import responses as views
from openai._models import construct_type
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter


def body(**fields: Any) -> views.ResponseCreate:
    return views.ResponseCreate.model_validate({"input": "hi", **fields})


def record(**fields: Any) -> dict[str, Any]:
    return {"id": "ab12", "status": "queued", "owner": "open", "model": "m", "created_at": 10.5,
            "kind": "response", "request": {"messages": [{"role": "user", "content": "hi"}]},
            "view": {"background": True, "store": True}, **fields}


@pytest.mark.parametrize(("response_id", "job_id"), [
    ("resp_ab12", "ab12"), ("resp_", None), ("ab12", None), ("resp_XYZ", None),
    ("resp_" + "a" * 65, None), ("msg_ab12", None),
])
def test_response_ids(response_id: str, job_id: str | None) -> None:
    assert views.job_id_of(response_id) == job_id


@pytest.mark.parametrize(("fields", "param"), [
    ({}, None),
    ({"tools": []}, None),
    ({"tools": [{"type": "web_search"}]}, "tools"),
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"reasoning": {"effort": "low"}}, "reasoning"),
    ({"text": {"format": {"type": "text"}}}, None),
    ({"text": {"format": {"type": "json_schema"}}}, "text"),
    ({"user": "u", "top_p": 0.5, "parallel_tool_calls": False}, None),
    ({"tool_choice": "auto"}, None),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"frobnicate": 1}, "frobnicate"),
    ({"metadata": {str(i): "v" for i in range(17)}}, "metadata"),
])
def test_unsupported_params(fields: dict[str, Any], param: str | None) -> None:
    assert views.unsupported_param(body(**fields)) == param


def test_to_chat_request() -> None:
    request = views.to_chat_request(body(
        input=[{"role": "developer", "content": "terse"},
               {"type": "message", "role": "user",
                "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}]}],
        instructions="sys", max_output_tokens=7, temperature=0.5, metadata={"k": "v"}))
    assert request.chat_messages() == [{"role": "system", "content": "sys"},
                                       {"role": "system", "content": "terse"},
                                       {"role": "user", "content": "ab"}]
    assert (request.max_tokens, request.temperature, request.metadata) == (7, 0.5, {"k": "v"})
    assert views.to_chat_request(body(input="q")).chat_messages() == [{"role": "user", "content": "q"}]


@pytest.mark.parametrize(("given", "problem"), [
    ("   ", "blank"),
    ([{"type": "function_call_output", "output": "x"}], r"input\[0\]: only messages"),
    ([{"role": "tool", "content": "x"}], r"input\[0\]: only messages"),
    ([{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}], "not implemented"),
    ([{"role": "user", "content": ""}], "empty"),
])
def test_to_chat_request_refuses(given: Any, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        views.to_chat_request(body(input=given))


@pytest.mark.parametrize(("status", "finish", "shown"), [
    ("queued", None, "queued"), ("running", None, "in_progress"),
    ("succeeded", "stop", "completed"), ("succeeded", None, "completed"),
    ("succeeded", "length", "incomplete"), ("failed", None, "failed"),
    ("cancelled", None, "cancelled"),
])
def test_status(status: str, finish: str | None, shown: str) -> None:
    assert views.status_of(record(status=status, finish_reason=finish)) == shown


def parse(obj: dict[str, Any]) -> Response:
    return TypeAdapter(Response).validate_python(obj)


def test_view_parses_with_the_sdk_types() -> None:
    done = parse(views.view(record(status="succeeded", answer="hello", finished_at=12.0,
                                   usage={"prompt_tokens": 3, "completion_tokens": 2,
                                          "total_tokens": 5}, metadata={"t": "1"})))
    assert done.status == "completed" and done.output_text == "hello"
    assert done.usage is not None and (done.usage.input_tokens, done.usage.output_tokens) == (3, 2)
    assert done.created_at == 10 and done.completed_at == 12 and done.metadata == {"t": "1"}
    cut = parse(views.view(record(status="succeeded", answer="he", finish_reason="length")))
    assert cut.status == "incomplete" and cut.incomplete_details is not None
    assert cut.incomplete_details.reason == "max_output_tokens" and cut.output_text == "he"
    failed = parse(views.view(record(status="failed", error={"code": "model_rate_limited",
                                                             "message": "busy"})))
    assert failed.error is not None and failed.error.code == "rate_limit_exceeded"
    assert failed.output == [] and failed.usage is None


def stream(*redis: tuple[str, dict[str, Any]], final: dict[str, Any]) -> list[Any]:
    """What a client sees for these Redis events, parsed by the SDK."""
    mapper = views.EventMapper(record())
    events = mapper.opening()
    for kind, data in redis:
        events += mapper.feed(kind, data, final if kind == "done" else None)
    return [construct_type(type_=ResponseStreamEvent, value=e) for e in events]


DONE = record(status="succeeded", answer="ab", usage={"prompt_tokens": 1, "completion_tokens": 2})


def test_events_of_a_plain_answer() -> None:
    events = stream(("attempt", {"attempt": 1}), ("delta", {"text": "a"}), ("delta", {"text": "b"}),
                    ("done", {"status": "succeeded"}), final=DONE)
    assert [e.type for e in events] == [
        "response.created", "response.queued", "response.in_progress",
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].response.output_text == "ab" and events[7].text == "ab"
    assert events[0].response.status == "queued" and events[2].response.status == "in_progress"


def test_a_retry_before_text_is_invisible_and_after_text_opens_a_new_item() -> None:
    quiet = stream(("attempt", {}), ("attempt", {}), ("delta", {"text": "ab"}),
                   ("done", {}), final=DONE)
    assert sum(e.type == "response.output_item.added" for e in quiet) == 1
    loud = stream(("attempt", {}), ("delta", {"text": "x"}), ("attempt", {}),
                  ("delta", {"text": "ab"}), ("done", {}), final=DONE)
    added = [e for e in loud if e.type == "response.output_item.added"]
    assert [e.output_index for e in added] == [0, 1]
    abandoned = next(e for e in loud if e.type == "response.output_item.done")
    assert abandoned.item.status == "incomplete" and abandoned.item.content == []
    final = loud[-1].response
    assert final.output_text == "ab" and [i.status for i in final.output] == ["incomplete",
                                                                              "completed"]
    second = [e for e in loud if e.type == "response.output_text.delta"][1]
    assert second.item_id == final.output[1].id and second.output_index == 1


@pytest.mark.parametrize(("final", "last"), [
    (record(status="cancelled"), "response.cancelled"),
    (record(status="failed", error={"code": "model_timeout", "message": "slow"}), "response.failed"),
    (record(status="succeeded", answer="a", finish_reason="length"), "response.incomplete"),
])
def test_terminal_events(final: dict[str, Any], last: str) -> None:
    events = stream(("attempt", {}), ("delta", {"text": "a"}), ("done", {}), final=final)
    snapshot = events[-1].response
    # The SDK has no type for response.cancelled: its response stays a plain dict there.
    status = snapshot["status"] if isinstance(snapshot, dict) else snapshot.status
    assert events[-1].type == last and status == last.split(".")[1]
    assert stream(("done", {}), ("delta", {"text": "late"}), final=final)[-1].type == last


def test_replay_is_deterministic() -> None:
    events = [("attempt", {}), ("delta", {"text": "a"}), ("done", {})]
    first = stream(*events, final=DONE)
    assert [(e.type, e.sequence_number) for e in first] == [
        (e.type, e.sequence_number) for e in stream(*events, final=DONE)]
    assert jobs.Status("succeeded").terminal
