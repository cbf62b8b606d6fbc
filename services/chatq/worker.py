"""The worker: receive messages, claim their jobs, call the model, write the answer, ack.

Reads top-down: `Worker.run()` → `startup()` → `main_loop()` (receive while there is room
under the concurrency cap, start a task per message) → `run_job()` → `shutdown()` (stop
receiving, let in-flight jobs finish within the grace period, hand the rest back).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from typing import Any

from chatq import (
    breaker,
    budget,
    errors,
    janitor,
    jobs,
    lanes,
    llm,
    metrics,
    probe,
    quotas,
    results,
    telemetry,
)
from chatq import settings as settings_mod
from chatq.queues import Delivery, Queue

log = logging.getLogger(__name__)

# Deltas are written at most this often per job, so a fast model is not one Redis call
# per token.
DELTA_FLUSH_SECONDS = 0.1


def default_worker_id() -> str:
    """hostname-pid-random: in a container the pid is always 1, and a restarted container
    keeps its hostname, so the random part keeps two lives of one container apart."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"


class JobSink:
    """Writes a job's token deltas to its event stream, coalesced."""

    def __init__(self, store: results.Store, job_id: str, attempt: int) -> None:
        self.store = store
        self.job_id = job_id
        self.attempt = attempt
        self._pending: list[str] = []
        self.attempt_errors: list[dict[str, object]] = []
        self._last_flush = time.monotonic()

    async def delta(self, text: str) -> None:
        self._pending.append(text)
        if time.monotonic() - self._last_flush >= DELTA_FLUSH_SECONDS:
            await self.flush()

    async def flush(self) -> None:
        """Write what is pending."""
        self._last_flush = time.monotonic()
        if self._pending:
            text, self._pending = "".join(self._pending), []
            await self.store.append_delta(self.job_id, text, self.attempt)

    async def restart(self, attempt: int) -> None:
        # `attempt` counts this delivery's model calls; the job's own count (what the
        # events and the record say) spans every delivery, so the store numbers it.
        self._pending = []
        self.attempt = await self.store.start_attempt(self.job_id)
        log.debug("job %s: call %d of this delivery is attempt %d", self.job_id, attempt,
                  self.attempt)

    def attempt_failed(self, attempt: int, error: errors.ChatqError) -> None:
        # Kept on the job when it ends, so its attempts say what happened.
        self.attempt_errors.append({"attempt": attempt, "code": getattr(error, "code", "error"),
                                    "message": str(error)[:300]})
        log.info("job %s: attempt %d failed: %s (%s)", self.job_id, attempt, error,
                 getattr(error, "code", "error"))


class Worker:
    """One worker process: up to `concurrency` jobs at once."""

    def __init__(self, settings: settings_mod.Settings, queue: Queue, store: results.Store,
                 model: llm.Llm, worker_id: str, batch_queue: Queue | None = None) -> None:
        self.settings = settings
        self.queue = queue
        self.batch_queue = batch_queue
        """The batch lane, taken from only with room to spare; None: interactive only."""
        self._batch_flowing = False
        self._batch_next_poll = 0.0
        self.store = store
        self.llm = model
        self.id = worker_id
        self.lease = settings.queue.visibility_seconds
        self.heartbeat_every = settings.worker.heartbeat_seconds or self.lease / 3
        self.concurrency = settings.worker.concurrency
        self.tasks: dict[asyncio.Task[None], Delivery] = {}
        self.budget_waiting: set[asyncio.Task[Any]] = set()
        self.stopping = asyncio.Event()
        # Cleared when a job meets an unreachable Redis; receiving waits until it is set.
        self.store_ok = asyncio.Event()
        self.store_ok.set()
        self._reporter: asyncio.Task[None] | None = None
        self._janitor: asyncio.Task[None] | None = None
        # The model's health, shared with every worker: a down model holds the queue.
        self.breaker = breaker.Breaker(store.redis, settings.llm, settings.redis.results_ttl_seconds)
        self.budgets = budget.Budgets(store.redis, settings) if settings.llm.budget else None
        self._watcher: asyncio.Task[None] | None = None

    def stop(self) -> None:
        """Ask the worker to drain and exit (SIGTERM)."""
        if not self.stopping.is_set():
            log.info("stopping: no new messages; %d job(s) in flight get %.0fs to finish",
                     len(self.tasks), self.settings.worker.grace_seconds)
            self.stopping.set()

    async def run(self) -> None:
        """The whole life of the worker."""
        await self.startup()
        try:
            await self.main_loop()
        finally:
            await self.shutdown()

    async def startup(self) -> None:
        """Wait for the queue, then start reporting busy counts."""
        delay = 0.5
        while not self.stopping.is_set():
            try:
                await self.queue.setup()
                if self.batch_queue is not None:
                    await self.batch_queue.setup()
                break
            except (errors.StoreUnavailable, errors.TemporaryError) as exc:
                log.warning("waiting for the %s queue %r: %s (retrying in %.0fs)",
                            self.queue.backend, self.queue.name, exc, delay)
                await self._sleep_unless_stopping(delay)
                delay = min(10.0, delay * 2)
        metrics.concurrency.set(self.concurrency)
        self._reporter = asyncio.create_task(self._report_busy(), name="busy-report")
        if self.settings.worker.janitor_seconds > 0:
            sweeper = janitor.Janitor(self.settings.worker, self.store, self.queue)
            self._janitor = asyncio.create_task(sweeper.run(self.stopping), name="janitor")
        self._watcher = asyncio.create_task(self.breaker.watch(self.llm.probe), name="model-health")
        log.info("worker %s ready: %s queue %r, concurrency %d, model %s%s", self.id,
                 self.queue.backend, self.queue.name, self.concurrency, self.llm.default_model,
                 " (llmsim)" if self.llm.simulated else "")

    async def main_loop(self) -> None:
        """Receive while there is room; one task per message; interactive before batch.

        One interactive receive is in flight whenever there is room (a long poll, so a
        question is taken the moment it arrives). Batch lines are taken only while that poll
        has been waiting for `lanes.QUIET_SECONDS` (no question is waiting), only into the
        room it leaves, and never into the last `CHATQ_BATCH_RESERVE` slots; while batch
        lines flow, the poll asks for at most that reserve, so it holds few slots.
        """
        stop = asyncio.create_task(self.stopping.wait())
        poll: asyncio.Task[list[Delivery]] | None = None
        poll_size, poll_started = 0, 0.0
        delay = 0.5
        try:
            while not self.stopping.is_set():
                if not self.store_ok.is_set():
                    await self._wait_for_store()
                    continue
                if self.breaker.down and not self.breaker.outage_over():
                    # Hold the queue: nothing is received until the model answers again.
                    await self.breaker.wait_change(1.0)
                    continue
                room = self.concurrency - len(self.tasks) - (poll_size if poll else 0)
                if poll is None and room > 0:
                    batch_due = self.batch_queue is not None and (
                        self._batch_flowing or time.monotonic() >= self._batch_next_poll)
                    poll_size = lanes.interactive_take(room, self.settings.worker.batch_size,
                                                       self.settings.batch.reserve, batch_due)
                    poll = asyncio.create_task(self.queue.receive(
                        poll_size, self.settings.queue.wait_seconds))
                    poll_started = time.monotonic()
                    room -= poll_size
                timeout = None
                if self.batch_queue is not None and poll is not None and not poll.done():
                    quiet_for = time.monotonic() - poll_started
                    if quiet_for < lanes.QUIET_SECONDS:
                        timeout = lanes.QUIET_SECONDS - quiet_for
                    else:
                        took = await self._take_batch(room)
                        if took == "took":
                            continue
                        if took == "idle":  # full: the wait wakes when a job finishes
                            timeout = max(0.01, self._batch_next_poll - time.monotonic())
                waiting = {stop, *self.tasks} | ({poll} if poll else set())
                await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if poll is None or not poll.done():
                    continue
                done, poll = poll, None
                try:
                    self._start(done.result(), "interactive")
                    delay = 0.5
                except errors.ChatqError as exc:
                    log.warning("cannot receive from the %s queue: %s (retrying in %.0fs)",
                                self.queue.backend, exc, delay)
                    await self._sleep_unless_stopping(delay)
                    delay = min(10.0, delay * 2)
        finally:
            stop.cancel()
            if poll is not None and not poll.done():
                # Stopping mid long-poll: what it would have got stays on the queue.
                poll.cancel()
                with contextlib.suppress(asyncio.CancelledError, errors.ChatqError):
                    await poll

    async def _take_batch(self, room: int) -> str:
        """Take batch lines into the spare room, without waiting: 'took' when some came,
        'full' when there is no spare room, 'idle' when the lane is (or was just) empty."""
        if self.batch_queue is None or time.monotonic() < self._batch_next_poll:
            return "idle"
        in_flight = sum(1 for d in self.tasks.values() if d.lane == "batch")
        take = lanes.batch_take(room, self.concurrency, in_flight, self.settings.batch.reserve,
                                self.settings.worker.batch_size)
        if take <= 0:
            return "full"
        try:
            got = await self.batch_queue.receive(take, 0)
        except errors.ChatqError as exc:
            log.warning("cannot receive from the batch lane: %s", exc)
            got = []
        self._batch_flowing = bool(got)
        if not got:
            self._batch_next_poll = time.monotonic() + lanes.BATCH_IDLE_SECONDS
            return "idle"
        self._start(got, "batch")
        return "took"

    def _start(self, deliveries: list[Delivery], lane: str) -> None:
        for delivery in deliveries:
            delivery.lane = lane
            metrics.deliveries.labels(self.queue.backend).inc()
            task = asyncio.create_task(self.run_job(delivery))
            self.tasks[task] = delivery
            task.add_done_callback(self._job_done)
        metrics.in_flight.set(len(self.tasks))

    def _queue_of(self, delivery: Delivery) -> Queue:
        if delivery.lane == "batch" and self.batch_queue is not None:
            return self.batch_queue
        return self.queue

    async def _wait_for_store(self) -> None:
        """Redis went silent for this worker: probe it (with backoff) before taking more."""
        delay = 0.5
        while not self.stopping.is_set():
            try:
                await self.store.ping()
                log.info("Redis answers again: receiving jobs")
                self.store_ok.set()
                return
            except errors.ChatqError as exc:
                log.warning("not receiving: Redis is unreachable from this worker (%s); "
                            "probing again in %.1fs", exc, delay)
            await self._sleep_unless_stopping(delay)
            delay = min(5.0, delay * 2)

    def _job_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.pop(task, None)
        metrics.in_flight.set(len(self.tasks))
        if not task.cancelled() and task.exception() is not None:
            log.error("job task failed", exc_info=task.exception())

    async def shutdown(self) -> None:
        """Let in-flight jobs finish within the grace period; hand the rest back; close."""
        for task in list(self.budget_waiting):
            task.cancel()  # not started yet: handed back at once, not after the grace period
        if self.tasks:
            grace = self.settings.worker.grace_seconds
            log.info("waiting up to %.0fs for %d job(s) in flight", grace, len(self.tasks))
            _, late = await asyncio.wait(set(self.tasks), timeout=grace)
            if late:
                log.warning("handing %d unfinished job(s) back to the queue", len(late))
                for task in late:
                    task.cancel()
                await asyncio.gather(*late, return_exceptions=True)
        for helper in (self._reporter, self._janitor, self._watcher):
            if helper is not None:
                helper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await helper
        with contextlib.suppress(errors.ChatqError):
            await self.store.clear_busy(self.id)
        if self.budgets is not None:
            await self.budgets.close()
        log.info("worker %s stopped", self.id)

    async def run_job(self, delivery: Delivery) -> None:
        """Take one message from claim to ack; never raises for a job's own failure."""
        try:
            message = jobs.decode_message(delivery.body)
        except errors.MalformedMessage as exc:
            log.warning("dead-lettering malformed message %s: %s", delivery.message_id, exc)
            await self._dead_letter(delivery, "malformed_message")
            return
        with telemetry.consumer_span(self.queue.backend, self.queue.name, message.job_id,
                                     delivery.attributes, message_id=delivery.message_id):
            try:
                await self._run_claimed(delivery, message)
            except errors.StoreUnavailable as exc:
                # Handed straight back, so a worker that can reach Redis takes it now (on
                # SQS this worker could otherwise take it again and again, and sit on it);
                # receiving pauses until Redis answers this worker again.
                log.warning("job %s handed back: %s", message.job_id, exc)
                self.store_ok.clear()
                with contextlib.suppress(errors.ChatqError, TimeoutError):
                    async with asyncio.timeout(self.settings.redis.timeout_seconds):
                        await self.queue.release(delivery)

    async def _run_claimed(self, delivery: Delivery, message: jobs.QueueMessage) -> None:
        job_id = message.job_id
        job_budget = await self._wait_for_budget(delivery, job_id)
        token = f"{self.id}:{uuid.uuid4().hex[:12]}"
        state, record, lease_left = await self.store.claim(job_id, token, self.lease)
        if record is None:
            self._skip(job_id, state)
            if job_budget is not None:
                await job_budget.give_back()
            if state == "leased":
                # Back when the holder's lease runs out, not a whole visibility later: if
                # the holder is dead, the next receive takes the job over (or fails it
                # for too many deliveries) at once.
                with contextlib.suppress(errors.ChatqError):
                    await self._queue_of(delivery).release(delivery, delay=lease_left + 0.5)
            else:  # terminal or gone: nothing left to do for this message
                await self._queue_of(delivery).ack(delivery)
            return
        if job_budget is not None and job_budget.waited:
            await self.store.note_budget_wait(job_id, job_budget.waited)
        claimed_at = time.time()
        metrics.queue_wait.observe(max(0.0, claimed_at - message.enqueued_at))
        if delivery.receive_count > self.settings.queue.max_receives:
            await self._fail(delivery, job_id, token, errors.PermanentError(
                f"delivered {delivery.receive_count} times without finishing",
                code="too_many_deliveries"))
            return
        try:
            request = jobs.ChatRequest.model_validate(record.request or {})
        except ValueError:
            await self._fail(delivery, job_id, token, errors.PermanentError(
                "the job's request is unreadable", code="bad_request_record"))
            return
        if self.breaker.down:
            await self._model_down(delivery, job_id, token, errors.ModelUnavailable(
                f"the model is down ({self.breaker.current.last_error})"))
            return
        usage = await self._call_model(delivery, message, job_id, token, request,
                                       record.attempts, job_budget)
        if usage and "total_tokens" in usage:
            # The key's day quota reserved the job's cost at the api: count real usage instead.
            # A batch line reserved nothing (its batch took one token): it adds its usage.
            reserved = 0 if record.batch_id else budget.job_cost(request, self.settings)
            delta = usage["total_tokens"] - reserved
            with contextlib.suppress(errors.ChatqError):
                await quotas.correct(self.store.redis, record.owner,
                                     record.created_at or time.time(), delta)

    async def _wait_for_budget(self, delivery: Delivery, job_id: str) -> budget.JobBudget | None:
        """Take the first call's budget while the job is still `queued`, renewing the
        message's lease meanwhile; None when there is no budget to take (or no job)."""
        if self.budgets is None:
            return None
        record = await self.store.get(job_id)
        if record is None or record.status != jobs.Status.QUEUED:
            return None  # claim() says what to do with it
        try:
            request = jobs.ChatRequest.model_validate(record.request or {})
        except ValueError:
            return None
        job_budget = self.budgets.for_job(request, record.owner,
                                          budget.priority_of(record.model_dump()))
        keep = asyncio.create_task(self._keep_message(delivery))
        me = asyncio.current_task()
        assert me is not None
        self.budget_waiting.add(me)
        try:
            await job_budget.take_early()
        except asyncio.CancelledError:
            if me.cancelling():
                with contextlib.suppress(errors.ChatqError):
                    await self._queue_of(delivery).release(delivery)
                log.info("job %s handed back while waiting for budget", job_id)
            raise
        finally:
            self.budget_waiting.discard(me)
            keep.cancel()
        return job_budget

    async def _keep_message(self, delivery: Delivery) -> None:
        """Keep an unclaimed message's lease alive (waiting for budget)."""
        while True:
            await asyncio.sleep(self.heartbeat_every)
            with contextlib.suppress(errors.ChatqError):
                await self._queue_of(delivery).extend(delivery, self.lease)

    async def _call_model(self, delivery: Delivery, message: jobs.QueueMessage, job_id: str,
                          token: str, request: jobs.ChatRequest, attempt: int,
                          job_budget: budget.JobBudget | None = None) -> dict[str, int] | None:
        """Run the model and write the outcome; the usage when the answer was written."""
        sink = JobSink(self.store, job_id, attempt)
        work = asyncio.create_task(llm.process_query(self.llm, request, sink, self.breaker,
                                                     job_budget))
        verdict: list[str] = []
        beat = asyncio.create_task(self._heartbeat(delivery, job_id, token, work, verdict))
        try:
            answer = await work
            await sink.flush()
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():  # type: ignore[union-attr]
                await self._hand_back(delivery, job_id, token)
                raise
            # The heartbeat stopped the model: cancelled by the client, or lease lost.
            self._skip(job_id, verdict[0] if verdict else "cancelled")
            if verdict and verdict[0] != "lost":
                await self._queue_of(delivery).ack(delivery)
            return None
        except errors.ModelUnavailable as exc:
            await self._model_down(delivery, job_id, token, exc)
            return None
        except errors.StoreUnavailable:
            # Redis, not the job, failed (a delta write met a restart): run_job hands the
            # job back; recording it as the job's failure would fail a healthy job.
            raise
        except errors.ChatqError as exc:
            await self._fail(delivery, job_id, token, exc, sink.attempt_errors)
            return None
        finally:
            beat.cancel()
        with telemetry.span("chatq.result.write", **{"chatq.job.status": "succeeded"}):
            state = await self.store.finish(job_id, token, jobs.Outcome(
                status=jobs.Status.SUCCEEDED, answer=answer.text or None, usage=answer.usage or None,
                model=answer.model or None, model_seconds=answer.model_seconds,
                finish_reason=answer.finish_reason or None, usage_estimated=answer.usage_estimated,
                attempt_errors=sink.attempt_errors or None))
        if state == "ok":
            metrics.jobs_finished.labels("succeeded", "ok").inc()
            metrics.job_overhead.observe(
                max(0.0, time.time() - message.enqueued_at - answer.model_seconds))
            # One line per job (never its text): with JSON logs it carries job_id and trace_id.
            log.info("job %s succeeded: model %s, %d completion tokens, %.2fs in the model",
                     job_id, answer.model, answer.usage.get("completion_tokens", 0),
                     answer.model_seconds)
        else:
            self._skip(job_id, state)
        if state != "lost":
            await self._queue_of(delivery).ack(delivery)
        return answer.usage if state == "ok" else None

    async def _heartbeat(self, delivery: Delivery, job_id: str, token: str,
                         work: asyncio.Task[llm.Answer], verdict: list[str]) -> None:
        """Renew the message's and the record's lease; stop the model if the job is off."""
        while True:
            await asyncio.sleep(self.heartbeat_every)
            try:
                # Each beat is bounded by the beat interval: a call stuck on a silent link
                # must not hold up the next renewal (a queue that hangs would otherwise
                # keep the record's lease from being renewed too).
                async with asyncio.timeout(self.heartbeat_every):
                    state = await self.store.renew(job_id, token, self.lease)
                    if state == "ok":
                        await self._queue_of(delivery).extend(delivery, self.lease)
                        continue
            except (errors.ChatqError, TimeoutError) as exc:
                log.warning("cannot renew the lease of job %s: %s", job_id,
                            exc or "no answer within the heartbeat interval")
                continue
            verdict.append(state)
            work.cancel()
            return

    async def _fail(self, delivery: Delivery, job_id: str, token: str,
                    exc: errors.ChatqError, attempt_errors: list[dict[str, object]] | None = None,
                    ) -> None:
        """Record the failure and dead-letter the message."""
        code = getattr(exc, "code", "error")
        # What the model streamed before a failure that is not retried stays visible.
        partial = getattr(exc, "partial", "") if isinstance(exc, errors.PermanentError) else ""
        with telemetry.span("chatq.result.write", **{"chatq.job.status": "failed"}):
            state = await self.store.finish(job_id, token, jobs.Outcome(
                status=jobs.Status.FAILED, answer=partial or None,
                error=jobs.JobError(code=code, message=str(exc)),
                attempt_errors=attempt_errors or None))
        log.warning("job %s failed: %s (%s)", job_id, exc, code, extra={"error_code": code})
        if state == "ok":
            metrics.jobs_finished.labels("failed", code).inc()
        if state != "lost":
            await self._dead_letter(delivery, code)

    async def _dead_letter(self, delivery: Delivery, reason: str) -> None:
        try:
            await self._queue_of(delivery).dead_letter(delivery, reason)
            metrics.dead_letters.labels(reason).inc()
        except errors.ChatqError as exc:
            log.error("cannot dead-letter message %s: %s", delivery.message_id, exc)

    async def _model_down(self, delivery: Delivery, job_id: str, token: str,
                          exc: errors.ModelUnavailable) -> None:
        """The model is down: the job waits for it, unless it has been down too long."""
        if self.breaker.outage_over():
            window = self.settings.llm.outage_window_seconds
            await self._fail(delivery, job_id, token, errors.PermanentError(
                f"{exc}; it has been down for {self.breaker.current.down_for(time.time()):.0f}s, "
                f"longer than CHATQ_LLM_OUTAGE_WINDOW_SECONDS={window:g}",
                code="model_unavailable"))
            return
        delay = self.settings.llm.handback_delay_seconds
        with contextlib.suppress(errors.ChatqError):
            await self.store.release(job_id, token)
        with contextlib.suppress(errors.ChatqError):
            await self._queue_of(delivery).release(delivery, delay)
        metrics.model_handbacks.inc()
        log.info("job %s handed back (visible again in %.0fs): %s", job_id, delay, exc)

    async def _hand_back(self, delivery: Delivery, job_id: str, token: str) -> None:
        """Shutting down with the job unfinished: queued again, message visible again."""
        with contextlib.suppress(errors.ChatqError):
            await self.store.release(job_id, token)
        with contextlib.suppress(errors.ChatqError):
            await self._queue_of(delivery).release(delivery)
        log.info("job %s handed back", job_id)

    def _skip(self, job_id: str, state: str) -> None:
        reasons = {"missing": "its record is gone (expired or never written)",
                   "leased": "another worker holds it", "lost": "this worker lost its lease"}
        log.info("job %s skipped: %s", job_id, reasons.get(state, f"it is already {state}"))
        if state == "cancelled":
            metrics.jobs_finished.labels("cancelled", "client").inc()

    async def _report_busy(self) -> None:
        every = self.settings.worker.busy_report_seconds
        while True:
            with contextlib.suppress(errors.ChatqError):
                await self.store.report_busy(self.id, len(self.tasks), int(every * 3) + 1,
                                             self.concurrency)
            await asyncio.sleep(every)

    async def _sleep_unless_stopping(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)


async def serve(settings: settings_mod.Settings, worker_id: str) -> None:
    """Build the worker from settings and run it until stopped by a signal."""
    import signal

    from chatq import queues

    store = results.Store.from_settings(settings.redis)
    queue = queues.open_queue(settings, consumer=worker_id)
    batch_queue = queues.open_queue(settings, consumer=worker_id, lane="batch")
    model = llm.Llm(settings)
    worker = Worker(settings, queue, store, model, worker_id, batch_queue)
    loop = asyncio.get_running_loop()
    signals_seen = 0

    def on_signal() -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen > 1:
            log.warning("second signal: exiting now")
            os._exit(1)
        worker.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    # Answered from this loop, so the kubelet's probes see a stuck loop (chatq.probe).
    http = await probe.start(settings.telemetry.metrics_host,
                             probe.port_of(settings.telemetry.metrics_port))
    try:
        await worker.run()
    finally:
        await http.cleanup()
        await queue.close()
        await batch_queue.close()
        await model.close()
        await store.close()
