"""The Responses API against `/v1/chat`, in the same run through the same api + one worker:
`client.responses.create(background=True)` at a steady rate, and the same rate of
`POST /v1/chat`, both through one official openai SDK client (`client.post("/chat")` for
the peer), each job then polled the same way until the client sees it done. The two sides
alternate in blocks, ABBA, each block drained before the next, so a change in the machine's
load falls on both; each block reports the create rate it reached (a starved machine does
not reach the one asked for). For every job: the overhead beyond model time (answer written - created
- model time, from the job record). Webhooks are on for both sides (one endpoint for every
event, a receiver process on loopback, `bench.receiver`): delivery latency is arrival at the
receiver - the job's end, p50 and p99.

    .venv/bin/python -m bench.responses [--rate 100] [--seconds 20] [--block 5] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, cast

import openai
from chatq import results, webhooks

from bench import harness, receiver
from bench.overhead import percentile
from tests import servers

#: Seconds between two status polls of one job, the same on both sides.
POLL_SECONDS = 0.05


def sdk_client(url: str) -> openai.AsyncOpenAI:
    """The one client both sides use, with the SDK's default retries on, as for any user (a
    keep-alive connection the server closed just as a request went out is retried)."""
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=2, timeout=10)


async def create_response(client: openai.AsyncOpenAI, i: int) -> str:
    resp = await client.responses.create(model="chatq-sim-1", background=True,
                                         input=f"q{i} {uuid.uuid4().hex[:6]}")
    return resp.id.removeprefix("resp_")


async def create_chat(client: openai.AsyncOpenAI, i: int) -> str:
    # The same SDK client and its request machinery; `object` parses the JSON body only.
    job = await client.post("/chat", cast_to=object, body={"message": f"q{i} {uuid.uuid4().hex[:6]}"})
    return str(cast(dict[str, Any], job)["id"])


async def response_done(client: openai.AsyncOpenAI, job_id: str) -> bool:
    resp = await client.responses.retrieve(f"resp_{job_id}")
    assert resp.status not in ("failed", "cancelled", "incomplete"), resp
    return resp.status == "completed"


async def chat_done(client: openai.AsyncOpenAI, job_id: str) -> bool:
    job = cast(dict[str, Any], await client.get(f"/chat/{job_id}", cast_to=object))
    assert job["status"] not in ("failed", "cancelled"), job
    return bool(job["status"] == "succeeded")


SIDES: dict[str, tuple[Callable[[openai.AsyncOpenAI, int], Coroutine[Any, Any, str]],
                       Callable[[openai.AsyncOpenAI, str], Coroutine[Any, Any, bool]]]] = {
    "responses": (create_response, response_done), "chat": (create_chat, chat_done)}


async def block(client: openai.AsyncOpenAI, side: str, rate: float, seconds: float
                ) -> tuple[list[str], float]:
    """Open-loop creates at `rate` for `seconds`, then every job polled until the client sees
    it completed (the same polling on both sides); the job ids and the create rate reached."""
    create, done = SIDES[side]
    tasks: list[asyncio.Task[str]] = []
    start = time.monotonic()
    for i in range(int(rate * seconds)):
        await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
        tasks.append(asyncio.create_task(create(client, i)))
    ids = list(await asyncio.gather(*tasks))
    reached = len(ids) / (time.monotonic() - start)
    for job_id in ids:
        while not await done(client, job_id):
            await asyncio.sleep(POLL_SECONDS)
    return ids, reached


def schedule(seconds: float, block_seconds: float) -> list[str]:
    """Blocks in ABBA order (responses, chat, chat, responses...), `seconds` per side: drift
    in the machine's load, or a warm-up, falls on both sides alike."""
    pairs = max(1, round(seconds / block_seconds))
    return [side for i in range(pairs)
            for side in (("responses", "chat") if i % 2 == 0 else ("chat", "responses"))]


async def overheads(store: results.Store, job_ids: list[str]) -> tuple[list[float], dict[str, float]]:
    """Per job: finished - created - model seconds; and each job's end time."""
    out, ended = [], {}
    for job_id in job_ids:
        raw = await store.redis.hgetall(results.job_key(job_id))
        assert raw["status"] == "succeeded", raw
        ended[job_id] = float(raw["finished_at"])
        out.append(ended[job_id] - float(raw["created_at"]) - float(raw["_model_seconds"]))
    return out, ended


async def run(rate: float, seconds: float, block_seconds: float) -> dict[str, list[float]]:
    secret = webhooks.new_secret()
    with servers.redis_server() as redis, harness.llmsim(50, 5, 10) as sim, \
            tempfile.TemporaryDirectory(prefix="chatq-bench-") as tmp, \
            receiver.Receiver(Path(tmp)) as hooks:
        env = servers.chatq_env(
            CHATQ_REDIS_URL=redis.url, CHATQ_LLMSIM_PORT=str(sim.port),
            CHATQ_QUEUE_NAME=f"bench-{uuid.uuid4().hex[:6]}", CHATQ_LOG_LEVEL="WARNING",
            CHATQ_WORKER_CONCURRENCY="64", CHATQ_WEBHOOK_ALLOW_PRIVATE="true",
            CHATQ_WEBHOOK_ENDPOINTS=json.dumps([{"url": hooks.url(), "secret": secret}]))
        store = results.Store.from_settings(harness.settings_for(env).redis)
        ids: dict[str, list[str]] = {"responses": [], "chat": []}
        rates: dict[str, list[float]] = {"responses": [], "chat": []}
        with servers.chatq_process("api", env, port_var="CHATQ_API_PORT") as api, \
                servers.chatq_process("worker", env, port_var="CHATQ_TELEMETRY_METRICS_PORT"):
            client = sdk_client(api.url)
            order = schedule(seconds, block_seconds)
            each = seconds / (len(order) / 2)
            for n, side in enumerate(order, 1):
                harness.say(f"block {n}/{len(order)}: {side}, {rate:.0f}/s for {each:g}s "
                            "through the openai SDK...")
                made, reached = await block(client, side, rate, each)
                ids[side] += made
                rates[side].append(reached)
            await client.close()
            mine, ended = await overheads(store, ids["responses"])
            peer, chat_ended = await overheads(store, ids["chat"])
            ended.update(chat_ended)
            total = len(ended)
            harness.say(f"waiting for {total} webhook deliveries...")
            deadline = time.monotonic() + 60
            while len(hooks.arrivals()) < total and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            arrivals = hooks.arrivals()
        await store.close()
    latency = []
    for arrival in arrivals:
        data_id = json.loads(arrival.body)["data"]["id"].removeprefix("resp_")
        latency.append(arrival.at - ended[data_id])
    if len(latency) < total:
        raise TimeoutError(f"only {len(latency)} of {total} webhooks arrived within 60 s")
    return {"responses_s": mine, "chat_s": peer, "webhook_s": latency,
            "responses_rate": rates["responses"], "chat_rate": rates["chat"]}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=float, default=100)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--block", type=float, default=5,
                        help="seconds per block; the sides alternate in ABBA order")
    parser.add_argument("--quick", action="store_true", help="a short smoke run (CI)")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.block = 3, 1.5
    got = await run(args.rate, args.seconds, args.block)
    mine, peer, hooks = got["responses_s"], got["chat_s"], got["webhook_s"]
    ms = lambda v: f"{v * 1000:.1f} ms"  # noqa: E731
    harness.report("responses", [
        (f"responses overhead p50 at {args.rate:.0f}/s", ms(percentile(mine, 50)), ""),
        (f"responses overhead p99 at {args.rate:.0f}/s", ms(percentile(mine, 99)), ""),
        (f"/v1/chat overhead p50 at {args.rate:.0f}/s (peer)", ms(percentile(peer, 50)), ""),
        (f"/v1/chat overhead p99 at {args.rate:.0f}/s (peer)", ms(percentile(peer, 99)), ""),
        ("ratio responses / chat p50", f"{percentile(mine, 50) / percentile(peer, 50):.2f}",
         "target <= 1.2"),
        ("ratio responses / chat p99", f"{percentile(mine, 99) / percentile(peer, 99):.2f}", ""),
        ("creates/s reached, responses blocks (lowest)", f"{min(got['responses_rate']):.0f}", ""),
        ("creates/s reached, /v1/chat blocks (lowest)", f"{min(got['chat_rate']):.0f}", ""),
        ("webhook delivery p50 after the job ends", ms(percentile(hooks, 50)), ""),
        ("webhook delivery p99 after the job ends", ms(percentile(hooks, 99)), "target < 1 s"),
    ], {**{k: sorted(v) for k, v in got.items()}, "rate": args.rate, "seconds": args.seconds})


if __name__ == "__main__":
    asyncio.run(main())
