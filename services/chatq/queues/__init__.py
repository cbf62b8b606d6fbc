"""The job queue behind one small interface, with two backends: `redis` and `sqs`.

A backend receives `Delivery`s; the worker acks them when the job is done, extends their
lease while the model runs, hands them back on shutdown, or dead-letters them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from chatq import settings as settings_mod


@dataclass
class Delivery:
    """One received message."""

    message_id: str
    body: str
    receive_count: int
    """How many times the queue has handed this message out, this time included."""
    handle: str = ""
    """What the backend needs to ack or extend it (SQS receipt handle, stream entry id)."""
    attributes: dict[str, str] = field(default_factory=dict)
    lane: str = "interactive"
    """Which lane it came from (`interactive` or `batch`); the worker acks it there."""


@dataclass(frozen=True)
class Depth:
    """Messages waiting (visible) and being worked on (in flight)."""

    visible: int
    in_flight: int


# The one depth rule of each backend: the queues' `depth()`, the api's /metrics and the
# operator's sources all read depth through these, so they cannot drift apart.

SQS_DEPTH_ATTRIBUTES = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
"""What GetQueueAttributes must return for `sqs_depth`."""


def sqs_depth(attributes: Mapping[str, str]) -> Depth:
    """An SQS queue's depth from its GetQueueAttributes reply's `Attributes`."""
    return Depth(int(attributes.get("ApproximateNumberOfMessages", 0)),
                 int(attributes.get("ApproximateNumberOfMessagesNotVisible", 0)))


def stream_depth(length: int, groups: Iterable[Mapping[str, Any]], group: str) -> Depth:
    """A Redis stream's depth for one consumer group, from XLEN and XINFO GROUPS.

    chatq deletes acknowledged entries, after which Redis may not know the group's lag:
    the stream then holds exactly the waiting and the pending entries. Before the workers
    create their group, every entry is waiting.
    """
    for info in groups:
        if info.get("name") == group:
            pending = int(info.get("pending") or 0)
            lag = info.get("lag")
            return Depth(int(lag) if lag is not None else max(0, length - pending), pending)
    return Depth(length, 0)


class Queue(Protocol):
    """What the api and the worker need of a queue."""

    name: str
    backend: str

    async def setup(self) -> None:
        """Create or check the queue and its dead-letter queue."""

    async def send(self, body: str, attributes: dict[str, str]) -> str:
        """Enqueue one message with string attributes (trace context); returns its id."""

    async def receive(self, max_messages: int, wait_seconds: float) -> list[Delivery]:
        """Up to max_messages, waiting at most wait_seconds for the first."""

    async def ack(self, delivery: Delivery) -> None:
        """The message is done with: remove it."""

    async def extend(self, delivery: Delivery, seconds: int) -> None:
        """Keep the lease for `seconds` more."""

    async def release(self, delivery: Delivery, delay: float = 0.0) -> None:
        """Hand the message back, for another worker: at once, or visible after `delay` s."""

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Move the message to the dead-letter queue."""

    async def depth(self) -> Depth:
        """How many messages wait and how many are in flight."""

    async def dead_letters(self, limit: int = 100) -> list[str]:
        """Bodies in the dead-letter queue (for tests and operators)."""

    async def close(self) -> None:
        """Release connections."""


def open_queue(settings: settings_mod.Settings, consumer: str = "api",
               lane: str = "interactive") -> Queue:
    """The configured backend, not yet set up; `consumer` names this process to it.

    `lane="batch"` opens the batch lane: the same backend, a queue of its own named
    `<name><CHATQ_BATCH_QUEUE_SUFFIX>` (so interactive messages never wait behind batch lines).
    """
    cfg = settings.queue
    if lane == "batch":
        cfg = cfg.model_copy(update={"name": cfg.name + settings.batch.queue_suffix, "url": ""})
    if cfg.backend == "sqs":
        from chatq.queues import sqs

        return sqs.SqsQueue(cfg)
    from chatq.queues import redis_streams

    return redis_streams.RedisStreamsQueue(cfg, settings.redis, consumer)
