"""The worker in this process (as arq tests its worker): a real redis-server and llmsim, no
subprocess timing. Each case reaches one path of `Worker` directly: a heartbeat's verdict
(cancelled, lease lost), the hand-back on shutdown, a job taken over after its lease ran
out, and the store's claim verdicts the worker acts on.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
from chatq import jobs, llm, queues, results, worker
from chatq import settings as settings_mod

from tests import servers

pytestmark = pytest.mark.integration


@dataclass
class Parts:
    """One worker's settings, store and queue, on their own stream."""

    settings: settings_mod.Settings
    store: results.Store
    queue: queues.Queue

    async def submit(self, message: str, owner: str = "open") -> str:
        job_id = jobs.new_job_id()
        record = jobs.JobRecord.queued(job_id, owner, jobs.ChatRequest(message=message),
                                       "chatq-sim-1", True)
        await self.store.create(record)
        await self.queue.send(jobs.encode_message(job_id), {})
        return job_id

    async def record(self, job_id: str) -> jobs.JobRecord:
        found = await self.store.get(job_id)
        assert found is not None
        return found

    async def until(self, job_id: str, ok: Callable[[jobs.JobRecord], bool], what: str,
                    timeout: float = 20) -> jobs.JobRecord:
        async with asyncio.timeout(timeout):
            while not ok(record := await self.record(job_id)):
                await asyncio.sleep(0.05)
        assert ok(record), what
        return record


@pytest.fixture
async def parts(redis_server: servers.Server, llmsim: servers.Server) -> AsyncIterator[Parts]:
    settings = settings_mod.Settings(
        redis=settings_mod.RedisSettings(url=redis_server.url),
        queue=settings_mod.QueueSettings(name=f"inproc-{uuid.uuid4().hex[:6]}",
                                         visibility_seconds=3),
        llmsim=settings_mod.LlmsimSettings(port=llmsim.port),
        worker=settings_mod.WorkerSettings(concurrency=4, heartbeat_seconds=0.5,
                                           grace_seconds=5, janitor_seconds=0))
    store = results.Store.from_settings(settings.redis)
    queue = queues.open_queue(settings, consumer="submitter")
    await queue.setup()
    yield Parts(settings, store, queue)
    await queue.close()
    await store.close()


@contextlib.asynccontextmanager
async def running(parts: Parts, name: str) -> AsyncIterator[worker.Worker]:
    """A Worker with its own store, queue and model client, run as a task of this loop."""
    store = results.Store.from_settings(parts.settings.redis)
    queue = queues.open_queue(parts.settings, consumer=name)
    model = llm.Llm(parts.settings)
    w = worker.Worker(parts.settings, queue, store, model, name)
    task = asyncio.create_task(w.run(), name=name)
    try:
        yield w
    finally:
        w.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 15)
        await queue.close()
        await model.close()
        await store.close()


async def wait(cond: Callable[[], Awaitable[bool]], timeout: float = 20) -> None:
    async with asyncio.timeout(timeout):
        while not await cond():
            await asyncio.sleep(0.05)


async def test_answer_is_written_once_with_its_events(parts: Parts) -> None:
    async with running(parts, "w1"):
        job_id = await parts.submit("hello llmsim:tokens=5")
        done = await parts.until(job_id, lambda r: r.status.terminal, "the job to finish")
    assert done.status == jobs.Status.SUCCEEDED and done.answer and done.attempts == 1
    events = [e["type"] for _, e in await parts.store.read_events(job_id, "0-0", 0)]
    assert events.count("done") == 1 and "delta" in events
    assert (await parts.queue.depth()) == queues.Depth(0, 0)  # acked


async def test_cancel_mid_stream_stops_the_model_call(parts: Parts) -> None:
    async with running(parts, "w1") as w:
        job_id = await parts.submit("long llmsim:tokens=50 llmsim:itl_ms=200")
        await parts.until(job_id, lambda r: r.status == jobs.Status.RUNNING, "the job to start")
        assert await parts.store.cancel(job_id) == jobs.Status.CANCELLED.value
        # The heartbeat hears of it within a beat or two and cancels the model call (the
        # answer would take 10 s more).
        await wait(lambda: _idle(w), timeout=15)
    record = await parts.record(job_id)
    assert record.status == jobs.Status.CANCELLED and record.answer is None
    assert (await parts.queue.depth()) == queues.Depth(0, 0)  # the message is done with


async def _idle(w: worker.Worker) -> bool:
    return not w.tasks


async def test_a_lost_lease_writes_nothing_and_leaves_the_message(parts: Parts) -> None:
    async with running(parts, "w1") as w:
        job_id = await parts.submit("long llmsim:tokens=50 llmsim:itl_ms=200")
        await parts.until(job_id, lambda r: r.status == jobs.Status.RUNNING, "the job to start")
        # Another holder takes the record over (as after a partition outlasting the lease).
        await parts.store.redis.hset(results.job_key(job_id), mapping={
            "_lease": "thief:1", "_lease_expires_at": "9999999999"})
        await wait(lambda: _idle(w), timeout=15)
    record = await parts.record(job_id)
    assert record.status == jobs.Status.RUNNING and record.answer is None  # nothing written
    # The message was not acked: the queue still has it, for whoever holds the job.
    depth = await parts.queue.depth()
    assert depth.visible + depth.in_flight == 1, depth
    events = [e["type"] for _, e in await parts.store.read_events(job_id, "0-0", 0)]
    assert "done" not in events


async def test_shutdown_hands_unfinished_jobs_back_and_another_worker_answers(
        parts: Parts) -> None:
    parts.settings.worker.grace_seconds = 0.3  # far less than the answer takes (10 s)
    async with running(parts, "w1"):
        job_id = await parts.submit("long llmsim:tokens=50 llmsim:itl_ms=200")
        await parts.until(job_id, lambda r: r.status == jobs.Status.RUNNING, "the job to start")
    handed_back = await parts.record(job_id)
    assert handed_back.status == jobs.Status.QUEUED, (  # not left `running`, nor cut short
        handed_back, len((handed_back.answer or "").split()))
    async with running(parts, "w2"):
        done = await parts.until(job_id, lambda r: r.status.terminal, "w2 to answer", 30)
    assert done.status == jobs.Status.SUCCEEDED and done.attempts == 2
    events = [e["type"] for _, e in await parts.store.read_events(job_id, "0-0", 0)]
    assert events.count("done") == 1


async def test_claim_verdicts(parts: Parts) -> None:
    store = parts.store
    job_id = await parts.submit("x")
    first = await store.claim(job_id, "a:1", 30)
    assert first.state == "ok" and first.record is not None
    assert first.record.status == jobs.Status.RUNNING and first.record.attempts == 1
    second = await store.claim(job_id, "b:1", 30)
    assert second.state == "leased" and second.record is None and second.lease_left > 28
    assert await store.renew(job_id, "b:1", 30) == "lost"  # not b's to renew
    assert await store.renew(job_id, "a:1", 30) == "ok"
    assert await store.finish(job_id, "a:1", jobs.Outcome(status=jobs.Status.SUCCEEDED,
                                                          answer="yes")) == "ok"
    assert (await store.claim(job_id, "b:2", 30)).state == jobs.Status.SUCCEEDED.value
    assert (await store.claim(jobs.new_job_id(), "c:1", 30)).state == "missing"


async def test_late_writes_to_a_deleted_job_leave_nothing_behind(parts: Parts) -> None:
    # A worker still busy with a job its client deleted (DELETE /v1/responses/{id}) must not
    # leave a stub hash that later reads as a broken record (a 500 instead of a 404).
    store = parts.store
    job_id = await parts.submit("x")
    assert (await store.claim(job_id, "a:1", 30)).state == "ok"
    await store.delete(job_id)
    assert await store.start_attempt(job_id) == 0
    await store.note_budget_wait(job_id, 1.5)
    assert await store.count_requeue(job_id) == 0
    assert not await store.redis.exists(results.job_key(job_id))
    assert await store.get(job_id) is None and await store.get_many([job_id]) == [None]
    assert await store.renew(job_id, "a:1", 30) == "missing"
