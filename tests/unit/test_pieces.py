"""Small pure pieces: API key hashing, retry-after parsing, llmsim directives, SSE parsing."""

from __future__ import annotations

import hashlib

import httpx
import openai
import pytest
from chatq import client, errors, llm, llmsim, queues
from chatq.api import deps


def test_keys_are_kept_hashed() -> None:
    digest = hashlib.sha256(b"k2").hexdigest()
    keys = deps.parse_keys(f" k1 , sha256:{digest.upper()},,")
    assert keys == {hashlib.sha256(b"k1").hexdigest(), digest}
    assert "k1" not in keys
    assert deps.parse_keys("") == frozenset()


@pytest.mark.parametrize(("headers", "expected"), [
    ({"retry-after": "2"}, 2.0), ({"retry-after-ms": "250"}, 0.25),
    ({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, None), ({}, None)])
def test_retry_after(headers: dict[str, str], expected: float | None) -> None:
    assert llm.retry_after_seconds(httpx.Headers(headers)) == expected


def _status_error(status: int, headers: dict[str, str] | None = None) -> openai.APIStatusError:
    req = httpx.Request("POST", "http://x/v1/chat/completions")
    resp = httpx.Response(status, headers=headers or {}, request=req,
                          json={"error": {"message": "nope"}})
    return openai.APIStatusError("nope", response=resp, body={"error": {"message": "nope"}})


@pytest.mark.parametrize(("status", "temporary"), [
    (429, True), (500, True), (503, True), (408, True), (400, False), (401, False), (404, False)])
def test_translate_status_errors(status: int, temporary: bool) -> None:
    err = llm.translate(_status_error(status, {"retry-after": "3"}))
    assert isinstance(err, errors.TemporaryError) == temporary
    assert isinstance(err, errors.PermanentError) == (not temporary)
    if status == 429:
        assert isinstance(err, errors.TemporaryError) and err.delay == 3.0
    assert "nope" in str(err)


def test_translate_timeouts_and_connection_errors() -> None:
    req = httpx.Request("POST", "http://x")
    assert isinstance(llm.translate(openai.APITimeoutError(req)), errors.TemporaryError)
    assert isinstance(llm.translate(openai.APIConnectionError(request=req)), errors.TemporaryError)


def test_llmsim_directives_and_answers() -> None:
    msgs = [{"role": "user", "content": "hi llmsim:fail=429 llmsim:times=2"},
            {"role": "assistant", "content": "llmsim:fail=500"}]
    assert llmsim.directives(msgs) == {"fail": "429", "times": "2"}
    tokens = llmsim.answer_tokens(msgs, 5)
    assert len(tokens) == 5 and tokens[0] == llmsim.PREFIX
    assert tokens == llmsim.answer_tokens(msgs, 5)


def test_sse_parsing() -> None:
    lines = ["retry: 1000", "", "id: 1-0", "event: delta", 'data: {"text": "a"}', "",
             ": keep-alive", "", "id: 2-0", "event: done", 'data: {"status": "succeeded"}', "",
             "id: 3-0", "event: delta", 'data: {"text": "never"}', ""]
    events = list(client._parse_sse(iter(lines)))
    assert [(e.id, e.type, e.data) for e in events] == [
        ("1-0", "delta", {"text": "a"}), ("2-0", "done", {"status": "succeeded"})]


def test_depth_rules_of_both_backends() -> None:
    # The one rule the queues, the api's /metrics and the operator share.
    assert queues.sqs_depth({"ApproximateNumberOfMessages": "4",
                             "ApproximateNumberOfMessagesNotVisible": "2"}) == queues.Depth(4, 2)
    assert queues.sqs_depth({}) == queues.Depth(0, 0)
    groups = [{"name": "other", "lag": 9, "pending": 9},
              {"name": "workers", "lag": 3, "pending": 2}]
    assert queues.stream_depth(10, groups, "workers") == queues.Depth(3, 2)
    # After deletions Redis may not know the lag: the stream holds waiting + pending.
    assert queues.stream_depth(7, [{"name": "workers", "lag": None, "pending": 2}],
                               "workers") == queues.Depth(5, 2)
    assert queues.stream_depth(7, [], "workers") == queues.Depth(7, 0)  # no group yet


def test_worker_healthz_fails_while_its_event_loop_is_stuck() -> None:
    # The probe server runs in the worker's loop (chatq.probe): a loop stuck in a blocking
    # call must stop answering, so the kubelet's liveness probe restarts the worker.
    import asyncio
    import threading
    import time

    from chatq import probe

    from tests import servers

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    port = servers.free_port()
    runner = asyncio.run_coroutine_threadsafe(probe.start("127.0.0.1", port), loop).result(10)
    url = f"http://127.0.0.1:{port}"
    try:
        assert httpx.get(f"{url}/healthz", timeout=5).json() == {"status": "ok"}
        metrics = httpx.get(f"{url}/metrics", timeout=5)
        assert metrics.status_code == 200 and "python_info" in metrics.text
        assert httpx.get(f"{url}/nope", timeout=5).status_code == 404
        loop.call_soon_threadsafe(time.sleep, 3.0)  # a blocking call inside the loop
        time.sleep(0.2)
        with pytest.raises(httpx.TimeoutException):
            httpx.get(f"{url}/healthz", timeout=1.0)
        time.sleep(2.5)  # the loop is free again: so is the probe
        assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
