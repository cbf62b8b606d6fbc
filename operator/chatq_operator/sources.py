"""Queue depth and the workers' busy counts, read at most once per poll per queue.

Jobs chatq's fair window holds back in Redis (`chatq:fair:held`) count as visible too.

Two queue kinds, read through the same depth rules as chatq.queues (`sqs_depth`,
`stream_depth`): SQS (GetQueueAttributes: ApproximateNumberOfMessages and
ApproximateNumberOfMessagesNotVisible; an endpoint override reaches ElasticMQ) and a Redis
stream read by a consumer group (XINFO GROUPS: the group's lag and pending). Busy counts
are the workers' `chatq:busy:<worker id>` keys, the worker id being the pod name.

`Sources` caches each queue's last read for the shortest poll interval of the scalers
that share it, and joins concurrent reads, so N QueueScalers on one queue cost one call.
boto, botocore and redis errors become `SourceError` here and go no further.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import aiobotocore.session  # type: ignore[import-untyped,unused-ignore]
import botocore.config  # type: ignore[import-untyped,unused-ignore]
import botocore.exceptions  # type: ignore[import-untyped,unused-ignore]
import redis.asyncio as aioredis
import redis.exceptions
from chatq import budget, queues, results

from chatq_operator import decision

log = logging.getLogger(__name__)

#: Longest a single queue or Redis call may take, in seconds: a poll must not stall.
CALL_TIMEOUT_SECONDS = 5.0


class SourceError(Exception):
    """A queue or Redis could not be read; the decision holds, then falls back."""


@dataclasses.dataclass(frozen=True)
class SqsQueueRef:
    """An SQS queue, by URL or by name."""

    url: str = ""
    name: str = ""
    region: str = "us-east-1"
    endpoint: str = ""

    def __str__(self) -> str:
        return f"sqs:{self.url or self.name}"


@dataclasses.dataclass(frozen=True)
class RedisQueueRef:
    """A Redis stream and the consumer group of the workers."""

    url: str = "redis://redis:6379/0"
    stream: str = "chatq-jobs"
    group: str = "chatq-workers"

    def __str__(self) -> str:
        return f"redis:{self.stream}/{self.group}"


QueueRef = SqsQueueRef | RedisQueueRef


@dataclasses.dataclass
class _Entry:
    """The last read of one queue: its time and outcome."""

    at: float
    outcome: decision.Metrics | SourceError


class Sources:
    """Queue and busy-count readers with their clients and the per-poll cache."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.reads: Counter[QueueRef] = Counter()
        """Reads that reached each queue (cached answers not counted)."""
        self._cache: dict[QueueRef, _Entry] = {}
        self._pending: dict[QueueRef, asyncio.Future[decision.Metrics]] = {}
        self._redis: dict[str, aioredis.Redis] = {}
        self._sqs: dict[tuple[str, str], Any] = {}
        self._sqs_urls: dict[SqsQueueRef, str] = {}
        self._stack = contextlib.AsyncExitStack()
        self._session = aiobotocore.session.get_session()

    async def metrics(self, queue: QueueRef, max_age: float) -> decision.Metrics:
        """The queue's depth, at most `max_age` seconds old; raises SourceError."""
        entry = self._cache.get(queue)
        if entry is not None and self.clock() - entry.at < max_age:
            return _unwrap(entry.outcome)
        pending = self._pending.get(queue)
        if pending is not None:  # another scaler is reading this queue right now
            return await asyncio.shield(pending)
        future: asyncio.Future[decision.Metrics] = asyncio.get_running_loop().create_future()
        self._pending[queue] = future
        try:
            self.reads[queue] += 1
            metrics = await asyncio.wait_for(self._read(queue), CALL_TIMEOUT_SECONDS * 2)
        except Exception as exc:
            error = exc if isinstance(exc, SourceError) else SourceError(f"{queue}: {exc!r}")
            self._cache[queue] = _Entry(self.clock(), error)
            future.set_exception(error)
            future.exception()  # retrieved: no "never retrieved" warning when nobody waits
            raise error from None
        else:
            self._cache[queue] = _Entry(self.clock(), metrics)
            future.set_result(metrics)
            return metrics
        finally:
            del self._pending[queue]

    async def _read(self, queue: QueueRef) -> decision.Metrics:
        if isinstance(queue, SqsQueueRef):
            return await self._read_sqs(queue)
        return await self._read_redis(queue)

    async def _read_sqs(self, queue: SqsQueueRef) -> decision.Metrics:
        try:
            sqs = await self._sqs_client(queue.region, queue.endpoint)
            url = queue.url or self._sqs_urls.get(queue, "")
            if not url:
                url = str((await sqs.get_queue_url(QueueName=queue.name))["QueueUrl"])
                self._sqs_urls[queue] = url
            reply = await sqs.get_queue_attributes(QueueUrl=url,
                                                   AttributeNames=queues.SQS_DEPTH_ATTRIBUTES)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, OSError,
                TimeoutError) as exc:
            raise SourceError(f"{queue}: {exc}") from None
        depth = queues.sqs_depth(reply.get("Attributes", {}))
        return decision.Metrics(depth.visible, depth.in_flight)

    async def _read_redis(self, queue: RedisQueueRef) -> decision.Metrics:
        client = self._redis_client(queue.url)
        try:
            async with client.pipeline(transaction=False) as pipe:
                pipe.exists(queue.stream)
                pipe.xlen(queue.stream)
                exists, length = await pipe.execute()
            if not exists:  # no job was ever sent: an empty queue, not an error
                return decision.Metrics(0, 0)
            stream = await client.xinfo_stream(queue.stream)
            groups = await client.xinfo_groups(queue.stream)
        except (redis.exceptions.RedisError, OSError) as exc:
            raise SourceError(f"{queue}: {exc}") from None
        added = stream.get("entries-added")
        depth = queues.stream_depth(int(length), groups, queue.group)
        return decision.Metrics(depth.visible, depth.in_flight,
                                int(added) if added is not None else None)

    async def busy(self, redis_url: str, pods: Iterable[str]) -> dict[str, int]:
        """In-flight jobs per pod from `chatq:busy:<pod>`; pods without a report are left out."""
        names = sorted(pods)
        if not names or not redis_url:
            return {}
        client = self._redis_client(redis_url)
        try:
            values = await client.mget([results.busy_key(name) for name in names])
        except (redis.exceptions.RedisError, OSError) as exc:
            raise SourceError(f"busy counts at {_safe_url(redis_url)}: {exc}") from None
        out: dict[str, int] = {}
        for name, value in zip(names, values, strict=True):
            if value is not None:
                with contextlib.suppress(ValueError):
                    out[name] = int(value)
        return out

    async def held(self, redis_url: str) -> int:
        """Interactive jobs chatq's fair window holds back in Redis (chatq.fair): waiting as
        surely as the queue's visible messages, but not on the queue."""
        if not redis_url:
            return 0
        try:
            value = await self._redis_client(redis_url).get(results.FAIR_HELD)
        except (redis.exceptions.RedisError, OSError) as exc:
            raise SourceError(f"held jobs at {_safe_url(redis_url)}: {exc}") from None
        try:
            return max(0, int(value or 0))
        except ValueError:
            return 0

    async def model_down(self, redis_url: str) -> bool:
        """Whether the workers' shared circuit breaker (chatq.breaker) says the model is down."""
        if not redis_url:
            return False
        try:
            state = await self._redis_client(redis_url).hget(results.model_health_key(), "state")
        except (redis.exceptions.RedisError, OSError) as exc:
            raise SourceError(f"model health at {_safe_url(redis_url)}: {exc}") from None
        return bool(state == "down")

    async def budget_cap(self, redis_url: str, endpoint: str, concurrency: int) -> int | None:
        """Replicas the model's rate budget can keep busy (chatq.budget.operator_cap), from
        the workers' shared budget: its limits in force, and the mean seconds and tokens of
        a call the workers measured. `endpoint` empty: every budget there, the tightest.
        None while no budget (or no measured call) is there."""
        client = self._redis_client(redis_url)
        try:
            names = ([results.budget_key(endpoint)] if endpoint else
                     [k async for k in client.scan_iter(match=results.budget_key("*"), count=100)])
            states = [await client.hgetall(name) for name in names]
        except (redis.exceptions.RedisError, OSError) as exc:
            raise SourceError(f"rate budget at {_safe_url(redis_url)}: {exc}") from None
        caps = []
        for state in states:
            try:
                rpm, tpm = float(state.get("rpm_eff", 0)), float(state.get("tpm_eff", 0))
                seconds, tokens = float(state.get("model_s", 0)), float(state.get("call_tok", 0))
            except ValueError:
                continue
            cap = budget.operator_cap(rpm, tpm, tokens, seconds, concurrency)
            if cap is not None:
                caps.append(cap)
        return min(caps) if caps else None

    def _redis_client(self, url: str) -> aioredis.Redis:
        client = self._redis.get(url)
        if client is None:
            client = aioredis.Redis.from_url(url, decode_responses=True,
                                             socket_timeout=CALL_TIMEOUT_SECONDS,
                                             socket_connect_timeout=CALL_TIMEOUT_SECONDS / 2)
            self._redis[url] = client
        return client

    async def _sqs_client(self, region: str, endpoint: str) -> Any:
        key = (region, endpoint)
        if key not in self._sqs:
            # One attempt per poll: the decision counts failures and decides what to do.
            config = botocore.config.Config(retries={"max_attempts": 1, "mode": "standard"},
                                            connect_timeout=CALL_TIMEOUT_SECONDS / 2,
                                            read_timeout=CALL_TIMEOUT_SECONDS)
            self._sqs[key] = await self._stack.enter_async_context(self._session.create_client(
                "sqs", region_name=region, endpoint_url=endpoint or None, config=config))
        return self._sqs[key]

    async def close(self) -> None:
        """Close every client."""
        for client in self._redis.values():
            await client.aclose()
        self._redis.clear()
        self._sqs.clear()
        await self._stack.aclose()


def _unwrap(outcome: decision.Metrics | SourceError) -> decision.Metrics:
    if isinstance(outcome, SourceError):
        raise outcome
    return outcome


def _safe_url(url: str) -> str:
    """A Redis URL without its password, for messages."""
    if "@" in url:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return url
