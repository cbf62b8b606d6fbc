"""RQ, as its docs show: a plain function enqueued with `Queue.enqueue`, run by `rq worker-pool`.

RQ runs one job at a time per worker process (forking a work horse per job), so its
concurrency is its number of processes.
"""

from __future__ import annotations

import openai
import redis

from bench.peers import job


def answer(job_id: str, question: str) -> None:
    client = openai.OpenAI(base_url=job.base_url(), api_key="none", max_retries=0)
    store = redis.Redis.from_url(job.redis_url())
    try:
        job.answer(client, store, job_id, question)
    finally:
        client.close()
        store.close()
