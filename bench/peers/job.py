"""The job every peer runs: stream an answer from the model, store it, count it.

The answer goes to `peer:answer:<id>` with a TTL and the counter `peer:done` is
incremented, which is how the runner sees progress. chatq does more per job (a lease,
streamed deltas in Redis, a job record, retries): the README's peer table says so.
"""

from __future__ import annotations

import os

import openai
import redis

MODEL = "chatq-sim-1"
DONE = "peer:done"


def base_url() -> str:
    """llmsim's OpenAI-compatible URL, as the runner exports it."""
    return os.environ["PEER_LLM_BASE_URL"]


def redis_url() -> str:
    """The Redis that holds answers (and, for the Redis brokers, the queue)."""
    return os.environ["PEER_REDIS_URL"]


def answer(client: openai.OpenAI, store: redis.Redis, job_id: str, question: str) -> None:
    """The synchronous body (Celery, RQ, Dramatiq's threads)."""
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": question}], stream=True)
    parts = [c.choices[0].delta.content or "" for c in stream if c.choices]
    store.set(f"peer:answer:{job_id}", "".join(parts), ex=3600)
    store.incr(DONE)


async def answer_async(client: openai.AsyncOpenAI, store: redis.asyncio.Redis, job_id: str,
                       question: str) -> None:
    """The asyncio body (arq, Dramatiq's AsyncIO middleware)."""
    stream = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": question}], stream=True)
    parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
    await store.set(f"peer:answer:{job_id}", "".join(parts), ex=3600)
    await store.incr(DONE)
