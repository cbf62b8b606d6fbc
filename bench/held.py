"""Held requests: N pending long-polls and M idle SSE streams on one api process.

The held requests wait on jobs that are written but not yet sent to the queue, so nothing
comes until the bench sends their messages. Reported: the api's RSS growth per pending
long-poll and per idle stream (RSS delta / N, once RSS settles); another client's latency
with them open against the same client with none open, in the same run (the peer): GET of a
finished job (p50 / p99 of 200) and POST + long-poll until answered (p99 of 20); then the
held jobs' messages are sent, and every long-poll must come back with its answer and every
stream with its `done` event.

    .venv/bin/python -m bench.held [--polls 2000] [--streams 2000] [--quick] [--baseline]

`--baseline` leaves out the settings older chatq versions do not know (run it with an older
checkout first on PYTHONPATH to measure the version before).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
import uuid

import httpx
import psutil
from chatq import jobs

from bench import harness
from tests import servers

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def rss_mib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


async def settled_rss(pid: int, timeout: float = 60.0) -> float:
    """The api's RSS once it stops moving (the held requests all registered)."""
    last, still, deadline = rss_mib(pid), 0, time.monotonic() + timeout
    while time.monotonic() < deadline and still < 3:
        await asyncio.sleep(1.0)
        now = rss_mib(pid)
        still = still + 1 if abs(now - last) < max(0.2, last * 0.002) else 0
        last = now
    return last


async def open_many(port: int, paths: list[str], head_until: bytes = b"") -> list[Conn]:
    """One raw connection per path, its request sent; with `head_until`, read up to it.
    Those the api cut before that are left out (the caller counts them)."""
    conns: list[Conn | None] = []

    async def one(path: str) -> Conn | None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=2**20)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: chatq\r\n\r\n".encode())
        await writer.drain()
        if head_until:
            try:
                await asyncio.wait_for(reader.readuntil(head_until), 60)
            except (asyncio.IncompleteReadError, TimeoutError, OSError):
                writer.close()
                return None
        return reader, writer

    for start in range(0, len(paths), 100):  # batches: the listen backlog is finite
        conns += await asyncio.gather(*(one(p) for p in paths[start:start + 100]))
    return [c for c in conns if c is not None]


def p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def other_client(url: str, done_id: str, gets: int, asks: int) -> dict[str, float]:
    """Another client's latencies: GET of a finished job; POST + long-poll to the answer."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        get_s: list[float] = []
        for _ in range(gets):
            started = time.perf_counter()
            assert (await http.get(f"/v1/chat/{done_id}")).status_code == 200
            get_s.append(time.perf_counter() - started)
        ask_s: list[float] = []
        for i in range(asks):
            started = time.perf_counter()
            job = (await http.post("/v1/chat", json={"message": f"other {i}"})).json()["id"]
            resp = await http.get(f"/v1/chat/{job}", params={"wait": 60})
            assert resp.json()["status"] == "succeeded", resp.text
            ask_s.append(time.perf_counter() - started)
    return {"get_p50_ms": p(get_s, 0.5), "get_p99_ms": p(get_s, 0.99),
            "ask_p50_ms": p(ask_s, 0.5), "ask_p99_ms": p(ask_s, 0.99)}


async def read_answer(conn: Conn) -> bool:
    reader, writer = conn
    try:
        data = await asyncio.wait_for(reader.readuntil(b'"}'), 600)
        return b"200 OK" in data and b'"succeeded"' in data
    except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        return False
    finally:
        writer.close()


async def read_done(conn: Conn) -> bool:
    reader, writer = conn
    try:
        await asyncio.wait_for(reader.readuntil(b"event: done"), 600)
        return True
    except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        return False
    finally:
        writer.close()


async def run(args: argparse.Namespace, env: dict[str, str], api: servers.Server) -> dict[str, float]:
    store, queue = harness.open_store_and_queue(env)
    request = jobs.ChatRequest(message="held")
    poll_ids = [jobs.new_job_id() for _ in range(args.polls)]
    stream_ids = [jobs.new_job_id() for _ in range(args.streams)]
    for start in range(0, len(poll_ids + stream_ids), 500):
        await asyncio.gather(*(store.create(jobs.JobRecord.queued(i, "open", request,
                                                                  "chatq-sim-1", True))
                               for i in (poll_ids + stream_ids)[start:start + 500]))
    async with httpx.AsyncClient(base_url=api.url, timeout=60) as http:
        first = (await http.post("/v1/chat", json={"message": "warm-up"})).json()["id"]
        assert (await http.get(f"/v1/chat/{first}", params={"wait": 60})).json()["status"] == "succeeded"
    pid = api.proc.pid
    out: dict[str, float] = {}
    harness.say("another client, nothing held (the peer)...")
    for k, v in (await other_client(api.url, first, args.gets, args.asks)).items():
        out[f"idle_{k}"] = v
    rss0 = await settled_rss(pid)
    harness.say(f"api RSS {rss0:.1f} MiB; holding {args.polls} long-polls...")
    polls = await open_many(api.port, [f"/v1/chat/{i}?wait=600" for i in poll_ids])
    rss1 = await settled_rss(pid)
    harness.say(f"api RSS {rss1:.1f} MiB; opening {args.streams} SSE streams (then unread)...")
    streams = await open_many(api.port, [f"/v1/chat/{i}/events" for i in stream_ids],
                              head_until=b"retry: 1000\n\n")
    rss2 = await settled_rss(pid)
    out["streams_opened"] = len(streams)
    harness.say(f"api RSS {rss2:.1f} MiB; another client while they are held...")
    for k, v in (await other_client(api.url, first, args.gets, args.asks)).items():
        out[f"held_{k}"] = v
    out.update(rss_start_mib=rss0, rss_polls_mib=rss1, rss_streams_mib=rss2,
               kib_per_poll=(rss1 - rss0) * 1024 / max(1, args.polls),
               kib_per_stream=(rss2 - rss1) * 1024 / max(1, args.streams),
               api_fds=psutil.Process(pid).num_fds())
    harness.say("sending the held jobs' messages; every held request must be answered...")
    started = time.monotonic()
    for start in range(0, len(poll_ids + stream_ids), 500):
        await asyncio.gather(*(queue.send(jobs.encode_message(i), {})
                               for i in (poll_ids + stream_ids)[start:start + 500]))
    answered = await asyncio.gather(*(read_answer(c) for c in polls))
    finished = await asyncio.gather(*(read_done(c) for c in streams))
    out.update(polls_answered=sum(answered), streams_done=sum(finished),
               seconds_to_answer_all=time.monotonic() - started)
    await queue.close()
    await store.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--polls", type=int, default=2000)
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--gets", type=int, default=200)
    parser.add_argument("--asks", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="200 of each, fewer samples")
    parser.add_argument("--baseline", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.polls, args.streams, args.gets, args.asks = 200, 200, 50, 5
    with contextlib.ExitStack() as stack:
        rserver = stack.enter_context(servers.redis_server())
        sim = stack.enter_context(harness.llmsim(20, 2, 12))
        env = servers.chatq_env(
            CHATQ_REDIS_URL=rserver.url, CHATQ_QUEUE_NAME=f"held-{uuid.uuid4().hex[:6]}",
            CHATQ_LLMSIM_PORT=str(sim.port), CHATQ_API_MAX_WAIT_SECONDS="600",
            CHATQ_WORKER_CONCURRENCY="64", CHATQ_LOG_LEVEL="WARNING")
        api_env = dict(env) if args.baseline else {**env, "CHATQ_API_MAX_HELD_PER_KEY": "100000"}
        api = stack.enter_context(servers.chatq_process("api", api_env, port_var="CHATQ_API_PORT"))
        stack.enter_context(servers.chatq_process(
            "worker", {**env, "CHATQ_TELEMETRY_METRICS_PORT": str(servers.free_port())},
            port_var="CHATQ_TELEMETRY_METRICS_PORT"))
        out = asyncio.run(run(args, env, api))
    ratio = out["held_ask_p99_ms"] / max(out["idle_ask_p99_ms"], 0.001)
    rows = [
        ("RSS per pending long-poll", f"{out['kib_per_poll']:.1f} KiB", f"{args.polls} held"),
        ("RSS per idle SSE stream", f"{out['kib_per_stream']:.1f} KiB", f"{args.streams} held"),
        ("api RSS start / all held", f"{out['rss_start_mib']:.0f}/{out['rss_streams_mib']:.0f} MiB", ""),
        ("other GET p99 none / held", f"{out['idle_get_p99_ms']:.1f}/{out['held_get_p99_ms']:.1f} ms", ""),
        ("other POST+wait p99 none / held",
         f"{out['idle_ask_p99_ms']:.0f}/{out['held_ask_p99_ms']:.0f} ms", f"ratio held / none {ratio:.2f}"),
        ("long-polls answered", f"{out['polls_answered']}/{args.polls}", ""),
        ("streams opened", f"{out['streams_opened']}/{args.streams}", "cut before their head"),
        ("streams that saw done", f"{out['streams_done']}/{args.streams}",
         f"all in {out['seconds_to_answer_all']:.1f} s"),
    ]
    out["ask_p99_ratio"] = ratio
    harness.report("held" + ("-baseline" if args.baseline else ""), rows,
                   {**out, "polls": args.polls, "streams": args.streams})


if __name__ == "__main__":
    main()
