"""Fair shares of interactive work among API keys, on either queue backend.

The queue is FIFO: with one key's thousand questions ahead, another key's ten wait behind
all of them. So the queue is given a window — about the live workers' slots, plus a little
spare (`window_size()`) — and a new job goes onto it only while the window has room and
its key has nothing held; otherwise its id joins its key's list in Redis
(`chatq:fair:held:<owner>`). The batch feeder (one process at a time, under its lease)
releases held jobs into room as it frees up, one slot at a time to the key with the fewest
jobs released so far during its backlog (a deficit round-robin, `release_order()`): the
keys with a backlog are released to, and so served, at equal rates whatever their backlog
sizes, and a key that has just arrived goes first. Within a worker, the rate budget's gate
orders its waiters the same way (chatq.budget.Gate).

Why this and not a fair claim order in the worker: a worker sees only what it received,
and the queue hands out the head; skipping another key's message means handing it back,
which on SQS counts a receive towards the dead-letter queue and spins while the backlog
lasts. Per-key queues on the backend itself would mean creating SQS queues per key. Held
lists in Redis, where the job records already are, work the same for both backends.

Why a lone question is as fast as before: with room in the window (no backlog anywhere,
the common case) the job is written and routed by one Lua script, one round trip like the
plain write it replaces, and sent at once.

Durability: a held job's record and its place in its key's list are written by the same
script, before the api answers 202. The feeder sends a held job before it takes it off the
list (`_COMMIT` checks the list still starts with what was sent), so a crash in between
sends it twice, which the worker's claim absorbs, and never loses it. A released job
leaves the window in the script that makes it terminal (finish, cancel, the janitor's
fail: chatq.results); `_PRUNE` recounts the window now and then from the records, so a
record that expired or was forgotten cannot hold a slot for ever.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, cast

import redis.asyncio as aioredis

from chatq import errors, jobs, metrics, redis_client, results, telemetry
from chatq import settings as settings_mod
from chatq.queues import Queue

log = logging.getLogger(__name__)

# How often the feeder recounts the workers' slots, and the window from them, in seconds.
WINDOW_SECONDS = 1.0
# How often the released set is checked against the records (a safety net), in seconds.
PRUNE_SECONDS = 5.0
# The window the feeder wrote lives this long: past it (no feeder) the api falls back to
# CHATQ_FAIR_SPARE, which holds more back, never less.
WINDOW_TTL_SECONDS = 30
# Most ids released to one key in one step (one LRANGE, one send each, one commit).
RELEASE_CHUNK = 100


# --- pure decisions --------------------------------------------------------------------------

def window_size(slots: int, spare: int) -> int:
    """How many interactive jobs may be on the queue or running at once: the live workers'
    slots, plus `spare` or a quarter of the slots, whichever is more (so a worker that
    frees a slot finds the next job already there, between two feeder rounds)."""
    return max(0, slots) + max(spare, max(0, slots) // 4)


def level_start(held: Mapping[str, int], released: Mapping[str, int],
                in_flight: Mapping[str, int]) -> dict[str, int]:
    """`released` for every key with jobs held: a key whose backlog begins starts level with
    the least served of the others, served meaning released less what is still in flight,
    and its own jobs in flight (let straight in while the window had room) count as
    released. So the jobs a key already had in the window when the backlogs began are
    weighed, and another key catches up on them: two keys arriving together 10:1 are served
    equally from the start, instead of the larger one keeping its first window's head start."""
    backlogged = [owner for owner, n in held.items() if n > 0]
    base = min((released[o] - in_flight.get(o, 0) for o in backlogged if o in released),
               default=0)
    return {o: released[o] if o in released else base + in_flight.get(o, 0)
            for o in backlogged}


def release_order(free: int, held: Mapping[str, int], released: Mapping[str, int],
                  in_flight: Mapping[str, int]) -> list[str]:
    """Whose held jobs fill `free` slots, slot by slot (the order to send them in).

    A deficit round-robin by count: each slot goes, among the keys with jobs held, to the
    one released to least so far during its backlog (`released`; a key not in it starts as
    `level_start` says), then to the one with fewest jobs on the queue or running, then by
    name. Counting releases, not only what is in flight, keeps the keys level in service
    even when one key's jobs wait longer in the queue than another's.
    """
    backlogged = {owner: n for owner, n in held.items() if n > 0}
    start = level_start(held, released, in_flight)
    heap = [(start[o], in_flight.get(o, 0), o) for o in backlogged]
    heapq.heapify(heap)
    left = dict(backlogged)
    order: list[str] = []
    for _ in range(max(0, free)):
        if not heap:
            break
        done, flying, owner = heapq.heappop(heap)
        order.append(owner)
        left[owner] -= 1
        if left[owner] > 0:
            heapq.heappush(heap, (done + 1, flying + 1, owner))
    return order


def live_slots(capacity: Mapping[str, str], now: float) -> tuple[int, list[str]]:
    """The slots of the workers whose report is current, and the ids of those expired
    (`chatq:fair:capacity` values are "<concurrency> <expiry>")."""
    slots, expired = 0, []
    for worker, value in capacity.items():
        try:
            concurrency, until = value.split()
            if float(until) >= now:
                slots += int(concurrency)
                continue
        except ValueError:
            pass
        expired.append(worker)
    return slots, expired


class Route(StrEnum):
    """Where `Fair.create` put a new job."""

    DIRECT = "direct"
    """On the window: the caller sends it to the queue now."""
    HELD = "held"
    """In its key's held list: the feeder sends it when its turn comes."""


# --- the Redis side ----------------------------------------------------------------------

_PRELUDE = "local TERMINAL = {" + ", ".join(f"['{s}'] = true" for s in results.TERMINAL) + "}\n"

# Write a new job's record and route it. KEYS: record, released, inflight, the owner's
# held list, owners, held count, window. ARGV: ttl, job id, owner, window when unset,
# then the record's field/value pairs.
_CREATE = """
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('EXPIRE', KEYS[1], ARGV[1])
local window = tonumber(redis.call('GET', KEYS[7]) or ARGV[4])
if redis.call('LLEN', KEYS[4]) == 0 and redis.call('SCARD', KEYS[2]) < window then
  redis.call('SADD', KEYS[2], ARGV[2])
  redis.call('HINCRBY', KEYS[3], ARGV[3], 1)
  return 'direct'
end
redis.call('RPUSH', KEYS[4], ARGV[2])
redis.call('SADD', KEYS[5], ARGV[3])
redis.call('INCR', KEYS[6])
return 'held'
"""

# The feeder's look. KEYS: owners, released, inflight, window. ARGV: held-list prefix,
# window when unset. Returns {window, released, {owner, held, ...}, {owner, in flight, ...}};
# keys whose list is empty leave the owners set here.
_STATE = """
local held = {}
for _, o in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local n = redis.call('LLEN', ARGV[1] .. o)
  if n == 0 then redis.call('SREM', KEYS[1], o) else
    table.insert(held, o) table.insert(held, n)
  end
end
local window = tonumber(redis.call('GET', KEYS[4]) or ARGV[2])
return {window, redis.call('SCARD', KEYS[2]), held, redis.call('HGETALL', KEYS[3])}
"""

# Take ids the feeder has sent off the head of one key's list, and count the live ones
# as released (a job that already ended is not: its finish found nothing to free).
# KEYS: held list, released, inflight, owners, held count. ARGV: owner, record prefix,
# ids. Returns the number released, or -1 when the list no longer starts with the ids.
_COMMIT = _PRELUDE + """
local n = #ARGV - 2
local head = redis.call('LRANGE', KEYS[1], 0, n - 1)
for i = 1, n do if head[i] ~= ARGV[i + 2] then return -1 end end
redis.call('LTRIM', KEYS[1], n, -1)
local added = 0
for i = 3, #ARGV do
  local st = redis.call('HGET', ARGV[2] .. ARGV[i], 'status')
  if st and not TERMINAL[st] and redis.call('SADD', KEYS[2], ARGV[i]) == 1 then
    added = added + 1
  end
end
if added > 0 then redis.call('HINCRBY', KEYS[3], ARGV[1], added) end
if redis.call('DECRBY', KEYS[5], n) < 0 then redis.call('SET', KEYS[5], 0) end
if redis.call('LLEN', KEYS[1]) == 0 then redis.call('SREM', KEYS[4], ARGV[1]) end
return added
"""

# The safety net: drop released ids whose record is gone or terminal, recount the keys'
# in-flight numbers and the held count from what is there. KEYS: released, inflight,
# owners, held count. ARGV: record prefix, held-list prefix. Returns the ids dropped.
_PRUNE = _PRELUDE + """
local counts, dropped = {}, 0
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local rec = redis.call('HMGET', ARGV[1] .. id, 'status', 'owner')
  if not rec[1] or TERMINAL[rec[1]] then
    redis.call('SREM', KEYS[1], id)
    dropped = dropped + 1
  else
    local o = rec[2] or ''
    counts[o] = (counts[o] or 0) + 1
  end
end
redis.call('DEL', KEYS[2])
for o, n in pairs(counts) do redis.call('HSET', KEYS[2], o, n) end
local held = 0
for _, o in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  held = held + redis.call('LLEN', ARGV[2] .. o)
end
redis.call('SET', KEYS[4], held)
return dropped
"""

# A direct job whose message could not be sent (the api forgets it): free its slot.
_FORGET = """
if redis.call('SREM', KEYS[1], ARGV[1]) == 1 then
  if redis.call('HINCRBY', KEYS[2], ARGV[2], -1) <= 0 then redis.call('HDEL', KEYS[2], ARGV[2]) end
end
"""


@dataclass(frozen=True)
class State:
    """What the feeder sees in one round."""

    window: int
    released: int
    held: dict[str, int]
    in_flight: dict[str, int]


def _pairs(flat: list[Any]) -> dict[str, int]:
    return {str(flat[i]): int(flat[i + 1]) for i in range(0, len(flat), 2)}


class Fair:
    """The window and the held lists in Redis: the api's `create`, the feeder's `state`,
    `commit`, `prune` and `refresh_window`."""

    def __init__(self, client: aioredis.Redis, settings: settings_mod.Settings) -> None:
        self.redis = client
        self.cfg = settings.fair
        self.ttl = settings.redis.results_ttl_seconds
        self._create = client.register_script(_CREATE)
        self._state = client.register_script(_STATE)
        self._commit = client.register_script(_COMMIT)
        self._prune = client.register_script(_PRUNE)
        self._forget = client.register_script(_FORGET)

    @redis_client.translate_errors
    async def create(self, record: jobs.JobRecord) -> Route:
        """Write a new interactive job's record and route it, in one step."""
        flat = [x for pair in record.to_redis().items() for x in pair]
        keys = [results.job_key(record.id), results.FAIR_RELEASED, results.FAIR_INFLIGHT,
                results.fair_held_key(record.owner), results.FAIR_OWNERS, results.FAIR_HELD,
                results.FAIR_WINDOW]
        route = Route(str(await self._create(
            keys=keys, args=[self.ttl, record.id, record.owner, self.cfg.spare, *flat])))
        if route is Route.HELD:
            metrics.fair_held_jobs.inc()
        return route

    @redis_client.translate_errors
    async def forget(self, job_id: str, owner: str) -> None:
        """A direct job the queue never got leaves the window."""
        await self._forget(keys=[results.FAIR_RELEASED, results.FAIR_INFLIGHT],
                           args=[job_id, owner])

    @redis_client.translate_errors
    async def state(self) -> State:
        """The window, what is released, and each key's held and in-flight counts."""
        reply = cast(list[Any], await self._state(
            keys=[results.FAIR_OWNERS, results.FAIR_RELEASED, results.FAIR_INFLIGHT,
                  results.FAIR_WINDOW], args=[results.FAIR_PREFIX, self.cfg.spare]))
        return State(int(reply[0]), int(reply[1]), _pairs(reply[2]), _pairs(reply[3]))

    @redis_client.translate_errors
    async def head(self, owner: str, count: int) -> list[tuple[str, str | None]]:
        """The first `count` held ids of a key, each with its record's status (None: gone)."""
        ids = cast(list[str], await self.redis.lrange(results.fair_held_key(owner), 0,
                                                      count - 1))
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hget(results.job_key(job_id), "status")
            statuses = await pipe.execute()
        return [(i, None if s is None else str(s)) for i, s in zip(ids, statuses, strict=True)]

    @redis_client.translate_errors
    async def commit(self, owner: str, ids: list[str]) -> int:
        """Take sent ids off the head of the key's list; the number counted as released,
        or -1 when the list had changed (nothing taken: the ids are sent again later)."""
        return int(await self._commit(
            keys=[results.fair_held_key(owner), results.FAIR_RELEASED, results.FAIR_INFLIGHT,
                  results.FAIR_OWNERS, results.FAIR_HELD],
            args=[owner, results.JOB_PREFIX, *ids]))

    @redis_client.translate_errors
    async def prune(self) -> int:
        """Recount the window from the records; the number of stale ids dropped."""
        return int(await self._prune(
            keys=[results.FAIR_RELEASED, results.FAIR_INFLIGHT, results.FAIR_OWNERS,
                  results.FAIR_HELD], args=[results.JOB_PREFIX, results.FAIR_PREFIX]))

    @redis_client.translate_errors
    async def refresh_window(self) -> int:
        """Set the window from the workers' current reports; returns it."""
        capacity = cast(dict[str, str], await self.redis.hgetall(results.FAIR_CAPACITY))
        slots, expired = live_slots(capacity, time.time())
        if expired:
            await self.redis.hdel(results.FAIR_CAPACITY, *expired)
        window = window_size(slots, self.cfg.spare)
        await self.redis.set(results.FAIR_WINDOW, window, ex=WINDOW_TTL_SECONDS)
        return window


class Releaser:
    """The feeder's part: every round, release held jobs into the window's free room."""

    def __init__(self, fair: Fair, queue: Queue, settings: settings_mod.Settings) -> None:
        self.fair = fair
        self.queue = queue
        self.cfg = settings.fair
        self.released: dict[str, int] = {}
        """Jobs released to each key with a backlog, since its backlog began (this feeder's
        count: a feeder taking over starts everyone level)."""
        self._queue_ready = False
        self._next_window = 0.0
        self._next_prune = 0.0

    async def run(self, leading: Callable[[], bool]) -> None:
        """Rounds while `leading()` (this process holds the feeder's lease), until cancelled."""
        async def step() -> None:
            if leading():
                await self.round()

        await errors.rounds(step, self.cfg.round_seconds, "fair release", log)

    async def round(self) -> int:
        """One look: refresh the window when due, release into the room; jobs released."""
        now = time.monotonic()
        if now >= self._next_window:
            self._next_window = now + WINDOW_SECONDS
            await self.fair.refresh_window()
        if now >= self._next_prune:
            self._next_prune = now + PRUNE_SECONDS
            dropped = await self.fair.prune()
            if dropped:
                log.info("fair window: %d released job(s) had ended or gone unseen", dropped)
        state = await self.fair.state()
        metrics.fair_held.set(sum(state.held.values()))
        # A key whose backlog ended is forgotten: when it has one again it starts level.
        self.released = level_start(state.held, self.released, state.in_flight)
        free = state.window - state.released
        if free <= 0 or not state.held:
            return 0
        order = release_order(free, state.held, self.released, state.in_flight)
        released = await self.release(order)
        floor = min(self.released.values(), default=0)
        self.released = {o: n - floor for o, n in self.released.items()}  # keep them small
        return released

    async def release(self, order: list[str]) -> int:
        """Send the held jobs `order` names (a key per slot, at most RELEASE_CHUNK each), in
        that order, then take them off their keys' lists; the number released."""
        if not self._queue_ready:
            await self.queue.setup()
            self._queue_ready = True
        wanted: dict[str, int] = {}
        for owner in order:
            wanted[owner] = min(RELEASE_CHUNK, wanted.get(owner, 0) + 1)
        heads = {owner: await self.fair.head(owner, n) for owner, n in wanted.items()}
        sends = []
        taken = {owner: 0 for owner in heads}
        for owner in order:
            if taken[owner] >= len(heads[owner]):
                continue
            job_id, status = heads[owner][taken[owner]]
            taken[owner] += 1
            self.released[owner] = self.released.get(owner, 0) + 1
            # A job cancelled (or expired) while held needs no message.
            if status is not None and status not in results.TERMINAL:
                with telemetry.producer_span(self.queue.backend, self.queue.name,
                                             job_id) as carrier:
                    sends.append(self.queue.send(jobs.encode_message(job_id), carrier))
        await asyncio.gather(*sends)
        metrics.jobs_enqueued.labels(self.queue.backend).inc(len(sends))
        released = 0
        for owner, head in heads.items():
            if head:
                # -1: another feeder moved the list; what was sent is sent twice at worst.
                released += max(0, await self.fair.commit(owner, [i for i, _ in head]))
        return released


def open_fair(client: aioredis.Redis, settings: settings_mod.Settings) -> Fair | None:
    """The fair window of these settings; None when CHATQ_FAIR_ENABLED is false."""
    return Fair(client, settings) if settings.fair.enabled else None
