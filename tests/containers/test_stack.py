"""The compose stack end to end, through nginx: answers, both API replicas, a worker killed
mid-answer, a worker drained by `docker stop`, and `compose down -v` leaving nothing.

The tests share one stack and run in file order; the last one takes it down.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request

import pytest

from tests import servers
from tests.containers.conftest import Stack, run

pytestmark = pytest.mark.timeout(900)

TOKENS = 24  # llmsim's answer length (CHATQ_LLMSIM_TOKENS default)


def sse_events(stack: Stack, job_id: str) -> list[tuple[str, str]]:
    """The job's whole event stream, through nginx, as (event, data) pairs."""
    events: list[tuple[str, str]] = []
    req = urllib.request.Request(f"{stack.url}/v1/chat/{job_id}/events")
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        kind, data = "message", ""
        for raw in resp:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                data = line[6:]
            elif not line and data:
                events.append((kind, data))
                kind, data = "message", ""
    return events


def queue_counts(stack: Stack) -> dict[str, int]:
    status, body = stack.request("GET", "/readyz")
    assert status == 200, body
    return {"visible": body["queue"]["visible"], "in_flight": body["queue"]["in_flight"]}


def test_answer_through_nginx(stack: Stack) -> None:
    status, health = stack.request("GET", "/healthz")
    assert (status, health["status"]) == (200, "ok")
    job_id = stack.ask("Why is the sky blue?")
    status, job = stack.request("GET", f"/v1/chat/{job_id}?wait=60")
    assert status == 200
    assert job["status"] == "succeeded", job
    assert job["answer"].startswith("[simulated answer from llmsim]")
    # The token stream through nginx (unbuffered SSE) ends with the same answer.
    events = sse_events(stack, job_id)
    assert events[-1][0] == "done"
    assert json.loads(events[-1][1])["answer"] == job["answer"]


def test_sse_streams_tokens_as_they_come(stack: Stack) -> None:
    # nginx must not buffer the event stream: the first token arrives long before the end
    # (llmsim writes one token every 400 ms here, 24 in all).
    job_id = stack.ask("Stream this, please.")
    start = time.monotonic()
    first_delta = done = 0.0
    with urllib.request.urlopen(f"{stack.url}/v1/chat/{job_id}/events", timeout=60) as resp:
        for raw in resp:
            line = raw.decode()
            if line.startswith("event: delta") and not first_delta:
                first_delta = time.monotonic() - start
            elif line.startswith("event: done"):
                done = time.monotonic() - start
                break
    assert first_delta and done, (first_delta, done)
    assert done - first_delta > 4, f"first token at {first_delta:.1f}s, done at {done:.1f}s"


def test_request_size_limit(stack: Stack) -> None:
    status, body = stack.request("POST", "/v1/chat", {"message": "x" * 200_000})
    assert status == 413, body


def test_both_api_replicas_served_requests(stack: Stack) -> None:
    for _ in range(8):
        assert stack.request("GET", "/healthz")[0] == 200
    addresses = {}
    for service in ("api-1", "api-2"):
        cid = stack.container(service)
        ip = run(
            ["docker", "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", cid]
        ).stdout.strip()
        addresses[service] = f"{ip}:8000"
    served = re.findall(r'" (\d{3}) .*upstream=(\S+)', stack.logs("nginx"))
    for service, address in addresses.items():
        hits = [status for status, upstream in served if upstream == address]
        assert any(s.startswith("2") for s in hits), f"{service} ({address}) served no request: {served}"


def test_cli_in_a_container_asks_through_nginx(stack: Stack, chatq_images: dict[str, str]) -> None:
    # `docker run <image> ask`: the CLI in the worker image, on the stack's network.
    network = f"{stack.project}_default"
    out = run(
        [
            "docker",
            "run",
            "--rm",
            "--network",
            network,
            chatq_images["worker"],
            "ask",
            "--url",
            "http://nginx",
            "--no-stream",
            "--timeout",
            "60",
            "What is chatq?",
        ],
        timeout=120,
    ).stdout
    assert "[simulated answer from llmsim]" in out, out


def test_answer_survives_a_killed_worker(stack: Stack) -> None:
    job_id = stack.ask("Tell me a long story.")
    stack.wait_status(job_id, {"running"}, timeout=60)
    time.sleep(2)  # some tokens are out: the worker is mid-answer
    old = stack.container("worker")
    run(["docker", "kill", "--signal", "KILL", old])
    assert run(["docker", "inspect", "-f", "{{.State.ExitCode}}", old]).stdout.strip() == "137"
    _, job = stack.request("GET", f"/v1/chat/{job_id}")
    assert job["status"] == "running", job  # nobody finished it
    # A new worker (a new container) takes the job once its lease runs out.
    stack.cmd("up", "-d", "--no-deps", "--force-recreate", "worker", timeout=180)
    assert stack.container("worker") != old
    job = stack.wait_status(job_id, {"succeeded", "failed", "cancelled"}, timeout=120)
    assert job["status"] == "succeeded", job
    assert job["attempts"] >= 2, job
    # Written exactly once: one answer of one answer's length, and one final event.
    assert job["answer"].count("[simulated answer from llmsim]") == 1, job["answer"]
    assert job["usage"]["completion_tokens"] == TOKENS, job["usage"]
    events = sse_events(stack, job_id)
    kinds = [kind for kind, _ in events]
    assert kinds.count("done") == 1
    assert kinds.count("attempt") >= 2, kinds
    last_attempt = len(kinds) - 1 - kinds[::-1].index("attempt")
    deltas = [json.loads(data) for kind, data in events[last_attempt:] if kind == "delta"]
    assert len(deltas) >= 1
    # Nothing left on the queue: the message was deleted once, not dead-lettered or redelivered.
    servers.poll(lambda: queue_counts(stack), lambda n: n == {"visible": 0, "in_flight": 0},
                 "an empty queue", 30, interval=0.5)


def test_worker_drains_on_docker_stop(stack: Stack) -> None:
    job_id = stack.ask("Answer me while you shut down.")
    stack.wait_status(job_id, {"running"}, timeout=60)
    worker = stack.container("worker")
    start = time.monotonic()
    run(["docker", "stop", "--time", "40", worker], timeout=60)
    took = time.monotonic() - start
    state = json.loads(run(["docker", "inspect", "-f", "{{json .State}}", worker]).stdout)
    assert state["ExitCode"] == 0, (state, stack.logs("worker")[-2000:])
    assert took < 40, f"docker stop took {took:.0f}s: the worker did not exit on SIGTERM"
    # The in-flight answer was finished before the worker left.
    _, job = stack.request("GET", f"/v1/chat/{job_id}")
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 1, job


def test_compose_down_leaves_nothing(stack: Stack) -> None:
    assert any(stack.leftovers().values())  # the stack is there...
    stack.down()
    assert stack.leftovers() == {"containers": [], "networks": [], "volumes": []}
