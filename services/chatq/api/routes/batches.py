"""OpenAI's Batch API: create, get, cancel and list batches of a key.

The routes only write and read batch records; the feeder (`chatq.feeder`, running in the
API processes under one lease) moves them through their statuses and feeds their lines.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from chatq import batches, catalog, quotas
from chatq.api.deps import OwnerDep, ServicesDep
from chatq.api.openai_errors import OpenAIError, not_found

router = APIRouter(prefix="/v1/batches", tags=["batches"])

BatchId = Annotated[str, Path(max_length=80, pattern=r"^batch_[0-9a-f]+$")]


class BatchCreate(BaseModel):
    """The body of POST /v1/batches."""

    model_config = ConfigDict(extra="ignore")

    input_file_id: Annotated[str, Field(min_length=1, max_length=80)]
    endpoint: Literal["/v1/chat/completions", "/v1/responses"]
    completion_window: Literal["24h"]
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None = None


@router.post("", summary="Create a batch from an uploaded JSONL file",
             responses={429: {"description": "The API key is over its quota (Retry-After)"}})
async def create_batch(body: BatchCreate, owner: OwnerDep, svc: ServicesDep,
                       response: Response) -> dict[str, Any]:
    if body.metadata is not None and len(body.metadata) > 16:
        raise OpenAIError(400, "metadata holds at most 16 pairs", param="metadata")
    source = await svc.catalog.get_file(body.input_file_id)
    if source is None or source.owner != owner:
        raise not_found("file", body.input_file_id)
    if source.purpose != "batch":
        raise OpenAIError(400, f"file {source.id} has purpose {source.purpose!r}, not 'batch'",
                          param="input_file_id", code="invalid_file_purpose")
    other = [u for u in source.urls if u != body.endpoint]
    if other:
        raise OpenAIError(400, f"the file's requests go to {', '.join(other)}, but the batch's "
                          f"endpoint is {body.endpoint}; every line's url must be the endpoint",
                          param="endpoint", code="mismatched_endpoint")
    if svc.quotas is not None:
        # One request of the key's minute; of its day, one token now (refused once the day
        # is used up): each line adds the tokens it really used when it has run.
        try:
            response.headers.update(await svc.quotas.admit(owner, 1))
        except quotas.QuotaExceeded as exc:
            raise OpenAIError(429, str(exc), code=f"quota_exceeded_{exc.kind}",
                              headers=exc.headers) from None
    now = catalog.now()
    record = catalog.BatchRecord(
        id=catalog.new_batch_id(), owner=owner, endpoint=body.endpoint,
        input_file_id=source.id, completion_window=body.completion_window,
        metadata=body.metadata, total=source.lines, created_at=now,
        expires_at=now + svc.settings.batch.completion_window_seconds,
        model=None)
    await svc.catalog.create_batch(record)
    return record.public()


async def _owned(svc: ServicesDep, batch_id: str, owner: str) -> catalog.BatchRecord:
    record = await svc.catalog.get_batch(batch_id)
    if record is None or record.owner != owner:
        raise not_found("batch", batch_id)
    return record


@router.get("/{batch_id}", summary="A batch")
async def get_batch(batch_id: BatchId, owner: OwnerDep, svc: ServicesDep) -> dict[str, Any]:
    return (await _owned(svc, batch_id, owner)).public()


@router.post("/{batch_id}/cancel", summary="Cancel a batch; what finished is kept")
async def cancel_batch(batch_id: BatchId, owner: OwnerDep, svc: ServicesDep) -> dict[str, Any]:
    record = await _owned(svc, batch_id, owner)
    state = await svc.catalog.transition(record.id, batches.CANCELLABLE, status="cancelling",
                                         cancelling_at=catalog.now(), outcome="cancelled")
    if state not in ("ok", "cancelling", "cancelled"):
        raise OpenAIError(409, f"the batch is {state} and can no longer be cancelled",
                          code="batch_not_cancellable")
    return (await _owned(svc, batch_id, owner)).public()


@router.get("", summary="The caller's batches, newest first")
async def list_batches(
    owner: OwnerDep, svc: ServicesDep,
    after: Annotated[str | None, Query(max_length=80)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> dict[str, Any]:
    records, more = await svc.catalog.list_batches(owner, after, limit)
    data = [r.public() for r in records]
    return {"object": "list", "data": data, "has_more": more,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None}

