"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from typing import Any

import prometheus_client
from fastapi import APIRouter, Response

from chatq import errors
from chatq.api.deps import QueueDep, StoreDep, api_error

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Redis and the queue are reachable")
async def readyz(store: StoreDep, queue: QueueDep) -> dict[str, Any]:
    try:
        await store.ping()
    except errors.ChatqError as exc:
        raise api_error(503, "redis_unavailable", str(exc)) from None
    try:
        depth = await queue.depth()
    except errors.ChatqError as exc:
        raise api_error(503, "queue_unavailable", f"the {queue.backend} queue: {exc}") from None
    return {"status": "ready", "queue": {"backend": queue.backend, "name": queue.name,
                                         "visible": depth.visible, "in_flight": depth.in_flight}}


@router.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
async def metrics() -> Response:
    return Response(prometheus_client.generate_latest(),
                    media_type=prometheus_client.CONTENT_TYPE_LATEST)
