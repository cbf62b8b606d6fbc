"""The Files and Batch APIs end to end, with the official openai SDK as the client.

Real processes throughout: redis-server, ElasticMQ, moto's S3 server, llmsim, chatq's api
and workers. Batches run on both queue backends and both file stores; bad files are
refused with the line that is wrong; cancel and expiry keep what finished; every process
is killed mid-batch and restarted; interactive questions are answered while a batch runs;
two keys' batches progress together.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
from chatq import llmsim

from tests.conftest import Stack, StackFactory, s3_env

pytestmark = pytest.mark.integration


def sdk(stack: Stack, key: str = "") -> openai.OpenAI:
    """The official client, pointed at chatq."""
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=key or "none", max_retries=0,
                         timeout=60)


def batch_file(count: int, url: str = "/v1/chat/completions", prompt: str = "question",
               start: int = 0) -> bytes:
    """A JSONL batch input of `count` request lines."""
    lines = []
    for i in range(start, start + count):
        text = f"{prompt} {i}"
        body: dict[str, Any] = ({"model": "chatq-sim-1", "messages": [{"role": "user", "content": text}]}
                                if url == "/v1/chat/completions"
                                else {"model": "chatq-sim-1", "input": text})
        lines.append(json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": url,
                                 "body": body}))
    return ("\n".join(lines) + "\n").encode()


def wait_batch(client: openai.OpenAI, batch_id: str, until: Callable[[Any], bool],
               timeout: float = 120, what: str = "the batch to finish") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if until(batch):
            return batch
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {batch}")
        time.sleep(0.2)


def finished(batch: Any) -> bool:
    return batch.status in ("completed", "failed", "expired", "cancelled")


def jsonl(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines() if line]


def run_batch(client: openai.OpenAI, data: bytes, endpoint: str = "/v1/chat/completions",
              **extra: Any) -> Any:
    uploaded = client.files.create(file=("questions.jsonl", data), purpose="batch")
    return client.batches.create(input_file_id=uploaded.id, endpoint=endpoint,  # type: ignore[arg-type]
                                 completion_window="24h", **extra)


STORES = ["local", "s3"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", ["redis", "sqs"])
@pytest.mark.parametrize("store", STORES)
def test_thousand_line_batch_end_to_end(stack_factory: StackFactory, request: pytest.FixtureRequest,
                                        backend: str, store: str) -> None:
    env = s3_env(request.getfixturevalue("s3")) if store == "s3" else {}
    stack = stack_factory(backend, workers=2, **env)
    client = sdk(stack)
    data = batch_file(1000, prompt="llmsim:ttft_ms=1 llmsim:tokens=3")
    uploaded = client.files.create(file=("questions.jsonl", data), purpose="batch")
    assert (uploaded.object, uploaded.purpose, uploaded.bytes, uploaded.filename) == (
        "file", "batch", len(data), "questions.jsonl")
    assert client.files.retrieve(uploaded.id).id == uploaded.id
    assert client.files.content(uploaded.id).content == data
    assert uploaded.id in [f.id for f in client.files.list()]

    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"run": "e2e"})
    assert batch.status == "validating" and batch.metadata == {"run": "e2e"}
    assert batch.expires_at is not None and batch.expires_at >= batch.created_at + 86000
    seen_counts = []
    done = wait_batch(client, batch.id, lambda b: seen_counts.append(b.request_counts.completed)
                      or finished(b), timeout=240)
    assert done.status == "completed", done
    assert done.request_counts.total == 1000 and done.request_counts.completed == 1000
    assert done.request_counts.failed == 0 and done.error_file_id is None
    assert done.in_progress_at and done.finalizing_at and done.completed_at
    assert done.created_at <= done.in_progress_at <= done.finalizing_at <= done.completed_at
    assert seen_counts == sorted(seen_counts)  # counts only go up

    output = jsonl(client, done.output_file_id)
    assert sorted(line["custom_id"] for line in output) == sorted(f"req-{i}" for i in range(1000))
    first = output[0]
    assert first["error"] is None and first["response"]["status_code"] == 200
    body = first["response"]["body"]
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"].startswith(llmsim.PREFIX)
    assert body["usage"]["completion_tokens"] > 0
    # The same answer a /v1/chat question with that text gets: it is the same kind of job.
    out_file = client.files.retrieve(done.output_file_id)
    assert out_file.purpose == "batch_output" and out_file.bytes > 0
    assert [b.id for b in client.batches.list(limit=5)] == [batch.id]

    client.files.delete(uploaded.id)
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)


def test_responses_endpoint_lines(stack_factory: StackFactory) -> None:
    stack = stack_factory("redis")
    client = sdk(stack)
    batch = run_batch(client, batch_file(20, url="/v1/responses"), endpoint="/v1/responses")
    done = wait_batch(client, batch.id, finished)
    assert done.status == "completed" and done.request_counts.completed == 20
    body = jsonl(client, done.output_file_id)[0]["response"]["body"]
    assert body["object"] == "response" and body["status"] == "completed"
    assert body["output"][0]["content"][0]["text"].startswith(llmsim.PREFIX)


GOOD = (b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": '
        b'{"messages": [{"role": "user", "content": "hi"}]}}')


@pytest.mark.parametrize(("lines", "expected"), [
    ([GOOD, b'{"custom_id": "b", '], "line 2: not valid JSON"),
    ([GOOD, GOOD], "line 2: custom_id 'a' appears more than once"),
    ([b'{"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {}}'],
     "line 1: url '/v1/embeddings' is not one of"),
    ([b'{"custom_id": "a", "method": "GET", "url": "/v1/chat/completions", "body": {}}'],
     'line 1: method must be "POST"'),
    ([b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": []}}'],
     "line 1: body.messages must be a non-empty list"),
    ([b"", b""], "no request lines"),
])
def test_bad_files_are_refused_with_the_line(stack_factory: StackFactory, lines: list[bytes],
                                             expected: str) -> None:
    stack = stack_factory("redis", workers=0)
    client = sdk(stack)
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=("bad.jsonl", b"\n".join(lines) + b"\n"), purpose="batch")
    error = caught.value.body
    assert isinstance(error, dict) and expected in error["message"], error
    assert error["type"] == "invalid_request_error"
    assert list(client.files.list()) == []  # nothing was kept


def test_limits_and_wrong_use(stack_factory: StackFactory) -> None:
    stack = stack_factory("redis", workers=0, CHATQ_FILES_MAX_BYTES="200000",
                          CHATQ_FILES_MAX_LINES="100")
    client = sdk(stack)
    with pytest.raises(openai.APIStatusError) as caught:  # streamed past the limit
        client.files.create(file=("big.jsonl", batch_file(2000)), purpose="batch")
    assert caught.value.status_code == 413 and "over 200000 bytes" in caught.value.message
    with pytest.raises(openai.BadRequestError, match="over 100 requests"):
        client.files.create(file=("many.jsonl", batch_file(101)), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="purpose must be"):
        client.files.create(file=("a.jsonl", batch_file(1)), purpose="fine-tune")
    ok = client.files.create(file=("a.jsonl", batch_file(3)), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="every line's url must be the endpoint"):
        client.batches.create(input_file_id=ok.id, endpoint="/v1/responses", completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions",
                              completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_0123")


def test_files_and_batches_are_private_to_their_key(stack_factory: StackFactory) -> None:
    stack = stack_factory("redis", workers=0, CHATQ_API_KEYS="k1,k2")
    one, two = sdk(stack, "k1"), sdk(stack, "k2")
    batch = run_batch(one, batch_file(2))
    mine = batch.input_file_id
    with pytest.raises(openai.NotFoundError):
        two.files.retrieve(mine)
    with pytest.raises(openai.NotFoundError):
        two.files.content(mine)
    with pytest.raises(openai.NotFoundError):
        two.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        two.batches.create(input_file_id=mine, endpoint="/v1/chat/completions", completion_window="24h")
    assert list(two.batches.list()) == [] and list(two.files.list()) == []
    with pytest.raises(openai.AuthenticationError):
        sdk(stack, "wrong").files.list()


def test_batch_list_pages(stack_factory: StackFactory) -> None:
    stack = stack_factory("redis", workers=0)
    client = sdk(stack)
    upload = client.files.create(file=("a.jsonl", batch_file(1)), purpose="batch")
    made = [client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                  completion_window="24h").id for _ in range(5)]
    page = client.batches.list(limit=2)
    assert [b.id for b in page.data] == made[::-1][:2] and page.has_more
    assert [b.id for b in client.batches.list(limit=2, after=made[3]).data] == made[::-1][2:4]
    assert [b.id for b in client.batches.list(limit=2)] == made[::-1]  # auto-paging


def _split(client: openai.OpenAI, batch: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    out, err = jsonl(client, batch.output_file_id), jsonl(client, batch.error_file_id)
    ids = [line["custom_id"] for line in out + err]
    assert sorted(ids) == sorted(set(ids)), "a line is in the files twice"
    assert len(ids) == batch.request_counts.total, "a line is missing from the files"
    return out, err


def test_cancel_keeps_what_finished(stack_factory: StackFactory) -> None:
    stack = stack_factory("redis", CHATQ_WORKER_CONCURRENCY="4", CHATQ_BATCH_RESERVE="0")
    client = sdk(stack)
    batch = run_batch(client, batch_file(200, prompt="slow llmsim:ttft_ms=150"))
    wait_batch(client, batch.id, lambda b: b.request_counts.completed >= 10, what="10 answers")
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
    done = wait_batch(client, batch.id, finished)
    assert done.status == "cancelled" and done.cancelled_at
    out, err = _split(client, done)
    assert 10 <= len(out) < 200 and len(out) == done.request_counts.completed
    assert {line["error"]["code"] for line in err} == {"batch_cancelled"}
    assert all(line["response"]["status_code"] == 200 for line in out)
    other = run_batch(client, batch_file(2))
    wait_batch(client, other.id, finished)
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(other.id)


def test_expiry_keeps_what_finished(stack_factory: StackFactory) -> None:
    stack = stack_factory("redis", CHATQ_WORKER_CONCURRENCY="4", CHATQ_BATCH_RESERVE="0",
                          CHATQ_BATCH_COMPLETION_WINDOW_SECONDS="4")
    client = sdk(stack)
    batch = run_batch(client, batch_file(300, prompt="slow llmsim:ttft_ms=200"))
    done = wait_batch(client, batch.id, finished, timeout=60)
    assert done.status == "expired" and done.expired_at
    out, err = _split(client, done)
    assert 0 < len(out) < 300
    assert {line["error"]["code"] for line in err} == {"batch_expired"}


@pytest.mark.parametrize("backend", ["redis", "sqs"])
def test_everything_killed_mid_batch_finishes_once(stack_factory: StackFactory, backend: str) -> None:
    stack = stack_factory(backend, CHATQ_WORKER_CONCURRENCY="8")
    client = sdk(stack)
    batch = run_batch(client, batch_file(400, prompt="llmsim:ttft_ms=100"))
    wait_batch(client, batch.id, lambda b: b.request_counts.completed >= 60, what="60 answers")
    stack.api.kill()
    for worker in stack.workers:
        worker.kill()
    stack.start_api()
    stack.start_worker()
    client = sdk(stack)
    done = wait_batch(client, batch.id, finished)
    assert done.status == "completed" and done.request_counts.completed == 400
    out = jsonl(client, done.output_file_id)
    assert sorted(line["custom_id"] for line in out) == sorted(f"req-{i}" for i in range(400))


def test_interactive_questions_go_first(stack_factory: StackFactory) -> None:
    # One worker, four slots, one kept for questions; the batch alone would fill them all.
    stack = stack_factory("redis", CHATQ_WORKER_CONCURRENCY="4", CHATQ_BATCH_RESERVE="1")
    client = sdk(stack)
    batch = run_batch(client, batch_file(200, prompt="llmsim:ttft_ms=200"))
    wait_batch(client, batch.id, lambda b: b.request_counts.completed >= 5, what="the batch to run")
    with httpx.Client(base_url=stack.url, timeout=30) as http:
        for i in range(5):
            job = http.post("/v1/chat", json={"message": f"interactive {i}"}).json()["id"]
            answer = http.get(f"/v1/chat/{job}", params={"wait": 20}).json()
            assert answer["status"] == "succeeded", answer
            # Answered while hundreds of batch lines still wait: it did not queue behind them.
            assert client.batches.retrieve(batch.id).request_counts.completed < 150
    done = wait_batch(client, batch.id, finished)
    assert done.status == "completed"


@pytest.mark.timeout(300)
def test_two_keys_progress_together(stack_factory: StackFactory) -> None:
    stack = stack_factory("redis", CHATQ_API_KEYS="ka,kb", CHATQ_WORKER_CONCURRENCY="8",
                          CHATQ_BATCH_RESERVE="0", CHATQ_BATCH_LANE_WINDOW="8")
    a, b = sdk(stack, "ka"), sdk(stack, "kb")
    first = run_batch(a, batch_file(240, prompt="llmsim:ttft_ms=50 llmsim:tokens=2"))
    second = run_batch(b, batch_file(120, prompt="llmsim:ttft_ms=50 llmsim:tokens=2"))
    wait_batch(b, second.id, lambda x: x.request_counts.completed >= 60, what="key b's half")
    ahead = a.batches.retrieve(first.id).request_counts.completed
    behind = b.batches.retrieve(second.id).request_counts.completed
    # First come, first served would finish all 240 of key a before key b's first line.
    assert behind / max(ahead, 1) >= 0.6, (ahead, behind)
    assert wait_batch(a, first.id, finished, timeout=240).status == "completed"


def test_s3_store_reads_from_the_middle(request: pytest.FixtureRequest) -> None:
    """The S3 store writes multipart uploads and reads from any offset (the feeder's resume)."""
    import asyncio

    from chatq import filestore
    from chatq import settings as settings_mod

    server = request.getfixturevalue("s3")
    env = s3_env(server)
    cfg = settings_mod.FilesSettings(store="s3", s3_bucket=env["CHATQ_FILES_S3_BUCKET"],
                                     s3_endpoint=server.url, s3_prefix=env["CHATQ_FILES_S3_PREFIX"])
    data = bytes(range(256)) * (filestore.S3_PART_BYTES // 256 * 2 + 100)

    async def roundtrip() -> tuple[bytes, bytes, bytes]:
        store = filestore.open_store(cfg)
        try:
            writer = await store.writer("big")
            for i in range(0, len(data), 1 << 20):
                await writer.write(data[i:i + (1 << 20)])
            await writer.commit()
            whole = b"".join([c async for c in store.read("big")])
            tail = b"".join([c async for c in store.read("big", len(data) - 1000)])
            end = b"".join([c async for c in store.read("big", len(data))])
            await store.delete("big")
            return whole, tail, end
        finally:
            await store.close()

    import os
    old = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ.update(AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="x")
    try:
        whole, tail, end = asyncio.run(roundtrip())
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert whole == data and tail == data[-1000:] and end == b""



def test_batch_webhooks(stack_factory: StackFactory) -> None:
    from tests import servers

    secret = "whsec_" + base64.b64encode(b"batch-webhook-test-secret-32byte").decode()
    with servers.WebhookReceiver() as receiver:
        stack = stack_factory("redis", CHATQ_WEBHOOK_ALLOW_PRIVATE="true",
                              CHATQ_WEBHOOK_ENDPOINTS=json.dumps([{"key": "", "url": receiver.url(),
                                                                   "secret": secret}]))
        client = sdk(stack)
        done = run_batch(client, batch_file(5))
        stopped = run_batch(client, batch_file(100, prompt="llmsim:ttft_ms=300"))
        client.batches.cancel(stopped.id)
        assert wait_batch(client, done.id, finished).status == "completed"
        assert wait_batch(client, stopped.id, finished).status == "cancelled"
        deadline = time.monotonic() + 30
        events: dict[str, str] = {}
        while len(events) < 2 and time.monotonic() < deadline:
            for delivery in receiver.received():
                event = client.webhooks.unwrap(delivery.body, delivery.headers, secret=secret)
                events[event.data.id] = event.type
            time.sleep(0.2)
        # One event per batch's end, none per line (the lines are no chat jobs).
        assert events == {done.id: "batch.completed", stopped.id: "batch.cancelled"}, events
