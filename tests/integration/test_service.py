"""chatq end to end, on both queue backends: api and workers as real processes, real Redis,
real ElasticMQ, llmsim as the model. Questions carry llmsim directives to slow or fail them.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from typing import Any

import httpx
import pytest
from chatq import client as chatq_client
from chatq import llmsim, queues
from chatq import settings as settings_mod

from tests import servers
from tests.conftest import BACKENDS, Stack, StackFactory
from tests.servers import ask, wait_done, wait_status

pytestmark = pytest.mark.parametrize("backend", BACKENDS)


def all_events(stack: Stack, job_id: str) -> list[chatq_client.Event]:
    with chatq_client.Client(stack.url) as c:
        return list(c.events(job_id))


def queue_call(stack: Stack, method: str, *args: Any) -> Any:
    """Call one Queue method with the stack's settings, in a loop of its own."""
    async def run() -> Any:
        q = queues.open_queue(settings_mod.Settings(), consumer="test")
        try:
            await q.setup()
            return await getattr(q, method)(*args)
        finally:
            await q.close()

    saved = dict(os.environ)
    os.environ.update({k: v for k, v in stack.env.items() if k.startswith(("CHATQ_", "AWS_"))})
    try:
        return asyncio.run(run())
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_happy_path_and_seed_aliases(stack_factory: StackFactory, backend: str) -> None:
    stack = stack_factory(backend)
    with stack.client() as http:
        resp = http.post("/v1/chat", json={"message": "Why is the sky blue?",
                                           "metadata": {"ticket": "42"}})
        assert resp.status_code == 202
        created = resp.json()
        assert created["status"] == "queued" and created["created_at"].endswith("+00:00")
        assert resp.headers["location"] == f"/v1/chat/{created['id']}"
        job = wait_done(http, created["id"])
        assert job["status"] == "succeeded", job
        assert job["answer"].startswith(llmsim.PREFIX)
        assert job["simulated"] is True and job["model"] == "chatq-sim-1"
        assert job["usage"]["completion_tokens"] == 12 and job["attempts"] == 1
        assert job["metadata"] == {"ticket": "42"} and job["error"] is None
        assert job["created_at"] <= job["started_at"] <= job["finished_at"]

        seed = http.post("/chat", json={"messages": [{"role": "user", "content": "hi"}]})
        assert seed.status_code == 202
        result = http.get(f"/result/{seed.json()['id']}", params={"wait": 20}).json()
        assert result["status"] == "succeeded" and result["answer"]
        assert http.get("/readyz").json()["status"] == "ready"
        metrics = http.get("/metrics").text
        assert 'chatq_http_requests_total{method="POST",route="/v1/chat",status="202"} 1.0' in metrics


def test_long_poll_waits_until_done(stack_factory: StackFactory, backend: str) -> None:
    stack = stack_factory(backend)
    with stack.client() as http:
        job_id = ask(http, "slow llmsim:ttft_ms=1500")
        started = time.monotonic()
        early = http.get(f"/v1/chat/{job_id}", params={"wait": 0.3}).json()
        assert early["status"] in ("queued", "running")
        assert 0.25 < time.monotonic() - started < 1.5
        job = http.get(f"/v1/chat/{job_id}", params={"wait": 30}).json()
        waited = time.monotonic() - started
        assert job["status"] == "succeeded"
        assert 1.4 < waited < 10, waited  # woke when done, long before the 30 s bound


def test_sse_streams_and_resumes(stack_factory: StackFactory, backend: str) -> None:
    stack = stack_factory(backend)
    with stack.client() as http, chatq_client.Client(stack.url) as c:
        job_id = ask(http, "stream llmsim:itl_ms=120 llmsim:tokens=15")
        first: list[chatq_client.Event] = []
        for event in c.events(job_id):
            first.append(event)
            if sum(e.type == "delta" for e in first) == 3:
                break  # the client goes away mid-answer
        rest = list(c.events(job_id, last_event_id=first[-1].id))
        ids = [e.id for e in first + rest]
        assert len(ids) == len(set(ids)), "no event is sent twice across the resume"
        assert rest[-1].type == "done" and rest[-1].data["status"] == "succeeded"
        text = "".join(e.data["text"] for e in first + rest if e.type == "delta")
        assert text == wait_done(http, job_id)["answer"]
        # Resuming after the end gives just the outcome.
        after = list(c.events(job_id, last_event_id=rest[-1].id))
        assert [e.type for e in after] == ["done"]
        bad = http.get(f"/v1/chat/{job_id}/events", headers={"Last-Event-ID": "nope"})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_last_event_id"


def test_cancel_running_and_queued(stack_factory: StackFactory, backend: str) -> None:
    stack = stack_factory(backend, workers=0)
    with stack.client() as http:
        queued = ask(http, "never runs")
        resp = http.post(f"/v1/chat/{queued}/cancel")
        assert resp.status_code == 200 and resp.json()["status"] == "cancelled"
        assert http.post(f"/v1/chat/{queued}/cancel").status_code == 200  # idempotent
        stack.start_worker()
        running = ask(http, "long llmsim:ttft_ms=300 llmsim:itl_ms=200 llmsim:tokens=40")
        wait_status(http, running, "running")
        time.sleep(0.5)
        assert http.post(f"/v1/chat/{running}/cancel").json()["status"] == "cancelled"
        done = ask(http, "quick")
        assert wait_done(http, done)["status"] == "succeeded"
        conflict = http.post(f"/v1/chat/{done}/cancel")
        assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "not_cancellable"
        time.sleep(2)  # past a heartbeat: the worker stops the model and writes nothing
        for job_id in (queued, running):
            job = http.get(f"/v1/chat/{job_id}").json()
            assert job["status"] == "cancelled" and job["answer"] is None
        assert http.get(f"/v1/chat/{queued}").json()["attempts"] == 0
    deadline = time.monotonic() + 15
    while queue_call(stack, "depth") != queues.Depth(0, 0):
        assert time.monotonic() < deadline, "cancelled jobs' messages were never acked"
        time.sleep(0.5)


def test_idempotency_key(stack_factory: StackFactory, backend: str) -> None:
    stack = stack_factory(backend, CHATQ_API_KEYS="alice,bob")
    body = {"message": f"once only {uuid.uuid4().hex}"}
    with stack.client("alice") as alice, stack.client("bob") as bob:
        first = alice.post("/v1/chat", json=body, headers={"Idempotency-Key": "k-1"})
        again = alice.post("/v1/chat", json=body, headers={"Idempotency-Key": "k-1"})
        assert first.status_code == again.status_code == 202
        assert first.json()["id"] == again.json()["id"]
        assert again.headers["idempotent-replayed"] == "true"
        other = alice.post("/v1/chat", json={"message": "something else"},
                           headers={"Idempotency-Key": "k-1"})
        assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_conflict"
        # Keys are per API key: bob's k-1 is his own job.
        bobs = bob.post("/v1/chat", json=body, headers={"Idempotency-Key": "k-1"})
        assert bobs.status_code == 202 and bobs.json()["id"] != first.json()["id"]
        assert wait_done(alice, first.json()["id"])["status"] == "succeeded"
        metrics = alice.get("/metrics").text
    # Two jobs were put on the queue, not three.
    assert f'chatq_jobs_enqueued_total{{queue="{backend}"}} 2.0' in metrics


def test_jobs_are_private_to_their_key(stack_factory: StackFactory, backend: str) -> None:
    stack = stack_factory(backend, CHATQ_API_KEYS="alice,bob")
    with stack.client("alice") as alice, stack.client("bob") as bob, stack.client() as anon, \
            stack.client("mallory") as mallory:
        job_id = ask(alice, "mine")
        assert alice.get(f"/v1/chat/{job_id}").status_code == 200
        for path in (f"/v1/chat/{job_id}", f"/v1/chat/{job_id}/events", f"/result/{job_id}"):
            resp = bob.get(path)
            assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found"
        assert bob.post(f"/v1/chat/{job_id}/cancel").status_code == 404
        assert anon.get(f"/v1/chat/{job_id}").status_code == 401
        resp = mallory.post("/v1/chat", json={"message": "x"})
        assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer"
        assert resp.json()["error"]["code"] == "unauthorized"


def test_worker_killed_mid_job(stack_factory: StackFactory, backend: str) -> None:
    stack = stack_factory(backend)
    with stack.client() as http, chatq_client.Client(stack.url) as c:
        job_id = ask(http, "long llmsim:itl_ms=100 llmsim:tokens=30")
        for event in c.events(job_id):
            if event.type == "delta":
                break  # the model is mid-answer
        stack.workers[0].kill()
        stack.start_worker()
        job = wait_done(http, job_id, timeout=60)
        assert job["status"] == "succeeded", job
        assert job["attempts"] == 2
        events = all_events(stack, job_id)
        assert [e.type for e in events].count("done") == 1, "the answer is written once"
        second = [e for e in events if e.type == "delta" and e.data["attempt"] == 2]
        assert "".join(e.data["text"] for e in second) == job["answer"]


def test_sigterm_drains_without_losing_jobs(stack_factory: StackFactory, backend: str) -> None:
    stack = stack_factory(backend, CHATQ_WORKER_CONCURRENCY="6", CHATQ_WORKER_GRACE_SECONDS="1.5")
    with stack.client() as http:
        ids = [ask(http, f"load {i} llmsim:ttft_ms=100 llmsim:itl_ms=60 llmsim:tokens=20")
               for i in range(20)]  # 1.2 s each
        time.sleep(1.0)
        worker = stack.workers[0]
        started = time.monotonic()
        assert worker.stop(signal.SIGTERM) == 0
        assert time.monotonic() - started < 8
        log = worker.logs()
        assert "stopping" in log and "worker" in log and "stopped" in log
        stack.start_worker()
        jobs = [wait_done(http, i, timeout=60) for i in ids]
    assert [j["status"] for j in jobs] == ["succeeded"] * 20
    for job_id in ids[:5]:
        assert [e.type for e in all_events(stack, job_id)].count("done") == 1


def test_429_storm_is_retried(stack_factory: StackFactory, backend: str) -> None:
    stack = stack_factory(backend)
    with stack.client() as http:
        job_id = ask(http, "busy llmsim:fail=429 llmsim:times=3")
        job = wait_done(http, job_id)
        assert job["status"] == "succeeded", job
        assert job["attempts"] == 4  # three 429s, then the answer
        metrics = httpx.get(f"{stack.workers[0].url}/metrics").text
        assert 'chatq_model_retries_total{reason="model_rate_limited"} 3.0' in metrics


def test_permanent_failure_dead_letters(stack_factory: StackFactory, backend: str) -> None:
    stack = stack_factory(backend, CHATQ_LLM_MAX_ATTEMPTS="3")
    with stack.client() as http:
        refused = wait_done(http, ask(http, "bad llmsim:fail=400"))
        assert refused["status"] == "failed" and refused["attempts"] == 1
        assert refused["error"]["code"] == "model_error_400"
        assert "400" in refused["error"]["message"]
        broken = wait_done(http, ask(http, "down llmsim:fail=500"))
        assert broken["status"] == "failed" and broken["attempts"] == 3
        assert broken["error"]["code"] == "model_server_error"
    dead = queue_call(stack, "dead_letters")
    assert sorted(d.split('"job_id":"')[1][:32] for d in dead) == sorted(
        [refused["id"], broken["id"]])


def test_too_many_deliveries_fail_the_job(stack_factory: StackFactory, backend: str) -> None:
    stack = stack_factory(backend, CHATQ_QUEUE_MAX_RECEIVES="1")
    with stack.client() as http, chatq_client.Client(stack.url) as c:
        job_id = ask(http, "crashes its worker llmsim:itl_ms=100 llmsim:tokens=40")
        for event in c.events(job_id):
            if event.type == "delta":
                break
        stack.workers[0].kill()  # the one allowed delivery dies with its worker
        stack.start_worker()
        job = wait_done(http, job_id, timeout=60)
    assert job["status"] == "failed" and job["error"]["code"] == "too_many_deliveries", job
    assert job["answer"] is None
    [dead] = queue_call(stack, "dead_letters")
    assert job_id in dead


def test_malformed_message_is_dead_lettered(stack_factory: StackFactory, backend: str) -> None:
    stack = stack_factory(backend)
    queue_call(stack, "send", "this is not a chatq message", {})
    queue_call(stack, "send", '{"job_id": "ffff", "enqueued_at": 1}', {})  # no such job
    with stack.client() as http:
        assert wait_done(http, ask(http, "still works"))["status"] == "succeeded"
    deadline = time.monotonic() + 10
    while queue_call(stack, "dead_letters") != ["this is not a chatq message"]:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert stack.workers[0].proc.poll() is None
    assert queue_call(stack, "depth") == queues.Depth(0, 0)


def test_redis_down_answers_503(stack_factory: StackFactory, redis_server: servers.Server,
                                backend: str) -> None:
    stack = stack_factory(backend)
    with stack.client() as http:
        job_id = ask(http, "before the outage")
        wait_done(http, job_id)
        redis_server.stop()
        for resp in (http.post("/v1/chat", json={"message": "during"}),
                     http.get(f"/v1/chat/{job_id}"), http.get("/readyz")):
            assert resp.status_code == 503, resp.text
            error = resp.json()["error"]
            assert error["code"] in ("store_unavailable", "redis_unavailable")
            assert "Redis" in error["message"]
        assert http.get("/healthz").status_code == 200  # alive, just not ready


def test_bad_input(stack_factory: StackFactory, backend: str) -> None:
    stack = stack_factory(backend, workers=0, CHATQ_API_MAX_BODY_BYTES="2000")
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"json": {"message": ""}}, 422, "invalid_request"),
        ({"json": {"message": 5}}, 422, "invalid_request"),
        ({"json": {"messages": "hi"}}, 422, "invalid_request"),
        ({"json": {"message": "x", "temperature": "hot"}}, 422, "invalid_request"),
        ({"json": {"message": "x" * 3000}}, 413, "too_large"),
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400,
         "invalid_json"),
        ({}, 400, "empty_body"),
    ]
    with stack.client() as http:
        for kwargs, status, code in cases:
            resp = http.post("/v1/chat", **kwargs)
            assert (resp.status_code, resp.json()["error"]["code"]) == (status, code), kwargs
            assert resp.json()["error"]["message"]
        for path in ("/v1/chat/0123456789abcdef0123456789abcdef", "/v1/chat/../etc",
                     "/result/zzz"):
            resp = http.get(path)
            assert resp.status_code == 404 and "error" in resp.json()
        assert http.get("/v1/chat/abc", params={"wait": "soon"}).status_code == 422
        assert http.get("/docs").status_code == 200
        assert "/v1/chat/{job_id}/events" in http.get("/openapi.json").json()["paths"]
