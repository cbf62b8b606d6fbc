"""Overhead at a steady 100 jobs/s: answer written minus enqueued, minus the model's own
time, for every job; p50 and p99. The peer is the seed design's pipeline (FastAPI route →
Redis list → one-at-a-time worker, bench.seed_api + bench.worker_throughput.seed_worker's
loop) at the rate it sustains, measured in the same run on the same llmsim.

    .venv/bin/python -m bench.overhead [--rate 100] [--seconds 20] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid

import httpx
import openai
from chatq import results

from bench import harness
from tests import servers


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


async def post_at_rate(url: str, path: str, rate: float, seconds: float) -> list[str]:
    """Open-loop load: one POST every 1/rate s, whatever the answers' speed."""
    ids: list[str] = []
    async with httpx.AsyncClient(base_url=url, timeout=10,
                                 limits=httpx.Limits(max_connections=200)) as http:
        async def one(i: int) -> None:
            resp = await http.post(path, json={"message": f"q{i} {uuid.uuid4().hex[:6]}"})
            resp.raise_for_status()
            ids.append(resp.json()["id"])

        tasks = []
        start = time.monotonic()
        for i in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
    return ids


async def chatq_overheads(env: dict[str, str], rate: float, seconds: float) -> list[float]:
    store = results.Store.from_settings(harness.settings_for(env).redis)
    with servers.chatq_process("api", env, port_var="CHATQ_API_PORT") as api, \
            servers.chatq_process("worker", env, port_var="CHATQ_TELEMETRY_METRICS_PORT"):
        harness.say(f"chatq: {rate:.0f} jobs/s for {seconds:.0f}s through api + one worker...")
        ids = await post_at_rate(api.url, "/v1/chat", rate, seconds)
        async with httpx.AsyncClient(base_url=api.url, timeout=70) as http:
            for job_id in ids:
                job = (await http.get(f"/v1/chat/{job_id}", params={"wait": 60})).json()
                assert job["status"] == "succeeded", job
    out = []
    for job_id in ids:
        record = await store.get(job_id)
        assert record is not None and record.finished_at and record.created_at, job_id
        out.append(record.finished_at - record.created_at - (record.model_seconds or 0.0))
    await store.close()
    return out


async def seed_overheads(env: dict[str, str], sim_url: str, rate: float, seconds: float) -> list[float]:
    """The seed pipeline: its own API route, a list, and a worker taking one at a time."""
    import subprocess
    import sys

    store = results.Store.from_settings(harness.settings_for(env).redis)
    r = store.redis
    client = openai.AsyncOpenAI(base_url=f"{sim_url}/v1", api_key="none", max_retries=0)
    port = servers.free_port()
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "bench.seed_api:app", "--port",
                             str(port), "--log-level", "warning"], env=env)
    overheads: list[float] = []
    sent: dict[str, float] = {}

    async def worker(n: int) -> None:
        while len(overheads) < n:
            item = await r.blpop(["queue"], timeout=5)
            if item is None:
                continue
            job_id = item[1].split('"')[3]
            t0 = time.time()
            await client.chat.completions.create(model="chatq-sim-1",
                                                 messages=[{"role": "user", "content": "x"}])
            model = time.time() - t0
            await r.hset(f"job:{job_id}", mapping={"status": "done"})
            while job_id not in sent:  # the POST's answer may still be on its way to us
                await asyncio.sleep(0.001)
            overheads.append(time.time() - sent[job_id] - model)

    try:
        servers.wait_for(lambda: servers.http_ok(f"http://127.0.0.1:{port}/healthz"), "seed api", 30, proc)
        harness.say(f"peer: seed pipeline at {rate:.0f} jobs/s for {seconds:.0f}s...")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            n = int(rate * seconds)
            work = asyncio.create_task(worker(n))
            start = time.monotonic()
            for i in range(n):
                await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
                # The seed route stamps no creation time: take it as the POST goes out.
                posted = time.time()
                job_id = (await http.post("/chat", json={"message": f"q{i}"})).json()["id"]
                sent[job_id] = posted
            await asyncio.wait_for(work, 60)
    finally:
        proc.terminate()
        proc.wait()
        await client.close()
        await store.close()
    return overheads


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=float, default=100)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--quick", action="store_true", help="a short smoke run (CI)")
    args = parser.parse_args()
    if args.quick:
        args.seconds = 3
    with servers.redis_server() as redis, harness.llmsim(50, 5, 10) as sim:
        env = servers.chatq_env(CHATQ_REDIS_URL=redis.url, CHATQ_LLMSIM_PORT=str(sim.port),
                                CHATQ_QUEUE_NAME=f"bench-{uuid.uuid4().hex[:6]}",
                                CHATQ_LOG_LEVEL="WARNING", CHATQ_WORKER_CONCURRENCY="64")
        mine = await chatq_overheads(env, args.rate, args.seconds)
        peer = await seed_overheads(env, sim.url, 5, min(args.seconds, 6))
    ms = lambda v: f"{v * 1000:.1f} ms"  # noqa: E731
    harness.report("overhead", [
        (f"chatq p50 at {args.rate:.0f} jobs/s", ms(percentile(mine, 50)), "target < 20 ms"),
        (f"chatq p99 at {args.rate:.0f} jobs/s", ms(percentile(mine, 99)), "target < 100 ms"),
        ("seed pipeline p50 at 5 jobs/s (peer)", ms(percentile(peer, 50)), "its sustainable rate"),
        ("seed pipeline p99 at 5 jobs/s (peer)", ms(percentile(peer, 99)), ""),
        ("ratio chatq p50 / peer p50", f"{percentile(mine, 50) / percentile(peer, 50):.2f}",
         f"at {args.rate / 5:.0f}x the rate"),
    ], {"chatq_s": sorted(mine), "peer_s": sorted(peer), "rate": args.rate})


if __name__ == "__main__":
    asyncio.run(main())
