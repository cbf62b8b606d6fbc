"""Enqueues N jobs with one peer library's own client, in the peers' venv (the library reads
its broker from the environment at import): `python -m bench.peers.load LIB N`."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid


def load(lib: str, n: int) -> None:
    """Enqueue n jobs with the library's own client (run in a child: env read at import)."""
    ids = [uuid.uuid4().hex for _ in range(n)]
    if lib in ("celery", "celery-sqs"):
        from bench.peers import celery_app
        for i in ids:
            celery_app.answer.apply_async(args=[i, "bench"])
    elif lib == "rq":
        import redis
        from rq import Queue

        from bench.peers import rq_jobs
        q = Queue(connection=redis.Redis.from_url(os.environ["PEER_REDIS_URL"]))
        for i in ids:
            q.enqueue(rq_jobs.answer, i, "bench", result_ttl=0)
    elif lib == "dramatiq":
        from bench.peers import dramatiq_actors
        for i in ids:
            dramatiq_actors.answer.send(i, "bench")
    elif lib == "arq":
        async def go() -> None:
            from arq import create_pool
            from arq.connections import RedisSettings
            pool = await create_pool(RedisSettings.from_dsn(os.environ["PEER_REDIS_URL"]))
            for start in range(0, n, 500):
                chunk = ids[start:start + 500]
                await asyncio.gather(*(pool.enqueue_job("answer", i, "bench") for i in chunk))
            await pool.aclose()
        asyncio.run(go())


if __name__ == "__main__":
    load(sys.argv[1], int(sys.argv[2]))
