"""The webhook dispatcher: fans events out to endpoints and delivers them at least once.

Reads top-down: `Dispatcher.run()` starts two loops. `fan_out()` reads the event stream as
a member of one Redis consumer group (so several api processes share it; entries a dead
dispatcher held are taken over after `CLAIM_IDLE_MS`), and in one script writes one
delivery per subscribed endpoint into the outbox and acks the entry: an event is never
acked without its deliveries. Each new delivery is written leased to this dispatcher (its
score past the attempt's timeout, so a dispatcher that dies mid-attempt leaves it to
another) and attempted at once, so a job's webhook leaves as soon as the event is read.
`deliver()` takes the deliveries that come due again (retries, taken-over leases) from the
outbox with the same lease. An attempt's 2xx ends it; anything else (a timeout, a refused
connection, a 5xx, a redirect, which is never followed) is retried with jittered backoff
until the retry window ends, then it goes to the owner's dead-letter list. Targets that
resolve to loopback, link-local or private addresses are refused unless allowed, and the
connection goes to the address that was checked (no second lookup to rebind).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import random
import socket
import time
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import httpx
import redis.asyncio as aioredis
import redis.exceptions

from chatq import errors, results, webhooks
from chatq import settings as settings_mod

log = logging.getLogger(__name__)

GROUP = "chatq-dispatchers"
CLAIM_IDLE_MS = 30_000
DEAD_LETTERS_KEPT = 1000
_DEAD_TTL_SECONDS = 30 * 86400

# Lua: the deliveries of a batch of events, and the events acked and deleted, at once: an
# event is never acked without its deliveries. A delivery that exists already (an event
# read again after a claim) is left as it is. KEYS: outbox, event stream, then one delivery
# key per delivery. ARGV: group, lease score, number of events, their entry ids, then per
# delivery its id, endpoint, owner, body, first attempt time. Returns 1 per delivery made
# (now leased to the caller, who attempts it at once), 0 per one left alone.
_FAN_OUT = """
local n = tonumber(ARGV[3])
local made = {}
local at = 4 + n
for i = 3, #KEYS do
  local id = ARGV[at]
  if redis.call('EXISTS', KEYS[i]) == 1 then
    made[#made + 1] = 0
  else
    redis.call('HSET', KEYS[i], 'id', id, 'endpoint', ARGV[at + 1], 'owner', ARGV[at + 2],
               'body', ARGV[at + 3], 'attempts', 0, 'first_at', ARGV[at + 4])
    redis.call('ZADD', KEYS[1], ARGV[2], id)
    made[#made + 1] = 1
  end
  at = at + 5
end
if n > 0 then
  local ids = {unpack(ARGV, 4, 3 + n)}
  redis.call('XACK', KEYS[2], ARGV[1], unpack(ids))
  redis.call('XDEL', KEYS[2], unpack(ids))
end
return made
"""

# Lua: take up to ARGV[2] deliveries due at ARGV[1], leasing each until ARGV[3].
_TAKE_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, id in ipairs(due) do redis.call('ZADD', KEYS[1], 'XX', ARGV[3], id) end
return due
"""


class Dispatcher:
    """Delivers webhook events from Redis to their endpoints."""

    def __init__(self, client: aioredis.Redis, endpoints: webhooks.EndpointStore,
                 cfg: settings_mod.WebhookSettings, consumer: str) -> None:
        self.redis = client
        self.endpoints = endpoints
        self.cfg = cfg
        self.consumer = consumer
        self.http = httpx.AsyncClient(follow_redirects=False, trust_env=False,
                                      timeout=cfg.timeout_seconds)
        self._fan_out_script = client.register_script(_FAN_OUT)
        self._take_due = client.register_script(_TAKE_DUE)
        self._kick = asyncio.Event()
        self._slots = asyncio.Semaphore(cfg.concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._loops: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Start both loops in the background."""
        self._loops = [asyncio.create_task(self._forever(self.fan_out), name="webhook-fan-out"),
                       asyncio.create_task(self._forever(self.deliver), name="webhook-deliver")]
        log.info("webhook dispatcher %s started (%d configured endpoint(s), private targets "
                 "%s)", self.consumer, len(self.endpoints.configured),
                 "allowed" if self.cfg.allow_private else "refused")

    async def stop(self) -> None:
        """Stop the loops; attempts in flight are abandoned (their lease runs out)."""
        for task in [*self._loops, *self._tasks]:
            task.cancel()
        for task in [*self._loops, *self._tasks]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.http.aclose()

    async def _forever(self, loop: Any) -> None:
        delay = 0.5
        while True:
            try:
                await loop()
                delay = 0.5
            except (errors.StoreUnavailable, redis.exceptions.RedisError, OSError) as exc:
                log.warning("webhook dispatcher: Redis trouble (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(10.0, delay * 2)

    # --- fan-out ---------------------------------------------------------------------------

    async def _ensure_group(self) -> None:
        await self.endpoints.announce()
        try:
            await self.redis.xgroup_create(results.WEBHOOK_EVENTS, GROUP, id="0", mkstream=True)
        except redis.exceptions.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def fan_out(self) -> None:
        """Turn events into deliveries, forever."""
        await self._ensure_group()
        last_claim = 0.0
        while True:
            entries: list[tuple[str, dict[str, str]]] = []
            if time.monotonic() - last_claim > CLAIM_IDLE_MS / 1000:
                last_claim = time.monotonic()
                reply = await self.redis.xautoclaim(results.WEBHOOK_EVENTS, GROUP, self.consumer,
                                                    CLAIM_IDLE_MS, "0-0", count=100)
                entries = [(str(i), dict(f)) for i, f in reply[1] if f]
            if not entries:
                read = cast(list[Any], await self.redis.xreadgroup(
                    GROUP, self.consumer, {results.WEBHOOK_EVENTS: ">"}, count=100, block=1000))
                entries = [(str(i), dict(f)) for i, f in read[0][1]] if read else []
            if not entries:
                continue
            wanted, fresh = await self._fan_out_batch(entries)
            # A fresh delivery is attempted now, with what fan-out already holds: no outbox
            # poll, no re-read. When every slot is busy it is made due for the deliver loop
            # instead (its lease would run on while it waited for a slot).
            later = []
            for delivery, endpoint in fresh:
                if len(self._tasks) < self.cfg.concurrency:
                    await self._start(delivery["id"], delivery, endpoint)
                else:
                    later.append(delivery["id"])
            if later:
                await self.redis.zadd(results.WEBHOOK_OUTBOX, dict.fromkeys(later, time.time()),
                                      xx=True)
            if later or len(fresh) < wanted:
                self._kick.set()

    async def _fan_out_batch(self, entries: list[tuple[str, dict[str, str]]]
                             ) -> tuple[int, list[tuple[dict[str, str], webhooks.Endpoint]]]:
        """One delivery per (event, subscribed endpoint), written and the events acked in one
        round trip: how many the events call for, and those made now (the others existed),
        leased to this dispatcher for their first attempt."""
        owners: dict[str, list[webhooks.Endpoint]] = {}
        now = time.time()
        keys = [results.WEBHOOK_OUTBOX, results.WEBHOOK_EVENTS]
        args: list[str | float] = [GROUP, now + self.cfg.timeout_seconds + 30, len(entries),
                                   *(i for i, _ in entries)]
        planned: list[tuple[dict[str, str], webhooks.Endpoint]] = []
        for entry_id, fields in entries:
            owner = fields.get("owner", "")
            if owner not in owners:
                owners[owner] = await self.endpoints.list(owner)
            by_id = {e.id: e for e in owners[owner]}
            for delivery_id, endpoint_id, body in self._deliveries(entry_id, fields,
                                                                   owners[owner]):
                keys.append(results.webhook_delivery_key(delivery_id))
                args += [delivery_id, endpoint_id, owner, body, now]
                planned.append(({"id": delivery_id, "endpoint": endpoint_id, "owner": owner,
                                 "body": body, "attempts": "0", "first_at": str(now)},
                                by_id[endpoint_id]))
        made = cast(list[int], await self._fan_out_script(keys=keys, args=args))
        return len(planned), [plan for plan, new in zip(planned, made, strict=True) if new]

    @staticmethod
    def _deliveries(entry_id: str, fields: dict[str, str], endpoints: list[webhooks.Endpoint]
                    ) -> list[tuple[str, str, str]]:
        """(delivery id, endpoint id, body) for one event."""
        if "type" in fields:  # emitted directly (batch events)
            kind: str | None = fields["type"]
            data_id = fields.get("object", "")
        else:
            kind = webhooks.event_type(fields.get("kind", "chat"), fields.get("status", ""),
                                       fields.get("finish_reason", ""))
            data_id = webhooks.object_id(fields.get("kind", "chat"), fields.get("job", ""))
        if kind is None:
            return []
        ident = webhooks.event_id(entry_id)
        body = webhooks.payload(ident, kind, data_id, float(fields.get("at") or time.time()))
        return [(f"{ident}.{e.id}", e.id, body) for e in endpoints if e.wants(kind)]

    # --- delivery --------------------------------------------------------------------------

    async def deliver(self) -> None:
        """Send due deliveries, forever."""
        while True:
            now = time.time()
            lease_until = now + self.cfg.timeout_seconds + 30
            due = cast(list[str], await self._take_due(keys=[results.WEBHOOK_OUTBOX],
                                                       args=[now, 100, lease_until]))
            for delivery_id in due:
                await self._start(str(delivery_id))
            if due:
                continue
            self._kick.clear()
            wait = 1.0
            head = await self.redis.zrange(results.WEBHOOK_OUTBOX, 0, 0, withscores=True)
            if head:
                wait = max(0.0, min(wait, float(head[0][1]) - time.time()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), wait)

    async def _start(self, delivery_id: str, delivery: dict[str, str] | None = None,
                     endpoint: webhooks.Endpoint | None = None) -> None:
        """Start one leased attempt once a slot is free; `delivery` and `endpoint` when the
        caller has them already (a fresh delivery), else they are read."""
        await self._slots.acquire()
        task = asyncio.create_task(self._attempt(delivery_id, delivery, endpoint))
        self._tasks.add(task)
        task.add_done_callback(self._attempt_done)

    def _attempt_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("webhook delivery task failed", exc_info=task.exception())

    async def _attempt(self, delivery_id: str, delivery: dict[str, str] | None = None,
                       endpoint: webhooks.Endpoint | None = None) -> None:
        key = results.webhook_delivery_key(delivery_id)
        try:
            if delivery is None:
                delivery = cast(dict[str, str], await self.redis.hgetall(key))
                if not delivery:
                    await self.redis.zrem(results.WEBHOOK_OUTBOX, delivery_id)
                    return
                endpoint = await self.endpoints.get(delivery["owner"], delivery["endpoint"])
            if endpoint is None:  # deleted since: nothing to deliver to
                await self._drop(delivery_id)
                return
            attempts = int(delivery.get("attempts", 0)) + 1
            problem = await self.send(endpoint, json.loads(delivery["body"])["id"],
                                      delivery["body"])
            if problem is None:
                await self._drop(delivery_id)
                return
            await self._failed(delivery_id, {**delivery, "attempts": str(attempts)}, problem)
        except errors.StoreUnavailable as exc:
            log.warning("webhook delivery %s left for later: %s", delivery_id, exc)
        except redis.exceptions.RedisError as exc:
            log.warning("webhook delivery %s left for later: %s", delivery_id, exc)

    async def _drop(self, delivery_id: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zrem(results.WEBHOOK_OUTBOX, delivery_id)
            pipe.delete(results.webhook_delivery_key(delivery_id))
            await pipe.execute()

    async def _failed(self, delivery_id: str, delivery: dict[str, str], problem: str) -> None:
        attempts = int(delivery["attempts"])
        now = time.time()
        permanent = problem.startswith(("refused:", "redirect"))
        delay = webhooks.next_attempt_delay(attempts, self.cfg, random.random())
        if permanent or webhooks.gives_up(float(delivery.get("first_at", now)), now, delay,
                                          self.cfg):
            entry = webhooks.dead_letter_entry(delivery, problem, now)
            dead = results.webhook_dead_key(delivery["owner"])
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.lpush(dead, json.dumps(entry))
                pipe.ltrim(dead, 0, DEAD_LETTERS_KEPT - 1)
                pipe.expire(dead, _DEAD_TTL_SECONDS)
                pipe.zrem(results.WEBHOOK_OUTBOX, delivery_id)
                pipe.delete(results.webhook_delivery_key(delivery_id))
                await pipe.execute()
            log.warning("webhook delivery %s dead-lettered after %d attempt(s): %s",
                        delivery_id, attempts, problem)
            return
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(results.webhook_delivery_key(delivery_id),
                      mapping={"attempts": attempts, "last_error": problem})
            pipe.zadd(results.WEBHOOK_OUTBOX, {delivery_id: now + delay})
            await pipe.execute()
        log.info("webhook delivery %s failed (%s), attempt %d; next in %.1fs", delivery_id,
                 problem, attempts, delay)

    async def send(self, endpoint: webhooks.Endpoint, message_id: str, body: str) -> str | None:
        """One signed POST; None when the receiver took it, else what went wrong."""
        try:
            url, host_header, sni = await self._pinned(endpoint.url)
        except webhooks.EndpointRefused as exc:
            return f"refused: {exc}"
        except OSError as exc:
            return f"cannot resolve the host: {exc}"
        head = webhooks.headers(endpoint.secret, message_id, body)
        head["host"] = host_header
        try:
            resp = await self.http.post(url, content=body.encode(), headers=head,
                                        extensions={"sni_hostname": sni} if sni else None)
        except httpx.TimeoutException:
            return f"no answer within {self.cfg.timeout_seconds:g}s"
        except httpx.HTTPError as exc:
            return f"connection failed: {type(exc).__name__}: {exc}"
        if 200 <= resp.status_code < 300:
            return None
        if 300 <= resp.status_code < 400:
            return (f"redirect ({resp.status_code} to {resp.headers.get('location', '?')}) "
                    "refused: webhooks never follow redirects")
        return f"the receiver answered {resp.status_code}"

    async def _pinned(self, url: str) -> tuple[str, str, str]:
        """The URL with its host replaced by a checked address, the Host header, the TLS name."""
        problem = webhooks.url_problem(url)
        if problem:
            raise webhooks.EndpointRefused(problem)
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:  # an address already: no lookup (a resolver thread per delivery otherwise)
            addresses = [str(ipaddress.ip_address(host))]
        except ValueError:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port,
                                                                 type=socket.SOCK_STREAM)
            addresses = [str(info[4][0]) for info in infos]
        refused = [a for a in addresses if not webhooks.address_allowed(a, self.cfg.allow_private)]
        if not addresses or refused:
            raise webhooks.EndpointRefused(
                f"{host} resolves to {', '.join(refused) or 'nothing'}, a loopback, link-local "
                "or private address (set CHATQ_WEBHOOK_ALLOW_PRIVATE=true to allow it)")
        address = addresses[0]
        netloc = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
        pinned = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
        host_header = parts.netloc.rsplit("@", 1)[-1]
        return pinned, host_header, host if parts.scheme == "https" else ""
