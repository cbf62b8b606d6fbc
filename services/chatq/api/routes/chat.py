"""The v1 chat routes (and the seed's aliases `POST /chat`, `GET /result/{id}`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from chatq import budget, errors, fair, jobs, metrics, quotas, results, telemetry
from chatq.api.deps import OwnerDep, Services, ServicesDep, api_error

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/chat", tags=["chat"])
aliases = APIRouter(tags=["seed aliases"])
seed = APIRouter(tags=["seed routes"])

JobId = Annotated[str, Path(description="The job id from POST /v1/chat.", max_length=64)]
_EVENT_ID = re.compile(r"^\d+-\d+$")
# Held requests wait on chatq.wakeups, and re-read Redis on their own only this often
# (jittered, so thousands held at once do not re-read at once): a missed wake-up, or a
# worker of an older version that does not tick, costs at most this. SSE streams send a
# keep-alive comment then too, so proxies keep an idle stream open.
RECHECK_SECONDS = 15.0
# Events read, and sent in one write, at a time: what a stream whose client stopped
# reading holds while it waits out CHATQ_API_SEND_TIMEOUT_SECONDS.
EVENT_BATCH = 100


class JobCreated(jobs.PublicView):
    """The answer to POST /v1/chat."""

    id: str
    status: jobs.Status
    created_at: jobs.IsoTime


class Job(jobs.PublicView):
    """A job as GET /v1/chat/{id} shows it: the public fields of its JobRecord."""

    id: str
    status: jobs.Status
    model: str | None = None
    answer: str | None = None
    finish_reason: str | None = None
    """Why the model stopped: `stop`, or `length` when cut by max_tokens or the context."""
    usage_estimated: bool = False
    """True when the server sent no usage and chatq counted the tokens itself."""
    attempt_errors: list[dict[str, Any]] | None = None
    """What each failed model attempt was: attempt, code, message."""
    budget_wait_seconds: float | None = None
    """Seconds the job waited, still queued, for the model's shared rate budget."""
    error: jobs.JobError | None = None
    usage: dict[str, int] | None = None
    attempts: int = 0
    simulated: bool = False
    """True when llmsim, not a real model, wrote the answer."""
    metadata: dict[str, str] | None = None
    created_at: jobs.IsoTime = None
    started_at: jobs.IsoTime = None
    finished_at: jobs.IsoTime = None
    updated_at: jobs.IsoTime = None


async def load_owned(store: results.Store, job_id: str, owner: str) -> jobs.JobRecord:
    """The record, or 404 when unknown, expired or another key's (no existence leak)."""
    record = await store.get(job_id) if re.fullmatch(r"[0-9a-f]{1,64}", job_id) else None
    if record is None or record.owner != owner:
        raise api_error(404, "not_found", f"no job {job_id!r}")
    return record


@router.post("", status_code=202, response_model=JobCreated, summary="Ask a question",
             responses={409: {"description": "Idempotency-Key reused with another body"},
                        429: {"description": "The API key is over its quota (Retry-After)"}})
async def create_chat(
    body: jobs.ChatRequest, response: Response, owner: OwnerDep, svc: ServicesDep,
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=255)] = None,
) -> JobCreated:
    job_id = jobs.new_job_id()
    settings = svc.settings
    if idempotency_key is not None:
        earlier = await svc.store.remember_idempotency(owner, idempotency_key,
                                                       jobs.fingerprint(body), job_id)
        if earlier is not None:
            return await _replay(svc, response, owner, idempotency_key, body, *earlier)
    response.headers.update(await admit(svc, owner, body, job_id, idempotency_key or ""))
    record = jobs.JobRecord.queued(job_id, owner, body, settings.llm_model,
                                   settings.uses_simulator)
    await submit(svc, record, idempotency_key or "")
    response.headers["Location"] = f"{settings.api.public_url}/v1/chat/{job_id}"
    return JobCreated.of(record)


async def admit(svc: Services, owner: str, body: jobs.ChatRequest, job_id: str = "",
                idem_key: str = "") -> dict[str, str]:
    """The key's quota for one job (also /v1/responses): the x-ratelimit-* headers to send,
    or 429 (an idempotency binding made for this refused job is let go, so a retry with the
    same key is a new try)."""
    if svc.quotas is None:
        return {}
    cost = budget.job_cost(body, svc.settings)
    try:
        return await svc.quotas.admit(owner, cost)
    except quotas.QuotaExceeded as exc:
        if idem_key:
            await svc.store.forget(job_id, owner, idem_key)
        raise api_error(429, f"quota_exceeded_{exc.kind}", str(exc), exc.headers) from None


async def _replay(svc: Services, response: Response, owner: str, key: str,
                  body: jobs.ChatRequest, earlier_fp: str, earlier_id: str) -> JobCreated:
    if earlier_fp != jobs.fingerprint(body):
        raise api_error(409, "idempotency_conflict",
                        f"Idempotency-Key {key!r} was used with a different request body")
    record = await load_owned(svc.store, earlier_id, owner)
    response.headers["Location"] = f"{svc.settings.api.public_url}/v1/chat/{earlier_id}"
    response.headers["Idempotent-Replayed"] = "true"
    return JobCreated.of(record)


async def submit(svc: Services, record: jobs.JobRecord, idem_key: str = "") -> None:
    """Write a new job and send it to the queue, or hold it for its key's turn (chatq.fair:
    the queue's window is full, or the key has jobs held already)."""
    if svc.fair is None:
        await svc.store.create(record)
        await enqueue(svc, record.id, record.owner, idem_key)
        return
    if await svc.fair.create(record) is fair.Route.DIRECT:
        await enqueue(svc, record.id, record.owner, idem_key)
    else:
        log.info("job %s held for its key's turn: the queue's window is full", record.id)


async def enqueue(svc: Services, job_id: str, owner: str, idem_key: str = "") -> None:
    """Put a created job on the queue, or take its record back and answer 503."""
    queue = svc.queue
    try:
        await svc.ensure_queue()
        with telemetry.producer_span(queue.backend, queue.name, job_id) as carrier:
            await queue.send(jobs.encode_message(job_id), carrier)
            # One line per job (never its text), with job_id and, traced, the trace id.
            log.info("job %s queued on the %s queue %r", job_id, queue.backend, queue.name)
    except errors.ChatqError as exc:
        # Nothing will ever run this job: take the record back so no one waits on it.
        try:
            await svc.store.forget(job_id, owner, idem_key)
            if svc.fair is not None:
                await svc.fair.forget(job_id, owner)
        except errors.ChatqError:
            pass
        raise api_error(503, "queue_unavailable",
                        f"could not enqueue the job on the {queue.backend} queue: {exc}",
                        {"Retry-After": "1"}) from None
    metrics.jobs_enqueued.labels(queue.backend).inc()


@router.get("/{job_id}", response_model=Job, summary="The job, optionally long-polled",
            responses={429: {"description": "The API key holds too many long-polls and streams "
                                            "open (Retry-After)"}})
async def get_chat(
    job_id: JobId, owner: OwnerDep, svc: ServicesDep,
    wait: Annotated[float, Query(ge=0, le=3600, description=(
        "Seconds to wait for the job to finish (bounded by CHATQ_API_MAX_WAIT_SECONDS)."))] = 0,
) -> Job:
    wait = min(wait, svc.settings.api.max_wait_seconds)
    if wait <= 0:
        return Job.of(await load_owned(svc.store, job_id, owner))
    # Watched before the first read, so that read is also the wait's first: one Redis
    # read per long-poll, not two (a burst of thousands waits on the pool half as long).
    async with svc.wakeups.watch(job_id) as woken:
        record = await load_owned(svc.store, job_id, owner)
        if not record.status.terminal:
            with svc.holds.hold(owner):
                record = await wait_terminal(svc, job_id, record, wait, woken)
    return Job.of(record)


def recheck_seconds() -> float:
    """How long a held request waits for a wake-up before it re-reads on its own."""
    return RECHECK_SECONDS * random.uniform(0.75, 1.25)


async def wait_terminal(svc: Services, job_id: str, record: jobs.JobRecord, wait: float,
                        woken: asyncio.Event | None = None) -> jobs.JobRecord:
    """The record once terminal, or as it stands after `wait` seconds. Waits on the
    process's one subscription (chatq.wakeups): no Redis connection is held meanwhile.
    `woken`: the caller's watch of the job, opened before it read `record` (which is then
    not read again at once); without it, one is opened here and the record re-read."""
    deadline = time.monotonic() + wait
    async with contextlib.AsyncExitStack() as scope:
        fresh = woken is not None
        if woken is None:
            woken = await scope.enter_async_context(svc.wakeups.watch(job_id))
        while True:
            if not fresh:
                woken.clear()  # then read: a wake-up from now on is not lost
                record = await svc.store.get(job_id) or record
            fresh = False
            left = deadline - time.monotonic()
            if record.status.terminal or left <= 0:
                return record
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(woken.wait(), min(left, recheck_seconds()))


Events = list[tuple[str, dict[str, str]]]


async def follow(svc: Services, job_id: str, after: str, loaded: jobs.JobRecord | None = None
                 ) -> AsyncIterator[tuple[str, Events, jobs.JobRecord | None]]:
    """A job's stream events after id `after`, as they come: ("events", a batch, None);
    ("idle", [], None) when nothing came for a while (send a keep-alive); ("end", [],
    the record or None when gone) when the stream is past its end without a `done` event
    (expired, or the job is gone). Ends after the batch that holds `done`. `loaded`: the
    record as the caller just read it, used for the first check instead of a re-read (a
    job that ended since has its `done` in the stream, read after the watch is open)."""
    store = svc.store
    async with svc.wakeups.watch(job_id, events=True) as woken:
        check = True
        while True:
            woken.clear()  # then read: a tick from now on is not lost
            items = await store.read_events(job_id, after, block_ms=0, count=EVENT_BATCH)
            if items:
                after = items[-1][0]
                yield "events", items, None
                if any(fields.get("type") == "done" for _, fields in items):
                    return
                if len(items) == EVENT_BATCH:
                    continue  # more to read now
            elif check:
                record, loaded = loaded or await store.get(job_id), None
                if record is None or record.status.terminal:
                    yield "end", [], record
                    return
            try:
                await asyncio.wait_for(woken.wait(), recheck_seconds())
                check = False
            except TimeoutError:
                check = True
                yield "idle", [], None


@router.get("/{job_id}/events", summary="Server-Sent Events: token deltas, then `done`",
            response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}},
                       429: {"description": "The API key holds too many long-polls and streams "
                                            "open (Retry-After)"}})
async def chat_events(
    job_id: JobId, owner: OwnerDep, svc: ServicesDep,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> StreamingResponse:
    record = await load_owned(svc.store, job_id, owner)
    if last_event_id is not None and not _EVENT_ID.match(last_event_id):
        raise api_error(400, "bad_last_event_id", "Last-Event-ID must be an id this stream sent")
    return svc.holds.stream(owner, _event_stream(svc, record, last_event_id or "0-0"),
                            media_type="text/event-stream",
                            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _event_stream(svc: Services, loaded: jobs.JobRecord, after: str
                        ) -> AsyncIterator[bytes]:
    job_id = loaded.id
    yield b"retry: 1000\n\n"
    async for kind, items, record in follow(svc, job_id, after, loaded):
        if kind == "idle":
            yield b": keep-alive\n\n"
        elif kind == "end":
            # Already past the end (or gone): close with the outcome.
            final = (Job.of(record).model_dump(mode="json") if record
                     else {"id": job_id, "status": "expired"})
            yield f"event: done\ndata: {json.dumps(final)}\n\n".encode()
        else:
            yield "".join(f"id: {event_id}\nevent: {fields.get('type', 'message')}\n"
                          f"data: {fields.get('data', '{}')}\n\n"
                          for event_id, fields in items).encode()


@router.post("/{job_id}/cancel", response_model=Job, summary="Cancel a queued or running job")
async def cancel_chat(job_id: JobId, owner: OwnerDep, svc: ServicesDep) -> Job:
    store = svc.store
    await load_owned(store, job_id, owner)
    state = await store.cancel(job_id)
    if state == "missing":
        raise api_error(404, "not_found", f"no job {job_id!r}")
    record = await load_owned(store, job_id, owner)
    if state != jobs.Status.CANCELLED.value:
        raise api_error(409, "not_cancellable", f"the job has already {state}")
    return Job.of(record)


# The seed designs' names, kept working.
aliases.add_api_route("/chat", create_chat, methods=["POST"], status_code=202,
                      response_model=JobCreated, summary="Alias of POST /v1/chat", deprecated=True)
aliases.add_api_route("/result/{job_id}", get_chat, methods=["GET"], response_model=Job,
                      summary="Alias of GET /v1/chat/{id}", deprecated=True)


class AnswerRequest(BaseModel):
    """The body of `POST /answer`: the job id `POST /question` gave."""

    model_config = {"extra": "forbid"}

    id: Annotated[str, Field(min_length=1, max_length=64)]
    wait: Annotated[float, Field(ge=0, le=3600)] = 0
    """Seconds to wait for the job to finish, as `?wait=` on GET /v1/chat/{id}."""


# The seed sqs_worker_exemple's sequence: post a question, later post a request for the
# answer by job id.
seed.add_api_route("/question", create_chat, methods=["POST"], status_code=202,
                   response_model=JobCreated, summary="Post a question (as POST /v1/chat)")


@seed.post("/answer", response_model=Job, summary="The answer by job id (as GET /v1/chat/{id})")
async def post_answer(body: AnswerRequest, owner: OwnerDep, svc: ServicesDep) -> Job:
    return await get_chat(body.id, owner, svc, wait=body.wait)
