"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import prometheus_client
from fastapi import APIRouter, Response

from chatq import breaker, errors
from chatq import metrics as chatq_metrics
from chatq.api.deps import QueueDep, ServicesDep, StoreDep, api_error

router = APIRouter(tags=["health"])

#: /readyz answers within this, 503 when Redis or the queue did not: under the chart's
#: readinessProbe timeoutSeconds (3), so the kubelet reads a clear error rather than a timeout
#: (a queue Service whose pod just vanished drops packets until its endpoint goes: botocore's
#: connect timeouts and retries took over 10 s there, seen on real pods).
READY_WITHIN_SECONDS = 2.5


@router.get("/healthz", summary="The process is alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Redis and the queue are reachable")
async def readyz(svc: ServicesDep) -> dict[str, Any]:
    store, queue = svc.store, svc.queue
    try:
        async with asyncio.timeout(READY_WITHIN_SECONDS):
            await store.ping()
    except TimeoutError:
        raise api_error(503, "redis_unavailable",
                        f"Redis did not answer within {READY_WITHIN_SECONDS} s") from None
    except errors.ChatqError as exc:
        raise api_error(503, "redis_unavailable", str(exc)) from None
    try:
        # A queue that was not there when the api started (ElasticMQ after the api) is set
        # up here: an unready api gets no other request that would do it.
        async with asyncio.timeout(READY_WITHIN_SECONDS):
            await svc.ensure_queue()
            depth = await queue.depth()
    except TimeoutError:
        raise api_error(503, "queue_unavailable", f"the {queue.backend} queue did not answer "
                        f"within {READY_WITHIN_SECONDS} s") from None
    except errors.ChatqError as exc:
        raise api_error(503, "queue_unavailable", f"the {queue.backend} queue: {exc}") from None
    # A down model does not make the api unready: it still takes questions, which wait in
    # the queue until the model is back (or the outage window ends).
    model = await breaker.read_view(store.redis)
    chatq_metrics.model_up.set(0 if model.down else 1)
    return {"status": "ready",
            "queue": {"backend": queue.backend, "name": queue.name,
                      "visible": depth.visible, "in_flight": depth.in_flight},
            "model": {"state": "down" if model.down else "up", "down_since": model.down_since,
                      "last_error": model.last_error or None}}


@router.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
async def metrics(queue: QueueDep, store: StoreDep) -> Response:
    # The queue's depth is read at scrape time, so backlog alerts work with no operator and
    # with no worker running (the very case the "no workers" alert is for).
    try:
        async with asyncio.timeout(2):
            depth = await queue.depth()
        chatq_metrics.queue_messages.labels(queue.name, "visible").set(depth.visible)
        chatq_metrics.queue_messages.labels(queue.name, "in_flight").set(depth.in_flight)
    except (errors.ChatqError, TimeoutError):
        for state in ("visible", "in_flight"):
            with contextlib.suppress(KeyError):
                chatq_metrics.queue_messages.remove(queue.name, state)
    with contextlib.suppress(errors.ChatqError, TimeoutError):
        async with asyncio.timeout(2):
            model = await breaker.read_view(store.redis)
        chatq_metrics.model_up.set(0 if model.down else 1)
    return Response(prometheus_client.generate_latest(),
                    media_type=prometheus_client.CONTENT_TYPE_LATEST)
