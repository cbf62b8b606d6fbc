"""The stale-job janitor against real Redis and ElasticMQ: records left `running` by a
worker that is gone, whose message is gone too, are requeued or failed, once.

The tests play the dying worker themselves with the real Store and Queue (claim, then
vanish at the chosen step), so the kill point is exact; the janitor runs in real worker
processes, or in-process where two sweepers must race.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest
from chatq import janitor, jobs, queues, results
from chatq import settings as settings_mod
from chatq.queues import sqs

from tests import servers
from tests.conftest import BACKENDS, StackFactory
from tests.integration.test_service import all_events
from tests.servers import ask, wait_done

T = TypeVar("T")
FAST_JANITOR = {"CHATQ_WORKER_JANITOR_SECONDS": "0.5", "CHATQ_WORKER_STALE_SECONDS": "2"}


def with_parts(monkeypatch: pytest.MonkeyPatch, env: dict[str, str],
               fn: Callable[[settings_mod.Settings, results.Store, queues.Queue], Awaitable[T]]) -> T:
    """Run fn with a Store and a set-up Queue made from a stack's environment."""
    for k, v in env.items():
        if k.startswith(("CHATQ_", "AWS_")):
            monkeypatch.setenv(k, v)
    settings = settings_mod.Settings()

    async def run() -> T:
        store = results.Store.from_settings(settings.redis)
        queue = queues.open_queue(settings, consumer=f"dying-{uuid.uuid4().hex[:4]}")
        try:
            await queue.setup()
            return await fn(settings, store, queue)
        finally:
            await queue.close()
            await store.close()

    return asyncio.run(run())


async def receive_one(queue: queues.Queue, timeout: float = 15) -> queues.Delivery:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = await queue.receive(1, 1)
        if got:
            return got[0]
    raise AssertionError("no message arrived")


async def test_sweep_requeues_then_fails_once_whoever_sweeps(
        redis_server: servers.Server, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in {"CHATQ_REDIS_URL": redis_server.url, "CHATQ_QUEUE_NAME": f"j-{uuid.uuid4().hex[:6]}",
                 "CHATQ_WORKER_STALE_SECONDS": "0.3", "CHATQ_WORKER_JANITOR_REQUEUES": "1"}.items():
        monkeypatch.setenv(k, v)
    settings = settings_mod.Settings()
    store = results.Store.from_settings(settings.redis)
    queue = queues.open_queue(settings, consumer="t")
    await queue.setup()
    sweepers = [janitor.Janitor(settings.worker, store, queue) for _ in range(3)]
    try:
        job_id = jobs.new_job_id()
        await store.create(jobs.JobRecord.queued(job_id, "open", jobs.ChatRequest(message="x"), "m", True))
        assert (await store.claim(job_id, "gone:1", 0.1)).state == "ok"
        await asyncio.sleep(0.6)

        # Three workers sweep at once: one of them requeues it, with one new message.
        reports = await asyncio.gather(*(s.sweep() for s in sweepers))
        assert sum(r.requeued for r in reports) == 1 and sum(r.failed for r in reports) == 0
        record = await store.get(job_id)
        assert record is not None and record.status == "queued"
        [delivery] = await queue.receive(10, 1)
        assert jobs.decode_message(delivery.body).job_id == job_id
        assert await queue.receive(10, 0) == []
        assert [await s.sweep() for s in sweepers] == [janitor.SweepReport()] * 3

        # Its next worker vanishes too: requeued once already, so now it fails.
        assert (await store.claim(job_id, "gone:2", 0.1)).state == "ok"
        await asyncio.sleep(0.6)
        reports = await asyncio.gather(*(s.sweep() for s in sweepers))
        assert sum(r.failed for r in reports) == 1 and sum(r.requeued for r in reports) == 0
        record = await store.get(job_id)
        assert record is not None and record.status == "failed"
        assert record.error is not None and record.error.code == "abandoned"
        assert record.answer is None
        events = await store.read_events(job_id, "0-0", 0)
        assert [e["type"] for _, e in events].count("done") == 1
        assert await store.redis.ttl(results.job_key(job_id)) > 0
        # A late answer from the vanished worker is refused: one outcome only.
        assert await store.finish(job_id, "gone:2", jobs.Outcome(status=jobs.Status.SUCCEEDED,
                                                               answer="late")) == "failed"

        # A job on a live lease is left alone, and leaves the index when it finishes.
        live = jobs.new_job_id()
        await store.create(jobs.JobRecord.queued(live, "open", jobs.ChatRequest(message="y"), "m", True))
        assert (await store.claim(live, "alive:1", 30)).state == "ok"
        # Another worker is told how long the live lease has left (it hands the message
        # back for that long).
        taken = await store.claim(live, "other:1", 30)
        assert taken.state == "leased" and taken.record is None and 28 < taken.lease_left <= 30
        assert await sweepers[0].sweep() == janitor.SweepReport()
        assert await store.redis.zrange(results.LEASES_KEY, 0, -1) == [live]
        assert await store.finish(live, "alive:1", jobs.Outcome(status=jobs.Status.SUCCEEDED,
                                                             answer="a")) == "ok"
        assert await store.redis.zcard(results.LEASES_KEY) == 0
    finally:
        await queue.close()
        await store.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_running_job_whose_message_is_gone_gets_answered(
        stack_factory: StackFactory, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    stack = stack_factory(backend, workers=0, **FAST_JANITOR)
    with stack.client() as http:
        job_id = ask(http, "orphaned")

        async def die_after_claim(_: settings_mod.Settings, store: results.Store,
                                  queue: queues.Queue) -> None:
            delivery = await receive_one(queue)
            assert (await store.claim(job_id, "dying:1", 1)).state == "ok"
            await queue.ack(delivery)  # the message is lost; the record still says running

        with_parts(monkeypatch, stack.env, die_after_claim)
        assert http.get(f"/v1/chat/{job_id}").json()["status"] == "running"
        worker = stack.start_worker()
        job = wait_done(http, job_id, timeout=30)
    assert job["status"] == "succeeded" and job["attempts"] == 2, job
    assert [e.type for e in all_events(stack, job_id)].count("done") == 1
    assert f"janitor: job {job_id} requeued" in worker.logs()


@pytest.mark.parametrize(("requeues", "outcome"), [("0", "failed"), ("1", "succeeded")])
def test_sqs_worker_killed_inside_the_dead_letter_step(
        stack_factory: StackFactory, monkeypatch: pytest.MonkeyPatch, requeues: str,
        outcome: str) -> None:
    """SQS's redrive policy takes the message after the worker that was to dead-letter it
    on its last receive died between its claim and its failure write: before the janitor,
    `running` for ever."""
    stack = stack_factory("sqs", workers=0, CHATQ_QUEUE_MAX_RECEIVES="1",
                          CHATQ_WORKER_JANITOR_REQUEUES=requeues, **FAST_JANITOR)
    with stack.client() as http:
        job_id = ask(http, "poison")

        async def deaths(_: settings_mod.Settings, store: results.Store,
                         queue: queues.Queue) -> int:
            # A worker killed mid-job, then one killed in each dead-letter step, up to the
            # last receive the redrive policy allows.
            for receive in range(1, 1 + sqs.REDRIVE_SLACK + 1):
                delivery = await receive_one(queue)
                assert delivery.receive_count == receive
                assert (await store.claim(job_id, f"killed:{receive}", 0.5)).state == "ok"
                await queue.release(delivery)  # ...killed before writing anything
                await asyncio.sleep(0.6)
            return delivery.receive_count

        with_parts(monkeypatch, stack.env, deaths)
        worker = stack.start_worker()
        job = wait_done(http, job_id, timeout=30)
        assert job["status"] == outcome, job
        if outcome == "failed":
            assert job["error"]["code"] == "abandoned" and job["answer"] is None
        events = all_events(stack, job_id)
    assert [e.type for e in events].count("done") == 1
    assert f"janitor: job {job_id} {'failed' if outcome == 'failed' else 'requeued'}" in worker.logs()

    async def dead(_: settings_mod.Settings, __: results.Store, queue: queues.Queue) -> list[str]:
        return await queue.dead_letters()

    # SQS itself moved the old message to the dead-letter queue (redrive on the next receive).
    assert any(job_id in body for body in with_parts(monkeypatch, stack.env, dead))


