"""The stale-job janitor: no job stays `running` for ever when nobody works on it.

A worker that dies loses its lease, and the queue hands the message to another worker,
which takes the job over. That fails when the message itself is gone: SQS's redrive policy
moved it to the dead-letter queue after the last receive, the worker was killed between
its last claim and its dead-letter step, or Redis lost the stream entry but kept the
record. The job record then says `running`, on a lease nobody renews, until its TTL.

Every worker sweeps (leader-free): `Store.pick_stale` atomically hands each stale job to
one sweeper for a stale period, so sweepers never act on a job twice at once; the action
itself (`Store.abandon`) is conditional on the lease still being expired, so a worker that
took the job meanwhile always wins. What to do with a stale job is `decide()`, a pure
function: put it back on the queue with a new message a bounded number of times, then fail
it with `abandoned`, so a job that kills every worker that runs it does not loop.

The longest a job stays `running` with nobody on it: the lease (visibility timeout), plus
`stale_seconds`, plus one sweep interval (jittered up to 1.5 times).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from enum import StrEnum

from chatq import errors, jobs, metrics, results
from chatq import settings as settings_mod
from chatq.queues import Queue

log = logging.getLogger(__name__)

# Stale jobs handled per sweep; more wait for the next one.
SWEEP_LIMIT = 100


class Verdict(StrEnum):
    """What the janitor does with one job."""

    SKIP = "skip"
    REQUEUE = "requeue"
    FAIL = "fail"


def decide(status: str, lease_until: float, now: float, stale_seconds: float, requeues: int,
           max_requeues: int) -> Verdict:
    """The janitor's rule for one job record.

    1. Anything but `running` is none of its business (queued jobs have their message;
       terminal ones are done).
    2. A lease that expired less than `stale_seconds` ago is the queue's to redeliver.
    3. A stale job goes back on the queue while it has been requeued fewer than
       `max_requeues` times; after that it fails.
    """
    if status != jobs.Status.RUNNING.value:
        return Verdict.SKIP
    if lease_until > now - stale_seconds:
        return Verdict.SKIP
    if requeues < max_requeues:
        return Verdict.REQUEUE
    return Verdict.FAIL


@dataclass
class SweepReport:
    """What one sweep did."""

    requeued: int = 0
    failed: int = 0
    skipped: int = 0


class Janitor:
    """Sweeps the running-jobs index of one Redis for jobs nobody works on."""

    def __init__(self, cfg: settings_mod.WorkerSettings, store: results.Store, queue: Queue) -> None:
        self.cfg = cfg
        self.store = store
        self.queue = queue

    async def sweep(self) -> SweepReport:
        """One pass: requeue or fail every stale job this sweeper was handed."""
        report = SweepReport()
        stale = self.cfg.stale_seconds
        for job in await self.store.pick_stale(stale, SWEEP_LIMIT):
            verdict = decide(jobs.Status.RUNNING.value, job.lease_until, time.time(), stale,
                             job.requeues, self.cfg.janitor_requeues)
            if verdict is Verdict.REQUEUE:
                state = await self._requeue(job)
            elif verdict is Verdict.FAIL:
                state = await self.store.abandon(job.job_id, stale, "fail", jobs.JobError(
                    code="abandoned",
                    message=f"no worker finished the job: its lease ran out and it was "
                            f"put back on the queue {job.requeues} time(s)"))
            else:
                state = "skipped"
            if state in ("requeued", "failed"):
                log.warning("janitor: job %s %s (lease expired %.0fs ago)", job.job_id, state,
                            time.time() - job.lease_until)
                metrics.janitor_actions.labels(state).inc()
                if state == "requeued":
                    report.requeued += 1
                else:
                    report.failed += 1
            else:
                report.skipped += 1
        return report

    async def _requeue(self, job: results.StaleJob) -> str:
        # Counted first, then the message, then the record: a sweeper that dies after the
        # message leaves a job that the message's worker takes over (claim takes expired
        # leases); the other order could leave a `queued` record with no message at all.
        await self.store.count_requeue(job.job_id)
        try:
            await self.queue.send(jobs.encode_message(job.job_id), {})
        except errors.ChatqError as exc:
            log.warning("janitor: cannot requeue job %s (%s); the next sweep tries again",
                        job.job_id, exc)
            return "send_failed"
        state = await self.store.abandon(job.job_id, self.cfg.stale_seconds, "requeue")
        # 'live': a worker took the job off the new message before the record was updated.
        return "requeued" if state in ("requeued", "live") else state

    async def run(self, stopping: asyncio.Event) -> None:
        """Sweep every `janitor_seconds` (jittered, so workers spread out) until stopping."""
        every = self.cfg.janitor_seconds
        while not stopping.is_set():
            try:
                async with asyncio.timeout(max(every, 10.0)):
                    await self.sweep()
            except (errors.ChatqError, TimeoutError) as exc:
                log.warning("janitor: sweep failed (%s); trying again in %.0fs", exc, every)
            try:
                await asyncio.wait_for(stopping.wait(), every * random.uniform(0.5, 1.5))
            except TimeoutError:
                pass
