"""Soak: steady load through api + two workers for minutes, a worker SIGKILLed and replaced
every `--kill-every` seconds; then every accepted job is waited for.

Reports answered / accepted (the ratio line), failed jobs by code, duplicate answers (jobs
with more than one `done` event: must be 0), the RSS of the api and of each worker that
lived through the run from the end of warm-up to the end (growth per process), the api's
open file descriptors, and chatq's Redis keys left without a TTL. The peer is the same run's
first and last fifth: jobs accepted per second in each, and the p99 time from accepted to
answered of the jobs accepted in each (a backlog that grows makes the last fifth's longer).

    .venv/bin/python -m bench.soak [--minutes 30] [--rate 50] [--kill-every 60] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import time
import uuid
from collections import Counter
from typing import Any

import httpx
import psutil
import redis
from chatq import settings

from bench import harness
from tests import servers


def rss_mib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


class Soak:
    """One run: the servers, the load and the kills."""

    def __init__(self, env: dict[str, str], stack: contextlib.ExitStack) -> None:
        self.env = env
        self.stack = stack
        self.workers: list[servers.Server] = []
        self.kills = 0

    def start_worker(self) -> servers.Server:
        wenv = {**self.env, "CHATQ_TELEMETRY_METRICS_PORT": str(servers.free_port())}
        worker = self.stack.enter_context(servers.chatq_process(
            "worker", wenv, port_var="CHATQ_TELEMETRY_METRICS_PORT"))
        self.workers.append(worker)
        return worker

    def kill_one(self) -> None:
        """SIGKILL the newest worker and start a replacement: the first worker lives through
        the run (its RSS is the per-process growth), the second slot dies again and again."""
        victim = self.workers.pop()
        victim.kill()
        self.kills += 1
        self.start_worker()


async def load(url: str, rate: float, seconds: float, soak: Soak, kill_every: float,
               accepted: list[tuple[float, str]], refused: Counter[int], lag: list[float]) -> None:
    """Open loop: one POST every 1/rate s; a worker killed every kill_every s. `lag` gets
    the most a POST was sent after its time, per fifth of the run (a late one means a burst)."""
    async with httpx.AsyncClient(base_url=url, timeout=10,
                                 limits=httpx.Limits(max_connections=200)) as http:
        async def one(i: int) -> None:
            try:
                resp = await http.post("/v1/chat", json={"message": f"soak {i} {uuid.uuid4().hex[:6]}"})
            except httpx.HTTPError:
                refused[0] += 1
                return
            if resp.status_code == 202:
                accepted.append((time.monotonic(), resp.json()["id"]))
            else:
                refused[resp.status_code] += 1

        async def killer() -> None:
            while True:
                await asyncio.sleep(kill_every)
                await asyncio.to_thread(soak.kill_one)  # the load goes on meanwhile

        kills = asyncio.create_task(killer())
        # Only the requests in flight are kept: holding 90,000 finished tasks made this
        # process's garbage collections longer and longer, and each pause sent a burst.
        tasks: set[asyncio.Task[None]] = set()
        start = time.monotonic()
        for i in range(int(rate * seconds)):
            due = start + i / rate
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            fifth = min(4, int(i / rate / seconds * 5))
            lag[fifth] = max(lag[fifth], time.monotonic() - due)
            task = asyncio.create_task(one(i))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        kills.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await kills
        await asyncio.gather(*tasks)


def settle(redis_url: str, ids: list[str], timeout: float) -> dict[str, dict[str, str]]:
    """Each job's record once all are terminal, or as they stand after `timeout` s. Read
    from Redis in pipelines: reading 90,000 jobs through the api's GET (one at a time, 2.6 ms
    each; or 64 at a time) outlasts any deadline, and half of them looked unanswered."""
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    final: dict[str, dict[str, str]] = {}
    left = list(ids)
    deadline = time.monotonic() + timeout
    while left and time.monotonic() < deadline:
        pipe = r.pipeline(transaction=False)
        for job_id in left:
            pipe.hmget(f"chatq:job:{job_id}", "status", "error", "created_at", "finished_at")
        for job_id, (status, error, created, finished) in zip(left, pipe.execute(), strict=True):
            if status in ("succeeded", "failed", "cancelled"):
                final[job_id] = {"status": status, "error": error or "{}",
                                 "created_at": created, "finished_at": finished}
        left = [i for i in left if i not in final]
        if left:
            time.sleep(2)
    r.close()
    return final


async def sample_fds(pid: int, redis_port: int, every: float,
                     into: list[tuple[float, int, int]]) -> None:
    """The api's open file descriptors and, of them, its Redis connections, every `every` s:
    a leak climbs; a connection pool grows to its busiest moment so far and stays there."""
    proc = psutil.Process(pid)
    while True:
        to_redis = sum(1 for c in proc.net_connections("tcp")
                       if c.raddr and c.raddr.port == redis_port)
        into.append((time.monotonic(), proc.num_fds(), to_redis))
        await asyncio.sleep(every)


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] if ordered else float("nan")


def size_of(r: redis.Redis, key: str) -> int:
    """Entries a key holds, whatever its type (1 for a string)."""
    kind = r.type(key)
    return int({"stream": r.xlen, "zset": r.zcard, "set": r.scard, "hash": r.hlen,
                "list": r.llen}.get(kind, lambda _k: 1)(key))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--rate", type=float, default=50, help="jobs per second")
    parser.add_argument("--kill-every", type=float, default=60, help="seconds between worker kills")
    parser.add_argument("--quick", action="store_true", help="2 minutes at 20/s, a kill every 20 s (CI)")
    args = parser.parse_args()
    if args.quick:
        args.minutes, args.rate, args.kill_every = 2, 20, 20
    seconds = args.minutes * 60
    warmup = min(60.0, seconds / 5)
    with contextlib.ExitStack() as stack:
        rserver = stack.enter_context(servers.redis_server())
        sim = stack.enter_context(harness.llmsim(50, 5, 12))
        env = servers.chatq_env(
            CHATQ_REDIS_URL=rserver.url, CHATQ_QUEUE_BACKEND="redis", CHATQ_QUEUE_NAME="soak",
            CHATQ_QUEUE_VISIBILITY_SECONDS="5", CHATQ_QUEUE_WAIT_SECONDS="1",
            CHATQ_LLMSIM_PORT=str(sim.port), CHATQ_LOG_LEVEL="WARNING",
            CHATQ_WORKER_GRACE_SECONDS="5")
        api = stack.enter_context(servers.chatq_process("api", env, port_var="CHATQ_API_PORT"))
        soak = Soak(env, stack)
        soak.start_worker()
        soak.start_worker()
        accepted: list[tuple[float, str]] = []
        refused: Counter[int] = Counter()
        lag = [0.0] * 5
        harness.say(f"soak: {args.rate:.0f} jobs/s for {seconds:.0f}s, a worker SIGKILLed every "
                    f"{args.kill_every:.0f}s...")

        async def run() -> dict[str, Any]:
            started = time.monotonic()
            task = asyncio.create_task(load(api.url, args.rate, seconds, soak, args.kill_every,
                                            accepted, refused, lag))
            fds: list[tuple[float, int, int]] = []
            sampler = asyncio.create_task(sample_fds(api.proc.pid, rserver.port, 5, fds))
            await asyncio.sleep(warmup)
            early = {w.proc.pid: rss_mib(w.proc.pid) for w in soak.workers}
            api_early, fds_early = rss_mib(api.proc.pid), psutil.Process(api.proc.pid).num_fds()
            await task
            sampler.cancel()
            ids = [i for _, i in accepted]
            final = await asyncio.to_thread(settle, rserver.url, ids, 120)
            survivors = {w.proc.pid: rss_mib(w.proc.pid) for w in soak.workers}
            return {"started": started, "early": early, "api_early": api_early,
                    "fds_early": fds_early, "fds": fds, "final": final, "survivors": survivors,
                    "api_late": rss_mib(api.proc.pid),
                    "fds_late": psutil.Process(api.proc.pid).num_fds()}

        out = asyncio.run(run())
        r = redis.Redis.from_url(rserver.url, decode_responses=True)
        ids = [i for _, i in accepted]
        dones = [sum(1 for _, e in r.xrange(f"chatq:job:{i}:events") if e.get("type") == "done")
                 for i in ids]
        # Each key without a TTL, by family, and how much it holds: bounded ones stay small.
        sizes = {k: size_of(r, k) for k in r.scan_iter("chatq:*", count=1000) if r.ttl(k) == -1}
        no_ttl = Counter(k if k.count(":") < 2 else k.rsplit(":", 1)[0] + ":*" for k in sizes)
        r.close()
    final = out["final"]
    answered = sum(1 for j in final.values() if j["status"] == "succeeded")
    failed = Counter(json.loads(j["error"]).get("code") for j in final.values()
                     if j["status"] == "failed")
    duplicates = sum(1 for n in dones if n > 1)
    fifth = seconds / 5
    t0 = out["started"]
    first = sum(1 for t, _ in accepted if t - t0 < fifth) / fifth
    last = sum(1 for t, _ in accepted if t - t0 >= seconds - fifth) / fifth
    # Accepted -> answered of the jobs accepted in the first and the last fifth (one not
    # finished counts as never): a backlog that grows makes the last fifth's longer.
    created = {i: t for t, i in accepted}
    took = [(created[i] - t0, float(j["finished_at"]) - float(j["created_at"])
             if j["status"] == "succeeded" else math.inf) for i, j in final.items()]
    took += [(created[i] - t0, math.inf) for i in ids if i not in final]
    early_s = [d for at, d in took if at < fifth]
    late_s = [d for at, d in took if at >= seconds - fifth]
    fds_first, redis_first = (max((s[k] for s in out["fds"] if s[0] - t0 < fifth), default=0)
                              for k in (1, 2))
    fds_last, redis_last = (max((s[k] for s in out["fds"] if s[0] - t0 >= seconds - fifth),
                                default=0) for k in (1, 2))
    growth = {pid: (out["early"][pid], mib) for pid, mib in out["survivors"].items() if pid in out["early"]}
    ratio = answered / max(1, len(accepted))
    rows = [
        ("accepted", str(len(accepted)), f"refused {dict(refused) or 0}"),
        ("answered", str(answered), f"failed {dict(failed) or 0}; unsettled {len(accepted) - len(final)}"),
        ("duplicate answers", str(duplicates), "must be 0"),
        ("worker kills", str(soak.kills), f"every {args.kill_every:.0f}s"),
        ("api RSS MiB", f"{out['api_early']:.1f} -> {out['api_late']:.1f}",
         f"{(out['api_late'] / out['api_early'] - 1) * 100:+.1f}% after {warmup:.0f}s warm-up"),
        ("api open fds", f"{out['fds_early']} -> {out['fds_late']}", "after warm-up -> after settling"),
        ("api open fds, most in first fifth", str(fds_first),
         f"last fifth {fds_last} (sampled every 5 s; a leak climbs)"),
        ("  of them to Redis", str(redis_first),
         f"last fifth {redis_last} (the pool keeps what it opened; at most "
         f"{settings.RedisSettings.model_fields['max_connections'].default}, its size)"),
        *[(f"worker {pid} RSS MiB", f"{a:.1f} -> {b:.1f}", f"{(b / a - 1) * 100:+.1f}%")
          for pid, (a, b) in growth.items()],
        ("accepted/s first fifth", f"{first:.1f}", f"last fifth {last:.1f}"),
        ("load sent late, most ms, first fifth", f"{lag[0] * 1000:.0f}",
         f"last fifth {lag[4] * 1000:.0f} (the bench's own pauses: a burst follows)"),
        ("answer time p99 s, first fifth", f"{p99(early_s):.2f}",
         f"last fifth {p99(late_s):.2f} (steady: about equal)"),
        ("chatq keys without TTL", str(sum(no_ttl.values())), str(dict(no_ttl))),
        *[(f"  {k}", str(n), "entries") for k, n in sorted(sizes.items())],
        ("ratio answered / accepted", f"{ratio:.4f}", "peer: every accepted job answered (1.0)"),
    ]
    harness.report("soak", rows, {
        "minutes": args.minutes, "rate": args.rate, "kill_every": args.kill_every,
        "accepted": len(accepted), "answered": answered, "failed": dict(failed),
        "duplicates": duplicates, "kills": soak.kills, "refused": dict(refused),
        "api_rss_mib": [out["api_early"], out["api_late"]], "api_fds": [out["fds_early"], out["fds_late"]],
        "api_fds_most_per_fifth": [fds_first, fds_last],
        "api_redis_connections_most_per_fifth": [redis_first, redis_last],
        "worker_rss_mib": {str(k): v for k, v in growth.items()}, "keys_without_ttl": dict(no_ttl),
        "sizes_without_ttl": sizes,
        "accepted_per_s": [first, last], "lag_ms_per_fifth": [x * 1000 for x in lag],
        "answer_p99_s": [p99(early_s), p99(late_s)]})
    if duplicates:
        raise SystemExit(f"{duplicates} job(s) answered twice")


if __name__ == "__main__":
    main()
