"""The pure pieces of batches: line checks, the status machine, fair shares, lane room."""

from __future__ import annotations

import json

import pytest
from chatq import batches, batchfile, catalog, lanes


def line(custom_id: str = "a", url: str = "/v1/chat/completions", **body: object) -> bytes:
    body = body or {"messages": [{"role": "user", "content": "hi"}]}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body}).encode()


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_checker_finds_lines_across_any_chunking(chunk: int) -> None:
    data = b"\n".join(line(f"id-{i}") for i in range(30)) + b"\n\n" + line("last")  # no final newline
    checker = batchfile.LineChecker(max_bytes=1 << 20, max_lines=100)
    for i in range(0, len(data), chunk):
        checker.feed(data[i:i + chunk])
    checker.finish()
    assert (checker.lines, checker.size, checker.urls) == (31, len(data), {"/v1/chat/completions"})


@pytest.mark.parametrize(("raw", "message"), [
    (b"{", "not valid JSON"),
    (b"[]", "must be a JSON object"),
    (line(""), "custom_id must be a non-empty string"),
    (line("x" * 600), "longer than 512"),
    (json.dumps({"custom_id": "a", "method": "PUT", "url": "/v1/responses", "body": {}}).encode(),
     'method must be "POST"'),
    (line(url="/v1/embeddings"), "is not one of"),
    (line(messages=[{"role": "tool", "content": "x"}]), "role must be"),
    (line(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), "only text content"),
    (line(messages=[{"role": "user", "content": "x"}], temperature=9), "body.temperature"),
    (line(url="/v1/responses", input=[]), "body.input must be a non-empty list"),
])
def test_bad_lines_say_what_is_wrong(raw: bytes, message: str) -> None:
    with pytest.raises(batchfile.BadFile, match=message) as caught:
        batchfile.check_line(raw, 7)
    assert caught.value.line == 7 and str(caught.value).startswith("line 7: ")


def test_duplicates_and_limits() -> None:
    checker = batchfile.LineChecker(max_bytes=1 << 20, max_lines=2)
    with pytest.raises(batchfile.BadFile, match="line 3: custom_id 'a' appears more than once"):
        checker.feed(line("a") + b"\n\n" + line("a") + b"\n")
    checker = batchfile.LineChecker(max_bytes=1 << 20, max_lines=2)
    with pytest.raises(batchfile.TooLarge, match="over 2 requests"):
        checker.feed(b"\n".join(line(str(i)) for i in range(3)) + b"\n")
    checker = batchfile.LineChecker(max_bytes=100, max_lines=2)
    with pytest.raises(batchfile.TooLarge, match="over 100 bytes"):
        checker.feed(b" " * 101)


def test_bodies_become_chat_requests() -> None:
    chat = batchfile.chat_request("/v1/chat/completions", {
        "model": "m", "max_completion_tokens": 5, "top_p": 0.5,
        "messages": [{"role": "developer", "content": "be brief"},
                     {"role": "user", "content": [{"type": "text", "text": "hi"}]}]})
    assert chat.chat_messages() == [{"role": "system", "content": "be brief"},
                                    {"role": "user", "content": "hi"}]
    assert (chat.model, chat.max_tokens) == ("m", 5)
    resp = batchfile.chat_request("/v1/responses", {"input": "hi", "instructions": "terse",
                                                    "max_output_tokens": 9})
    assert resp.chat_messages() == [{"role": "system", "content": "terse"},
                                    {"role": "user", "content": "hi"}]
    assert resp.max_tokens == 9


def batch(**fields: object) -> catalog.BatchRecord:
    base: dict[str, object] = {"id": "batch_1", "owner": "o", "endpoint": "/v1/chat/completions",
                               "input_file_id": "file-1", "status": "in_progress", "total": 10,
                               "expires_at": 100}
    base.update(fields)
    return catalog.BatchRecord.model_validate(base)


@pytest.mark.parametrize(("fields", "now", "action"), [
    ({"status": "validating"}, 0, batches.Action.START),
    ({"fed": 3}, 0, batches.Action.FEED),
    ({"fed": 10, "completed": 6, "failed": 1}, 0, batches.Action.WAIT),
    ({"fed": 10, "completed": 9, "failed": 1}, 0, batches.Action.FINISH),
    ({"fed": 3}, 100, batches.Action.EXPIRE),
    ({"fed": 10, "completed": 10}, 100, batches.Action.EXPIRE),  # late: expired wins
    ({"status": "finalizing"}, 0, batches.Action.WRITE),
    ({"status": "cancelling"}, 0, batches.Action.WRITE),
    ({"status": "cancelled"}, 0, batches.Action.RETIRE),
    ({"status": "completed"}, 0, batches.Action.RETIRE),
])
def test_next_action(fields: dict[str, object], now: int, action: batches.Action) -> None:
    assert batches.next_action(batch(**fields), now) is action


@pytest.mark.parametrize(("free", "wants", "shares"), [
    (4, [("a", "b1", 100, 0), ("b", "b2", 100, 0)], {"b1": 2, "b2": 2}),
    # Key a already has 6 in flight: the room goes to key b until they are level.
    (8, [("a", "b1", 100, 6), ("b", "b2", 100, 0)], {"b1": 1, "b2": 7}),
    # Two batches of one key share that key's half.
    (8, [("a", "b1", 100, 0), ("a", "b3", 100, 0), ("b", "b2", 100, 0)], {"b1": 2, "b3": 2, "b2": 4}),
    # A batch near its end takes only what it has left.
    (8, [("a", "b1", 1, 0), ("b", "b2", 100, 0)], {"b1": 1, "b2": 7}),
    (0, [("a", "b1", 5, 0)], {}),
    (5, [], {}),
])
def test_fair_shares(free: int, wants: list[tuple[str, str, int, int]], shares: dict[str, int]) -> None:
    assert batches.fair_shares(free, wants) == shares


@pytest.mark.parametrize(("room", "flowing", "take"), [(32, False, 10), (32, True, 2), (1, True, 1)])
def test_interactive_take(room: int, flowing: bool, take: int) -> None:
    assert lanes.interactive_take(room, 10, 2, flowing) == take


@pytest.mark.parametrize(("room", "in_flight", "take"), [
    (30, 0, 10), (5, 25, 5), (5, 28, 2), (5, 30, 0), (0, 10, 0)])
def test_batch_take_keeps_the_reserve(room: int, in_flight: int, take: int) -> None:
    assert lanes.batch_take(room, 32, in_flight, 2, 10) == take


def test_result_lines() -> None:
    done = {"id": "j1", "status": "succeeded", "answer": "hello", "model": "m", "created_at": 5.0,
            "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}
    good, out = batches.result_line("c1", "j1", done, "completed")
    assert good and out["response"]["body"]["choices"][0]["message"]["content"] == "hello"
    good, out = batches.result_line("c1", "j1", {**done, "url": "/v1/responses"}, "completed")
    assert good and out["response"]["body"]["output"][0]["content"][0]["text"] == "hello"
    failed = {"id": "j2", "status": "failed", "error": {"code": "model_error_400", "message": "no"}}
    assert batches.result_line("c2", "j2", failed, "completed") == (False, {
        "id": "batch_req_j2", "custom_id": "c2", "response": None,
        "error": {"code": "model_error_400", "message": "no"}})
    _, unfed = batches.result_line("c3", "j3", None, "expired")
    assert unfed["error"]["code"] == "batch_expired"
    _, stopped = batches.result_line("c4", "j4", {"id": "j4", "status": "cancelled"}, "cancelled")
    assert stopped["error"]["code"] == "batch_cancelled"
