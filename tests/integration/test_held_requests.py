"""Requests held open on one real api process: thousands of pending long-polls and idle SSE
streams, the per-key cap on them, and a client that stops reading its stream.

The held requests wait on jobs that are written but not yet on the queue (so nothing
comes until the test sends their messages): another client must still be served while
they wait, and every one of them must be answered once its job is done. Correctness
only; what they cost (RSS per held request, another client's p99) is bench/held.py's.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time

import httpx
import pytest
from chatq import jobs, results
from chatq import settings as settings_mod
from chatq.api import deps
from chatq.queues import open_queue

from tests.conftest import Stack, StackFactory

POLLS, STREAMS = int(os.environ.get('T_POLLS', 2000)), int(os.environ.get('T_STREAMS', 500))
Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def store_of(stack: Stack) -> results.Store:
    return results.Store.from_settings(
        settings_mod.RedisSettings(url=stack.env["CHATQ_REDIS_URL"]))


async def seed(stack: Stack, n: int, owner: str = "open") -> list[str]:
    """n job records as the api writes them, without their queue messages."""
    store = store_of(stack)
    ids = [jobs.new_job_id() for _ in range(n)]
    request = jobs.ChatRequest(message="held")
    for start in range(0, n, 50):
        await asyncio.gather(*(store.create(jobs.JobRecord.queued(i, owner, request,
                                                                  "chatq-sim-1", True))
                               for i in ids[start:start + 50]))
    await store.close()
    return ids


async def send_messages(stack: Stack, ids: list[str]) -> None:
    settings = settings_mod.Settings(
        redis=settings_mod.RedisSettings(url=stack.env["CHATQ_REDIS_URL"]),
        queue=settings_mod.QueueSettings(name=stack.env["CHATQ_QUEUE_NAME"]))
    queue = open_queue(settings)
    for start in range(0, len(ids), 50):
        await asyncio.gather(*(queue.send(jobs.encode_message(i), {})
                               for i in ids[start:start + 50]))
    await queue.close()


async def hold(stack: Stack, paths: list[str], head_until: bytes = b"", key: str = "",
               batch: int = 100) -> list[Conn]:
    """One raw connection per path with its GET sent, `batch` at once (all of them at once
    stay within uvicorn's listen backlog of 2048); with head_until, read that far."""
    auth = f"Authorization: Bearer {key}\r\n" if key else ""

    async def one(path: str) -> Conn:
        reader, writer = await asyncio.open_connection("127.0.0.1", stack.api.port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: chatq\r\n{auth}\r\n".encode())
        if head_until:
            await asyncio.wait_for(reader.readuntil(head_until), 300)  # a loaded CI box
        return reader, writer

    conns: list[Conn] = []
    for start in range(0, len(paths), batch):
        conns += await asyncio.gather(*(one(p) for p in paths[start:start + batch]))
    return conns


async def answer_of(conn: Conn, until: bytes) -> bytes:
    reader, writer = conn
    try:
        return await asyncio.wait_for(reader.readuntil(until), 600)
    except (asyncio.IncompleteReadError, TimeoutError, OSError) as exc:
        return f"no answer: {exc!r}".encode()
    finally:
        writer.close()


@pytest.mark.timeout(900)
async def test_thousands_held_and_another_client_served(stack_factory: StackFactory) -> None:
    stack = stack_factory("redis", workers=1, CHATQ_API_MAX_WAIT_SECONDS="600",
                          CHATQ_API_KEYS="key-held,key-other",
                          CHATQ_API_MAX_HELD_PER_KEY=str(POLLS + STREAMS),
                          CHATQ_WORKER_CONCURRENCY="64", CHATQ_LOG_LEVEL="WARNING")
    owner = deps.owner_of_entry("key-held")
    poll_ids = await seed(stack, POLLS, owner)
    stream_ids = await seed(stack, STREAMS, owner)
    t0 = time.monotonic()
    # The long-polls in one burst, as clients that all retry at once after an outage.
    polls = await hold(stack, [f"/v1/chat/{i}?wait=600" for i in poll_ids], key="key-held",
                       batch=POLLS)
    # Idle streams whose client reads the head, then nothing.
    streams = await hold(stack, [f"/v1/chat/{i}/events" for i in stream_ids],
                         head_until=b"retry: 1000\n\n", key="key-held")
    print(f"\n{time.monotonic() - t0:.1f}s: {POLLS} long-polls and {STREAMS} streams held")
    async with httpx.AsyncClient(base_url=stack.url, timeout=60) as http:
        # The held key is at its cap: one more is refused, not held...
        held = {"Authorization": "Bearer key-held"}
        for _ in range(100):  # (once the api has taken in every long-poll sent)
            refused = await http.get(f"/v1/chat/{poll_ids[0]}", params={"wait": 1}, headers=held)
            if refused.status_code == 429:
                break
        assert refused.status_code == 429, refused.text
        # ...and another client is served meanwhile: questions asked and long-polled.
        other = {"Authorization": "Bearer key-other"}
        for i in range(3):
            job = (await http.post("/v1/chat", json={"message": f"another client {i}"},
                                   headers=other)).json()
            done = (await http.get(f"/v1/chat/{job['id']}", params={"wait": 60},
                                   headers=other)).json()
            assert done["status"] == "succeeded", done
    print(f"{time.monotonic() - t0:.1f}s: another client served")
    started = time.monotonic()
    await send_messages(stack, poll_ids + stream_ids)
    answers = await asyncio.gather(*(answer_of(c, b'"}') for c in polls))
    ends = await asyncio.gather(*(answer_of(c, b"event: done\n") for c in streams))
    unanswered = [a[:80] for a in answers if b"200 OK" not in a or b'"succeeded"' not in a]
    assert not unanswered, f"{len(unanswered)} of {POLLS} long-polls: {unanswered[:3]}"
    cut = [e[-80:] for e in ends if not e.endswith(b"event: done\n")]
    assert not cut, f"{len(cut)} of {STREAMS} streams never saw done: {cut[:3]}"
    print(f"\n{POLLS} long-polls and {STREAMS} streams answered in "
          f"{time.monotonic() - started:.1f}s once their jobs were sent")


async def held_reaches(http: httpx.AsyncClient, n: int, failure: str) -> None:
    """Wait (30 s at most) for the api's held gauge to read n, else fail with `failure`.
    Async, not servers.poll: that blocks the loop the held requests are sent from."""
    for _ in range(300):
        if f"\nchatq_http_held {n}.0\n" in (await http.get("/metrics")).text:
            return
        await asyncio.sleep(0.1)
    pytest.fail(failure)


async def test_held_requests_are_capped_per_key(stack_factory: StackFactory) -> None:
    stack = stack_factory("redis", workers=0, CHATQ_API_MAX_HELD_PER_KEY="3",
                          CHATQ_API_KEYS="key-a,key-b", CHATQ_API_MAX_WAIT_SECONDS="300")
    ids = await seed(stack, 4)
    bearer_a, bearer_b = ({"Authorization": f"Bearer {k}"} for k in ("key-a", "key-b"))
    # Owned by key-a: the records name the owner digest of key-a.
    store = store_of(stack)
    for i in ids:
        await store.redis.hset(results.job_key(i), "owner", deps.owner_of_entry("key-a"))
    await store.close()
    async with httpx.AsyncClient(base_url=stack.url, timeout=30, headers=bearer_a) as http:
        held = [asyncio.create_task(http.get(f"/v1/chat/{i}", params={"wait": 300}))
                for i in ids[:2]]
        # Held once the api has them (the gauge says so); only then the stream and the one
        # over the cap, so no request of this test races another for the last place.
        await held_reaches(http, 2, f"the two long-polls were never both held: "
                                    f"{[t.done() for t in held]}")
        async with http.stream("GET", f"/v1/chat/{ids[2]}/events") as stream:
            assert stream.status_code == 200
            over = await http.get(f"/v1/chat/{ids[3]}", params={"wait": 0.01})
            assert over.status_code == 429 and over.headers["Retry-After"] == "1", over.text
            assert over.json()["error"]["code"] == "too_many_held"
            sse = await http.get(f"/v1/chat/{ids[3]}/events")
            assert sse.status_code == 429
            # Not held (no wait) and other keys: served as ever.
            assert (await http.get(f"/v1/chat/{ids[3]}")).status_code == 200
            other = await http.get(f"/v1/chat/{ids[3]}", params={"wait": 0.2},
                                   headers=bearer_b)
            assert other.status_code == 404  # key-b's view: not its job, but not refused
        # The stream's end gave its hold back.
        again = await http.get(f"/v1/chat/{ids[3]}", params={"wait": 0.5})
        assert again.status_code == 200 and again.json()["status"] == "queued"
        for task in held:
            task.cancel()


async def hgetall_calls(stack: Stack) -> int:
    store = store_of(stack)
    stats = await store.redis.info("commandstats")
    await store.close()
    return int(stats.get("cmdstat_hgetall", {}).get("calls", 0))


async def test_a_held_request_reads_its_record_once_before_it_waits(
        stack_factory: StackFactory) -> None:
    # What a burst of held requests costs Redis, and so how long each waits on the pool:
    # one record read each (the wait's first read is the route's own), not two.
    stack = stack_factory("redis", workers=0, CHATQ_API_MAX_WAIT_SECONDS="300")
    n = 100
    poll_ids, stream_ids = await seed(stack, n), await seed(stack, n)
    before = await hgetall_calls(stack)
    polls = await hold(stack, [f"/v1/chat/{i}?wait=300" for i in poll_ids])
    streams = await hold(stack, [f"/v1/chat/{i}/events" for i in stream_ids],
                         head_until=b"retry: 1000\n\n")
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as http:
        await held_reaches(http, 2 * n, "the held requests never all reached the api")
        await asyncio.sleep(1)  # a stream reads its record after its head: let them
        reads = await hgetall_calls(stack) - before
    for _, writer in polls + streams:
        writer.close()
    # Exactly 2n unless the api's subscription was remade meanwhile (all re-read then).
    assert 2 * n <= reads < 3 * n, f"{reads} record reads for {n} long-polls and {n} streams"


async def test_a_waiting_response_reads_no_record_before_it_waits(
        stack_factory: StackFactory) -> None:
    # POST /v1/responses without background holds the request until the answer: its watch
    # opens before the job is written, so the record it has just written is the wait's
    # first read (it read each one back once before).
    stack = stack_factory("redis", workers=0, CHATQ_API_RESPONSE_WAIT_SECONDS="300")
    n = 50
    before = await hgetall_calls(stack)
    async with httpx.AsyncClient(base_url=stack.url, timeout=600) as http:
        posts = [asyncio.create_task(http.post("/v1/responses", json={"model": "m", "input": f"q{i}"}))
                 for i in range(n)]
        await held_reaches(http, n, "the waiting responses never all reached the api")
        reads = await hgetall_calls(stack) - before
        for post in posts:
            post.cancel()
        await asyncio.gather(*posts, return_exceptions=True)
    # A few from the api's own rounds (its batch feeder); n more with a read per response.
    assert reads < n // 2, f"{reads} record reads for {n} waiting responses"


def test_a_response_whose_client_stopped_reading_is_closed(stack_factory: StackFactory) -> None:
    # A download bigger than the kernel's socket buffers can take (tcp_wmem's 4 MiB), to a
    # client with a small receive buffer that reads the head and stops: the api must not
    # keep it, its buffered bytes and its task, past CHATQ_API_SEND_TIMEOUT_SECONDS. SSE
    # streams go through the same protocol and the same limit.
    stack = stack_factory("redis", workers=0, CHATQ_API_SEND_TIMEOUT_SECONDS="2")
    line = json.dumps({"custom_id": "{i}", "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": "m", "messages": [{"role": "user",
                                                             "content": "x" * 400}]}})
    data = "".join(line.replace("{i}", str(i)) + "\n" for i in range(15_000)).encode()
    with httpx.Client(base_url=stack.url, timeout=60) as http:
        up = http.post("/v1/files", files={"file": ("big.jsonl", data)}, data={"purpose": "batch"})
        assert up.status_code == 200, up.text
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", stack.api.port))
        sock.sendall(f"GET /v1/files/{up.json()['id']}/content HTTP/1.1\r\n"
                     "Host: chatq\r\n\r\n".encode())
        assert sock.recv(64).startswith(b"HTTP/1.1 200")
        time.sleep(6)  # past the send timeout, reading nothing
        sock.settimeout(10)
        got = 0
        try:
            while chunk := sock.recv(1 << 20):
                got += len(chunk)
        except ConnectionResetError:
            pass
        sock.close()
        assert got < len(data), f"the unread download was sent whole ({got} bytes)"
        assert http.get("/healthz").status_code == 200
        metrics = http.get("/metrics").text
        assert "chatq_http_send_timeouts_total 1.0" in metrics, metrics[-500:]
