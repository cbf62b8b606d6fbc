"""The model's circuit breaker, shared by all workers through Redis.

A model that is down (restarting, reloading, overloaded) must hold the queue, not burn
the jobs. Every worker reports its model calls here: an unreachable model (connection
refused, 502/503/504) marks it down at once; server errors (5xx) mark it down when
`breaker_failures` of them, from all workers together, fall within `breaker_window_seconds`;
any success marks it up. While it is down, workers take no new jobs and hand running ones
back; one worker at a time (a Redis lock) asks the model every `probe_seconds` whether it
is back. Jobs fail with `model_unavailable` only once the model has been down for longer
than `outage_window_seconds`. The api's /readyz and the operator read the same record.

The record is one Redis hash (`results.model_health_key()`): `state` (`down` when open),
`down_since` (the first failure since the last success), `failures` and `window_start`
(the counting window), `last_error`. The decisions are pure functions (`view`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import cast

import redis.asyncio as aioredis

from chatq import errors, metrics, redis_client, results
from chatq import settings as settings_mod

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class View:
    """The model's health as the shared record says."""

    down: bool
    down_since: float | None
    """When the failures began (None while the model is well)."""
    last_error: str = ""

    def down_for(self, now: float) -> float:
        """Seconds the model has been failing, 0 when it is well."""
        return max(0.0, now - self.down_since) if self.down_since is not None else 0.0

    def outage_over(self, now: float, window: float) -> bool:
        """True when the model has been down past the outage window: jobs may fail now."""
        return self.down and self.down_for(now) > window


def view(fields: Mapping[str, str]) -> View:
    """The View of the Redis hash's fields (an empty hash: the model is well)."""
    since = fields.get("down_since")
    return View(fields.get("state") == "down", float(since) if since else None,
                fields.get("last_error", ""))


@redis_client.translate_errors
async def read_view(client: aioredis.Redis) -> View:
    """The shared record as it is now (the api's /readyz and /metrics)."""
    return view(cast(dict[str, str], await client.hgetall(results.model_health_key())))


def opens(failures: int, threshold: int, unreachable: bool) -> bool:
    """Whether this failure marks the model down."""
    return unreachable or failures >= threshold


# Lua: count one failure in its window and note when the failures began. ARGV: window
# seconds, reason, ttl seconds. Returns the failures in the window.
_FAIL = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local h = KEYS[1]
if not redis.call('HGET', h, 'down_since') then redis.call('HSET', h, 'down_since', now) end
local ws = tonumber(redis.call('HGET', h, 'window_start') or '0')
if now - ws > tonumber(ARGV[1]) then redis.call('HSET', h, 'window_start', now, 'failures', 0) end
local n = redis.call('HINCRBY', h, 'failures', 1)
redis.call('HSET', h, 'last_error', ARGV[2])
redis.call('EXPIRE', h, ARGV[3])
return n
"""


class Breaker:
    """One process's handle on the shared breaker; `watch()` keeps its view fresh."""

    def __init__(self, client: aioredis.Redis, cfg: settings_mod.LlmSettings, ttl_seconds: int,
                 refresh_seconds: float = 1.0) -> None:
        self.redis = client
        self.cfg = cfg
        self.ttl = ttl_seconds
        self.refresh = refresh_seconds
        self.key = results.model_health_key()
        self.current = View(False, None)
        self._fail = client.register_script(_FAIL)
        self._changed = asyncio.Event()

    @property
    def down(self) -> bool:
        """The model is down, as last seen."""
        return self.current.down

    def outage_over(self) -> bool:
        """The model has been down past CHATQ_LLM_OUTAGE_WINDOW_SECONDS."""
        return self.current.outage_over(time.time(), self.cfg.outage_window_seconds)

    @redis_client.translate_errors
    async def read(self) -> View:
        """Read the shared record."""
        self._set(await read_view(self.redis))
        return self.current

    async def failure(self, error: errors.TemporaryError) -> bool:
        """Count a failed call; True when the model is now down (llm.Health)."""
        unreachable = isinstance(error, errors.ModelUnavailable)
        try:
            failures = int(await self._fail(keys=[self.key], args=[
                self.cfg.breaker_window_seconds, f"{error.code}: {error}"[:300], self.ttl]))
            if opens(failures, self.cfg.breaker_failures, unreachable):
                await self.redis.hset(self.key, "state", "down")
            await self.read()
        except errors.StoreUnavailable:
            pass  # without Redis, the job's own retries decide
        except Exception as exc:  # redis errors: the breaker must never fail a job
            log.warning("cannot record the model's failure: %s", exc)
        return self.current.down

    async def success(self) -> None:
        """The model answered: clear the record (only when there is one, to save a call)."""
        if self.current.down_since is None and not self.current.down:
            return
        with contextlib.suppress(Exception):
            await self.redis.delete(self.key)
            self._set(View(False, None))

    def _set(self, new: View) -> None:
        was = self.current
        self.current = new
        metrics.model_up.set(0 if new.down else 1)
        if new.down != was.down:
            if new.down:
                log.warning("the model is down (%s): no new jobs until it answers; probing every "
                            "%.0fs", new.last_error, self.cfg.probe_seconds)
            else:
                log.info("the model answers again: taking jobs")
            self._changed.set()
            self._changed = asyncio.Event()

    async def wait_change(self, seconds: float) -> None:
        """Until the view changes or `seconds` pass."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), seconds)

    async def watch(self, probe: Callable[[], Awaitable[None]]) -> None:
        """Keep the view fresh; while the model is down, probe it (one worker at a time)."""
        while True:
            try:
                current = await self.read()
                if current.down and await self.redis.set(
                        results.model_probe_key(), "1", nx=True,
                        px=max(1, int(self.cfg.probe_seconds * 1000))):
                    await self._probe(probe)
            except errors.StoreUnavailable as exc:
                log.debug("cannot read the model's health: %s", exc)
            except Exception as exc:  # redis errors: keep watching
                log.warning("model health check failed: %s", exc)
            await asyncio.sleep(self.refresh)

    async def _probe(self, probe: Callable[[], Awaitable[None]]) -> None:
        try:
            await probe()
        except errors.ModelUnavailable as exc:
            log.info("the model is still down: %s", exc)
            await self.failure(exc)
            return
        log.info("probe: the model answers")
        await self.redis.delete(self.key)
        self._set(View(False, None))
