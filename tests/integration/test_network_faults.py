"""Silent network faults, not kills: a link that stops forwarding (no RST, no FIN) between
(a) a worker and Redis, (b) a worker and SQS, (c) a worker and the model mid-stream, and
(d) the api and Redis, through `servers.FaultyLink`.

Each test checks the promises of the README's "Guarantees": no call hangs past its
configured timeout, a lease held across the cut expires and another worker takes the job,
no job is lost, no second answer is written, the api answers 503 while it cannot reach
Redis, and everything works again once the link heals. Timeouts and leases are short here
(1-3 s), so each case takes seconds.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx
import pytest
from chatq import client as chatq_client

from tests import servers
from tests.conftest import BACKENDS, StackFactory
from tests.integration.test_service import all_events
from tests.servers import ask, wait_done, wait_status

# A 1 s Redis timeout makes a silent Redis visible quickly; 3 s leases (the stack's).
SHORT = {"CHATQ_REDIS_TIMEOUT_SECONDS": "1"}
LONG_JOB = "llmsim:ttft_ms=50 llmsim:itl_ms=100 llmsim:tokens=30"  # about 3 s of tokens


def first_delta(url: str, job_id: str) -> None:
    """Return once the job's model is mid-answer."""
    with chatq_client.Client(url) as c:
        for event in c.events(job_id):
            if event.type == "delta":
                return


def one_answer(stack: Any, job_id: str) -> list[chatq_client.Event]:
    events = all_events(stack, job_id)
    assert [e.type for e in events].count("done") == 1, "the answer is written once"
    return events


@pytest.mark.parametrize("backend", BACKENDS)
def test_worker_cut_from_redis(stack_factory: StackFactory, redis_server: servers.Server,
                               backend: str) -> None:
    stack = stack_factory(backend, workers=0, **SHORT)
    with servers.faulty_link(redis_server.port) as link, stack.client() as http:
        cut = stack.start_worker(CHATQ_REDIS_URL=f"redis://127.0.0.1:{link.port}/0")
        job_id = ask(http, f"cut mid-job {LONG_JOB}")
        first_delta(stack.url, job_id)
        link.blackhole()
        peer = stack.start_worker()
        job = wait_done(http, job_id, timeout=40)
        assert job["status"] == "succeeded" and job["attempts"] == 2, job
        # The cut worker's calls time out instead of hanging: it gave the job up.
        servers.wait_for(lambda: "not receiving: Redis is unreachable" in cut.logs(),
                         "the cut worker to give the job up and stop receiving", 20)
        assert cut.proc.poll() is None
        link.heal()
        servers.wait_for(lambda: "Redis answers again" in cut.logs(), "the cut worker to resume", 20)
        time.sleep(2)  # what the link held arrives now: the cut worker's late finish is refused
        events = one_answer(stack, job_id)
        assert "".join(e.data["text"] for e in events
                       if e.type == "delta" and e.data["attempt"] == 2) == job["answer"]
        assert http.get(f"/v1/chat/{job_id}").json()["answer"] == job["answer"]
        # Healed: the once-cut worker alone serves new jobs.
        peer.stop()
        after = wait_done(http, ask(http, "after the heal"), timeout=40)
        assert after["status"] == "succeeded" and after["attempts"] == 1, after


def test_worker_cut_from_sqs(stack_factory: StackFactory, elasticmq: servers.Server) -> None:
    stack = stack_factory("sqs", workers=0)
    with servers.faulty_link(elasticmq.port) as link, stack.client() as http:
        cut = stack.start_worker(CHATQ_QUEUE_ENDPOINT=f"http://127.0.0.1:{link.port}")
        job_id = ask(http, f"cut mid-job {LONG_JOB}")
        first_delta(stack.url, job_id)
        link.blackhole()
        stack.start_worker()
        job = wait_done(http, job_id, timeout=40)
        assert job["status"] == "succeeded", job
        servers.wait_for(lambda: "cannot renew the lease" in cut.logs(),
                         "the cut worker's heartbeat to give up on SQS", 20)
        one_answer(stack, job_id)
        # Its message is deleted by whichever worker sees the job finished: nothing is left.
        servers.wait_for(lambda: _depth(http) == (0, 0), "the queue to drain", 40)
        link.heal()
        for w in stack.workers[1:]:
            w.stop()
        after = wait_done(http, ask(http, "after the heal"), timeout=60)
        assert after["status"] == "succeeded", after
        assert cut.proc.poll() is None


def _depth(http: httpx.Client) -> tuple[int, int]:
    queue = http.get("/readyz").json()["queue"]
    return int(queue["visible"]), int(queue["in_flight"])


def test_model_cut_mid_stream(stack_factory: StackFactory, llmsim: servers.Server) -> None:
    stack = stack_factory("redis", workers=0, CHATQ_LLM_TIMEOUT_SECONDS="2")
    with servers.faulty_link(llmsim.port) as link, stack.client() as http:
        stack.start_worker(CHATQ_LLMSIM_PORT=str(link.port))
        job_id = ask(http, "cut stream llmsim:ttft_ms=50 llmsim:itl_ms=60 llmsim:tokens=20")
        first_delta(stack.url, job_id)
        link.blackhole()
        time.sleep(3)  # past one call's timeout: attempt 1 is given up, attempt 2 hangs
        link.heal()
        job = wait_done(http, job_id, timeout=40)
        assert job["status"] == "succeeded" and job["attempts"] >= 2, job
        events = one_answer(stack, job_id)
        last = max(e.data["attempt"] for e in events if e.type == "delta")
        assert "".join(e.data["text"] for e in events
                       if e.type == "delta" and e.data["attempt"] == last) == job["answer"]

        # A model that stays silent fails the job after its attempts, each bounded.
        link.blackhole()
        stuck = wait_done(http, ask(http, "never answered"), timeout=40)
        assert stuck["status"] == "failed" and "timeout" in stuck["error"]["code"], stuck
        link.heal()
        assert wait_done(http, ask(http, "after the heal"))["status"] == "succeeded"


@pytest.mark.parametrize("backend", BACKENDS)
def test_api_cut_from_redis(stack_factory: StackFactory, redis_server: servers.Server,
                            backend: str) -> None:
    with servers.faulty_link(redis_server.port) as link:
        stack = stack_factory(backend, workers=0,
                              CHATQ_REDIS_URL=f"redis://127.0.0.1:{link.port}/0", **SHORT)
        stack.start_worker(CHATQ_REDIS_URL=redis_server.url)
        with stack.client() as http:
            before = ask(http, "before the cut")
            assert wait_done(http, before)["status"] == "succeeded"
            link.blackhole()
            # No hang: each answer comes within the client's 10 s, as a 503.
            with httpx.Client(base_url=stack.url, timeout=10) as quick:
                for method, path, kwargs in (
                        ("POST", "/v1/chat", {"json": {"message": "during the cut"}}),
                        ("GET", f"/v1/chat/{before}", {}),
                        ("GET", f"/v1/chat/{before}?wait=5", {}),
                        ("GET", "/readyz", {})):
                    resp = quick.request(method, path, **kwargs)
                    assert resp.status_code == 503, (path, resp.text)
                    assert resp.json()["error"]["code"] in ("store_unavailable", "redis_unavailable")
                assert quick.get("/healthz").status_code == 200
            link.heal()
            servers.wait_for(lambda: http.get("/readyz").status_code == 200, "the api to be ready", 20)
            job_id = ask(http, f"after the heal {LONG_JOB}")
            wait_status(http, job_id, "running")
            job = wait_done(http, job_id, timeout=40)
            assert job["status"] == "succeeded", job
            one_answer(stack, job_id)


def test_api_started_before_its_sqs_queue_turns_ready_once_it_appears(
        stack_factory: StackFactory, elasticmq: servers.Server) -> None:
    # ElasticMQ (or SQS's endpoint) coming up after the api, as pods do in any order: the
    # api must not stay unready for good. A proxy with nothing behind it stands in for the
    # absent server until it is pointed at the real one.
    stack = stack_factory("sqs", workers=0)
    link = servers.FaultyLink(servers.free_port())
    try:
        api = stack.start_api(CHATQ_QUEUE_ENDPOINT=f"http://127.0.0.1:{link.port}",
                              CHATQ_QUEUE_NAME=f"late-{uuid.uuid4().hex[:8]}")
        early = httpx.get(f"{api.url}/readyz", timeout=60)
        assert early.status_code == 503 and "queue_unavailable" in early.text, early.text
        link.target = ("127.0.0.1", elasticmq.port)  # the queue's server is up now
        servers.wait_for(lambda: httpx.get(f"{api.url}/readyz", timeout=60).status_code == 200,
                         "the api to turn ready once its queue exists", timeout=60)
        with stack.client() as http:  # the new api takes questions onto that queue
            job_id = ask(http, "late queue")
        assert httpx.get(f"{api.url}/v1/chat/{job_id}").json()["status"] == "queued"
    finally:
        link.close()


def test_readyz_answers_503_in_time_when_the_queue_goes_silent(
        stack_factory: StackFactory, elasticmq: servers.Server) -> None:
    # A queue Service whose pod was just deleted drops packets until its endpoint goes: the
    # kubelet's probe (3 s timeout) must get a 503 that says why, not a timeout; then 200.
    stack = stack_factory("sqs", workers=0)
    with servers.faulty_link(elasticmq.port) as link:
        api = stack.start_api(CHATQ_QUEUE_ENDPOINT=f"http://127.0.0.1:{link.port}",
                              CHATQ_QUEUE_NAME=f"silent-{uuid.uuid4().hex[:8]}")
        servers.wait_for(lambda: httpx.get(f"{api.url}/readyz", timeout=10).status_code == 200,
                         "the api to be ready", timeout=30)
        link.blackhole()
        start = time.monotonic()
        resp = httpx.get(f"{api.url}/readyz", timeout=10)
        took = time.monotonic() - start
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "queue_unavailable", resp.text
        assert "did not answer within" in resp.json()["error"]["message"], resp.text
        assert took < 3, f"/readyz took {took:.1f} s, past the chart's 3 s probe timeout"
        link.heal()
        servers.wait_for(lambda: httpx.get(f"{api.url}/readyz", timeout=10).status_code == 200,
                         "the api to be ready again", timeout=30)
