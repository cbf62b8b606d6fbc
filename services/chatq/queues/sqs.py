"""AWS SQS (or ElasticMQ) through aiobotocore.

Long polling up to 20 s, batches of up to 10, deletes batched into DeleteMessageBatch,
ChangeMessageVisibility as the lease heartbeat and the hand-back, and a dead-letter queue
with a redrive policy, created or checked at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, TypeVar

import aiobotocore.session
import botocore.config
import botocore.exceptions

from chatq import errors
from chatq import settings as settings_mod
from chatq.queues import SQS_DEPTH_ATTRIBUTES, Delivery, Depth, sqs_depth

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

# How long acks wait for company before a DeleteMessageBatch goes out.
ACK_LINGER_SECONDS = 0.01
# Receives beyond `max_receives` before SQS itself dead-letters a message (see `setup`).
REDRIVE_SLACK = 3


def _sqs_error(exc: Exception) -> errors.ChatqError | None:
    """botocore errors become ours: throttling and outages are temporary."""
    if isinstance(exc, botocore.exceptions.ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
        if status >= 500 or "Throttl" in code or code == "RequestThrottled":
            return errors.TemporaryError(f"SQS {code}: {exc}")
        return errors.PermanentError(f"SQS {code}: {exc}", code="sqs_" + code)
    if isinstance(exc, TimeoutError | botocore.exceptions.BotoCoreError | OSError):
        return errors.StoreUnavailable(f"SQS is unreachable: {exc}")
    return None


_translate = errors.translated(_sqs_error)

#: The error codes of a queue that is not there (SQS's and ElasticMQ's spellings).
QUEUE_GONE = frozenset({"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"})


def _queue_gone(exc: Exception) -> bool:
    return (isinstance(exc, botocore.exceptions.ClientError)
            and exc.response.get("Error", {}).get("Code", "") in QUEUE_GONE)


def _recreated(fn: Callable[Concatenate[SqsQueue, P], Coroutine[Any, Any, R]]
               ) -> Callable[Concatenate[SqsQueue, P], Coroutine[Any, Any, R]]:
    """A queue that vanished after setup (an in-memory ElasticMQ restarted empty, a queue
    deleted by hand) is created again and the call made once more, when the settings let chatq
    create queues: otherwise every send, receive and depth failed until each process restarted,
    and the api stayed unready (seen on real pods with the dev ElasticMQ deleted)."""

    @functools.wraps(fn)
    async def wrapper(self: SqsQueue, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(self, *args, **kwargs)
        except botocore.exceptions.ClientError as exc:
            if not (self.cfg.create and _queue_gone(exc)):
                raise
        log.warning("the SQS queue %s is gone; creating it (and its dead-letter queue) again", self.name)
        self.url = self.cfg.url
        await self.setup()
        return await fn(self, *args, **kwargs)

    return wrapper


class SqsQueue:
    """An SQS queue and its `-dlq` dead-letter queue."""

    backend = "sqs"

    def __init__(self, cfg: settings_mod.QueueSettings) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.url = cfg.url
        self.dlq_url = ""
        self._session = aiobotocore.session.get_session()
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None
        self._acks: asyncio.Queue[tuple[Delivery, asyncio.Future[None]]] = asyncio.Queue()
        self._acker: asyncio.Task[None] | None = None

    async def _sqs(self) -> Any:
        if self._client is None:
            config = botocore.config.Config(
                retries={"max_attempts": 3, "mode": "standard"},
                # Long polls wait 20 s; reads must outlast them.
                read_timeout=self.cfg.wait_seconds + 10, connect_timeout=5,
                max_pool_connections=64)
            self._client = await self._stack.enter_async_context(self._session.create_client(
                "sqs", region_name=self.cfg.region, endpoint_url=self.cfg.endpoint or None,
                config=config))
        return self._client

    @_translate
    async def setup(self) -> None:
        sqs = await self._sqs()
        dlq_name = f"{self.name}-dlq"
        if self.cfg.create:
            self.dlq_url = (await sqs.create_queue(QueueName=dlq_name))["QueueUrl"]
        else:
            self.dlq_url = (await sqs.get_queue_url(QueueName=dlq_name))["QueueUrl"]
        dlq_arn = (await sqs.get_queue_attributes(
            QueueUrl=self.dlq_url, AttributeNames=["QueueArn"]))["Attributes"]["QueueArn"]
        # The redrive policy is a safety net a few receives beyond ours: the worker itself
        # dead-letters on the last receive so it can mark the job failed first, and a
        # receive that finds the job still leased (its holder just died) must not be the
        # one that sends the message away with the job left `running`.
        attributes = {
            "VisibilityTimeout": str(self.cfg.visibility_seconds),
            "ReceiveMessageWaitTimeSeconds": str(self.cfg.wait_seconds),
            "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn,
                                         "maxReceiveCount": str(self.cfg.max_receives + REDRIVE_SLACK)}),
        }
        if not self.url:
            if self.cfg.create:
                self.url = (await sqs.create_queue(QueueName=self.name,
                                                   Attributes=attributes))["QueueUrl"]
            else:
                self.url = (await sqs.get_queue_url(QueueName=self.name))["QueueUrl"]
        if self.cfg.create:
            await sqs.set_queue_attributes(QueueUrl=self.url, Attributes=attributes)
        if self._acker is None:
            self._acker = asyncio.create_task(self._ack_loop(), name="sqs-acks")

    @_translate
    @_recreated
    async def send(self, body: str, attributes: dict[str, str]) -> str:
        sqs = await self._sqs()
        reply = await sqs.send_message(QueueUrl=self.url, MessageBody=body, MessageAttributes={
            k: {"DataType": "String", "StringValue": v} for k, v in attributes.items() if v})
        return str(reply["MessageId"])

    @_translate
    @_recreated
    async def receive(self, max_messages: int, wait_seconds: float) -> list[Delivery]:
        sqs = await self._sqs()
        reply = await sqs.receive_message(
            QueueUrl=self.url, MaxNumberOfMessages=min(10, max_messages),
            WaitTimeSeconds=int(min(20, wait_seconds)),
            MessageSystemAttributeNames=["ApproximateReceiveCount"],
            MessageAttributeNames=["All"])
        out = []
        for m in reply.get("Messages", []):
            attrs = {k: v.get("StringValue", "") for k, v in m.get("MessageAttributes", {}).items()}
            count = int(m.get("Attributes", {}).get("ApproximateReceiveCount", "1"))
            out.append(Delivery(m["MessageId"], m["Body"], count, m["ReceiptHandle"], attrs))
        return out

    async def ack(self, delivery: Delivery) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await self._acks.put((delivery, done))
        await done

    async def _ack_loop(self) -> None:
        """Gather acks into DeleteMessageBatch calls of up to 10."""
        while True:
            batch = [await self._acks.get()]
            await asyncio.sleep(ACK_LINGER_SECONDS)
            while len(batch) < 10 and not self._acks.empty():
                batch.append(self._acks.get_nowait())
            try:
                await self._delete_batch([d for d, _ in batch])
            except Exception as exc:  # every waiter hears of it; the loop goes on
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for _, fut in batch:
                if not fut.done():
                    fut.set_result(None)

    @_translate
    async def _delete_batch(self, deliveries: list[Delivery]) -> None:
        sqs = await self._sqs()
        reply = await sqs.delete_message_batch(QueueUrl=self.url, Entries=[
            {"Id": str(i), "ReceiptHandle": d.handle} for i, d in enumerate(deliveries)])
        for failure in reply.get("Failed", []):
            log.warning("SQS could not delete a message: %s", failure.get("Message"))

    @_translate
    async def extend(self, delivery: Delivery, seconds: int) -> None:
        sqs = await self._sqs()
        await sqs.change_message_visibility(QueueUrl=self.url, ReceiptHandle=delivery.handle,
                                            VisibilityTimeout=seconds)

    async def release(self, delivery: Delivery, delay: float = 0.0) -> None:
        await self.extend(delivery, min(43200, max(0, round(delay))))  # SQS's bounds

    @_translate
    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        sqs = await self._sqs()
        await sqs.send_message(QueueUrl=self.dlq_url, MessageBody=delivery.body,
                               MessageAttributes={
                                   "reason": {"DataType": "String", "StringValue": reason[:256]},
                                   "message_id": {"DataType": "String",
                                                  "StringValue": delivery.message_id}})
        await sqs.delete_message(QueueUrl=self.url, ReceiptHandle=delivery.handle)

    @_translate
    @_recreated
    async def depth(self) -> Depth:
        sqs = await self._sqs()
        reply = await sqs.get_queue_attributes(QueueUrl=self.url,
                                               AttributeNames=SQS_DEPTH_ATTRIBUTES)
        return sqs_depth(reply["Attributes"])

    @_translate
    async def dead_letters(self, limit: int = 100) -> list[str]:
        sqs = await self._sqs()
        reply = await sqs.receive_message(QueueUrl=self.dlq_url, MaxNumberOfMessages=10,
                                          VisibilityTimeout=0, WaitTimeSeconds=0)
        return [m["Body"] for m in reply.get("Messages", [])][:limit]

    async def close(self) -> None:
        if self._acker is not None:
            self._acker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._acker
        await self._stack.aclose()
