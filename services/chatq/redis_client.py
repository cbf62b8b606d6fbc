"""The one way chatq talks to Redis: `connect()` and the translation of Redis's errors.

The results store, the Redis Streams queue and every module that keeps state in Redis
(budget, quotas, breaker, webhooks, the batch catalog) build their client here and wrap
their calls in `translate_errors`, so a Redis outage reaches callers as
`errors.StoreUnavailable` whichever of them met it.
"""

from __future__ import annotations

import socket

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import ConstantBackoff

from chatq import errors
from chatq import settings as settings_mod

# Idle connections are probed after 10 s and dropped after 3 unanswered probes 5 s apart,
# so a peer that vanished without a FIN (a cut route) does not hold a connection for ever.
_KEEPALIVE = {opt: value for name, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5),
                                             ("TCP_KEEPCNT", 3))
              if (opt := getattr(socket, name, None)) is not None}
# A Redis that restarts answers LOADING while it reads its AOF: waited out in these steps.
BUSY_RETRY_SECONDS = 0.25
# What "Redis is unreachable" looks like from redis-py: worth waiting out, never a bug.
CONNECTION_ERRORS: tuple[type[Exception], ...] = (
    redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError, OSError)


def connect(cfg: settings_mod.RedisSettings, blocking_seconds: float = 0.0) -> aioredis.Redis:
    """A client whose pool makes callers wait (up to the timeout) rather than fail at the cap.

    Every reply is awaited at most `timeout_seconds` (plus `blocking_seconds` for a client
    that issues blocking reads of up to that long): a Redis that stops answering, rather
    than refusing, must turn into StoreUnavailable (a 503, a message left for later), not a
    hang. `BUSY LOADING` while a restarted Redis reads its data is retried for about as long.
    """
    busy = Retry(ConstantBackoff(BUSY_RETRY_SECONDS),
                 max(1, int(cfg.timeout_seconds / BUSY_RETRY_SECONDS)),
                 supported_errors=(redis.exceptions.BusyLoadingError,))
    pool = aioredis.BlockingConnectionPool.from_url(
        cfg.url, max_connections=cfg.max_connections, timeout=cfg.timeout_seconds,
        decode_responses=True, socket_connect_timeout=cfg.timeout_seconds,
        socket_timeout=cfg.timeout_seconds + blocking_seconds, socket_keepalive=True,
        socket_keepalive_options=_KEEPALIVE, health_check_interval=30, retry=busy,
        retry_on_error=[redis.exceptions.BusyLoadingError])
    return aioredis.Redis.from_pool(pool)  # the client owns the pool: aclose() closes it


def _unavailable(exc: Exception) -> errors.ChatqError | None:
    if isinstance(exc, CONNECTION_ERRORS):
        return errors.StoreUnavailable(f"Redis is unreachable: {exc}")
    return None


translate_errors = errors.translated(_unavailable)
"""Decorator: Redis connection trouble becomes StoreUnavailable, so callers see our error only."""
