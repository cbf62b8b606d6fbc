"""Both queue backends against real servers: the one interface behaves the same."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable

import aiobotocore.session
import pytest
from chatq import errors, queues
from chatq import settings as settings_mod
from chatq.queues import sqs

from tests import servers
from tests.conftest import BACKENDS


@pytest.fixture
async def make_queue(request: pytest.FixtureRequest, redis_server: servers.Server,
                     monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Callable[..., queues.Queue]]:
    made: list[queues.Queue] = []
    name = f"q-{uuid.uuid4().hex[:8]}"

    def make(backend: str, consumer: str = "c1", visibility: int = 2) -> queues.Queue:
        env = {"CHATQ_QUEUE_BACKEND": backend, "CHATQ_QUEUE_NAME": name,
               "CHATQ_QUEUE_VISIBILITY_SECONDS": str(visibility),
               "CHATQ_REDIS_URL": redis_server.url, "CHATQ_QUEUE_MAX_RECEIVES": "3"}
        if backend == "sqs":
            mq = request.getfixturevalue("elasticmq")
            env["CHATQ_QUEUE_ENDPOINT"] = mq.url
            for k, v in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x"}.items():
                monkeypatch.setenv(k, v)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        q = queues.open_queue(settings_mod.Settings(), consumer=consumer)
        made.append(q)
        return q

    yield make
    for q in made:
        await q.close()


async def _receive_all(q: queues.Queue, n: int, timeout: float = 10) -> list[queues.Delivery]:
    got: list[queues.Delivery] = []
    deadline = asyncio.get_running_loop().time() + timeout
    while len(got) < n and asyncio.get_running_loop().time() < deadline:
        got += await q.receive(10, 1)
    return got


@pytest.mark.parametrize("backend", BACKENDS)
async def test_send_receive_ack_with_attributes(make_queue: Callable[..., queues.Queue],
                                                backend: str) -> None:
    q = make_queue(backend)
    await q.setup()
    for i in range(15):
        await q.send(f"body-{i}", {"traceparent": f"00-{i:032x}-{i:016x}-01"})
    depth = await q.depth()
    assert depth.visible == 15
    got = await _receive_all(q, 15)
    assert sorted(d.body for d in got) == sorted(f"body-{i}" for i in range(15))
    assert all(d.receive_count == 1 for d in got)
    assert {d.attributes["traceparent"][-5:] for d in got} == {f"{i:016x}-01"[-5:] for i in range(15)}
    assert (await q.depth()).in_flight == 15
    await asyncio.gather(*(q.ack(d) for d in got))
    assert await q.depth() == queues.Depth(0, 0)
    assert await q.receive(10, 1) == []


@pytest.mark.parametrize("backend", BACKENDS)
async def test_unacked_message_comes_back_after_visibility(
        make_queue: Callable[..., queues.Queue], backend: str) -> None:
    a, b = make_queue(backend, "a"), make_queue(backend, "b")
    await a.setup()
    await b.setup()
    await a.send("lost-worker", {})
    first = await _receive_all(a, 1)
    assert [d.body for d in first] == ["lost-worker"]
    # "a" dies without acking: "b" gets the message once the lease runs out.
    again = await _receive_all(b, 1, timeout=15)
    assert [d.body for d in again] == ["lost-worker"]
    assert again[0].receive_count == 2
    await b.ack(again[0])


@pytest.mark.parametrize("backend", BACKENDS)
async def test_extend_keeps_the_lease(make_queue: Callable[..., queues.Queue], backend: str) -> None:
    a, b = make_queue(backend, "a"), make_queue(backend, "b")
    await a.setup()
    await b.setup()
    await a.send("long-job", {})
    [d] = await _receive_all(a, 1)
    for _ in range(4):  # 4 s of heartbeats at 1 s, with a 2 s visibility timeout
        await a.extend(d, 2)
        assert await b.receive(10, 0) == []
        await asyncio.sleep(1)
    await a.ack(d)
    await asyncio.sleep(2.5)
    assert await b.receive(10, 1) == []


@pytest.mark.parametrize("backend", BACKENDS)
async def test_release_hands_back_at_once(make_queue: Callable[..., queues.Queue], backend: str) -> None:
    a, b = make_queue(backend, "a", visibility=60), make_queue(backend, "b", visibility=60)
    await a.setup()
    await b.setup()
    await a.send("handed-back", {})
    [d] = await _receive_all(a, 1)
    await a.release(d)
    got = await _receive_all(b, 1, timeout=5)  # far less than the 60 s visibility
    assert [x.body for x in got] == ["handed-back"]


@pytest.mark.parametrize("backend", BACKENDS)
async def test_dead_letter(make_queue: Callable[..., queues.Queue], backend: str) -> None:
    q = make_queue(backend)
    await q.setup()
    await q.send("poison", {})
    [d] = await _receive_all(q, 1)
    await q.dead_letter(d, "malformed_message")
    assert await q.dead_letters() == ["poison"]
    assert await q.depth() == queues.Depth(0, 0)


async def test_sqs_redrive_policy_is_set(elasticmq: servers.Server,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    cfg = settings_mod.QueueSettings(backend="sqs", name=f"rp-{uuid.uuid4().hex[:6]}",
                                     endpoint=elasticmq.url, max_receives=4)
    q = sqs.SqsQueue(cfg)
    await q.setup()
    await q.close()
    session = aiobotocore.session.get_session()
    async with session.create_client("sqs", endpoint_url=elasticmq.url,
                                     region_name="us-east-1") as client:
        reply = await client.get_queue_attributes(QueueUrl=q.url, AttributeNames=["All"])
    attrs = reply["Attributes"]
    policy = json.loads(attrs["RedrivePolicy"])
    assert int(policy["maxReceiveCount"]) == 4 + sqs.REDRIVE_SLACK  # beyond the worker's own limit
    assert policy["deadLetterTargetArn"].endswith(cfg.name + "-dlq")
    assert attrs["VisibilityTimeout"] == "30"


@pytest.mark.parametrize("create", [True, False])
async def test_sqs_queue_gone_after_setup_is_created_again(elasticmq: servers.Server, create: bool,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """An in-memory ElasticMQ that restarts comes back without the queue (the dev chart's does):
    send, receive and depth create it again when chatq may create queues, and only then."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    name = f"gone-{uuid.uuid4().hex[:6]}"
    q = sqs.SqsQueue(settings_mod.QueueSettings(backend="sqs", name=name, endpoint=elasticmq.url))
    await q.setup()
    q.cfg = q.cfg.model_copy(update={"create": create})
    session = aiobotocore.session.get_session()
    async with session.create_client("sqs", endpoint_url=elasticmq.url,
                                     region_name="us-east-1") as client:
        for url in (q.url, q.dlq_url):
            await client.delete_queue(QueueUrl=url)
    try:
        if not create:
            with pytest.raises(errors.PermanentError):
                await q.depth()
            return
        assert await q.depth() == queues.Depth(0, 0)
        await q.send("after the restart", {})
        [d] = await _receive_all(q, 1)
        assert d.body == "after the restart"
        await q.ack(d)
        async with session.create_client("sqs", endpoint_url=elasticmq.url,
                                         region_name="us-east-1") as client:
            attrs = (await client.get_queue_attributes(QueueUrl=q.url, AttributeNames=["All"]))["Attributes"]
        assert json.loads(attrs["RedrivePolicy"])["deadLetterTargetArn"].endswith(f"{name}-dlq")
    finally:
        await q.close()
