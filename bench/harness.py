"""What the benchmarks share: starting servers, loading jobs, reporting a table."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from chatq import jobs, results
from chatq import settings as settings_mod
from chatq.queues import Queue, open_queue

from tests import servers

RESULTS = Path(__file__).resolve().parent / "results"


def say(message: str) -> None:
    """Progress on stderr, so stdout keeps just the report."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def settings_for(env: dict[str, str]) -> settings_mod.Settings:
    """Settings as a process started with `env` would read them."""
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        return settings_mod.Settings()
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def llmsim(ttft_ms: float, itl_ms: float, tokens: int) -> Iterator[servers.Server]:
    """llmsim with the given answer timing."""
    env = servers.chatq_env(CHATQ_LLMSIM_TTFT_MS=str(ttft_ms), CHATQ_LLMSIM_ITL_MS=str(itl_ms),
                            CHATQ_LLMSIM_TOKENS=str(tokens), CHATQ_LOG_LEVEL="WARNING")
    with servers.chatq_process("llmsim", env, port_var="CHATQ_LLMSIM_PORT") as sim:
        yield sim


async def preload(store: results.Store, queue: Queue, n: int, text: str = "bench") -> list[str]:
    """Write n queued jobs and their messages, as the api would."""
    ids = [jobs.new_job_id() for _ in range(n)]
    request = jobs.ChatRequest(message=text)
    for start in range(0, n, 200):
        chunk = ids[start:start + 200]
        await asyncio.gather(*(store.create(
            jobs.JobRecord.queued(i, "open", request, "chatq-sim-1", True)) for i in chunk))
        await asyncio.gather(*(queue.send(jobs.encode_message(i), {}) for i in chunk))
    return ids


async def count_done(store: results.Store, total: int, timeout: float,
                     marks: tuple[float, ...] = (0.1, 0.9)) -> dict[float, float]:
    """Listen on the done channel; the monotonic time when each share of `total` was done."""
    pubsub = store.redis.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(results.DONE_CHANNEL)
    seen = 0
    reached: dict[float, float] = {}
    deadline = time.monotonic() + timeout
    last_report = time.monotonic()
    try:
        while seen < total and time.monotonic() < deadline:
            message = await pubsub.get_message(timeout=1.0)
            if message is not None:
                seen += 1
                for mark in marks:
                    if mark not in reached and seen >= mark * total:
                        reached[mark] = time.monotonic()
            if time.monotonic() - last_report > 5:
                say(f"  {seen}/{total} answers written...")
                last_report = time.monotonic()
    finally:
        await pubsub.aclose()
    reached[1.0] = time.monotonic()
    if seen < total:
        raise TimeoutError(f"only {seen} of {total} jobs finished within {timeout:.0f}s")
    return reached


def open_store_and_queue(env: dict[str, str]) -> tuple[results.Store, Queue]:
    s = settings_for(env)
    return results.Store.from_settings(s.redis), open_queue(s, "bench")


def report(name: str, rows: list[tuple[str, str, str]], data: dict[str, Any]) -> None:
    """Print a table and keep the figures in bench/results/<name>.json."""
    width = max(len(r[0]) for r in rows)
    print(f"\n{name} ({platform.node()}, {os.cpu_count()} cores)")
    for label, value, note in rows:
        print(f"  {label.ljust(width)}  {value:>14}  {note}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2))
