"""Provider 429s and budget use of eight workers against one rate-limited model, in one run.

llmsim limits like a provider (600 requests and 60,000 tokens a minute, OpenAI's headers,
429 with retry-after). A backlog of 2,000 jobs is drained by eight worker processes three
ways, each against a fresh llmsim (its bucket starts full):

- shared:  chatq's budget, one bucket in Redis for all eight (CHATQ_LLM_RPM/TPM);
- eighths: the per-process peer, each worker its own budget of an eighth (as aiolimiter
  and the like would be set up: each process gets limit / replicas);
- none:    no budget: every worker calls and retries on its own.

Reported: 429s as a share of model calls, jobs failed, and budget use — successful calls
per minute while the backlog lasts (between 40% and 90% done, past the first minute's
burst) over the limit. Then two keys with a 10:1 backlog, through chatq's fair window
(chatq.fair: the jobs created as the api creates them, an api process running the feeder
that releases held jobs by key) against its peer, the same backlog on the queue in arrival
order (FIFO): what B gets for each of A's answers while both wait (1.0 is equal).

    .venv/bin/python -m bench.rate_budget [--jobs 2000] [--workers 8] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

from chatq import fair as fair_mod
from chatq import jobs

from bench import harness
from tests import servers


@contextlib.contextmanager
def limited_llmsim(rpm: int, tpm: int) -> Iterator[servers.Server]:
    env = servers.chatq_env(CHATQ_LLMSIM_TTFT_MS="100", CHATQ_LLMSIM_ITL_MS="10",
                            CHATQ_LLMSIM_TOKENS="16", CHATQ_LLMSIM_RPM=str(rpm),
                            CHATQ_LLMSIM_TPM=str(tpm), CHATQ_LOG_LEVEL="WARNING")
    with servers.chatq_process("llmsim", env, port_var="CHATQ_LLMSIM_PORT") as sim:
        yield sim


def sim_stats(sim: servers.Server) -> dict[str, int]:
    with urllib.request.urlopen(f"{sim.url}/healthz", timeout=10) as resp:
        data: dict[str, int] = json.load(resp)
    return data


async def preload(env: dict[str, str], owners: list[tuple[str, int]], fair: bool = False) -> None:
    """Queued jobs of each owner, interleaved as they would arrive; `fair`: routed through
    the fair window as the api routes them (most are held, for the feeder to release)."""
    store, queue = harness.open_store_and_queue(env)
    window = fair_mod.Fair(store.redis, harness.settings_for(env)) if fair else None
    await queue.setup()
    # Interleaved as they would arrive: with a 10:1 backlog, ten of A's, then one of B's.
    order: list[str] = []
    counts = dict(owners)
    step = {o: max(1, n // min(m for _, m in owners)) for o, n in owners}
    while any(counts.values()):
        for owner, _ in owners:
            take = min(step[owner], counts[owner])
            order += [owner] * take
            counts[owner] -= take
    request = jobs.ChatRequest(message="bench question", max_tokens=32)
    try:
        for start in range(0, len(order), 200):
            chunk = [(jobs.new_job_id(), o) for o in order[start:start + 200]]
            direct = [i for i, _ in chunk]
            if window is not None:  # one at a time, in arrival order, as they would come
                direct = [i for i, o in chunk if await window.create(jobs.JobRecord.queued(
                    i, o, request, "chatq-sim-1", True)) is fair_mod.Route.DIRECT]
            else:
                await asyncio.gather(*(store.create(jobs.JobRecord.queued(
                    i, o, request, "chatq-sim-1", True)) for i, o in chunk))
            for i in direct:  # in order: the queue's order is the arrival order
                await queue.send(jobs.encode_message(i), {})
    finally:
        await queue.close()
        await store.close()


async def watch(env: dict[str, str], total: int, timeout: float, owners: tuple[str, ...],
                ready: threading.Event) -> dict[str, Any]:
    """When shares of the backlog were done, and (for owners) who was served while all
    waited; `ready` is set once subscribed, before the workers start."""
    store, _ = harness.open_store_and_queue(env)
    pubsub = store.redis.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe("chatq:done")
    ready.set()
    seen, served = 0, dict.fromkeys(owners, 0)
    left = {o: 0 for o in owners}
    marks: dict[float, float] = {}
    both_waiting = True
    deadline, last = time.monotonic() + timeout, time.monotonic()
    try:
        if owners:
            left.update(await _tally(store, "owner"))
        while seen < total and time.monotonic() < deadline:
            message = await pubsub.get_message(timeout=1.0)
            if message is not None:
                seen += 1
                for mark in (0.4, 0.9):
                    if mark not in marks and seen >= mark * total:
                        marks[mark] = time.monotonic()
                if owners:
                    owner = str(await store.redis.hget(f"chatq:job:{message['data']}", "owner"))
                    left[owner] -= 1
                    if both_waiting:
                        served[owner] += 1
                        both_waiting = all(n > 0 for n in left.values())
            if time.monotonic() - last > 10:
                harness.say(f"  {seen}/{total} done...")
                last = time.monotonic()
        failed = (await _tally(store, "status")).get("failed", 0)
    finally:
        await pubsub.aclose()
        await store.close()
    return {"seen": seen, "marks": marks, "served": served, "failed": failed}


async def _tally(store: Any, field: str) -> dict[str, int]:
    """Job records counted by one field's value."""
    out: dict[str, int] = {}
    async for key in store.redis.scan_iter(match="chatq:job:*", count=1000):
        if not key.endswith(":events"):
            value = str(await store.redis.hget(key, field))
            out[value] = out.get(value, 0) + 1
    return out


def run(mode: str, args: argparse.Namespace, owners: list[tuple[str, int]],
        fair: bool = False) -> dict[str, Any]:
    total = sum(n for _, n in owners)
    harness.say(f"{mode}{' (fair window)' if fair else ''}: {args.workers} workers, {total} "
                f"jobs, llmsim at {args.rpm} RPM / {args.tpm} TPM")
    with servers.redis_server() as redis, limited_llmsim(args.rpm, args.tpm) as sim:
        env = servers.chatq_env(
            CHATQ_REDIS_URL=redis.url, CHATQ_QUEUE_BACKEND="redis",
            CHATQ_QUEUE_NAME=f"bench-{uuid.uuid4().hex[:6]}", CHATQ_LOG_LEVEL="WARNING",
            CHATQ_LLM_BASE_URL=f"{sim.url}/v1", CHATQ_LLM_MODEL="chatq-sim-1",
            CHATQ_LLM_API_KEY="bench", CHATQ_LLM_MAX_ATTEMPTS="6",
            CHATQ_LLM_BACKOFF_BASE_SECONDS="0.5", CHATQ_LLM_BACKOFF_MAX_SECONDS="10",
            CHATQ_WORKER_CONCURRENCY=str(args.concurrency), CHATQ_QUEUE_VISIBILITY_SECONDS="30",
            CHATQ_FAIR_ENABLED=str(fair).lower())
        asyncio.run(preload(env, owners, fair))
        got: dict[str, Any] = {}
        ready = threading.Event()
        names = tuple(o for o, _ in owners) if len(owners) > 1 else ()
        watcher = threading.Thread(target=lambda: got.update(asyncio.run(
            watch(env, total, args.timeout, names, ready))), daemon=True)
        watcher.start()
        ready.wait(30)
        with contextlib.ExitStack() as stack:
            if fair:  # the feeder that releases held jobs runs in the api
                stack.enter_context(servers.chatq_process("api", env, port_var="CHATQ_API_PORT"))
            for i in range(args.workers):
                wenv = dict(env, CHATQ_TELEMETRY_METRICS_PORT=str(servers.free_port()))
                if mode == "shared":
                    wenv.update(CHATQ_LLM_RPM=str(args.rpm), CHATQ_LLM_TPM=str(args.tpm))
                elif mode == "eighths":
                    # A key of its own: its own budget, of 1/workers of the limit.
                    wenv.update(CHATQ_LLM_API_KEY=f"bench-{i}",
                                CHATQ_LLM_RPM=str(args.rpm // args.workers),
                                CHATQ_LLM_TPM=str(args.tpm // args.workers))
                else:
                    wenv.update(CHATQ_LLM_BUDGET="false")
                stack.enter_context(servers.chatq_process(
                    "worker", wenv, port_var="CHATQ_TELEMETRY_METRICS_PORT"))
            watcher.join(args.timeout + 30)
        stats = sim_stats(sim)
    marks = got["marks"]
    steady = (0.5 * total) / max(1e-9, marks[0.9] - marks[0.4]) if 0.9 in marks else 0.0
    calls = max(1, stats["requests"])
    out = {"mode": mode, "jobs": total, "done": got["seen"], "failed": got["failed"],
           "calls": stats["requests"], "provider_429": stats["rate_limited"],
           "share_429": stats["rate_limited"] / calls,
           "use": steady * 60 / args.rpm, "served": got["served"]}
    harness.say(f"{mode}: {out}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--rpm", type=int, default=600)
    parser.add_argument("--tpm", type=int, default=60_000)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--concurrency", type=int, default=4,
                        help="jobs per worker; the fair window is the workers' slots plus a spare, "
                             "so a window wider than the smaller key's whole backlog leaves "
                             "fairness to the queue's order")
    parser.add_argument("--quick", action="store_true", help="a short smoke run (CI)")
    args = parser.parse_args()
    if args.quick:
        args.jobs, args.workers, args.rpm, args.tpm, args.timeout = 90, 2, 60, 6000, 300
    runs = {m: run(m, args, [("open", args.jobs)]) for m in ("shared", "eighths", "none")}
    backlog = [("key-a", args.jobs * 10 // 11), ("key-b", args.jobs // 11)]
    fair = {"fair": run("shared", args, backlog, fair=True), "fifo": run("shared", args, backlog)}
    b_per_a = {k: r["served"].get("key-b", 0) / max(1, r["served"].get("key-a", 0))
               for k, r in fair.items()}
    rows = [(f"{m}: 429s / calls", f"{r['share_429']:.1%}",
             f"{r['provider_429']} of {r['calls']} calls; {r['failed']} jobs failed")
            for m, r in runs.items()]
    rows += [(f"{m}: budget use", f"{r['use']:.0%}", f"of {args.rpm} RPM, 40%..90% of the backlog")
             for m, r in runs.items()]
    s, e = runs["shared"], runs["eighths"]
    rows.append(("ratio chatq / peer (use)", f"{s['use'] / max(1e-9, e['use']):.2f}",
                 "shared budget over per-process eighths"))
    for k, label in (("fair", "fair window"), ("fifo", "FIFO peer")):
        rows.append((f"10:1 keys, {label}: B per A", f"{b_per_a[k]:.2f}",
                     f"answers while both waited {fair[k]['served']} (1.00 is equal)"))
    rows.append(("ratio fair / FIFO (B per A)", f"{b_per_a['fair'] / max(1e-9, b_per_a['fifo']):.2f}",
                 "how much closer to equal the fair window serves a 10:1 backlog"))
    harness.report("rate_budget", rows, {"runs": runs, "fairness": fair, "b_per_a": b_per_a,
                                         "args": vars(args)})


if __name__ == "__main__":
    main()
