"""A model that is down holds the queue instead of burning the jobs (chatq.breaker).

The model here is an llmsim process of the test's own, on a port the test chooses, so it
can be absent, failing, or back; tests/integration/test_llamacpp.py restarts a real
llama.cpp server the same way.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import servers
from tests.conftest import Stack, StackFactory
from tests.servers import ask, wait_done

pytestmark = pytest.mark.integration

FAST = {"CHATQ_LLM_PROBE_SECONDS": "0.3", "CHATQ_LLM_HANDBACK_DELAY_SECONDS": "0.5"}


@contextlib.contextmanager
def model_on(port: int, tmp: Path, **env: str) -> Iterator[servers.Server]:
    """An llmsim on `port` (the model chatq points at), with extra settings."""
    senv = servers.chatq_env(CHATQ_LLMSIM_PORT=str(port), CHATQ_LLMSIM_TTFT_MS="20",
                             CHATQ_LLMSIM_ITL_MS="5", CHATQ_LLMSIM_TOKENS="8", **env)
    with servers.chatq_process("llmsim", senv, port_var="CHATQ_LLMSIM_PORT", tmp=tmp) as sim:
        yield sim


def readiness(stack: Stack) -> dict[str, Any]:
    with stack.client() as http:
        ready: dict[str, Any] = http.get("/readyz").json()
        return ready


def wait_model(stack: Stack, state: str, timeout: float = 30) -> dict[str, Any]:
    model: dict[str, Any] = servers.poll(lambda: readiness(stack)["model"],
                                         lambda m: m["state"] == state,
                                         f"the model to become {state}", timeout)
    return model


def worker_metric(stack: Stack, line_start: str) -> str:
    text = httpx.get(f"{stack.workers[0].url}/metrics").text
    return next((line for line in text.splitlines() if line.startswith(line_start)), "")


def test_jobs_wait_out_a_model_that_is_not_there(stack_factory: StackFactory,
                                                 tmp_path: Path) -> None:
    port = servers.free_port()
    stack = stack_factory("redis", CHATQ_LLM_BASE_URL=f"http://127.0.0.1:{port}/v1", **FAST)
    with stack.client() as http:
        ids = [ask(http, f"while down {i}") for i in range(4)]
        model = wait_model(stack, "down")
        assert "model_unavailable" in model["last_error"] and model["down_since"]
        assert readiness(stack)["status"] == "ready"  # the api still takes questions
        assert worker_metric(stack, "chatq_model_up ") == "chatq_model_up 0.0"
        time.sleep(2)  # a burst of attempts used to fail a job in 3 s; now they wait
        assert {http.get(f"/v1/chat/{i}").json()["status"] for i in ids} == {"queued"}
        with model_on(port, tmp_path):
            jobs = [wait_done(http, i, timeout=60) for i in ids]
            wait_model(stack, "up")
    assert [j["status"] for j in jobs] == ["succeeded"] * 4, jobs
    assert worker_metric(stack, "chatq_model_up ") == "chatq_model_up 1.0"
    assert "the model is down" in stack.workers[0].logs()
    assert "the model answers again" in stack.workers[0].logs()


def test_after_the_outage_window_jobs_fail_as_model_unavailable(stack_factory: StackFactory) -> None:
    port = servers.free_port()
    stack = stack_factory("redis", CHATQ_LLM_BASE_URL=f"http://127.0.0.1:{port}/v1",
                          CHATQ_LLM_OUTAGE_WINDOW_SECONDS="1.5", **FAST)
    with stack.client() as http:
        job = wait_done(http, ask(http, "nobody home"), timeout=30)
    assert job["status"] == "failed" and job["error"]["code"] == "model_unavailable", job
    assert "CHATQ_LLM_OUTAGE_WINDOW_SECONDS=1.5" in job["error"]["message"]


def test_server_errors_from_everyone_open_the_breaker(stack_factory: StackFactory,
                                                      tmp_path: Path) -> None:
    port = servers.free_port()
    stack = stack_factory("redis", CHATQ_LLM_BASE_URL=f"http://127.0.0.1:{port}/v1",
                          CHATQ_LLM_BREAKER_FAILURES="3", CHATQ_LLM_MAX_ATTEMPTS="20",
                          CHATQ_WORKER_CONCURRENCY="4", **FAST)
    with stack.client() as http:
        with model_on(port, tmp_path, CHATQ_LLMSIM_ERROR_RATE_500="1.0"):
            ids = [ask(http, f"failing {i}") for i in range(4)]
            model = wait_model(stack, "down")
            assert "model_server_error" in model["last_error"]
        # The jobs did not spend their twenty attempts against a model failing for everyone.
        with model_on(port, tmp_path):
            jobs = [wait_done(http, i, timeout=60) for i in ids]
    assert [j["status"] for j in jobs] == ["succeeded"] * 4, jobs
    assert all(j["attempts"] < 20 for j in jobs)
    assert float(worker_metric(stack, "chatq_model_handbacks_total").split()[-1]) >= 1
