"""Fixtures that start real servers: redis-server, ElasticMQ, llmsim, the api and workers.

`stack_factory(backend, **env)` builds a whole chatq (api + workers + llmsim) on one backend;
everything started is stopped when the test ends.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import servers

BACKENDS = ["redis", "sqs"]


# Under pytest-xdist each group of servers.XDIST_GROUPS runs on one worker. Marked here for
# the whole session; k8s-tests/conftest.py marks its own too, for when they run alone.
pytest_collection_modifyitems = servers.mark_xdist_groups


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node: Any, ids: list[str]) -> None:
    """Refuse to run if a worker's grouped tests lack their group in their ids: the scheduler
    reads the group from the id alone, so the tests of one group would be spread over workers
    and fight over the one machine (pytest 9.2 with pytest-xdist 3.8 did that)."""
    lost = [nodeid for nodeid in ids
            if (group := servers.xdist_group(nodeid)) and not nodeid.endswith(f"@{group}")]
    if lost:
        raise pytest.UsageError(
            f"{len(lost)} tests have no @group in their ids (first: {lost[0]}), so pytest-xdist "
            "would not keep them on one worker: run scripts/setup, which installs the pytest "
            "that pyproject.toml pins")


# Summary sections the xdist workers gathered (servers.hand_section), printed once at the end.
WORKER_SECTIONS: dict[str, dict[str, str]] = {}


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    for title, lines in getattr(node, "workeroutput", {}).get("sections", {}).items():
        WORKER_SECTIONS.setdefault(title, {}).update(lines)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for title, lines in WORKER_SECTIONS.items():
        terminalreporter.section(title)
        for key, value in lines.items():
            terminalreporter.write_line(f"{key}: {value}")


def _require(what: str, exc: Exception) -> None:
    servers.unavailable(f"{what} is not available ({exc}); run scripts/setup --elasticmq")


@pytest.fixture
def redis_server() -> Iterator[servers.Server]:
    """A fresh redis-server for this test."""
    try:
        cm = servers.redis_server()
        server = cm.__enter__()
    except RuntimeError as exc:
        _require("redis-server", exc)
    try:
        yield server
    finally:
        cm.__exit__(None, None, None)


@pytest.fixture(scope="session")
def elasticmq() -> Iterator[servers.Server]:
    """One ElasticMQ for the session; tests use their own queue names."""
    try:
        cm = servers.elasticmq_server()
        server = cm.__enter__()
    except (RuntimeError, TimeoutError) as exc:
        _require("ElasticMQ", exc)
    try:
        yield server
    finally:
        cm.__exit__(None, None, None)


@pytest.fixture(scope="session")
def s3() -> Iterator[servers.Server]:
    """One S3-compatible server (moto's) for the session; tests use their own key prefixes."""
    try:
        cm = servers.s3_server()
        server = cm.__enter__()
    except (RuntimeError, TimeoutError) as exc:
        _require("moto's S3 server", exc)
    try:
        yield server
    finally:
        cm.__exit__(None, None, None)


def s3_env(server: servers.Server) -> dict[str, str]:
    """Settings that put a stack's files into the test S3 server, under a fresh prefix."""
    return {"CHATQ_FILES_STORE": "s3", "CHATQ_FILES_S3_BUCKET": server.extra["bucket"],
            "CHATQ_FILES_S3_ENDPOINT": server.url,
            "CHATQ_FILES_S3_PREFIX": f"t-{uuid.uuid4().hex[:8]}/",
            "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x"}


@pytest.fixture(scope="session")
def llmsim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.Server]:
    """One llmsim for the session: fast by default, slowed per request by directives."""
    env = servers.chatq_env(CHATQ_LLMSIM_TTFT_MS="30", CHATQ_LLMSIM_ITL_MS="5",
                            CHATQ_LLMSIM_TOKENS="12")
    with servers.chatq_process("llmsim", env, port_var="CHATQ_LLMSIM_PORT",
                               tmp=tmp_path_factory.mktemp("llmsim")) as sim:
        yield sim


@dataclass
class Stack:
    """A running chatq: api, workers, and the servers behind them."""

    backend: str
    env: dict[str, str]
    api: servers.Server
    workers: list[servers.Server]
    tmp: Path
    _stack: list[object] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.api.url

    def client(self, api_key: str = "") -> httpx.Client:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def start_api(self, **env: str) -> servers.Server:
        """Another api process (on a port of its own), e.g. after the first was killed."""
        cm = servers.chatq_process("api", {**self.env, **env}, port_var="CHATQ_API_PORT",
                                   tmp=self.tmp)
        self.api = cm.__enter__()
        self._stack.append(cm)
        return self.api

    def start_worker(self, **env: str) -> servers.Server:
        """Another worker process on the same queue."""
        wenv = {**self.env, **env}
        wenv.setdefault("CHATQ_TELEMETRY_METRICS_PORT", str(servers.free_port()))
        cm = servers.chatq_process("worker", wenv, port_var="CHATQ_TELEMETRY_METRICS_PORT",
                                   tmp=self.tmp)
        worker = cm.__enter__()
        self._stack.append(cm)
        self.workers.append(worker)
        return worker

    def close(self) -> None:
        for cm in reversed(self._stack):
            cm.__exit__(None, None, None)  # type: ignore[attr-defined]


StackFactory = Callable[..., Stack]


@pytest.fixture
def stack_factory(request: pytest.FixtureRequest, llmsim: servers.Server, redis_server: servers.Server,
                  tmp_path: Path) -> Iterator[StackFactory]:
    """Start chatq on a backend: `stack_factory("sqs", workers=2, CHATQ_X="y")`."""
    made: list[Stack] = []

    def make(backend: str = "redis", workers: int = 1, **env: str) -> Stack:
        base = servers.chatq_env(
            CHATQ_REDIS_URL=redis_server.url,
            CHATQ_QUEUE_BACKEND=backend,
            CHATQ_QUEUE_NAME=f"jobs-{uuid.uuid4().hex[:8]}",
            CHATQ_QUEUE_VISIBILITY_SECONDS="3",
            CHATQ_QUEUE_WAIT_SECONDS="1",
            # No model configured: chatq falls back to llmsim, at the session's one.
            CHATQ_LLMSIM_PORT=str(llmsim.port),
            CHATQ_LLM_BACKOFF_BASE_SECONDS="0.05",
            CHATQ_LLM_BACKOFF_MAX_SECONDS="1",
            CHATQ_WORKER_GRACE_SECONDS="10",
            CHATQ_WORKER_BUSY_REPORT_SECONDS="1",
            CHATQ_FILES_DIR=str(tmp_path / "files"),
        )
        if backend == "sqs":
            mq = request.getfixturevalue("elasticmq")
            base.update(CHATQ_QUEUE_ENDPOINT=mq.url, AWS_ACCESS_KEY_ID="x",
                        AWS_SECRET_ACCESS_KEY="x", AWS_DEFAULT_REGION="us-east-1")
        base.update(env)
        api_cm = servers.chatq_process("api", base, port_var="CHATQ_API_PORT", tmp=tmp_path)
        api = api_cm.__enter__()
        stack = Stack(backend, base, api, [], tmp_path, [api_cm])
        made.append(stack)
        for _ in range(workers):
            stack.start_worker()
        return stack

    yield make
    for stack in made:
        stack.close()
