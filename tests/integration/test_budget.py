"""The shared rate budget: its Lua arithmetic on a real Redis (a clock given per call), and
several worker processes against one limited llmsim on both queue backends."""

from __future__ import annotations

import contextlib
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
from chatq import budget

from tests import servers
from tests.conftest import BACKENDS, StackFactory

pytestmark = pytest.mark.integration

#: A clock of the tests' own, in ms (0 would mean Redis's TIME).
T0 = 1_000_000


@pytest.fixture
async def client(redis_server: servers.Server) -> aioredis.Redis:
    r = aioredis.from_url(redis_server.url, decode_responses=True)
    yield r
    await r.aclose()


def _budget(client: aioredis.Redis, rpm: int | None = None, tpm: int | None = None,
            name: str = "ep") -> budget.Budget:
    return budget.Budget(client, name, rpm, tpm)


async def test_requests_bucket_holds_a_minute_and_refills(client: aioredis.Redis) -> None:
    b = _budget(client, rpm=60)
    grants = [(await b.take(1, now_ms=T0)).granted for _ in range(60)]
    # A minute's worth less the cushion: 250 ms of refill stays in the bucket.
    assert grants == [True] * 59 + [False]
    refused = await b.take(1, now_ms=T0)
    assert refused.wait_seconds == pytest.approx(0.25)
    assert (await b.take(1, now_ms=T0 + 1_000)).granted
    assert not (await b.take(1, now_ms=T0 + 1_000)).granted


async def test_tokens_bucket_waits_for_the_missing_tokens(client: aioredis.Redis) -> None:
    b = _budget(client, tpm=1000)
    assert (await b.take(400, now_ms=T0)).granted
    assert (await b.take(400, now_ms=T0)).granted
    refused = await b.take(400, now_ms=T0)
    assert not refused.granted
    # 200 tokens (and the cushion's 250 ms) missing at 1000/min.
    assert refused.wait_seconds == pytest.approx(12.25, abs=0.01)


async def test_settle_gives_back_the_unused_reservation(client: aioredis.Redis) -> None:
    b = _budget(client, tpm=1000)
    assert (await b.take(900, now_ms=T0)).granted
    assert not (await b.take(500, now_ms=T0)).granted
    await b.settle(budget.Outcome(reserved=900, used=300), now_ms=T0)
    assert (await b.take(500, now_ms=T0)).granted  # 100 + 600 given back


async def test_a_call_bigger_than_a_minute_is_not_refused_forever(client: aioredis.Redis) -> None:
    b = _budget(client, tpm=1000)
    assert (await b.take(5000, now_ms=T0)).granted


async def test_interactive_waiting_holds_back_batch(client: aioredis.Redis) -> None:
    b = _budget(client, tpm=1000)
    assert (await b.take(900, budget.Priority.INTERACTIVE, now_ms=T0)).granted
    assert not (await b.take(500, budget.Priority.INTERACTIVE, now_ms=T0)).granted
    # 100 tokens are left and a batch call of 50 would fit, but interactive waits.
    batch = await b.take(50, budget.Priority.BATCH, now_ms=T0)
    assert not batch.granted and batch.wait_seconds > 20
    assert (await b.take(500, budget.Priority.INTERACTIVE, now_ms=T0 + 25_000)).granted


async def test_a_429_blocks_every_worker_and_cuts_the_limit(client: aioredis.Redis) -> None:
    b = _budget(client, rpm=600)
    assert (await b.take(1, now_ms=T0)).granted
    await b.settle(budget.Outcome(reserved=1, retry_after=2.0), now_ms=T0)
    # A second 429 within a second is the same burst: one cut.
    await b.settle(budget.Outcome(reserved=1, retry_after=0.0), now_ms=T0 + 400)
    other_worker = _budget(client, rpm=600)
    blocked = await other_worker.take(1, now_ms=T0 + 500)
    assert not blocked.granted and blocked.wait_seconds == pytest.approx(1.5)
    after = await other_worker.take(1, now_ms=T0 + 2_000)
    assert after.granted and after.rpm == pytest.approx(600 * (0.7 + 0.00001 * 2_000))
    # The factor recovers by 0.01 a second, up to the configured limit.
    assert (await b.take(1, now_ms=T0 + 32_000)).rpm == pytest.approx(600)


async def test_limits_are_learnt_from_headers(client: aioredis.Redis) -> None:
    b = _budget(client)  # nothing configured
    first = await b.take(10, now_ms=T0)
    assert first.granted and first.rpm == 0
    await b.settle(budget.Outcome(reserved=10, used=10, provider=budget.ProviderLimits(
        limit_requests=100, limit_tokens=5000, remaining_requests=3, remaining_tokens=4000)),
        now_ms=T0)
    state = await b.state()
    assert state["rpm_learnt"] == 100 and state["tpm_learnt"] == 5000
    # The provider said 3 requests are left: the bucket believes it.
    grants = [(await b.take(1, now_ms=T0)).granted for _ in range(4)]
    assert grants == [True, True, False, False]  # 3, less the cushion


async def test_an_unconfigured_endpoint_pauses_everyone_on_a_429(client: aioredis.Redis) -> None:
    b = _budget(client)
    for _ in range(20):
        assert (await b.take(10, now_ms=T0)).granted
    await b.settle(budget.Outcome(reserved=10, retry_after=0.0), now_ms=T0)  # no retry-after
    paused = await _budget(client).take(10, now_ms=T0 + 10)
    assert not paused.granted and paused.wait_seconds == pytest.approx(0.99)
    after = await b.take(10, now_ms=T0 + 1_000)
    assert after.granted and after.rpm == 0  # and no ceiling guessed from a quiet minute


async def test_gate_serves_interactive_first_then_the_least_served_key(
        client: aioredis.Redis) -> None:
    import asyncio

    b = _budget(client, rpm=60)
    for _ in range(60):
        await b.take(1)  # empty: from here one grant a second
    gate = budget.Gate(b)
    order: list[str] = []

    async def job(name: str, owner: str, priority: budget.Priority) -> None:
        await gate.acquire(1, owner, priority)
        order.append(name)

    tasks = [asyncio.create_task(job(f"a{i}", "A", budget.Priority.BATCH)) for i in range(3)]
    await asyncio.sleep(0.05)
    tasks.append(asyncio.create_task(job("b0", "B", budget.Priority.BATCH)))
    tasks.append(asyncio.create_task(job("i0", "C", budget.Priority.INTERACTIVE)))
    await asyncio.wait_for(asyncio.gather(*tasks), 30)
    await gate.close()
    assert order[0] == "i0" or order[1] == "i0"  # one grant may already be on its way
    batch = [n for n in order if n != "i0"]
    assert batch.index("b0") <= 1, order  # B did not wait behind all of A's


# --- several workers against one limited llmsim ----------------------------------------------

@contextlib.contextmanager
def limited_llmsim(tmp: Path, rpm: int, tpm: int | None = None) -> Iterator[servers.Server]:
    env = servers.chatq_env(CHATQ_LLMSIM_TTFT_MS="20", CHATQ_LLMSIM_ITL_MS="5",
                            CHATQ_LLMSIM_TOKENS="8", CHATQ_LLMSIM_RPM=str(rpm),
                            **({"CHATQ_LLMSIM_TPM": str(tpm)} if tpm else {}))
    with servers.chatq_process("llmsim", env, port_var="CHATQ_LLMSIM_PORT", tmp=tmp) as sim:
        yield sim


def sim_stats(sim: servers.Server) -> dict[str, int]:
    import json

    with urllib.request.urlopen(f"{sim.url}/healthz", timeout=5) as resp:
        data: dict[str, int] = json.load(resp)
    return data


def run_backlog(stack_factory: StackFactory, backend: str, sim: servers.Server, jobs: int,
                **env: str) -> list[dict[str, object]]:
    stack = stack_factory(backend, workers=3, CHATQ_LLMSIM_PORT=str(sim.port),
                          CHATQ_WORKER_CONCURRENCY="8", CHATQ_LLM_MAX_TOKENS="8",
                          CHATQ_LLM_MAX_ATTEMPTS="8", **env)
    with stack.client() as c:
        ids = [c.post("/v1/chat", json={"message": f"question {i}"}).json()["id"]
               for i in range(jobs)]
        done = []
        deadline = time.monotonic() + 90
        for job_id in ids:
            while True:
                job = c.get(f"/v1/chat/{job_id}", params={"wait": 10}).json()
                if job["status"] not in ("queued", "running") or time.monotonic() > deadline:
                    break
            done.append(job)
    return done


@pytest.mark.parametrize("backend", BACKENDS)
def test_workers_share_one_budget_and_the_provider_never_says_429(
        stack_factory: StackFactory, backend: str, tmp_path: Path) -> None:
    # 60 RPM: the first 60 calls fill the minute, the last 12 wait for the refill.
    with limited_llmsim(tmp_path, rpm=60) as sim:
        done = run_backlog(stack_factory, backend, sim, 72, CHATQ_LLM_RPM="60")
        stats = sim_stats(sim)
    assert [j["status"] for j in done] == ["succeeded"] * 72
    assert stats["rate_limited"] == 0, stats
    assert stats["requests"] == 72
    waited = [float(j["budget_wait_seconds"] or 0) for j in done]  # type: ignore[arg-type]
    assert sum(w > 1.0 for w in waited) >= 5 and max(waited) > 3, waited


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_the_budget_the_same_backlog_meets_429s(
        stack_factory: StackFactory, backend: str, tmp_path: Path) -> None:
    """The peer of the test above: the limit is real, and only the budget avoids it."""
    with limited_llmsim(tmp_path, rpm=60) as sim:
        done = run_backlog(stack_factory, backend, sim, 72, CHATQ_LLM_BUDGET="false")
        stats = sim_stats(sim)
    assert stats["rate_limited"] > 0, stats
    assert all(j["budget_wait_seconds"] is None for j in done)


def test_an_unconfigured_budget_learns_the_limit_from_headers(
        stack_factory: StackFactory, tmp_path: Path, redis_server: servers.Server) -> None:
    with limited_llmsim(tmp_path, rpm=60) as sim:
        done = run_backlog(stack_factory, "redis", sim, 72)
        stats = sim_stats(sim)
    assert [j["status"] for j in done] == ["succeeded"] * 72
    # The headers told the budget the limit and what was left: at most the first burst
    # of calls in flight before the first answer can meet a 429.
    assert stats["rate_limited"] <= 24, stats
    import redis as sync_redis

    r = sync_redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        states = [r.hgetall(k) for k in r.scan_iter("chatq:budget:*")]
    finally:
        r.close()
    assert states and float(states[0]["rpm_learnt"]) == 60


def test_api_shows_the_budget_wait(stack_factory: StackFactory, tmp_path: Path) -> None:
    with limited_llmsim(tmp_path, rpm=60) as sim:
        stack = stack_factory("redis", workers=1, CHATQ_LLMSIM_PORT=str(sim.port),
                              CHATQ_LLM_RPM="1", CHATQ_WORKER_CONCURRENCY="4")
        with stack.client() as c:
            ids = [c.post("/v1/chat", json={"message": m}).json()["id"] for m in ("one", "two")]
            servers.wait_for(lambda: any(c.get(f"/v1/chat/{i}").json()["status"] == "succeeded"
                                         for i in ids), "one of the two jobs to succeed", 20)
            # One request a minute: the other waits, queued, its message's lease renewed.
            time.sleep(4)  # longer than the 3 s visibility the stack uses
            jobs = [c.get(f"/v1/chat/{i}").json() for i in ids]
            assert sorted(j["status"] for j in jobs) == ["queued", "succeeded"]
            waiting = next(j for j in jobs if j["status"] == "queued")
            assert waiting["attempts"] == 0 and waiting["started_at"] is None
            metrics = httpx.get(f"{stack.workers[0].url}/metrics").text
            assert "chatq_budget_waiting 1.0" in metrics
        assert sim_stats(sim)["requests"] == 1
