"""The embedded default queue: a Redis stream read by a consumer group.

Leases are the group's pending entries: a worker's heartbeat resets an entry's idle time
(XCLAIM to itself), and entries idle longer than the visibility timeout are taken over by
any worker (XAUTOCLAIM), which is how the job of a worker that died is picked up again.
"""

from __future__ import annotations

import logging
import time
from typing import Any, cast

import redis.exceptions

from chatq import errors, redis_client
from chatq import settings as settings_mod
from chatq.queues import Delivery, Depth, stream_depth

log = logging.getLogger(__name__)

# Longest one XREADGROUP blocks, so a stopping worker is never held up for long.
MAX_BLOCK_SECONDS = 2.0


def _delivery(entry_id: str, fields: dict[str, str], count: int) -> Delivery:
    attrs = {k[5:]: v for k, v in fields.items() if k.startswith("attr:")}
    return Delivery(entry_id, fields.get("body", ""), count, entry_id, attrs)


class RedisStreamsQueue:
    """Redis Streams consumer group, XAUTOCLAIM for stuck messages, a dead-letter stream."""

    backend = "redis"

    def __init__(self, cfg: settings_mod.QueueSettings, redis_cfg: settings_mod.RedisSettings,
                 consumer: str) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.dlq = f"{cfg.name}-dlq"
        self.group = cfg.group
        self.consumer = consumer
        self.redis = redis_client.connect(redis_cfg, blocking_seconds=MAX_BLOCK_SECONDS)
        self._visibility_ms = cfg.visibility_seconds * 1000
        self._next_autoclaim = 0.0

    @redis_client.translate_errors
    async def setup(self) -> None:
        try:
            # Id 0, not $: messages sent before any worker started are not skipped.
            await self.redis.xgroup_create(self.name, self.group, id="0", mkstream=True)
        except redis.exceptions.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise errors.PermanentError(f"cannot create consumer group: {exc}") from None

    @redis_client.translate_errors
    async def send(self, body: str, attributes: dict[str, str]) -> str:
        fields: dict[str | bytes, str | bytes] = {"body": body}
        fields.update({f"attr:{k}": v for k, v in attributes.items()})
        return str(await self.redis.xadd(self.name, fields))  # type: ignore[arg-type]

    @redis_client.translate_errors
    async def receive(self, max_messages: int, wait_seconds: float) -> list[Delivery]:
        got = await self._reclaim(max_messages)
        if len(got) < max_messages:
            # BLOCK 0 would wait forever: no wait means no BLOCK at all.
            block_ms = int(min(wait_seconds, MAX_BLOCK_SECONDS) * 1000) if not got else 0
            block = block_ms or None
            try:
                reply = await self.redis.xreadgroup(self.group, self.consumer, {self.name: ">"},
                                                    count=max_messages - len(got), block=block)
            except redis.exceptions.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                await self.setup()
                reply = []
            for _stream, entries in cast(list[Any], reply or []):
                for entry_id, fields in entries:
                    got.append(_delivery(entry_id, fields, 1))
        return got

    async def _reclaim(self, max_messages: int) -> list[Delivery]:
        """Take over messages whose holder stopped renewing them (at most every second)."""
        now = time.monotonic()
        if now < self._next_autoclaim:
            return []
        self._next_autoclaim = now + 1.0
        try:
            reply = await self.redis.xautoclaim(self.name, self.group, self.consumer,
                                                self._visibility_ms, "0-0", count=max_messages)
        except redis.exceptions.ResponseError as exc:
            if "NOGROUP" in str(exc):
                await self.setup()
                return []
            raise
        entries = reply[1]
        deleted = reply[2] if len(reply) > 2 else []
        if deleted:
            # Entries trimmed away while pending: nothing left to deliver, drop them.
            await self.redis.xack(self.name, self.group, *deleted)
        out = []
        for entry_id, fields in entries:
            if fields is None:
                continue
            pending = await self.redis.xpending_range(self.name, self.group, entry_id, entry_id, 1)
            count = int(pending[0]["times_delivered"]) if pending else 1
            out.append(_delivery(entry_id, fields, count))
        if out:
            log.info("took over %d message(s) idle for over %ds", len(out),
                     self.cfg.visibility_seconds)
        return out

    @redis_client.translate_errors
    async def ack(self, delivery: Delivery) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(self.name, self.group, delivery.handle)
            pipe.xdel(self.name, delivery.handle)
            await pipe.execute()

    @redis_client.translate_errors
    async def extend(self, delivery: Delivery, seconds: int) -> None:
        # Claiming it for ourselves resets its idle time: the lease is renewed.
        await self.redis.xclaim(self.name, self.group, self.consumer, 0, [delivery.handle],
                                justid=True)

    @redis_client.translate_errors
    async def release(self, delivery: Delivery, delay: float = 0.0) -> None:
        # Marked idle for longer than the visibility timeout: the next XAUTOCLAIM, by any
        # worker, takes it at once; with a delay, idle for that much less than the timeout.
        idle = self._visibility_ms + 1000 if delay <= 0 else max(
            0, self._visibility_ms - int(delay * 1000))
        await self.redis.xclaim(self.name, self.group, self.consumer, 0, [delivery.handle],
                                idle=idle, justid=True)

    @redis_client.translate_errors
    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(self.dlq, {"body": delivery.body, "reason": reason,
                                 "message_id": delivery.message_id,
                                 "receive_count": delivery.receive_count})
            pipe.xack(self.name, self.group, delivery.handle)
            pipe.xdel(self.name, delivery.handle)
            await pipe.execute()

    @redis_client.translate_errors
    async def depth(self) -> Depth:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xlen(self.name)
            pipe.xinfo_groups(self.name)
            length, groups = await pipe.execute(raise_on_error=False)
        if isinstance(length, Exception):
            raise length
        if isinstance(groups, redis.exceptions.ResponseError):
            return Depth(0, 0)  # no stream yet: nothing waits
        return stream_depth(int(length), groups, self.group)

    @redis_client.translate_errors
    async def dead_letters(self, limit: int = 100) -> list[str]:
        entries = cast(list[tuple[str, dict[str, str]]], await self.redis.xrange(self.dlq, count=limit))
        return [fields.get("body", "") for _id, fields in entries]

    async def close(self) -> None:
        await self.redis.aclose()
