"""arq, as its docs show: an async function, `WorkerSettings`, `arq bench.peers.arq_worker.WorkerSettings`."""

from __future__ import annotations

import os
from typing import Any

import openai
import redis.asyncio
from arq.connections import RedisSettings

from bench.peers import job


async def startup(ctx: dict[str, Any]) -> None:
    ctx["client"] = openai.AsyncOpenAI(base_url=job.base_url(), api_key="none", max_retries=0)
    ctx["store"] = redis.asyncio.Redis.from_url(job.redis_url())


async def shutdown(ctx: dict[str, Any]) -> None:
    await ctx["client"].close()
    await ctx["store"].aclose()


async def answer(ctx: dict[str, Any], job_id: str, question: str) -> None:
    await job.answer_async(ctx["client"], ctx["store"], job_id, question)


class WorkerSettings:
    """arq's worker configuration: 256 jobs at once, results not kept."""

    functions = [answer]
    on_startup = startup
    on_shutdown = shutdown
    redis_settings = RedisSettings.from_dsn(os.environ.get("PEER_REDIS_URL", "redis://127.0.0.1:6379"))
    max_jobs = int(os.environ.get("PEER_CONCURRENCY", "256"))
    keep_result = 0
