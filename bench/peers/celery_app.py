"""Celery, as its docs show: an app, a task, `celery -A ... worker --pool threads|prefork`.

The broker is Redis or SQS (ElasticMQ), from PEER_BROKER. `acks_late` so a lost worker's
task is redelivered (the nearest Celery has to a lease); prefetch 1 per slot, as the
docs advise for long tasks.
"""

from __future__ import annotations

import os

import openai
import redis
from celery import Celery

from bench.peers import job

app = Celery("peers", broker=os.environ.get("PEER_BROKER", "redis://127.0.0.1:6379/0"))
app.conf.update(task_acks_late=True, worker_prefetch_multiplier=1, task_ignore_result=True,
                broker_connection_retry_on_startup=True, worker_hijack_root_logger=False)
if app.conf.broker_url.startswith("sqs://"):
    app.conf.broker_transport_options = {
        "region": "elasticmq", "is_secure": False, "visibility_timeout": 60,
        "predefined_queues": {"celery": {"url": os.environ.get("PEER_SQS_QUEUE_URL", ""),
                                         "access_key_id": "x", "secret_access_key": "x"}}}

_client: openai.OpenAI | None = None
_store: redis.Redis | None = None


@app.task(name="answer")
def answer(job_id: str, question: str) -> None:
    """One question; the client and Redis connection are made once per process."""
    global _client, _store
    if _client is None or _store is None:
        _client = openai.OpenAI(base_url=job.base_url(), api_key="none", max_retries=0)
        _store = redis.Redis.from_url(job.redis_url())
    job.answer(_client, _store, job_id, question)
