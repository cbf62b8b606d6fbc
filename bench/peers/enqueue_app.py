"""The enqueue side of each peer: one FastAPI endpoint that validates a question and
enqueues it with the library named by PEER_LIB, the way that library's docs show
(Celery `apply_async`, arq `enqueue_job`, RQ `Queue.enqueue`, Dramatiq `send`).

    PEER_LIB=arq PEER_REDIS_URL=redis://... uvicorn bench.peers.enqueue_app:app
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, Field

LIB = os.environ.get("PEER_LIB", "arq")
state: dict[str, Any] = {}


class Question(BaseModel):
    message: str = Field(min_length=1, max_length=32_000)


@contextlib.asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    if LIB == "arq":
        from arq import create_pool
        from arq.connections import RedisSettings
        state["pool"] = await create_pool(RedisSettings.from_dsn(os.environ["PEER_REDIS_URL"]))
    elif LIB == "rq":
        import redis
        from rq import Queue
        state["queue"] = Queue(connection=redis.Redis.from_url(os.environ["PEER_REDIS_URL"]))
    yield
    if "pool" in state:
        await state["pool"].aclose()


app = FastAPI(lifespan=lifespan)


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


if LIB == "arq":
    @app.post("/chat", status_code=202)
    async def enqueue_arq(q: Question) -> dict[str, str]:
        job_id = uuid.uuid4().hex
        await state["pool"].enqueue_job("answer", job_id, q.message)
        return {"id": job_id}
elif LIB == "celery":
    from bench.peers import celery_app

    @app.post("/chat", status_code=202)
    def enqueue_celery(q: Question) -> dict[str, str]:  # Celery's client is synchronous
        job_id = uuid.uuid4().hex
        celery_app.answer.apply_async(args=[job_id, q.message])
        return {"id": job_id}
elif LIB == "rq":
    from bench.peers import rq_jobs

    @app.post("/chat", status_code=202)
    def enqueue_rq(q: Question) -> dict[str, str]:
        job_id = uuid.uuid4().hex
        state["queue"].enqueue(rq_jobs.answer, job_id, q.message, result_ttl=0)
        return {"id": job_id}
elif LIB == "dramatiq":
    from bench.peers import dramatiq_actors

    @app.post("/chat", status_code=202)
    def enqueue_dramatiq(q: Question) -> dict[str, str]:
        job_id = uuid.uuid4().hex
        dramatiq_actors.answer.send(job_id, q.message)
        return {"id": job_id}
