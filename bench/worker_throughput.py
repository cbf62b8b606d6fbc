"""Answers per second of one worker process, against a seed-style one-at-a-time worker.

llmsim answers in about 1 s (200 ms to the first token, 24 tokens 35 ms apart). The peer
is the seed designs' loop, measured in the same run on the same servers: take one message,
call the model, write the answer, ack, repeat.

    .venv/bin/python -m bench.worker_throughput [--jobs 3000] [--concurrency 256] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid

import openai
from chatq import jobs, results

from bench import harness
from tests import servers


async def seed_worker(env: dict[str, str], seconds: float) -> int:
    """The peer: one message at a time, non-streaming model call, then the next."""
    store, queue = harness.open_store_and_queue(env)
    settings = harness.settings_for(env)
    await queue.setup()
    client = openai.AsyncOpenAI(base_url=settings.llm_base_url, api_key="none", max_retries=0)
    done = 0
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            for d in await queue.receive(1, 1):
                job_id = jobs.decode_message(d.body).job_id
                reply = await client.chat.completions.create(
                    model="chatq-sim-1", messages=[{"role": "user", "content": "bench"}])
                await store.redis.hset(results.job_key(job_id), mapping={
                    "status": "succeeded", "answer": reply.choices[0].message.content or ""})
                await queue.ack(d)
                done += 1
    finally:
        await client.close()
        await queue.close()
        await store.close()
    return done


async def ours(env: dict[str, str], n: int, concurrency: int) -> dict[str, float]:
    store, queue = harness.open_store_and_queue(env)
    await queue.setup()
    harness.say(f"loading {n} jobs...")
    await harness.preload(store, queue, n)
    wenv = {**env, "CHATQ_WORKER_CONCURRENCY": str(concurrency), "CHATQ_LOG_LEVEL": "WARNING"}
    counting = asyncio.create_task(harness.count_done(store, n, timeout=n / 20 + 60))
    await asyncio.sleep(0.2)  # subscribed before the first answer
    harness.say(f"starting one worker process (concurrency {concurrency})...")
    started = time.monotonic()
    with servers.chatq_process("worker", wenv, port_var="CHATQ_TELEMETRY_METRICS_PORT"):
        marks = await counting
    await queue.close()
    await store.close()
    sustained = 0.8 * n / (marks[0.9] - marks[0.1])
    return {"sustained_per_s": sustained, "overall_per_s": n / (marks[1.0] - started)}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--peer-seconds", type=float, default=10)
    parser.add_argument("--quick", action="store_true", help="a short smoke run (CI)")
    args = parser.parse_args()
    if args.quick:
        args.jobs, args.peer_seconds = 400, 4
    with servers.redis_server() as redis, harness.llmsim(200, 34.8, 24) as sim:
        env = servers.chatq_env(CHATQ_REDIS_URL=redis.url, CHATQ_LLMSIM_PORT=str(sim.port),
                                CHATQ_QUEUE_NAME=f"bench-{uuid.uuid4().hex[:6]}")
        harness.say(f"peer: seed-style worker for {args.peer_seconds:.0f}s...")
        store, queue = harness.open_store_and_queue(env)
        await queue.setup()
        await harness.preload(store, queue, int(args.peer_seconds * 2) + 5)
        peer_done = await seed_worker(env, args.peer_seconds)
        peer = peer_done / args.peer_seconds
        await queue.close()
        await store.close()
        env["CHATQ_QUEUE_NAME"] = f"bench-{uuid.uuid4().hex[:6]}"
        mine = await ours(env, args.jobs, args.concurrency)
    harness.report("worker_throughput", [
        ("chatq worker, sustained", f"{mine['sustained_per_s']:.1f}/s", "target >= 100/s"),
        ("chatq worker, overall", f"{mine['overall_per_s']:.1f}/s", "start-up included"),
        ("seed-style worker (peer)", f"{peer:.2f}/s", "one message at a time"),
        ("ratio chatq / peer", f"{mine['sustained_per_s'] / max(peer, 1e-9):.0f}x", ""),
    ], {"chatq": mine, "peer_per_s": peer, "jobs": args.jobs, "concurrency": args.concurrency})


if __name__ == "__main__":
    asyncio.run(main())
