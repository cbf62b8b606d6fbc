"""Runs the same job through chatq and each peer queue library, on the same servers, in one
run; reports answers/s, CPU-ms per answer and peak RSS per worker, and enqueue requests/s.

    .venv/bin/python -m bench.peers.run [--jobs 2000] [--concurrency 256] [--quick] [--only arq,chatq]

Every worker gets the same preloaded backlog; the sustained rate and the CPU are measured
between 10% and 90% of the answers, so start-up and the tail are left out alike. CPU and RSS
are the whole process tree's (prefork children and RQ's work horses included).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import redis.asyncio as aioredis
from chatq import results

from bench import api_post, harness
from tests import servers

# Outside the checkout, so a fresh clone (CI's) reuses them.
PEERS_VENV = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "chatq" / "peers-venv"
# Each library in a venv of its own, as its users would install it (and because Celery 5.7
# asks for redis>=6.4 while arq 0.28 asks for redis<6); pinned so a run is repeatable.
REQUIREMENTS = {
    "celery": ["celery[redis,sqs]==5.7.0"],
    "arq": ["arq==0.28.0"],
    "rq": ["rq==3.0.0"],
    "dramatiq": ["dramatiq[redis]==2.2.1"],
}
COMMON = ["openai>=1.40", "fastapi>=0.115", "uvicorn[standard]>=0.30"]


def peer_python(lib: str) -> str:
    """The interpreter of a library's own venv (celery-sqs is Celery's)."""
    return str(PEERS_VENV / lib.split("-")[0] / "bin" / "python")


def ensure_peer_venv(lib: str) -> None:
    """Make .venv-peers/<lib> with the pinned library when missing or when the pins changed."""
    lib = lib.split("-")[0]
    want = " ".join(REQUIREMENTS[lib] + COMMON)
    venv = PEERS_VENV / lib
    stamp = venv / ".installed"
    if stamp.exists() and stamp.read_text() == want:
        return
    harness.say(f"installing {want} into {venv} (pip; a minute or two, once)...")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    done = subprocess.run([peer_python(lib), "-m", "pip", "install", "-q", *want.split()])
    if done.returncode != 0:
        raise SystemExit(f"pip could not install {want}: check that the package index is "
                         "reachable, then run again")
    stamp.write_text(want)


@dataclass
class Peer:
    """One worker set-up to measure: how to start it and how to load its queue."""

    name: str
    lib: str  # celery | arq | rq | dramatiq | chatq
    command: list[str]
    concurrency: int
    env: dict[str, str] = field(default_factory=dict)


def peers(concurrency: int, processes: int) -> list[Peer]:
    py = peer_python
    celery = [py("celery"), "-m", "celery", "-A", "bench.peers.celery_app", "worker",
              "--loglevel", "WARNING", "--without-gossip", "--without-mingle", "--without-heartbeat"]
    # chatq first, so nothing a peer leaves behind can weigh on its figures.
    return [
        Peer("chatq worker", "chatq", [sys.executable, "-m", "chatq", "worker"], concurrency,
             {"CHATQ_WORKER_CONCURRENCY": str(concurrency)}),
        Peer("celery, threads pool, redis broker", "celery",
             [*celery, "--pool", "threads", "--concurrency", str(concurrency)], concurrency),
        Peer("celery, threads pool, sqs broker (ElasticMQ)", "celery-sqs",
             [*celery, "--pool", "threads", "--concurrency", str(concurrency)], concurrency),
        Peer(f"celery, prefork pool ({processes} processes)", "celery",
             [*celery, "--pool", "prefork", "--concurrency", str(processes)], processes),
        Peer("arq", "arq", [py("arq"), "-m", "arq", "bench.peers.arq_worker.WorkerSettings"],
             concurrency, {"PEER_CONCURRENCY": str(concurrency)}),
        Peer(f"rq worker-pool ({processes} processes)", "rq",
             [py("rq"), "-m", "rq.cli", "worker-pool", "-n", str(processes), "-q"], processes),
        Peer("dramatiq, AsyncIO middleware", "dramatiq",
             [py("dramatiq"), "-m", "dramatiq", "bench.peers.dramatiq_actors", "--processes", "1",
              "--threads", str(concurrency)], concurrency),
    ]


def tree_usage(proc: psutil.Process) -> tuple[float, int]:
    """CPU seconds (reaped children included) and RSS bytes of a process and its descendants."""
    cpu, rss = 0.0, 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            cpu += t.user + t.system + t.children_user + t.children_system
            rss += p.memory_info().rss
    return cpu, rss


async def measure_worker(peer: Peer, env: dict[str, str], n: int,
                         progress: Callable[[], Awaitable[int]], timeout: float) -> dict[str, float]:
    """Start the worker on a loaded queue; sample progress, CPU and RSS until n are done."""
    with tempfile.TemporaryDirectory() as tmp, (Path(tmp) / "worker.log").open("wb") as log:
        proc = subprocess.Popen(peer.command, env={**env, **peer.env}, cwd=servers.REPO,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        ps = psutil.Process(proc.pid)
        marks: dict[float, tuple[float, float]] = {}
        peak = 0
        started = time.monotonic()
        last_say = started
        try:
            while True:
                done = await progress()
                cpu, rss = tree_usage(ps)
                peak = max(peak, rss)
                now = time.monotonic()
                for mark in (0.1, 0.9):
                    if mark not in marks and done >= mark * n:
                        marks[mark] = (now, cpu)
                if done >= n:
                    break
                if proc.poll() is not None:
                    raise RuntimeError(f"{peer.name} exited with {proc.returncode}:\n"
                                       + (Path(tmp) / "worker.log").read_text(errors="replace")[-2000:])
                if now - started > timeout:
                    raise TimeoutError(f"{peer.name}: {done}/{n} answers after {timeout:.0f}s")
                if now - last_say > 5:
                    harness.say(f"  {peer.name}: {done}/{n} answers...")
                    last_say = now
                await asyncio.sleep(0.1)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 15)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
    (t1, c1), (t9, c9) = marks[0.1], marks[0.9]
    answers = 0.8 * n
    return {"answers_per_s": answers / (t9 - t1), "cpu_ms_per_answer": 1000 * (c9 - c1) / answers,
            "peak_rss_mb": peak / 2**20, "concurrency": peer.concurrency}


async def run_workers(args: argparse.Namespace, env: dict[str, str], redis_url: str,
                      sqs_url: str) -> dict[str, dict[str, float]]:
    r = aioredis.Redis.from_url(redis_url, decode_responses=True)
    out: dict[str, dict[str, float]] = {}
    for peer in peers(args.concurrency, args.processes):
        if args.only and peer.lib.split("-")[0] not in args.only:
            continue
        await r.flushall()
        penv = dict(env)
        if peer.lib == "celery-sqs":
            queue = f"celery-{uuid.uuid4().hex[:6]}"
            penv["PEER_BROKER"] = f"sqs://x:x@{sqs_url.removeprefix('http://')}"
            penv["PEER_SQS_QUEUE_URL"] = f"{sqs_url}/000000000000/{queue}"
            # ElasticMQ takes SQS's query API unsigned.
            url = f"{sqs_url}/?Action=CreateQueue&QueueName={queue}"
            await asyncio.to_thread(lambda u=url: urllib.request.urlopen(u, timeout=10).close())
        # One-job-per-process peers get ten rounds of their slots, not the whole backlog:
        # enough for a sustained rate without minutes of waiting.
        n = min(args.jobs, peer.concurrency * 10)
        harness.say(f"{peer.name}: loading {n} jobs...")
        if peer.lib == "chatq":
            store, queue_ = harness.open_store_and_queue(penv)
            await queue_.setup()
            await harness.preload(store, queue_, n)
            seen = [0]
            pubsub = store.redis.pubsub(ignore_subscribe_messages=True)
            await pubsub.subscribe(results.DONE_CHANNEL)

            async def chatq_done(pubsub: Any = pubsub, seen: list[int] = seen) -> int:
                while await pubsub.get_message(timeout=0.0) is not None:
                    seen[0] += 1
                return seen[0]
            progress: Callable[[], Awaitable[int]] = chatq_done
        else:
            subprocess.run([peer_python(peer.lib), "-m", "bench.peers.load", peer.lib, str(n)],
                           env=penv, cwd=servers.REPO, check=True)

            async def peer_done() -> int:
                return int(await r.get("peer:done") or 0)
            progress = peer_done
        harness.say(f"{peer.name}: running at concurrency {peer.concurrency}...")
        try:
            out[peer.name] = await measure_worker(peer, penv, n, progress,
                                                  timeout=n / peer.concurrency * 3 + 120)
        except (RuntimeError, TimeoutError) as exc:
            harness.say(f"{peer.name}: FAILED: {exc}")
            print(f"{peer.name} failed: {str(exc)[:500]}", flush=True)  # in the report too
            out[peer.name] = {"error": 1.0}
        if peer.lib == "chatq":
            await pubsub.aclose()
            await queue_.close()
            await store.close()
    await r.aclose()
    return out


@contextlib.contextmanager
def enqueue_server(lib: str, env: dict[str, str]) -> Iterator[servers.Server]:
    if lib == "chatq":
        with servers.chatq_process("api", env, port_var="CHATQ_API_PORT") as api:
            yield api
        return
    port = servers.free_port()
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "enqueue.log"
        with log.open("w") as out:
            proc = subprocess.Popen([peer_python(lib), "-m", "uvicorn", "bench.peers.enqueue_app:app",
                                     "--port", str(port), "--log-level", "warning", "--no-access-log"],
                                    env={**env, "PEER_LIB": lib}, cwd=servers.REPO, stdout=out,
                                    stderr=subprocess.STDOUT)
        server = servers.Server(f"http://127.0.0.1:{port}", port, proc, log)
        try:
            servers.wait_for(lambda: servers.http_ok(f"{server.url}/healthz"), f"{lib} enqueue app",
                             30, proc, log)
            yield server
        finally:
            server.stop()


def run_enqueue(args: argparse.Namespace, env: dict[str, str]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for lib in ("celery", "arq", "rq", "dramatiq", "chatq"):
        if args.only and lib not in args.only:
            continue
        harness.say(f"enqueue: {lib} behind one uvicorn process...")
        with enqueue_server(lib, env) as server:
            path = "/v1/chat" if lib == "chatq" else "/chat"
            out[lib] = api_post.measure(server.url, path, args.seconds, args.rate)
    return out


def report(workers: dict[str, dict[str, float]], enqueue: dict[str, dict[str, float]],
           args: argparse.Namespace, load: tuple[float, float, float]) -> None:
    rows: list[tuple[str, str, str]] = []
    ok = {k: v for k, v in workers.items() if "error" not in v}
    for name, w in workers.items():
        if "error" in w:
            rows.append((name, "failed", "see the log above"))
            continue
        per_core = 1000 / w["cpu_ms_per_answer"]
        rows.append((name, f"{w['answers_per_s']:.1f}/s",
                     f"{w['cpu_ms_per_answer']:.2f} CPU-ms/answer ({per_core:.0f} answers per CPU-s), "
                     f"peak RSS {w['peak_rss_mb']:.0f} MB, concurrency {w['concurrency']:.0f}"))
    mine = ok.get("chatq worker")
    others = {k: v for k, v in ok.items() if k != "chatq worker"}
    if mine and others:
        best = min(others, key=lambda k: others[k]["cpu_ms_per_answer"])
        rows.append(("ratio chatq / best peer, answers per CPU-s",
                     f"{others[best]['cpu_ms_per_answer'] / mine['cpu_ms_per_answer']:.2f}x",
                     f"best peer: {best}"))
        fastest = max(others, key=lambda k: others[k]["answers_per_s"])
        rows.append(("ratio chatq / best peer, answers/s",
                     f"{mine['answers_per_s'] / others[fastest]['answers_per_s']:.2f}x",
                     f"best peer: {fastest}"))
    for lib, e in enqueue.items():
        rows.append((f"enqueue {lib}", f"{e['max_rps']:.0f} req/s",
                     f"p99 {e['p99_ms_at_rate']:.1f} ms at {args.rate}/s"))
    if "chatq" in enqueue and len(enqueue) > 1:
        best = max((k for k in enqueue if k != "chatq"), key=lambda k: enqueue[k]["max_rps"])
        rows.append(("ratio chatq / best peer, enqueue req/s",
                     f"{enqueue['chatq']['max_rps'] / enqueue[best]['max_rps']:.2f}x", f"best peer: {best}"))
    rows.append(("load average during the run", f"{load[0]:.1f}", "1-minute, at the end"))
    harness.report("peers", rows, {"workers": workers, "enqueue": enqueue, "jobs": args.jobs,
                                   "loadavg": load, "concurrency": args.concurrency})


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--processes", type=int, default=16,
                        help="processes for the peers that run one job per process (prefork, RQ)")
    parser.add_argument("--seconds", type=float, default=10, help="per enqueue measurement")
    parser.add_argument("--rate", type=int, default=500, help="fixed rate for the enqueue p99")
    parser.add_argument("--only", type=lambda s: s.split(","), default=None,
                        help="comma-separated libraries: celery,arq,rq,dramatiq,chatq")
    parser.add_argument("--quick", action="store_true", help="a short smoke run (CI)")
    args = parser.parse_args()
    if args.quick:
        args.jobs, args.seconds, args.processes = 200, 2, 4
    for lib in REQUIREMENTS:
        if not args.only or lib in args.only:
            ensure_peer_venv(lib)
    api_post.vegeta()
    with contextlib.ExitStack() as stack:
        redis = stack.enter_context(servers.redis_server())
        sim = stack.enter_context(harness.llmsim(200, 34.8, 24))
        sqs_url = ""
        if not args.only or "celery" in args.only:  # Celery's SQS broker runs on ElasticMQ
            sqs_url = stack.enter_context(servers.elasticmq_server()).url
        env = servers.chatq_env(
            CHATQ_REDIS_URL=redis.url, CHATQ_LLMSIM_PORT=str(sim.port), CHATQ_LOG_LEVEL="WARNING",
            CHATQ_QUEUE_NAME=f"bench-{uuid.uuid4().hex[:6]}", PEER_REDIS_URL=redis.url,
            PEER_BROKER=redis.url, PEER_LLM_BASE_URL=f"{sim.url}/v1", RQ_REDIS_URL=redis.url,
            PYTHONPATH=str(servers.REPO))
        workers = await run_workers(args, env, redis.url, sqs_url)
        enqueue = run_enqueue(args, env)
    report(workers, enqueue, args, os.getloadavg())


if __name__ == "__main__":
    asyncio.run(main())
