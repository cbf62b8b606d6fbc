"""The Responses API against `/v1/chat`, in the same run through the same api + one worker:
`client.responses.create(background=True)` at a steady rate with the official openai SDK,
then the same rate of `POST /v1/chat`; for every job the overhead beyond model time (answer
written - created - model time, from the job record). Webhooks are on for both halves (one
endpoint for every event, a receiver on loopback): delivery latency is arrival at the
receiver - the job's end, p50 and p99.

    .venv/bin/python -m bench.responses [--rate 100] [--seconds 20] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid

import httpx
import openai
from chatq import results, webhooks

from bench import harness
from bench.overhead import percentile
from tests import servers


async def create_at_rate(url: str, rate: float, seconds: float) -> list[str]:
    """Open-loop load through the SDK: one background create every 1/rate s."""
    # The SDK's default retries stay on, as for any user: a keep-alive connection that the
    # server closed just as a request went out is retried, not counted as a failure.
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=2, timeout=10)
    ids: list[str] = []

    async def one(i: int) -> None:
        resp = await client.responses.create(model="chatq-sim-1", background=True,
                                             input=f"q{i} {uuid.uuid4().hex[:6]}")
        ids.append(resp.id)

    tasks = []
    start = time.monotonic()
    for i in range(int(rate * seconds)):
        await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    for rid in ids:  # all of them completed, as the SDK sees them
        while (await client.responses.retrieve(rid)).status in ("queued", "in_progress"):
            await asyncio.sleep(0.05)
    await client.close()
    return ids


async def post_at_rate(url: str, rate: float, seconds: float) -> list[str]:
    """Open-loop POST /v1/chat, retried once when a kept-alive connection was closed under it
    (as the SDK's retries do for the other half)."""
    ids: list[str] = []
    async with httpx.AsyncClient(base_url=url, timeout=10, limits=httpx.Limits(
            max_connections=200, keepalive_expiry=1)) as http:
        async def one(i: int) -> None:
            body = {"message": f"q{i} {uuid.uuid4().hex[:6]}"}
            try:
                resp = await http.post("/v1/chat", json=body)
            except httpx.ReadError:
                resp = await http.post("/v1/chat", json=body)
            resp.raise_for_status()
            ids.append(resp.json()["id"])

        tasks = []
        start = time.monotonic()
        for i in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
    return ids


async def overheads(store: results.Store, job_ids: list[str]) -> tuple[list[float], dict[str, float]]:
    """Per job: finished - created - model seconds; and each job's end time."""
    out, ended = [], {}
    for job_id in job_ids:
        raw = await store.redis.hgetall(results.job_key(job_id))
        assert raw["status"] == "succeeded", raw
        ended[job_id] = float(raw["finished_at"])
        out.append(ended[job_id] - float(raw["created_at"]) - float(raw["_model_seconds"]))
    return out, ended


async def wait_chat(url: str, ids: list[str]) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=70) as http:
        for job_id in ids:
            job = (await http.get(f"/v1/chat/{job_id}", params={"wait": 60})).json()
            assert job["status"] == "succeeded", job


async def run(rate: float, seconds: float) -> dict[str, list[float]]:
    secret = webhooks.new_secret()
    with servers.redis_server() as redis, harness.llmsim(50, 5, 10) as sim, \
            servers.WebhookReceiver() as receiver:
        env = servers.chatq_env(
            CHATQ_REDIS_URL=redis.url, CHATQ_LLMSIM_PORT=str(sim.port),
            CHATQ_QUEUE_NAME=f"bench-{uuid.uuid4().hex[:6]}", CHATQ_LOG_LEVEL="WARNING",
            CHATQ_WORKER_CONCURRENCY="64", CHATQ_WEBHOOK_ALLOW_PRIVATE="true",
            CHATQ_WEBHOOK_ENDPOINTS=json.dumps([{"url": receiver.url(), "secret": secret}]))
        store = results.Store.from_settings(harness.settings_for(env).redis)
        with servers.chatq_process("api", env, port_var="CHATQ_API_PORT") as api, \
                servers.chatq_process("worker", env, port_var="CHATQ_TELEMETRY_METRICS_PORT"):
            harness.say(f"responses: {rate:.0f}/s for {seconds:.0f}s, openai SDK, background...")
            rids = await create_at_rate(api.url, rate, seconds)
            harness.say(f"chat: {rate:.0f}/s for {seconds:.0f}s, POST /v1/chat...")
            chat_ids = await post_at_rate(api.url, rate, seconds)
            await wait_chat(api.url, chat_ids)
            resp_ids = [rid.removeprefix("resp_") for rid in rids]
            mine, ended = await overheads(store, resp_ids)
            peer, chat_ended = await overheads(store, chat_ids)
            ended.update(chat_ended)
            total = len(ended)
            harness.say(f"waiting for {total} webhook deliveries...")
            deadline = time.monotonic() + 60
            while len(receiver.received()) < total and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
        await store.close()
    latency = []
    for delivery in receiver.received():
        data_id = json.loads(delivery.body)["data"]["id"].removeprefix("resp_")
        latency.append(delivery.at - ended[data_id])
    if len(latency) < total:
        raise TimeoutError(f"only {len(latency)} of {total} webhooks arrived within 60 s")
    return {"responses_s": mine, "chat_s": peer, "webhook_s": latency}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=float, default=100)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--quick", action="store_true", help="a short smoke run (CI)")
    args = parser.parse_args()
    if args.quick:
        args.seconds = 3
    got = await run(args.rate, args.seconds)
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
        ("webhook delivery p50 after the job ends", ms(percentile(hooks, 50)), ""),
        ("webhook delivery p99 after the job ends", ms(percentile(hooks, 99)), "target < 1 s"),
    ], {**{k: sorted(v) for k, v in got.items()}, "rate": args.rate, "seconds": args.seconds})


if __name__ == "__main__":
    asyncio.run(main())
