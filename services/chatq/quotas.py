"""Per-key API quotas: requests per minute and tokens per UTC day, counted in Redis so all
api replicas share them.

A request that creates a job (`POST /v1/chat`, `POST /v1/responses`) takes one request
from its key's minute bucket (one minute's worth, refilled continuously, as the model
budget does) and reserves its cost — prompt tokens plus `max_tokens`, counted as the worker
will count them — against the key's day. When the job succeeds the worker corrects the day
by the tokens really used, so the day counts usage, not reservations. `POST /v1/batches`
takes one request and one token (so it is refused once the day is used up); each of its
lines adds the tokens it really used when it has run, to the day of the line's start (a
batch already running is not stopped by its key's day quota). Over either quota the api
answers 429 with `Retry-After` and OpenAI's `x-ratelimit-*` headers (in OpenAI's error
shape on its routes); every accepted request carries the headers too.

Quotas come from settings: `CHATQ_API_KEY_RPM` / `CHATQ_API_KEY_TOKENS_PER_DAY` for every
key, and `CHATQ_API_QUOTAS` per key (`<key or sha256:hex>=<rpm>/<tokens per day>[/<name>]`,
0 = unlimited). A key with none is unlimited.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aioredis

from chatq import errors, metrics, redis_client, results


@dataclass(frozen=True)
class Quota:
    """One key's limits; 0 means unlimited."""

    rpm: int = 0
    tokens_per_day: int = 0
    name: str = ""
    """The label of the key in metrics; empty: the first 12 hex digits of its digest."""

    @property
    def unlimited(self) -> bool:
        """True when neither limit applies."""
        return not self.rpm and not self.tokens_per_day


class QuotaExceeded(errors.ChatqError):
    """A key is over its quota: answer 429 after `retry_after` seconds, with `headers`."""

    def __init__(self, message: str, kind: str, retry_after: float,
                 headers: dict[str, str]) -> None:
        super().__init__(message)
        self.kind = kind
        self.retry_after = retry_after
        self.headers = headers


def parse(raw: str, owner_of: Any) -> dict[str, Quota]:
    """CHATQ_API_QUOTAS as {owner: Quota}; `owner_of(entry)` maps a key entry (plain or
    `sha256:<hex>`) to the owner id the api uses. Raises ValueError naming a bad entry."""
    out: dict[str, Quota] = {}
    for entry in (e.strip() for e in raw.split(",")):
        if not entry:
            continue
        key, sep, limits = entry.rpartition("=")
        parts = limits.split("/")
        if not sep or not key or len(parts) not in (2, 3):
            raise ValueError(f"CHATQ_API_QUOTAS entry {entry[:12]}...: want "
                             "<key>=<rpm>/<tokens per day>[/<name>]")
        try:
            rpm, tpd = int(parts[0]), int(parts[1])
        except ValueError:
            raise ValueError(f"CHATQ_API_QUOTAS entry for {parts[2:] or 'a key'}: rpm and "
                             "tokens per day must be whole numbers (0 = unlimited)") from None
        out[owner_of(key)] = Quota(max(0, rpm), max(0, tpd), parts[2] if len(parts) == 3 else "")
    return out


def utc_day(ts: float) -> str:
    """The UTC day a timestamp falls on, as the counters name it."""
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d")


def seconds_to_midnight(ts: float) -> float:
    """Seconds until the UTC day of `ts` ends (when a day quota resets)."""
    day = dt.datetime.fromtimestamp(ts, dt.UTC).date()
    end = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), dt.UTC)
    return max(1.0, end.timestamp() - ts)


def headers_for(quota: Quota, requests_left: float, tokens_used: int, now: float
                ) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers for a key (tokens: per day here, not per minute)."""
    out: dict[str, str] = {}
    if quota.rpm:
        left = max(0.0, requests_left)
        out["x-ratelimit-limit-requests"] = str(quota.rpm)
        out["x-ratelimit-remaining-requests"] = str(int(left))
        out["x-ratelimit-reset-requests"] = f"{(quota.rpm - left) * 60 / quota.rpm:.3g}s"
    if quota.tokens_per_day:
        out["x-ratelimit-limit-tokens"] = str(quota.tokens_per_day)
        out["x-ratelimit-remaining-tokens"] = str(max(0, quota.tokens_per_day - tokens_used))
        out["x-ratelimit-reset-tokens"] = f"{seconds_to_midnight(now):.0f}s"
    return out


# KEYS: minute bucket, day counter. ARGV: rpm, tokens per day, cost, day ttl seconds.
# Returns {admitted 0|1, refused kind, wait ms, requests left, tokens used today, now ms}.
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rpm, tpd, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local lvl = 0
if rpm > 0 then
  local h = redis.call('HMGET', KEYS[1], 'lvl', 'ts')
  lvl = tonumber(h[1]) or rpm
  local ts = tonumber(h[2]) or now
  lvl = math.min(rpm, lvl + math.max(0, now - ts) * rpm / 60000)
end
local used = tonumber(redis.call('GET', KEYS[2]) or '0')
if rpm > 0 and lvl < 1 then
  return {0, 'requests', math.ceil((1 - lvl) * 60000 / rpm), tostring(lvl), used, now}
end
if tpd > 0 and used + cost > tpd then
  return {0, 'tokens', tonumber(ARGV[4]) * 1000, tostring(lvl), used, now}
end
if rpm > 0 then
  lvl = lvl - 1
  redis.call('HSET', KEYS[1], 'lvl', lvl, 'ts', now)
  redis.call('PEXPIRE', KEYS[1], 120000)
end
if tpd > 0 then
  used = redis.call('INCRBY', KEYS[2], cost)
  redis.call('EXPIRE', KEYS[2], 2 * 86400)
end
return {1, '', 0, tostring(lvl), used, now}
"""

# The worker's correction: the day counts real usage. Only where a day quota is counted.
_CORRECT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return redis.call('INCRBY', KEYS[1], ARGV[1]) end
return 0
"""


class Quotas:
    """The api's quota check, shared through Redis by every replica."""

    def __init__(self, client: aioredis.Redis, default: Quota, per_key: dict[str, Quota]) -> None:
        self.redis = client
        self.default = default
        self.per_key = per_key
        self._admit = client.register_script(_ADMIT)

    def quota(self, owner: str) -> Quota:
        """The quota of one owner: its own entry, else the defaults."""
        return self.per_key.get(owner, self.default)

    @redis_client.translate_errors
    async def admit(self, owner: str, cost: int) -> dict[str, str]:
        """Take one request and reserve `cost` tokens of the day; returns the headers to
        send, or raises QuotaExceeded."""
        quota = self.quota(owner)
        if quota.unlimited:
            return {}
        now = time.time()
        reply = cast(list[Any], await self._admit(
            keys=[results.quota_rpm_key(owner), results.quota_tokens_key(owner, utc_day(now))],
            args=[quota.rpm, quota.tokens_per_day, cost, math.ceil(seconds_to_midnight(now))]))
        admitted, kind, wait_ms = bool(int(reply[0])), str(reply[1]), int(reply[2])
        headers = headers_for(quota, float(reply[3]), int(reply[4]), now)
        if admitted:
            return headers
        label = quota.name or owner[:12]
        metrics.quota_refusals.labels(label, kind).inc()
        retry = max(1, math.ceil(wait_ms / 1000))
        headers["retry-after"] = str(retry)
        what = (f"{quota.rpm} requests per minute" if kind == "requests"
                else f"{quota.tokens_per_day} tokens per day")
        raise QuotaExceeded(f"this API key is over its quota of {what}; retry after {retry}s",
                            kind, retry, headers)


@redis_client.translate_errors
async def correct(client: aioredis.Redis, owner: str, created_at: float, delta: int) -> None:
    """Move a key's day by the difference between real usage and the reservation."""
    if delta:
        await client.eval(_CORRECT, 1, results.quota_tokens_key(owner, utc_day(created_at)),
                          delta)
