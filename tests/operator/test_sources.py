"""The queue readers against a real redis-server and a real ElasticMQ, and their cache."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiobotocore.session  # type: ignore[import-untyped,unused-ignore]
import pytest
import redis.asyncio as aioredis
from chatq import queues
from chatq import settings as settings_mod
from chatq.queues import redis_streams
from chatq_operator import decision, sources

from tests import servers

pytestmark = pytest.mark.integration


@pytest.fixture
async def reader() -> AsyncIterator[sources.Sources]:
    src = sources.Sources()
    yield src
    await src.close()


@pytest.fixture
async def rds(redis_server: servers.Server) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
async def sqs(elasticmq: servers.Server, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Any]:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(var, "x")
    session = aiobotocore.session.get_session()
    async with session.create_client("sqs", region_name="us-east-1", endpoint_url=elasticmq.url) as client:
        yield client


async def test_redis_stream_depth(reader: sources.Sources, rds: aioredis.Redis, redis_server: servers.Server
                                  ) -> None:
    queue = sources.RedisQueueRef(redis_server.url, "jobs", "workers")
    # The api's /metrics reads depth through the queue itself: both must agree at each step.
    chatq_queue = redis_streams.RedisStreamsQueue(
        settings_mod.QueueSettings(name="jobs", group="workers"),
        settings_mod.RedisSettings(url=redis_server.url), "api")

    async def read() -> decision.Metrics:
        seen = await reader.metrics(queue, 0)
        assert await chatq_queue.depth() == queues.Depth(seen.visible, seen.in_flight)
        return seen

    try:
        assert await read() == decision.Metrics(0, 0)  # no stream yet
        ids = [await rds.xadd("jobs", {"n": str(i)}) for i in range(5)]
        assert await read() == decision.Metrics(5, 0, 5)  # no group yet: all waiting
        await rds.xgroup_create("jobs", "workers", id="0")
        await rds.xreadgroup("workers", "pod-a", {"jobs": ">"}, count=2)
        assert await read() == decision.Metrics(3, 2, 5)
        # chatq acknowledges and deletes; Redis may then lose track of the lag.
        await rds.xack("jobs", "workers", ids[0])
        await rds.xdel("jobs", ids[0])
        assert await read() == decision.Metrics(3, 1, 5)
        await rds.xadd("jobs", {"n": "5"})
        assert await read() == decision.Metrics(4, 1, 6)
    finally:
        await chatq_queue.close()


async def test_sqs_depth(reader: sources.Sources, sqs: Any, elasticmq: servers.Server) -> None:
    name = f"q-{uuid.uuid4().hex[:8]}"
    url = (await sqs.create_queue(QueueName=name))["QueueUrl"]
    by_url = sources.SqsQueueRef(url=url, endpoint=elasticmq.url)
    by_name = sources.SqsQueueRef(name=name, endpoint=elasticmq.url)
    assert await reader.metrics(by_url, 0) == decision.Metrics(0, 0)
    for i in range(5):
        await sqs.send_message(QueueUrl=url, MessageBody=str(i))
    await sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=2, VisibilityTimeout=60)
    assert await reader.metrics(by_url, 0) == decision.Metrics(3, 2)
    assert await reader.metrics(by_name, 0) == decision.Metrics(3, 2)


async def test_one_read_per_poll_however_many_scalers(reader: sources.Sources, rds: aioredis.Redis,
                                                      redis_server: servers.Server) -> None:
    queue = sources.RedisQueueRef(redis_server.url, "shared", "workers")
    await rds.xadd("shared", {"n": "1"})
    got = await asyncio.gather(*(reader.metrics(queue, 5.0) for _ in range(10)))
    assert {m.visible for m in got} == {1}
    assert reader.reads[queue] == 1
    await reader.metrics(sources.RedisQueueRef(redis_server.url, "shared", "workers"), 5.0)
    assert reader.reads[queue] == 1  # equal queue specs share the entry
    await reader.metrics(queue, 0.0)
    assert reader.reads[queue] == 2


async def test_errors_are_ours_and_cached_too() -> None:
    dead = f"redis://127.0.0.1:{servers.free_port()}/0"
    reader = sources.Sources()
    try:
        queue = sources.RedisQueueRef(dead, "jobs", "workers")
        with pytest.raises(sources.SourceError, match="redis:jobs/workers"):
            await reader.metrics(queue, 5.0)
        with pytest.raises(sources.SourceError):
            await reader.metrics(queue, 5.0)
        assert reader.reads[queue] == 1
        sqs_queue = sources.SqsQueueRef(url="http://127.0.0.1:1/q", endpoint=f"http://127.0.0.1:{servers.free_port()}")
        with pytest.raises(sources.SourceError, match="sqs:"):
            await reader.metrics(sqs_queue, 0)
        with pytest.raises(sources.SourceError, match=r"busy counts at redis://\*\*\*@127"):
            await reader.busy(dead.replace("redis://", "redis://:secret@"), ["pod-a"])
    finally:
        await reader.close()


async def test_busy_counts(reader: sources.Sources, rds: aioredis.Redis,
                           redis_server: servers.Server) -> None:
    await rds.set("chatq:busy:pod-a", 3)
    await rds.set("chatq:busy:pod-b", 0)
    await rds.set("chatq:busy:pod-c", "garbage")
    await rds.set("chatq:busy:elsewhere", 7)
    got = await reader.busy(redis_server.url, ["pod-a", "pod-b", "pod-c", "pod-d"])
    assert got == {"pod-a": 3, "pod-b": 0}
    assert await reader.busy(redis_server.url, []) == {}


async def test_held_jobs_of_the_fair_window(reader: sources.Sources, rds: aioredis.Redis,
                                            redis_server: servers.Server) -> None:
    assert await reader.held(redis_server.url) == 0  # nothing ever held
    await rds.set("chatq:fair:held", 7)
    assert await reader.held(redis_server.url) == 7
    assert await reader.held("") == 0
