"""OpenAI's Responses API over chatq's jobs: create (background, stream, store), retrieve
(and resume a stream with `starting_after`), cancel, delete. Errors take OpenAI's shape.

The views and the event mapping are pure code in `chatq.responses`; these routes do the
I/O: the record and the queue through the same helpers as `/v1/chat`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query
from fastapi.responses import JSONResponse

from chatq import jobs, results
from chatq import responses as views
from chatq.api.deps import OwnerDep, Services, ServicesDep
from chatq.api.openai_errors import OpenAIError, not_found
from chatq.api.routes import chat

router = APIRouter(prefix="/v1/responses", tags=["responses (OpenAI)"])

ResponseId = Annotated[str, Path(description="A response id, `resp_...`.", max_length=80)]
SSE_KEEPALIVE_MS = 15_000
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def _load(store: results.Store, response_id: str, owner: str) -> jobs.JobRecord:
    """The record behind a response id; 404 when unknown, expired, another key's, a chat job,
    or created with store=false."""
    job_id = views.job_id_of(response_id)
    record = await store.get(job_id) if job_id else None
    if (record is None or record.owner != owner or record.kind != views.KIND
            or not (record.view or {}).get("store", True)):
        raise not_found("response", response_id)
    return record


@router.post("", summary="Create a response (background, stream, store)",
             responses={200: {"content": {"text/event-stream": {}}}})
async def create_response(body: views.ResponseCreate, owner: OwnerDep,
                          svc: ServicesDep) -> Any:
    bad = views.unsupported_param(body)
    if bad is not None:
        raise OpenAIError(400, f"chatq does not implement the parameter '{bad}' of the "
                               "Responses API (see the README, 'Use the OpenAI SDK')",
                          param=bad, code="unsupported_parameter")
    if body.background and not body.store:
        raise OpenAIError(400, "background responses must be stored: drop store=false",
                          param="store", code="invalid_parameter")
    try:
        request = views.to_chat_request(body)
    except ValueError as exc:
        raise OpenAIError(400, str(exc), param="input", code="invalid_input") from None
    if body.stream or not body.background:
        svc.holds.check(owner)  # held open below: refused before the job is made
    job_id = jobs.new_job_id()
    settings = svc.settings
    # The key's quota, as on /v1/chat: a refusal is OpenAI's 429 (the SDKs' RateLimitError).
    limits = await chat.admit(svc, owner, request, job_id)
    record = jobs.JobRecord.queued(
        job_id, owner, request, settings.llm_model, settings.uses_simulator, kind=views.KIND,
        view={"background": body.background, "store": body.store})
    if body.stream or body.background:
        await chat.submit(svc, record)
    else:
        # Watched before the job exists: the record just written is the wait's first read,
        # and its wake-up cannot come too early to be seen.
        async with svc.wakeups.watch(job_id) as woken:
            await chat.submit(svc, record)
            with svc.holds.hold(owner):
                record = await chat.wait_terminal(svc, job_id, record,
                                                  settings.api.response_wait_seconds, woken)
        if not body.store and record.status.terminal:
            await svc.store.delete(job_id)
    if body.stream:
        return svc.holds.stream(owner, _stream(svc, record, -1, forget=not body.store),
                                media_type="text/event-stream",
                                headers={**_SSE_HEADERS, **limits})
    return JSONResponse(views.view(record.model_dump()), headers=limits or None)


@router.get("/{response_id}", summary="A response; `stream=true` replays and follows its events",
            responses={200: {"content": {"text/event-stream": {}}}})
async def get_response(
    response_id: ResponseId, owner: OwnerDep, svc: ServicesDep,
    stream: bool = False,
    starting_after: Annotated[int, Query(ge=-1, description=(
        "With stream=true: the sequence number after which events start."))] = -1,
) -> Any:
    record = await _load(svc.store, response_id, owner)
    if stream:
        return svc.holds.stream(owner, _stream(svc, record, starting_after),
                                headers=_SSE_HEADERS, media_type="text/event-stream")
    return JSONResponse(views.view(record.model_dump()))


@router.post("/{response_id}/cancel", summary="Cancel a queued or in-progress response")
async def cancel_response(response_id: ResponseId, owner: OwnerDep,
                          svc: ServicesDep) -> JSONResponse:
    """Idempotent: a response that has already finished (completed, failed, incomplete or
    cancelled) comes back unchanged, with its own status."""
    record = await _load(svc.store, response_id, owner)
    await svc.store.cancel(record.id)
    return JSONResponse(views.view((await _load(svc.store, response_id, owner)).model_dump()))


@router.delete("/{response_id}", summary="Delete a response (cancelling it if unfinished)")
async def delete_response(response_id: ResponseId, owner: OwnerDep,
                          svc: ServicesDep) -> JSONResponse:
    record = await _load(svc.store, response_id, owner)
    await svc.store.delete(record.id)
    return JSONResponse(views.deleted(record.id))


def _sse(event: dict[str, Any]) -> bytes:
    return (f"id: {event['sequence_number']}\nevent: {event['type']}\n"
            f"data: {json.dumps(event, separators=(',', ':'))}\n\n").encode()


async def _job_events(svc: Services, job_id: str
                     ) -> AsyncIterator[tuple[str, dict[str, Any], dict[str, Any] | None]]:
    """(kind, data, terminal record) for each event of the job's Redis stream, following it
    live (chat.follow); None as kind is a keep-alive tick. Ends after `done`, or when the
    job is gone."""
    async for what, items, record in chat.follow(svc, job_id, "0-0"):
        if what == "idle":
            yield "", {}, None
        elif what == "end":
            # The done event is written with the outcome, so it was trimmed with an expired
            # stream: close with the outcome anyway (gone: nothing more will come).
            if record is not None:
                yield "done", {}, record.model_dump()
        for _, fields in items:
            kind = fields.get("type", "")
            final = await svc.store.get(job_id) if kind == "done" else None
            yield kind, json.loads(fields.get("data") or "{}"), final.model_dump() if final else None


async def _stream(svc: Services, record: jobs.JobRecord, starting_after: int,
                  forget: bool = False) -> AsyncIterator[bytes]:
    """Every event of the response from the start, numbered, sent after `starting_after`."""
    job_id = record.id
    # The Responses views read records as mappings (their unit tests build them by hand).
    mapper = views.EventMapper(record.model_dump())
    try:
        for event in mapper.opening():
            if event["sequence_number"] > starting_after:
                yield _sse(event)
        async for kind, data, final in _job_events(svc, job_id):
            if not kind:
                yield b": keep-alive\n\n"
            for event in mapper.feed(kind, data, final):
                if event["sequence_number"] > starting_after:
                    yield _sse(event)
    finally:
        if forget and mapper.finished:
            await svc.store.delete(job_id)
