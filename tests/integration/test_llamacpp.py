"""chatq against a real llama.cpp server (`llama-server`, set up by scripts/setup-llama) with
a tiny random-weight model the tests write (tests/llamacpp.py): api and worker as processes,
real Redis. What llmsim imitates in tests/integration/test_llm.py, the real server does here.

The tiny model never says end-of-sequence, so every answer runs to max_tokens or to the end
of its context: the finish_reason is always `length`, which is what a truncation test needs.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from chatq import client as chatq_client

from tests import llamacpp, servers
from tests.conftest import Stack, StackFactory
from tests.servers import ask, wait_done, wait_status

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny GGUF, written once per session."""
    pytest.importorskip("gguf", reason="gguf is in the dev extra: run scripts/setup")
    return llamacpp.write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="module")
def llama(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.Server]:
    """Two slots of 512 tokens each."""
    with llamacpp.llama_server(tiny_model, ctx=512, slots=2,
                               tmp=tmp_path_factory.mktemp("llama")) as server:
        yield server


def on_llama(stack_factory: StackFactory, server: servers.Server, **env: str) -> Stack:
    """chatq whose model is the llama.cpp server (the default model name, gpt-4o-mini, is
    what chatq asks for; the server answers with its own)."""
    return stack_factory("redis", CHATQ_LLM_BASE_URL=server.url, **env)


def slots(server: servers.Server) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{server.extra['root']}/slots", timeout=5) as resp:
        data: list[dict[str, Any]] = json.load(resp)
        return data


def test_the_tiny_model_loads_with_its_template(llama: servers.Server) -> None:
    props = llamacpp.props(llama)
    assert props["chat_template"] == llamacpp.CHAT_TEMPLATE
    assert [s["n_ctx"] for s in slots(llama)] == [512, 512]


def test_answers_stream_with_usage_and_the_served_model(stack_factory: StackFactory,
                                                        llama: servers.Server) -> None:
    stack = on_llama(stack_factory, llama)
    with stack.client() as http, chatq_client.Client(stack.url) as c:
        job_id = ask(http, "Why is the sky blue?", max_tokens=8)
        events = list(c.events(job_id))
        job = wait_done(http, job_id)
    assert job["status"] == "succeeded", job
    assert job["model"] == llamacpp.MODEL_NAME and job["simulated"] is False
    assert job["attempts"] == 1 and job["error"] is None and job["attempt_errors"] is None
    # Cut by max_tokens, and the job says so; the server sent its usage.
    assert job["finish_reason"] == "length" and job["usage_estimated"] is False
    usage = job["usage"]
    assert usage["completion_tokens"] == 8 and usage["prompt_tokens"] > 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + 8
    deltas = [e for e in events if e.type == "delta"]
    assert deltas and "".join(e.data["text"] for e in deltas) == job["answer"]
    assert events[-1].type == "done" and events[-1].data["status"] == "succeeded"


def test_more_jobs_than_the_server_has_slots(stack_factory: StackFactory,
                                             llama: servers.Server) -> None:
    stack = on_llama(stack_factory, llama, CHATQ_WORKER_CONCURRENCY="12")
    with stack.client() as http:
        ids = [ask(http, f"question {i}", max_tokens=16) for i in range(12)]
        jobs = [wait_done(http, i, timeout=90) for i in ids]
    assert [j["status"] for j in jobs] == ["succeeded"] * 12, jobs
    assert all(j["usage"]["completion_tokens"] == 16 and j["attempts"] == 1 for j in jobs)


def test_a_prompt_over_the_context_fails_at_once_and_says_why(stack_factory: StackFactory,
                                                              llama: servers.Server) -> None:
    stack = on_llama(stack_factory, llama)
    with stack.client() as http:
        job = wait_done(http, ask(http, "word " * 300))
    assert job["status"] == "failed" and job["attempts"] == 1, job
    assert job["error"]["code"] == "context_length_exceeded"
    assert [e["code"] for e in job["attempt_errors"]] == ["context_length_exceeded"]
    assert "exceeds the available context size" in job["error"]["message"]
    assert "shorten it" in job["error"]["message"]


def test_a_context_full_error_mid_stream_is_retried_and_no_job_fails(
        stack_factory: StackFactory, tiny_model: Path, tmp_path: Path) -> None:
    # The case: twelve jobs at once, default max_tokens (1024), a server whose four
    # slots share one 512-token cache. Streams end in `data: {"error": {"code": 500,
    # "message": "Context size has been exceeded."}}` once the cache is full.
    with llamacpp.llama_server(tiny_model, ctx=512, slots=4, unified=True, tmp=tmp_path) as srv:
        stack = on_llama(stack_factory, srv, CHATQ_WORKER_CONCURRENCY="12")
        with stack.client() as http:
            ids = [ask(http, f"tell me {i}") for i in range(12)]
            jobs = [wait_done(http, i, timeout=120) for i in ids]
        metrics = httpx.get(f"{stack.workers[0].url}/metrics").text
        log = srv.logs()
    assert "Context size has been exceeded" in log, "the server never ran out of context"
    assert [j["status"] for j in jobs] == ["succeeded"] * 12, [j["error"] for j in jobs]
    retried = [j for j in jobs if j["attempts"] > 1]
    assert retried and all(j["finish_reason"] == "length" for j in jobs)
    # The attempts say what happened.
    assert {e["code"] for j in retried for e in j["attempt_errors"]} == {"model_context_full"}
    assert 'chatq_model_retries_total{reason="model_context_full"}' in metrics
    assert all(j["answer"] for j in jobs)


def test_cancel_mid_stream_stops_the_generation(stack_factory: StackFactory, tiny_model: Path,
                                                tmp_path: Path) -> None:
    with llamacpp.llama_server(tiny_model, ctx=4096, slots=1, tmp=tmp_path) as srv:
        stack = on_llama(stack_factory, srv)
        with stack.client() as http, chatq_client.Client(stack.url) as c:
            job_id = ask(http, "a long one", max_tokens=4000)
            wait_status(http, job_id, "running")
            for event in c.events(job_id):
                if event.type == "delta":
                    break  # the model is mid-answer
            assert http.post(f"/v1/chat/{job_id}/cancel").json()["status"] == "cancelled"
            # The worker closes the stream, and the server stops generating for it.
            servers.poll(lambda: slots(srv)[0]["is_processing"], lambda busy: not busy,
                         "the server to stop generating the cancelled answer", 20)
            job = http.get(f"/v1/chat/{job_id}").json()
            assert job["status"] == "cancelled" and job["answer"] is None
            nxt = wait_done(http, ask(http, "next", max_tokens=4))
            assert nxt["status"] == "succeeded"


def test_the_server_restarted_mid_run_loses_no_job(stack_factory: StackFactory, tiny_model: Path,
                                                   tmp_path: Path) -> None:
    port = servers.free_port()
    with llamacpp.llama_server(tiny_model, ctx=2048, slots=2, port=port, tmp=tmp_path) as first:
        stack = on_llama(stack_factory, first, CHATQ_LLM_PROBE_SECONDS="0.5",
                         CHATQ_LLM_HANDBACK_DELAY_SECONDS="0.5")
        with stack.client() as http, chatq_client.Client(stack.url) as c:
            ids = [ask(http, f"during a restart {i}", max_tokens=400) for i in range(6)]
            for event in c.events(ids[0]):
                if event.type == "delta":
                    break  # answers are streaming
            first.kill()
    with stack.client() as http:
        # While it is gone the model is down, and nothing fails.
        servers.poll(lambda: http.get("/readyz").json()["model"]["state"],
                     lambda state: state == "down", "the model to be seen down", 20)
        assert not [i for i in ids if http.get(f"/v1/chat/{i}").json()["status"] == "failed"]
        with llamacpp.llama_server(tiny_model, ctx=2048, slots=2, port=port, tmp=tmp_path):
            jobs = [wait_done(http, i, timeout=120) for i in ids]
    assert [j["status"] for j in jobs] == ["succeeded"] * 6, [j["error"] for j in jobs]
    assert all(j["usage"]["completion_tokens"] == 400 for j in jobs)
    assert "handed back" in stack.workers[0].logs()
