"""Dramatiq with its AsyncIO middleware, as its docs show: an `async def` actor run by
`dramatiq bench.peers.dramatiq_actors --processes 1 --threads N`. Each worker thread waits
for one coroutine on the shared event loop, so the thread count is its concurrency.
"""

from __future__ import annotations

import os

import dramatiq
import openai
import redis.asyncio
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware.asyncio import AsyncIO

from bench.peers import job

broker = RedisBroker(url=os.environ.get("PEER_REDIS_URL", "redis://127.0.0.1:6379/0"))
broker.add_middleware(AsyncIO())
dramatiq.set_broker(broker)

_client: openai.AsyncOpenAI | None = None
_store: redis.asyncio.Redis | None = None


@dramatiq.actor(max_retries=3)
async def answer(job_id: str, question: str) -> None:
    global _client, _store
    if _client is None or _store is None:  # made on the event loop thread, once
        _client = openai.AsyncOpenAI(base_url=job.base_url(), api_key="none", max_retries=0)
        _store = redis.asyncio.Redis.from_url(job.redis_url())
    await job.answer_async(_client, _store, job_id, question)
