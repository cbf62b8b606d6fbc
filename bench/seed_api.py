"""The peer of bench.api_post: the seed design's API, a FastAPI route that writes a job
hash and pushes the id on a Redis list. No auth, no idempotency, no metrics, no checks.

    CHATQ_REDIS_URL=redis://... uvicorn bench.seed_api:app
"""

from __future__ import annotations

import json
import os
import uuid

import redis.asyncio as aioredis
from fastapi import FastAPI
from pydantic import BaseModel

app = FastAPI()
r = aioredis.from_url(os.environ.get("CHATQ_REDIS_URL", "redis://localhost:6379/0"),
                      decode_responses=True, max_connections=512)


class Query(BaseModel):
    message: str


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/chat", status_code=202)
async def chat(q: Query) -> dict[str, str]:
    job_id = uuid.uuid4().hex
    await r.hset(f"job:{job_id}", mapping={"status": "queued", "message": q.message})
    await r.rpush("queue", json.dumps({"id": job_id}))
    return {"id": job_id, "status": "queued"}
