"""Batches against interactive work, in one run through one api + one worker process:

1. throughput: N interactive jobs (the peer) vs a batch of N lines through the Batch API,
   llmsim at about `--answer-ms` per answer, answers/s between the 10% and 90% marks;
2. upload: a `--upload-mb` batch file through POST /v1/files (checked line by line as it
   streams): seconds, and the api process's peak RSS growth;
3. interactive queue wait (started - created) p50/p99 at `--rate` questions/s: idle, while
   a batch runs, and while a batch runs without priorities (its lines on the interactive
   queue itself, first come first served).

    .venv/bin/python -m bench.batches [--lines 10000] [--answer-ms 1000] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import openai
from chatq import results

from bench import harness
from bench.overhead import percentile, post_at_rate
from tests import servers


def batch_lines(count: int, pad: int = 0) -> bytes:
    filler = "x" * pad
    return b"".join(json.dumps({
        "custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "chatq-sim-1",
                 "messages": [{"role": "user", "content": f"line {i} {filler}"}]}}).encode() + b"\n"
        for i in range(count))


def peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def start_batch(url: str, data: bytes) -> str:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
    upload = await client.files.create(file=("in.jsonl", data), purpose="batch")
    batch = await client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                        completion_window="24h")
    await client.close()
    return batch.id


async def waits(store: results.Store, ids: list[str]) -> list[float]:
    out = []
    for job_id in ids:
        while True:
            raw = await store.redis.hgetall(results.job_key(job_id))
            if raw.get("status") == "succeeded":
                break
            await asyncio.sleep(0.05)
        out.append(float(raw["started_at"]) - float(raw["created_at"]))
    return out


def env_for(redis: servers.Server, sim: servers.Server, **extra: str) -> dict[str, str]:
    return servers.chatq_env(
        CHATQ_REDIS_URL=redis.url, CHATQ_LLMSIM_PORT=str(sim.port),
        CHATQ_QUEUE_NAME=f"bench-{uuid.uuid4().hex[:6]}", CHATQ_LOG_LEVEL="WARNING",
        CHATQ_WORKER_CONCURRENCY="32", CHATQ_QUEUE_WAIT_SECONDS="1", **extra)


async def throughput(redis: servers.Server, sim: servers.Server, lines: int, tmp: Path
                     ) -> dict[str, float]:
    env = env_for(redis, sim, CHATQ_FILES_DIR=str(tmp / "files"))
    store, queue = harness.open_store_and_queue(env)
    with servers.chatq_process("api", env, port_var="CHATQ_API_PORT") as api, \
            servers.chatq_process("worker", env, port_var="CHATQ_TELEMETRY_METRICS_PORT"):
        await queue.setup()
        harness.say(f"interactive: {lines} jobs...")
        counting = asyncio.create_task(harness.count_done(store, lines, lines * 2 + 60))
        await harness.preload(store, queue, lines)
        marks = await counting
        interactive = 0.8 * lines / (marks[0.9] - marks[0.1])
        harness.say(f"batch: {lines} lines...")
        counting = asyncio.create_task(harness.count_done(store, lines, lines * 2 + 60))
        await start_batch(api.url, batch_lines(lines))
        marks = await counting
        batch = 0.8 * lines / (marks[0.9] - marks[0.1])
    await queue.close()
    await store.close()
    return {"interactive_per_s": interactive, "batch_per_s": batch}


async def upload(redis: servers.Server, sim: servers.Server, megabytes: int, tmp: Path
                 ) -> dict[str, float]:
    line = len(batch_lines(1, 2000))
    data = batch_lines(min(50_000, megabytes * 1024 * 1024 // line), 2000)
    env = env_for(redis, sim, CHATQ_FILES_DIR=str(tmp / "upload"))
    with servers.chatq_process("api", env, port_var="CHATQ_API_PORT") as api:
        before = rss_kb(api.proc.pid)
        count = data.count(b"\n")
        harness.say(f"upload: {len(data) / 1e6:.0f} MB, {count} lines...")
        started = time.monotonic()
        async with httpx.AsyncClient(base_url=api.url, timeout=300) as http:
            reply = await http.post("/v1/files", data={"purpose": "batch"},
                                    files={"file": ("big.jsonl", data)})
        seconds = time.monotonic() - started
        reply.raise_for_status()
        peak = peak_rss_kb(api.proc.pid)
    return {"upload_mb": len(data) / 1e6, "upload_s": seconds,
            "api_rss_before_mb": before / 1024, "api_peak_rss_growth_mb": (peak - before) / 1024}


async def queue_wait(redis: servers.Server, sim: servers.Server, rate: float, seconds: float,
                     lines: int, tmp: Path, batch_mode: str) -> list[float]:
    """Interactive waits at `rate`: batch_mode none | lanes | fifo (no priorities)."""
    extra = {"CHATQ_FILES_DIR": str(tmp / f"wait-{batch_mode}")}
    if batch_mode == "fifo":
        extra["CHATQ_BATCH_QUEUE_SUFFIX"] = ""  # the batch lane is the interactive queue
    env = env_for(redis, sim, **extra)
    store = results.Store.from_settings(harness.settings_for(env).redis)
    with servers.chatq_process("api", env, port_var="CHATQ_API_PORT") as api, \
            servers.chatq_process("worker", env, port_var="CHATQ_TELEMETRY_METRICS_PORT"):
        if batch_mode != "none":
            await start_batch(api.url, batch_lines(lines))
            await asyncio.sleep(3)  # the batch fills the worker
        harness.say(f"queue wait ({batch_mode}): {rate:.0f}/s for {seconds:.0f}s...")
        ids = await post_at_rate(api.url, "/v1/chat", rate, seconds)
        out = await waits(store, ids)
    await store.close()
    return out


async def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    answer = args.answer_ms
    with servers.redis_server() as redis, harness.llmsim(answer, 0, 1) as sim:
        got: dict[str, Any] = await throughput(redis, sim, args.lines, tmp)
        got.update(await upload(redis, sim, args.upload_mb, tmp))
        for mode in ("none", "lanes", "fifo"):
            got[f"wait_{mode}_s"] = sorted(await queue_wait(
                redis, sim, args.rate, args.seconds, args.lines, tmp, mode))
    return got


async def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lines", type=int, default=10_000)
    parser.add_argument("--answer-ms", type=float, default=1000)
    parser.add_argument("--upload-mb", type=int, default=100)
    parser.add_argument("--rate", type=float, default=5)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--quick", action="store_true", help="a short smoke run (CI)")
    args = parser.parse_args()
    if args.quick:
        args.lines, args.answer_ms, args.upload_mb, args.seconds = 300, 100, 5, 3
    with tempfile.TemporaryDirectory(prefix="chatq-bench-batches-") as tmp:
        got = await run(args, Path(tmp))
    ms = lambda v: f"{v * 1000:.1f} ms"  # noqa: E731
    w = {m: got[f"wait_{m}_s"] for m in ("none", "lanes", "fifo")}
    harness.report("batches", [
        (f"interactive answers/s ({args.lines} jobs, {args.answer_ms:.0f} ms each; peer)",
         f"{got['interactive_per_s']:.1f}", ""),
        (f"batch lines/s ({args.lines} lines)", f"{got['batch_per_s']:.1f}", ""),
        ("ratio batch / interactive", f"{got['batch_per_s'] / got['interactive_per_s']:.2f}",
         "target >= 0.9"),
        (f"upload of {got['upload_mb']:.0f} MB, checked as it streams", f"{got['upload_s']:.1f} s",
         "target < 10 s"),
        ("api peak RSS growth during that upload", f"{got['api_peak_rss_growth_mb']:.0f} MB",
         f"(from {got['api_rss_before_mb']:.0f} MB)"),
        (f"interactive queue wait p99 idle at {args.rate:.0f}/s", ms(percentile(w["none"], 99)), ""),
        ("interactive queue wait p99 during a batch", ms(percentile(w["lanes"], 99)), ""),
        ("interactive queue wait p99 during a batch, no priorities", ms(percentile(w["fifo"], 99)),
         "(one FIFO queue)"),
        ("ratio during batch / idle p99", f"{percentile(w['lanes'], 99) / percentile(w['none'], 99):.2f}",
         "target <= 1.5"),
    ], {**got, "args": vars(args)})


if __name__ == "__main__":
    asyncio.run(main())
