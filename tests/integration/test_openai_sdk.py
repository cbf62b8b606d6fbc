"""The official `openai` Python SDK as a chatq client of the Responses API, on both queue
backends: api and worker as real processes, llmsim as the model.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx
import openai
import pytest
from chatq import llmsim
from openai.types.responses import Response

from tests.conftest import BACKENDS, Stack, StackFactory

pytestmark = pytest.mark.parametrize("backend", BACKENDS)


def sdk(stack: Stack, key: str = "none") -> openai.OpenAI:
    """The SDK pointed at chatq: only base_url changes."""
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=key, max_retries=0, timeout=30)


def unique(text: str) -> str:
    return f"{text} [{uuid.uuid4().hex[:8]}]"


def wait_status(client: openai.OpenAI, response_id: str, *statuses: str,
                timeout: float = 40) -> Response:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        resp = client.responses.retrieve(response_id)
        if resp.status in statuses:
            return resp
        time.sleep(0.05)
    raise AssertionError(f"{response_id} never reached {statuses}: last {resp.status}")


def test_background_create_then_retrieve(stack_factory: StackFactory, backend: str) -> None:
    stack = stack_factory(backend)
    with sdk(stack) as client:
        created = client.responses.create(model="chatq-sim-1", input=unique("Why is the sky blue?"),
                                          background=True, metadata={"ticket": "42"})
        assert isinstance(created, Response)
        assert created.id.startswith("resp_") and created.status == "queued"
        assert created.background is True and created.output == []
        done = wait_status(client, created.id, "completed", "failed")
        assert done.status == "completed", done.error
        assert done.output_text.startswith(llmsim.PREFIX)
        assert done.usage is not None and done.usage.output_tokens == 12
        assert done.usage.total_tokens == done.usage.input_tokens + 12
        assert done.model == "chatq-sim-1" and done.metadata == {"ticket": "42"}
        assert done.completed_at is not None and done.completed_at >= done.created_at
        message = done.output[0]
        assert message.type == "message" and message.role == "assistant"
        assert message.content[0].type == "output_text"

        # Without background the call waits for the answer; a list of messages works too.
        sync = client.responses.create(
            input=[{"role": "developer", "content": "Be brief."},
                   {"role": "user", "content": [{"type": "input_text", "text": unique("hi")}]}],
            instructions="You are chatq.", max_output_tokens=5, temperature=0.2)
        # Cut at max_output_tokens: the model's finish_reason "length" shows as incomplete.
        assert sync.status == "incomplete" and sync.usage is not None
        assert sync.incomplete_details is not None
        assert sync.incomplete_details.reason == "max_output_tokens"
        assert sync.usage.output_tokens == 5 and sync.instructions == "You are chatq."
        assert sync.max_output_tokens == 5 and sync.temperature == 0.2
        assert client.responses.retrieve(sync.id).output_text == sync.output_text

        # store=false: answered, then gone.
        unstored = client.responses.create(input=unique("forget me"), store=False)
        assert unstored.status == "completed" and unstored.output_text
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(unstored.id)
        with pytest.raises(openai.BadRequestError) as bad:
            client.responses.create(input="x", background=True, store=False)
        assert bad.value.body["param"] == "store"  # type: ignore[index]


def test_stream_and_resume_with_starting_after(stack_factory: StackFactory, backend: str) -> None:
    stack = stack_factory(backend)
    with sdk(stack) as client:
        events = list(client.responses.create(input=unique("stream"), stream=True,
                                              background=True))
        types = [e.type for e in events]
        assert types[:3] == ["response.created", "response.queued", "response.in_progress"]
        assert types[3:5] == ["response.output_item.added", "response.content_part.added"]
        assert types[-4:] == ["response.output_text.done", "response.content_part.done",
                              "response.output_item.done", "response.completed"]
        assert [e.sequence_number for e in events] == list(range(len(events)))
        deltas = [e for e in events if e.type == "response.output_text.delta"]
        assert deltas and all(d.item_id == deltas[0].item_id and d.output_index == 0
                              and d.content_index == 0 for d in deltas)
        final = events[-1].response  # type: ignore[union-attr]
        assert "".join(d.delta for d in deltas) == final.output_text
        assert final.output_text == client.responses.retrieve(final.id).output_text

        # Cut a slow stream after a few deltas, resume after the last sequence number seen.
        first: list[Any] = []
        with client.responses.create(
                input=unique("slow llmsim:itl_ms=120 llmsim:tokens=15"),
                stream=True, background=True) as cut:
            for event in cut:
                first.append(event)
                if sum(e.type == "response.output_text.delta" for e in first) == 3:
                    break
        rid = first[0].response.id
        rest = list(client.responses.retrieve(rid, stream=True,
                                              starting_after=first[-1].sequence_number))
        seqs = [e.sequence_number for e in first + rest]
        assert seqs == list(range(len(seqs))), "no event lost or repeated across the resume"
        text = "".join(e.delta for e in first + rest if e.type == "response.output_text.delta")
        assert rest[-1].type == "response.completed"
        assert text == rest[-1].response.output_text == client.responses.retrieve(rid).output_text
        # Resuming from the start replays the same events; after the end, nothing.
        again = list(client.responses.retrieve(rid, stream=True, starting_after=-1))
        assert [e.type for e in again] == [e.type for e in first + rest]
        assert list(client.responses.retrieve(rid, stream=True,
                                              starting_after=seqs[-1])) == []

        # The SDK's own stream helper accumulates our events into its final response.
        with client.responses.stream(model="chatq-sim-1", input=unique("helper")) as helper:
            assert helper.get_final_response().output_text.startswith(llmsim.PREFIX)


def test_cancel_mid_answer_and_delete(stack_factory: StackFactory, backend: str) -> None:
    stack = stack_factory(backend)
    with sdk(stack) as client:
        slow = client.responses.create(
            input=unique("long llmsim:ttft_ms=200 llmsim:itl_ms=200 llmsim:tokens=40"),
            background=True)
        with client.responses.retrieve(slow.id, stream=True) as stream:
            for event in stream:
                if event.type == "response.output_text.delta":
                    break  # the model is answering
        cancelled = client.responses.cancel(slow.id)
        assert cancelled.status == "cancelled" and cancelled.output == []
        assert client.responses.cancel(slow.id).status == "cancelled"  # idempotent
        events = list(client.responses.retrieve(slow.id, stream=True))
        assert events[-1].type == "response.cancelled"
        # The SDK has no type for response.cancelled, so its response stays a dict.
        assert events[-1].response["status"] == "cancelled"  # type: ignore[union-attr,index]
        time.sleep(2)  # past a heartbeat: the worker stopped the model and wrote nothing
        after = client.responses.retrieve(slow.id)
        assert after.status == "cancelled" and after.output == [] and after.usage is None

        done = client.responses.create(input=unique("quick"))
        assert done.status == "completed"
        assert client.responses.cancel(done.id).status == "completed"  # finished: unchanged
        client.responses.delete(done.id)
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(done.id)
        with pytest.raises(openai.NotFoundError):
            client.responses.delete(done.id)
        # Deleting an unfinished response cancels it first.
        queued = client.responses.create(input=unique("never llmsim:ttft_ms=3000"),
                                         background=True)
        client.responses.delete(queued.id)
        with pytest.raises(openai.NotFoundError):
            client.responses.cancel(queued.id)


def test_model_429_is_retried_and_completes(stack_factory: StackFactory, backend: str) -> None:
    stack = stack_factory(backend)
    with sdk(stack) as client:
        events = list(client.responses.create(input=unique("busy llmsim:fail=429 llmsim:times=2"),
                                              background=True, stream=True))
        assert events[-1].type == "response.completed"
        final = events[-1].response  # type: ignore[union-attr]
        assert final.output_text.startswith(llmsim.PREFIX) and len(final.output) == 1
        # A retry before any text is invisible: one message item, numbers without gaps.
        assert sum(e.type == "response.output_item.added" for e in events) == 1
        assert [e.sequence_number for e in events] == list(range(len(events)))
        # A retry after text was streamed: the abandoned item is closed, the answer restarts
        # in the next output_index, and GET shows only the final message.
        flaky = list(client.responses.create(
            input=unique("flaky llmsim:fail=midstream llmsim:times=1 llmsim:itl_ms=60 "
                         "llmsim:tokens=10"), background=True, stream=True))
        assert [e.output_index for e in flaky if e.type == "response.output_item.added"] == [0, 1]
        abandoned = next(e for e in flaky if e.type == "response.output_item.done")
        assert abandoned.output_index == 0 and abandoned.item.status == "incomplete"
        assert [e.sequence_number for e in flaky] == list(range(len(flaky)))
        final = flaky[-1].response  # type: ignore[union-attr]
        second = "".join(e.delta for e in flaky
                         if e.type == "response.output_text.delta" and e.output_index == 1)
        assert flaky[-1].type == "response.completed" and final.output_text == second
        kept = client.responses.retrieve(final.id)
        assert kept.output_text == second and len(kept.output) == 1

        failed = client.responses.create(input=unique("down llmsim:fail=500"), background=True)
        gone = wait_status(client, failed.id, "failed", "completed")
        assert gone.status == "failed" and gone.error is not None
        assert gone.error.code == "server_error" and "model_server_error" in gone.error.message


def test_errors_auth_and_isolation(stack_factory: StackFactory, backend: str) -> None:
    stack = stack_factory(backend, CHATQ_API_KEYS="alice,bob")
    with sdk(stack, "alice") as alice, sdk(stack, "bob") as bob, sdk(stack, "eve") as eve:
        with pytest.raises(openai.NotFoundError) as missing:
            alice.responses.retrieve("resp_0123456789abcdef")
        assert missing.value.body == {"message": "No response found with id "  # type: ignore[comparison-overlap]
                                      "'resp_0123456789abcdef'.",
                                      "type": "invalid_request_error", "param": None,
                                      "code": "not_found"}
        with pytest.raises(openai.NotFoundError):
            alice.responses.retrieve("not-an-id")
        mine = alice.responses.create(input=unique("mine"), background=True)
        with pytest.raises(openai.NotFoundError):
            bob.responses.retrieve(mine.id)  # another key: as if it did not exist
        with pytest.raises(openai.NotFoundError):
            bob.responses.cancel(mine.id)
        with pytest.raises(openai.AuthenticationError):
            eve.responses.create(input="hi")
        with pytest.raises(openai.BadRequestError) as tools:
            alice.responses.create(input="hi", tools=[{"type": "web_search"}])
        assert tools.value.body["param"] == "tools"  # type: ignore[index]
        with pytest.raises(openai.BadRequestError) as bad:
            alice.responses.create(input="hi", temperature=7)
        assert bad.value.body["type"] == "invalid_request_error"  # type: ignore[index]
        assert wait_status(alice, mine.id, "completed").output_text
    # A chat job is not a response, and the chat routes keep chatq's own error shape.
    with httpx.Client(base_url=stack.url, headers={"Authorization": "Bearer alice"}) as http:
        job = http.post("/v1/chat", json={"message": "hi"}).json()["id"]
        assert http.get(f"/v1/responses/resp_{job}").status_code == 404
        assert http.get("/v1/chat/nope").json()["error"]["code"] == "not_found"


def test_seed_routes(stack_factory: StackFactory, backend: str) -> None:
    stack = stack_factory(backend)
    with stack.client() as http:
        posted = http.post("/question", json={"message": unique("seed question")})
        assert posted.status_code == 202 and posted.json()["status"] == "queued"
        answer = http.post("/answer", json={"id": posted.json()["id"], "wait": 20}).json()
        assert answer["status"] == "succeeded" and answer["answer"].startswith(llmsim.PREFIX)
        assert http.post("/answer", json={"id": "ffff"}).status_code == 404
        assert http.post("/answer", json={}).status_code == 422
        spec = http.get("/openapi.json").json()
        assert spec["paths"]["/question"]["post"]["tags"] == ["seed routes"]
        assert spec["paths"]["/answer"]["post"]["tags"] == ["seed routes"]
