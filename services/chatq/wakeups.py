"""One Redis subscription per api process that wakes every long-poll and SSE stream it holds.

A long-poll or an SSE stream waits on an `asyncio.Event` here, not on Redis: it holds no
Redis connection while it waits and reads Redis only when woken. Wake-ups come from:

- the channel `chatq:done` (results.DONE_CHANNEL): a job id each time a job becomes
  terminal; it wakes everything that waits on that job;
- the channel `chatq:job:<id>:tick` (results.tick_channel): a message each time the worker
  adds an event to the job's stream; subscribed only while this process follows that job
  with an SSE stream, so Redis sends a process the ticks of its own readers and no others.

When the subscription is (re)made, every waiter is woken once, so a message published
while it was down is never waited for; waiters also re-read on their own now and then
(the callers' recheck), in case a publisher did not tick (a worker of an older version).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.client import PubSub

from chatq import results

log = logging.getLogger(__name__)

#: How long a new SSE stream waits for its job's tick channel to be subscribed before it
#: reads anyway (Redis unreachable: its recheck then covers it), in seconds.
SUBSCRIBE_WAIT_SECONDS = 1.0


class Wakeups:
    """The per-process subscription; `watch(job_id)` is what a waiter holds."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.redis = client
        self._watching: dict[str, set[asyncio.Event]] = {}
        self._following: dict[str, int] = {}  # job id -> SSE streams that want its ticks
        self._subscribed: set[str] = set()  # tick channels the current pubsub has asked for
        self._confirmed: dict[str, asyncio.Future[None]] = {}
        self._pubsub: PubSub | None = None
        self._sync_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._chores: set[asyncio.Task[None]] = set()

    @property
    def waiting(self) -> int:
        """Waiters registered now (long-polls and streams)."""
        return sum(len(w) for w in self._watching.values())

    async def start(self) -> None:
        """Subscribe in the background (reconnecting as needed)."""
        self._task = asyncio.create_task(self._listen(), name="wakeups")

    async def stop(self) -> None:
        """Stop listening."""
        for task in (*self._chores, self._task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    @contextlib.asynccontextmanager
    async def watch(self, job_id: str, events: bool = False) -> AsyncIterator[asyncio.Event]:
        """An Event set when job_id is published done (with `events`, also each time its
        stream grows). Registered before it is yielded: clear it, then read, then wait."""
        woken = asyncio.Event()
        self._watching.setdefault(job_id, set()).add(woken)
        try:
            if events:
                self._following[job_id] = self._following.get(job_id, 0) + 1
                await self._follow(results.tick_channel(job_id))
            yield woken
        finally:
            waiting = self._watching.get(job_id)
            if waiting is not None:
                waiting.discard(woken)
                if not waiting:
                    del self._watching[job_id]
            if events:
                left = self._following.get(job_id, 1) - 1
                if left:
                    self._following[job_id] = left
                else:
                    self._following.pop(job_id, None)
                    self._confirmed.pop(results.tick_channel(job_id), None)
                    self._chore(self._sync())

    async def _follow(self, channel: str) -> None:
        if channel in self._subscribed and channel not in self._confirmed:
            return  # subscribed and confirmed already
        confirmed = self._confirmed.get(channel)
        if confirmed is None:
            confirmed = self._confirmed[channel] = asyncio.get_running_loop().create_future()
        await self._sync()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(confirmed), SUBSCRIBE_WAIT_SECONDS)

    def _chore(self, work: object) -> None:
        task: asyncio.Task[None] = asyncio.create_task(work)  # type: ignore[arg-type]
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)

    async def _sync(self) -> None:
        """Make the subscription's tick channels those of the jobs followed now."""
        async with self._sync_lock:
            pubsub = self._pubsub
            if pubsub is None:
                return  # the next subscription subscribes to what is followed then
            wanted = {results.tick_channel(j) for j in self._following}
            add, drop = wanted - self._subscribed, self._subscribed - wanted
            try:
                if add:
                    await pubsub.subscribe(*add)
                if drop:
                    await pubsub.unsubscribe(*drop)
            except (*_REDIS_DOWN,):
                return  # the listener reconnects and subscribes again
            self._subscribed = wanted

    async def _listen(self) -> None:
        while True:
            pubsub = self.redis.pubsub()
            try:
                async with self._sync_lock:
                    ticks = {results.tick_channel(j) for j in self._following}
                    await pubsub.subscribe(results.DONE_CHANNEL, *ticks)
                    self._pubsub, self._subscribed = pubsub, ticks
                async for message in pubsub.listen():
                    self._dispatch(message)
            except (*_REDIS_DOWN,):
                # Redis went away: waiters re-read on their own recheck until it is back.
                await asyncio.sleep(1.0)
            finally:
                self._pubsub, self._subscribed = None, set()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _dispatch(self, message: dict[str, object]) -> None:
        kind, channel = message.get("type"), str(message.get("channel"))
        if kind == "subscribe":
            if channel == results.DONE_CHANNEL:
                # (Re)subscribed: what was published meanwhile is unknown, so all re-read.
                for waiting in self._watching.values():
                    for woken in waiting:
                        woken.set()
            confirmed = self._confirmed.pop(channel, None)
            if confirmed is not None and not confirmed.done():
                confirmed.set_result(None)
        elif kind == "message":
            job_id = (str(message.get("data")) if channel == results.DONE_CHANNEL
                      else results.job_of_tick_channel(channel))
            for woken in self._watching.get(job_id, ()):
                woken.set()


_REDIS_DOWN: tuple[type[Exception], ...] = (
    redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
