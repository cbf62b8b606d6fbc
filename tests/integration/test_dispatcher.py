"""The webhook dispatcher in process, against a real Redis and a real receiver: a job's event
is delivered by fan-out itself (no wait for the deliver loop's outbox poll), the event is
acked with its deliveries and nothing is left behind; with every slot busy, new deliveries
are left due for the deliver loop and still go out exactly once each.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
from chatq import dispatcher, redis_client, results, webhooks
from chatq import settings as settings_mod

from tests import servers

SECRET = "whsec_" + "c2VjcmV0LWZvci10ZXN0cy1vbmx5LTAxMjM0NTY3ODk="


@contextlib.asynccontextmanager
async def started(redis: servers.Server, receiver: servers.WebhookReceiver, concurrency: int,
                  deliver_loop: bool) -> AsyncIterator[tuple[aioredis.Redis, dispatcher.Dispatcher]]:
    cfg = settings_mod.WebhookSettings(
        allow_private=True, concurrency=concurrency, retry_base_seconds=0.2,
        retry_max_seconds=1, endpoints=json.dumps([{"url": receiver.url(), "secret": SECRET}]))
    client = redis_client.connect(settings_mod.RedisSettings(url=redis.url), blocking_seconds=5)
    sender = dispatcher.Dispatcher(client, webhooks.EndpointStore(
        client, webhooks.configured_endpoints(cfg)), cfg, consumer="test")
    loops = [asyncio.create_task(sender.fan_out())]
    if deliver_loop:
        loops.append(asyncio.create_task(sender.deliver()))
    try:
        yield client, sender
    finally:
        for task in loops:
            task.cancel()
        await sender.stop()
        await client.aclose()


async def job_ends(client: aioredis.Redis, n: int) -> list[str]:
    """Events as the worker's finish script records them."""
    ids = [f"{i:032x}" for i in range(1, n + 1)]
    for job_id in ids:
        await client.xadd(results.WEBHOOK_EVENTS, {
            "job": job_id, "owner": webhooks.OPEN_OWNER, "kind": "response",
            "status": "succeeded", "finish_reason": "stop", "at": str(time.time())})
    return [f"resp_{i}" for i in ids]


async def arrived(receiver: servers.WebhookReceiver, n: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while len(receiver.received()) < n and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert len(receiver.received()) >= n, f"{len(receiver.received())} of {n} arrived"


async def nothing_left(client: aioredis.Redis) -> None:
    assert await client.xlen(results.WEBHOOK_EVENTS) == 0
    assert (await client.xpending(results.WEBHOOK_EVENTS, dispatcher.GROUP))["pending"] == 0
    deadline = time.monotonic() + 10
    while await client.zcard(results.WEBHOOK_OUTBOX) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert await client.zcard(results.WEBHOOK_OUTBOX) == 0
    assert [k async for k in client.scan_iter("chatq:webhook:delivery:*")] == []


async def test_fan_out_delivers_a_new_event_itself(redis_server: servers.Server) -> None:
    with servers.WebhookReceiver() as receiver:
        async with started(redis_server, receiver, concurrency=8, deliver_loop=False) as (
                client, _):
            want = await job_ends(client, 3)
            await arrived(receiver, 3)
            got = [json.loads(d.body)["data"]["id"] for d in receiver.received()]
            assert sorted(got) == sorted(want)
            await nothing_left(client)
            await asyncio.sleep(0.5)
            assert len(receiver.received()) == 3  # each once


async def test_busy_slots_leave_new_deliveries_to_the_deliver_loop(
        redis_server: servers.Server) -> None:
    with servers.WebhookReceiver() as receiver:
        async with started(redis_server, receiver, concurrency=1, deliver_loop=True) as (
                client, _):
            want = await job_ends(client, 20)
            await arrived(receiver, 20)
            await nothing_left(client)
            await asyncio.sleep(0.5)
            ids = [json.loads(d.body)["data"]["id"] for d in receiver.received()]
            assert sorted(ids) == sorted(want)  # every one, each once
