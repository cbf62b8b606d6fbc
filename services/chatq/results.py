"""Job records, token streams, idempotency keys and busy counts in Redis.

Every Redis key chatq uses is named here:

- `chatq:job:<id>`          hash: the job record (status, answer, error, usage, lease...)
- `chatq:job:<id>:events`   stream: `attempt`, `delta` and `done` events, for SSE and resume
- `chatq:idem:<owner>:<key>` string: "<fingerprint> <job id>" for Idempotency-Key
- `chatq:busy:<worker id>`  string: in-flight jobs of one worker, read by the operator
- `chatq:leases`            sorted set: the id of every `running` job, scored by its lease
                            expiry (seconds, like `_lease_expires_at`); what the stale-job
                            janitor sweeps. Bounded by the jobs running now: finish, cancel
                            and hand-back remove the member
- `chatq:model:health`      hash: the model's circuit breaker (chatq.breaker), shared by all
- `chatq:model:probe`       string: the lock of the worker probing a down model
- `chatq:budget:<endpoint>`  hash: the shared rate budget of one model endpoint (budget.py)
- `chatq:quota:<owner>:rpm`  hash: an API key's requests-per-minute bucket (quotas.py)
- `chatq:quota:<owner>:tpd:<day>` string: tokens an API key used on one UTC day (quotas.py)
- channel `chatq:done`       a job id each time a job becomes terminal (wakes long-polls
                            and SSE streams, chatq.wakeups)
- channel `chatq:job:<id>:tick` an empty message each time the job's event stream grows
                            (wakes its SSE streams; an api subscribes only while it has some)
- `chatq:webhook:on`        string: set once any webhook endpoint exists; until then no
                            webhook events are recorded
- `chatq:webhook:events`    stream: one entry per terminal job (written atomically with the
                            outcome) or other event (`emit`), read by the dispatchers' group
- `chatq:webhook:endpoints:<owner>` hash: endpoint id -> endpoint JSON (made by the API)
- `chatq:webhook:outbox`    sorted set: delivery id scored by its next attempt (unix s)
- `chatq:webhook:delivery:<id>` hash: one event for one endpoint, its attempts and last error
- `chatq:webhook:dead:<owner>` list: dead-lettered deliveries, newest first (bounded)


- `chatq:file:<id>`          hash: a file's metadata (its body is in the file store)
- `chatq:files:<owner>`      sorted set: one key's file ids by creation time
- `chatq:batch:<id>`         hash: a batch (status, timestamps, counts, feed cursor)
- `chatq:batches:<owner>`    sorted set: one key's batch ids by creation time
- `chatq:batches:active`     sorted set: batches the feeder still has work for
- `chatq:batch-feeder`       string: the lease of the one process that feeds batches
- `chatq:fair:held:<owner>`  list: one API key's interactive job ids held back while the
                            queue's window is full, oldest first (chatq.fair)
- `chatq:fair:owners`        set: the keys with a non-empty held list
- `chatq:fair:held`          string: how many job ids are held, all keys (for the operator)
- `chatq:fair:released`      set: interactive jobs on the queue or running, not terminal;
                            finish, cancel and the janitor's fail remove the member
- `chatq:fair:inflight`      hash: owner -> its members of `chatq:fair:released`
- `chatq:fair:window`        string: how many may be released at once (the feeder sets it)
- `chatq:fair:capacity`      hash: worker id -> "<concurrency> <report expiry, unix s>"

A batch line is a job like any other (`chatq:job:<id>`) whose record names its batch;
finishing it counts it in the batch's `completed` or `failed`, in the same script.

The state changes that must be atomic (claim, renew, finish, cancel, hand back) are Lua
scripts, so a job's answer is written once however often its message is delivered.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import redis.asyncio as aioredis

from chatq import jobs, redis_client
from chatq import settings as settings_mod

log = logging.getLogger(__name__)

DONE_CHANNEL = "chatq:done"
LEASES_KEY = "chatq:leases"
JOB_PREFIX = "chatq:job:"
TERMINAL = tuple(s.value for s in jobs.Status if s.terminal)
"""The statuses after which nothing happens to a job; the Lua scripts take theirs from here."""


def job_key(job_id: str) -> str:
    """The hash that holds a job's record."""
    return f"{JOB_PREFIX}{job_id}"


def events_key(job_id: str) -> str:
    """The stream that holds a job's token deltas and final event."""
    return f"chatq:job:{job_id}:events"


_TICK_PREFIX, _TICK_SUFFIX = "chatq:job:", ":tick"


def tick_channel(job_id: str) -> str:
    """The channel told each time a job's event stream grows (chatq.wakeups)."""
    return f"{_TICK_PREFIX}{job_id}{_TICK_SUFFIX}"


def job_of_tick_channel(channel: str) -> str:
    """The job id of a tick_channel name."""
    return channel.removeprefix(_TICK_PREFIX).removesuffix(_TICK_SUFFIX)


def idempotency_key(owner: str, key: str) -> str:
    """Where an Idempotency-Key of one API key lives."""
    return f"chatq:idem:{owner}:{key}"


def busy_key(worker_id: str) -> str:
    """A worker's in-flight count, for the operator's busy-aware scale-in."""
    return f"chatq:busy:{worker_id}"


def budget_key(endpoint: str) -> str:
    """The rate budget of one model endpoint (budget.endpoint_id)."""
    return f"chatq:budget:{endpoint}"


def quota_rpm_key(owner: str) -> str:
    """An API key's requests-per-minute bucket."""
    return f"chatq:quota:{owner}:rpm"


def quota_tokens_key(owner: str, day: str) -> str:
    """Tokens an API key used on one UTC day (YYYY-MM-DD)."""
    return f"chatq:quota:{owner}:tpd:{day}"


def file_key(file_id: str) -> str:
    """The hash that holds a file's metadata."""
    return f"chatq:file:{file_id}"


def files_index_key(owner: str) -> str:
    """One API key's files, scored by creation time."""
    return f"chatq:files:{owner}"


FAIR_PREFIX = "chatq:fair:held:"
FAIR_OWNERS = "chatq:fair:owners"
FAIR_HELD = "chatq:fair:held"
FAIR_RELEASED = "chatq:fair:released"
FAIR_INFLIGHT = "chatq:fair:inflight"
FAIR_WINDOW = "chatq:fair:window"
FAIR_CAPACITY = "chatq:fair:capacity"


def fair_held_key(owner: str) -> str:
    """One API key's held interactive job ids (chatq.fair), oldest first."""
    return f"{FAIR_PREFIX}{owner}"


BATCH_PREFIX = "chatq:batch:"
ACTIVE_BATCHES = "chatq:batches:active"
FEEDER_LEASE = "chatq:batch-feeder"


def batch_key(batch_id: str) -> str:
    """The hash that holds a batch."""
    return f"{BATCH_PREFIX}{batch_id}"


def batches_index_key(owner: str) -> str:
    """One API key's batches, scored by creation time."""
    return f"chatq:batches:{owner}"


def model_health_key() -> str:
    """The model's shared circuit breaker (chatq.breaker): a hash, read by api and operator."""
    return "chatq:model:health"


def model_probe_key() -> str:
    """A short lock: the one worker that probes a down model this round."""
    return "chatq:model:probe"


# The longest any blocking read of the events client blocks (SSE keep-alives come at this
# pace); its socket timeout is this much longer than the plain one.
MAX_EVENTS_BLOCK_SECONDS = 15.0


WEBHOOK_ON = "chatq:webhook:on"
WEBHOOK_EVENTS = "chatq:webhook:events"
WEBHOOK_OUTBOX = "chatq:webhook:outbox"
#: Entries kept in the webhook event stream while no dispatcher reads it (memory bound).
WEBHOOK_EVENTS_MAXLEN = 100_000


def webhook_endpoints_key(owner: str) -> str:
    """The endpoints one API key made through the API."""
    return f"chatq:webhook:endpoints:{owner}"


def webhook_delivery_key(delivery_id: str) -> str:
    """One event on its way to one endpoint."""
    return f"chatq:webhook:delivery:{delivery_id}"


def webhook_dead_key(owner: str) -> str:
    """The dead-lettered deliveries of one API key."""
    return f"chatq:webhook:dead:{owner}"


def _lua_prelude() -> str:
    """Shared head of every script: the statuses and the terminal set from jobs.Status, and
    one clock (seconds since the epoch, as a float, like every `*_at` field)."""
    terminal = ", ".join(f"['{s}'] = true" for s in TERMINAL)
    statuses = "\n".join(f"local {s.name} = '{s.value}'" for s in jobs.Status)
    return f"""
local TERMINAL = {{{terminal}}}
{statuses}
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
"""


# Lua (a fragment of _FINISH and _CANCEL): record a webhook event with the outcome, in the
# same script, so an outcome is never written without its event. KEYS[4] the on-flag,
# KEYS[5] the event stream; JOB and STATUS are Lua expressions, `t` the script's now().
_WEBHOOK_EVENT = """
if redis.call('EXISTS', KEYS[4]) == 1 then
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', 'EVENTS_MAXLEN', '*', 'job', JOB,
    'owner', redis.call('HGET', KEYS[1], 'owner') or '',
    'kind', redis.call('HGET', KEYS[1], 'kind') or 'chat', 'status', STATUS,
    'finish_reason', redis.call('HGET', KEYS[1], 'finish_reason') or '', 'at', tostring(t))
end
""".replace("EVENTS_MAXLEN", str(WEBHOOK_EVENTS_MAXLEN))

# Lua (a fragment of _FINISH, _CANCEL and _ABANDON): a job that leaves chatq.fair's window
# frees its slot in the same script, so the feeder can release the next held job at once.
# RELEASED and INFLIGHT are KEYS entries, JOB a Lua expression; KEYS[1] is the record.
_FAIR_DONE = """
if redis.call('SREM', RELEASED, JOB) == 1 then
  local o = redis.call('HGET', KEYS[1], 'owner') or ''
  if redis.call('HINCRBY', INFLIGHT, o, -1) <= 0 then redis.call('HDEL', INFLIGHT, o) end
end
"""


def _fair_done(job: str, released: str, inflight: str) -> str:
    return (_FAIR_DONE.replace("RELEASED", released).replace("INFLIGHT", inflight)
            .replace("JOB", job))


# Lua: take the job if it is not terminal and no live lease holds it. ARGV: token, lease
# seconds, ttl, job id. Returns {'ok', <HGETALL>}, {'leased', seconds the lease has left}
# or {why not}.
_CLAIM = _lua_prelude() + """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return {'missing'} end
if TERMINAL[st] then return {st} end
local t = now()
local holder = redis.call('HGET', KEYS[1], '_lease')
local untl = tonumber(redis.call('HGET', KEYS[1], '_lease_expires_at') or '0')
if holder and holder ~= '' and holder ~= ARGV[1] and untl > t then return {'leased', tostring(untl - t)} end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'status', RUNNING, '_lease', ARGV[1],
  '_lease_expires_at', t + tonumber(ARGV[2]), 'updated_at', t)
if not redis.call('HGET', KEYS[1], 'started_at') then
  redis.call('HSET', KEYS[1], 'started_at', t)
end
redis.call('XADD', KEYS[2], '*', 'type', 'attempt', 'data', '{"attempt":' .. attempts .. '}')
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('PUBLISH', KEYS[4], '')
redis.call('ZADD', KEYS[3], t + tonumber(ARGV[2]), ARGV[4])
return {'ok', redis.call('HGETALL', KEYS[1])}
"""

# Lua: extend our lease; tell the caller if the job was cancelled or the lease lost.
# ARGV: token, lease seconds, job id.
_RENEW = _lua_prelude() + """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 'missing' end
if st ~= RUNNING then return st end
if redis.call('HGET', KEYS[1], '_lease') ~= ARGV[1] then return 'lost' end
local untl = now() + tonumber(ARGV[2])
redis.call('HSET', KEYS[1], '_lease_expires_at', untl)
redis.call('ZADD', KEYS[2], untl, ARGV[3])
return 'ok'
"""

# Lua: write the outcome once, only while holding the lease. ARGV: token, ttl, done-event
# JSON, job id, then field/value pairs.
_FINISH = _lua_prelude() + """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 'missing' end
if st ~= RUNNING then return st end
if redis.call('HGET', KEYS[1], '_lease') ~= ARGV[1] then return 'lost' end
local t = now()
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('HSET', KEYS[1], 'finished_at', t, 'updated_at', t)
redis.call('HDEL', KEYS[1], '_lease', '_lease_expires_at')
local batch = redis.call('HGET', KEYS[1], 'batch_id')
if batch then
  local counter = 'failed'
  if redis.call('HGET', KEYS[1], 'status') == SUCCEEDED then counter = 'completed' end
  redis.call('HINCRBY', KEYS[7] .. batch, counter, 1)
end
redis.call('XADD', KEYS[2], '*', 'type', 'done', 'data', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('PUBLISH', KEYS[3], ARGV[4])
redis.call('ZREM', KEYS[6], ARGV[4])
""" + _fair_done("ARGV[4]", "KEYS[8]", "KEYS[9]") + _WEBHOOK_EVENT.replace("JOB", "ARGV[4]").replace(
    "STATUS", "redis.call('HGET', KEYS[1], 'status')") + """
return 'ok'
"""

# Lua: cancel a job that is not terminal; idempotent. Returns the status after the call.
# ARGV: ttl, job id, error JSON, done-event JSON.
_CANCEL = _lua_prelude() + """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 'missing' end
if TERMINAL[st] then return st end
local t = now()
redis.call('HSET', KEYS[1], 'status', CANCELLED, 'finished_at', t, 'updated_at', t,
  'error', ARGV[3])
redis.call('HDEL', KEYS[1], '_lease', '_lease_expires_at')
redis.call('XADD', KEYS[2], '*', 'type', 'done', 'data', ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[1])
redis.call('PUBLISH', KEYS[3], ARGV[2])
redis.call('ZREM', KEYS[6], ARGV[2])
""" + _fair_done("ARGV[2]", "KEYS[7]", "KEYS[8]") + _WEBHOOK_EVENT.replace("JOB", "ARGV[2]").replace(
    "STATUS", "CANCELLED") + """
return CANCELLED
"""

# Lua: change one field of a job record only while the record exists, so a late write
# (a worker still busy with a job the client just deleted) cannot leave a stub hash
# behind. ARGV: 'incr' or 'set', field, value. Returns the new count (incr), 1 (set), or
# false when the record is gone.
_UPDATE_IF_EXISTS = """
if redis.call('HEXISTS', KEYS[1], 'status') == 0 then return false end
if ARGV[1] == 'incr' then return redis.call('HINCRBY', KEYS[1], ARGV[2], 1) end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
return 1
"""

# Lua: give a running job back (worker shutting down): queued again, lease dropped.
_RELEASE = _lua_prelude() + """
if redis.call('HGET', KEYS[1], '_lease') ~= ARGV[1] then return 'lost' end
if redis.call('HGET', KEYS[1], 'status') ~= RUNNING then return 'done' end
redis.call('HSET', KEYS[1], 'status', QUEUED)
redis.call('HDEL', KEYS[1], '_lease', '_lease_expires_at')
redis.call('ZREM', KEYS[2], ARGV[2])
return 'ok'
"""

# Lua: the janitor's pick. Running jobs whose lease expired over ARGV[1] seconds ago, up to
# ARGV[2] of them; each one returned is re-scored to now, so every other worker's sweep
# skips it for another stale period (this is what makes the sweep leader-free). Members
# that are no longer running are dropped. Returns id, requeues, lease expiry triples.
# Job keys are built here from ARGV[3] (the prefix): fine on one Redis, not on a cluster.
_PICK_STALE = _lua_prelude() + """
local t = now()
local cutoff = t - tonumber(ARGV[1])
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', cutoff, 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
for _, id in ipairs(ids) do
  local key = ARGV[3] .. id
  local st = redis.call('HGET', key, 'status')
  local untl = tonumber(redis.call('HGET', key, '_lease_expires_at') or '0')
  if st ~= RUNNING then
    redis.call('ZREM', KEYS[1], id)
  elseif untl > cutoff then
    redis.call('ZADD', KEYS[1], untl, id)
  else
    redis.call('ZADD', KEYS[1], t, id)
    table.insert(out, id)
    table.insert(out, redis.call('HGET', key, '_requeues') or '0')
    table.insert(out, tostring(untl))
  end
end
return out
"""

# Lua: the janitor's act on one stale job, only if it is still running on a lease that
# expired over ARGV[2] seconds ago (a worker may have taken it meanwhile). ARGV[1]
# 'requeue': back to queued (the caller has already sent a new message); 'fail': failed
# with the error ARGV[5] and the done event ARGV[6]. ARGV[3] ttl, ARGV[4] job id.
_ABANDON = _lua_prelude() + """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then redis.call('ZREM', KEYS[6], ARGV[4]) return 'missing' end
if st ~= RUNNING then return st end
local t = now()
local untl = tonumber(redis.call('HGET', KEYS[1], '_lease_expires_at') or '0')
if untl > t - tonumber(ARGV[2]) then return 'live' end
redis.call('HDEL', KEYS[1], '_lease', '_lease_expires_at')
redis.call('ZREM', KEYS[6], ARGV[4])
if ARGV[1] == 'requeue' then
  redis.call('HSET', KEYS[1], 'status', QUEUED, 'updated_at', t)
  return 'requeued'
end
redis.call('HSET', KEYS[1], 'status', FAILED, 'error', ARGV[5], 'finished_at', t,
  'updated_at', t)
redis.call('XADD', KEYS[2], '*', 'type', 'done', 'data', ARGV[6])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('PUBLISH', KEYS[3], ARGV[4])
""" + _fair_done("ARGV[4]", "KEYS[7]", "KEYS[8]") + _WEBHOOK_EVENT.replace("JOB", "ARGV[4]").replace(
    "STATUS", "FAILED") + """
return 'failed'
"""

# Lua: write a batch line's job record unless it exists (it was fed before a crash);
# returns 'created' or the status it has. ARGV: ttl, then field/value pairs.
_CREATE_LINE = """
local st = redis.call('HGET', KEYS[1], 'status')
if st then return st end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 'created'
"""


_CANCELLED_ERROR = jobs.JobError(code="cancelled", message="cancelled by the client")


@dataclass(frozen=True)
class StaleJob:
    """A running job whose lease expired long ago, as the janitor's pick returns it."""

    job_id: str
    requeues: int
    """How often a janitor has put it back on the queue already."""
    lease_until: float
    """When its last lease ran out (Unix seconds)."""


class Claim(NamedTuple):
    """What `Store.claim` found: 'ok' with the record now held, or why not (no record).

    `lease_left` is how long another worker's live lease still runs (state 'leased')."""

    state: str
    record: jobs.JobRecord | None
    lease_left: float = 0.0


class Store:
    """chatq's Redis: job records, events, idempotency and busy counts."""

    def __init__(self, client: aioredis.Redis, ttl_seconds: int,
                 events_client: aioredis.Redis | None = None) -> None:
        self.redis = client
        self.ttl = ttl_seconds
        # SSE readers block on their own pool: idle streams cannot starve plain requests
        # of connections, and their longer socket timeout covers the block.
        self.events = events_client or client
        self._claim = client.register_script(_CLAIM)
        self._renew = client.register_script(_RENEW)
        self._finish = client.register_script(_FINISH)
        self._cancel = client.register_script(_CANCEL)
        self._release = client.register_script(_RELEASE)
        self._update = client.register_script(_UPDATE_IF_EXISTS)
        self._pick_stale = client.register_script(_PICK_STALE)
        self._abandon = client.register_script(_ABANDON)
        self._create_line = client.register_script(_CREATE_LINE)

    @classmethod
    def from_settings(cls, cfg: settings_mod.RedisSettings) -> Store:
        """A Store with its own connection pools (plain calls, blocking event reads)."""
        return cls(redis_client.connect(cfg), cfg.results_ttl_seconds,
                   redis_client.connect(cfg, blocking_seconds=MAX_EVENTS_BLOCK_SECONDS))

    async def close(self) -> None:
        """Close the connection pools."""
        await self.redis.aclose()
        if self.events is not self.redis:
            await self.events.aclose()

    @redis_client.translate_errors
    async def ping(self) -> None:
        """Raise StoreUnavailable unless Redis answers."""
        await self.redis.ping()

    # --- the API's side ---------------------------------------------------------------

    @redis_client.translate_errors
    async def create(self, record: jobs.JobRecord) -> jobs.JobRecord:
        """Write a new job record (see JobRecord.queued); returns it."""
        # No MULTI: a fresh id has no readers yet, and one round trip is what matters here.
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(job_key(record.id), mapping=record.to_redis())  # type: ignore[arg-type]
            pipe.expire(job_key(record.id), self.ttl)
            await pipe.execute()
        return record

    @redis_client.translate_errors
    async def create_lines(self, owner: str, batch_id: str, lines: list[dict[str, str]],
                           simulated: bool) -> list[str]:
        """Write the job records of batch lines (each dict: id, custom_id, url, request,
        model, line) unless they exist; per line 'created' or the status it already has."""
        now = time.time()
        async with self.redis.pipeline(transaction=False) as pipe:
            for line in lines:
                fields = {"status": jobs.Status.QUEUED.value, "owner": owner, "created_at": now,
                          "updated_at": now, "attempts": 0, "batch_id": batch_id,
                          # Not "chat": a line's end is no webhook event; its batch's end is.
                          "kind": "batch_line",
                          "simulated": "1" if simulated else "0", **line}
                flat = [str(x) for pair in fields.items() for x in pair]
                await self._create_line(keys=[job_key(line["id"])], args=[self.ttl, *flat], client=pipe)
            replies = await pipe.execute()
        return [str(r) for r in replies]

    @redis_client.translate_errors
    async def get_many(self, job_ids: list[str]) -> list[jobs.JobRecord | None]:
        """Several job records in one round trip (None where missing)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hgetall(job_key(job_id))
            replies = await pipe.execute()
        return [jobs.JobRecord.from_redis(raw) if "status" in raw else None for raw in replies]

    @redis_client.translate_errors
    async def remember_idempotency(self, owner: str, key: str, fingerprint: str,
                                   job_id: str) -> tuple[str, str] | None:
        """Bind key to (fingerprint, job id) unless bound; returns the earlier binding."""
        name = idempotency_key(owner, key)
        if await self.redis.set(name, f"{fingerprint} {job_id}", nx=True, ex=self.ttl):
            return None
        value = cast(str | None, await self.redis.get(name))
        if value is None:  # expired between the two calls: bind again
            return await self.remember_idempotency(owner, key, fingerprint, job_id)
        earlier_fp, earlier_id = value.split(" ", 1)
        return earlier_fp, earlier_id

    @redis_client.translate_errors
    async def forget(self, job_id: str, owner: str = "", idem_key: str = "") -> None:
        """Remove a record the queue never got (enqueue failed)."""
        names = [job_key(job_id)]
        if idem_key:
            names.append(idempotency_key(owner, idem_key))
        await self.redis.delete(*names)

    @redis_client.translate_errors
    async def get(self, job_id: str) -> jobs.JobRecord | None:
        """The job record, or None when unknown or expired."""
        raw = cast(dict[str, str], await self.redis.hgetall(job_key(job_id)))
        return jobs.JobRecord.from_redis(raw) if "status" in raw else None

    @redis_client.translate_errors
    async def cancel(self, job_id: str) -> str:
        """Cancel unless terminal; returns the status after the call ('missing' if none)."""
        done = json.dumps({"status": jobs.Status.CANCELLED.value})
        return str(await self._cancel(
            keys=[job_key(job_id), events_key(job_id), DONE_CHANNEL, WEBHOOK_ON, WEBHOOK_EVENTS,
                  LEASES_KEY, FAIR_RELEASED, FAIR_INFLIGHT],
            args=[self.ttl, job_id, _CANCELLED_ERROR.model_dump_json(), done]))

    @redis_client.translate_errors
    async def delete(self, job_id: str) -> None:
        """Remove a job for good: cancelled first (so a worker stops and webhooks tell), then
        its record and events deleted; a worker still holding it finds it missing."""
        await self.cancel(job_id)
        await self.redis.delete(job_key(job_id), events_key(job_id))

    @redis_client.translate_errors
    async def read_events(self, job_id: str, after: str, block_ms: int,
                          count: int = 500) -> list[tuple[str, dict[str, str]]]:
        """Events after stream id `after`, waiting up to block_ms (at most
        MAX_EVENTS_BLOCK_SECONDS) for the first; 0 (the api's streams, which wait on
        chatq.wakeups instead) does not wait and holds a pooled connection for one reply."""
        block_ms = min(block_ms, int(MAX_EVENTS_BLOCK_SECONDS * 1000))
        client = self.events if block_ms else self.redis
        reply = cast(list[Any], await client.xread({events_key(job_id): after}, count=count,
                                                   block=block_ms or None))
        if not reply:
            return []
        return [(str(eid), dict(data)) for eid, data in reply[0][1]]

    # --- the worker's side -------------------------------------------------------------

    @redis_client.translate_errors
    async def claim(self, job_id: str, token: str, lease_seconds: float) -> Claim:
        """('ok', record) when this worker now holds the job; else (missing|leased|<terminal
        status>, None)."""
        reply = cast(list[Any], await self._claim(
            keys=[job_key(job_id), events_key(job_id), LEASES_KEY, tick_channel(job_id)],
            args=[token, lease_seconds, self.ttl, job_id]))
        if reply[0] == "leased":
            return Claim("leased", None, float(reply[1]))
        if reply[0] != "ok":
            return Claim(str(reply[0]), None)
        flat = reply[1]
        return Claim("ok", jobs.JobRecord.from_redis(dict(zip(flat[::2], flat[1::2],
                                                              strict=True))))

    @redis_client.translate_errors
    async def renew(self, job_id: str, token: str, lease_seconds: float) -> str:
        """'ok' when the lease was extended; 'cancelled', 'lost'... otherwise."""
        return str(await self._renew(keys=[job_key(job_id), LEASES_KEY],
                                     args=[token, lease_seconds, job_id]))

    @redis_client.translate_errors
    async def release(self, job_id: str, token: str) -> str:
        """Hand a running job back to the queue state (worker shutting down)."""
        return str(await self._release(keys=[job_key(job_id), LEASES_KEY], args=[token, job_id]))

    @redis_client.translate_errors
    async def start_attempt(self, job_id: str) -> int:
        """A retry of the model call begins: count it and tell stream readers."""
        attempt = await self._update(keys=[job_key(job_id)], args=["incr", "attempts", ""])
        if attempt is None:
            return 0  # deleted meanwhile: the next heartbeat stops this worker
        await self._add_event(job_id, {"type": "attempt",
                                       "data": json.dumps({"attempt": attempt})})
        return int(attempt)

    async def _add_event(self, job_id: str, fields: dict[str, str]) -> None:
        # One round trip: the event, then the tick that wakes the job's SSE streams.
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xadd(events_key(job_id), fields)  # type: ignore[arg-type]
            pipe.publish(tick_channel(job_id), "")
            await pipe.execute()

    @redis_client.translate_errors
    async def append_delta(self, job_id: str, text: str, attempt: int) -> None:
        """Add a token delta to the job's event stream."""
        data = json.dumps({"text": text, "attempt": attempt})
        # No EXPIRE here: claim() gave the stream its TTL and finish() renews it.
        await self._add_event(job_id, {"type": "delta", "data": data})

    @redis_client.translate_errors
    async def finish(self, job_id: str, token: str, outcome: jobs.Outcome) -> str:
        """Write the outcome once; 'ok', or why not (lost lease, already terminal...)."""
        flat = [x for pair in outcome.to_redis().items() for x in pair]
        return str(await self._finish(
            keys=[job_key(job_id), events_key(job_id), DONE_CHANNEL, WEBHOOK_ON, WEBHOOK_EVENTS,
                  LEASES_KEY, BATCH_PREFIX, FAIR_RELEASED, FAIR_INFLIGHT],
            args=[token, self.ttl, json.dumps(outcome.done_event()), job_id, *flat]))

    # --- the janitor's side ------------------------------------------------------------

    @redis_client.translate_errors
    async def pick_stale(self, stale_seconds: float, limit: int) -> list[StaleJob]:
        """Running jobs whose lease expired over stale_seconds ago; each is this caller's to
        act on until another stale period has passed."""
        flat = cast(list[str], await self._pick_stale(
            keys=[LEASES_KEY], args=[stale_seconds, limit, JOB_PREFIX]))
        return [StaleJob(flat[i], int(flat[i + 1]), float(flat[i + 2]))
                for i in range(0, len(flat), 3)]

    @redis_client.translate_errors
    async def count_requeue(self, job_id: str) -> int:
        """Count one more requeue of a stale job (before its new message is sent, so a
        worker that takes the job off that message at once cannot make it uncounted)."""
        return int(await self._update(keys=[job_key(job_id)], args=["incr", "_requeues", ""]) or 0)

    @redis_client.translate_errors
    async def abandon(self, job_id: str, stale_seconds: float, action: str,
                      error: jobs.JobError | None = None) -> str:
        """Requeue or fail a stale running job: 'requeued'|'failed', or why not ('live' when
        a worker renewed or took it meanwhile, or the status it has)."""
        error = error or jobs.JobError(code="abandoned", message="no worker finished the job")
        done = jobs.Outcome(status=jobs.Status.FAILED, error=error).done_event()
        return str(await self._abandon(
            keys=[job_key(job_id), events_key(job_id), DONE_CHANNEL, WEBHOOK_ON, WEBHOOK_EVENTS,
                  LEASES_KEY, FAIR_RELEASED, FAIR_INFLIGHT],
            args=[action, stale_seconds, self.ttl, job_id, error.model_dump_json(),
                  json.dumps(done)]))

    @redis_client.translate_errors
    async def note_budget_wait(self, job_id: str, seconds: float) -> None:
        """How long the job waited for the rate budget (shown with its timestamps)."""
        await self._update(keys=[job_key(job_id)],
                           args=["set", "budget_wait_seconds", f"{seconds:.3f}"])

    @redis_client.translate_errors
    async def report_busy(self, worker_id: str, in_flight: int, ttl_seconds: int,
                          capacity: int = 0) -> None:
        """Tell the operator how many jobs this worker holds, and the fair feeder (chatq.fair)
        how many it may hold, until the report expires."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(busy_key(worker_id), in_flight, ex=max(1, ttl_seconds))
            if capacity:
                pipe.hset(FAIR_CAPACITY, worker_id, f"{capacity} {time.time() + ttl_seconds:.0f}")
            await pipe.execute()

    @redis_client.translate_errors
    async def clear_busy(self, worker_id: str) -> None:
        """Remove a stopping worker's busy count."""
        await self.redis.delete(busy_key(worker_id))
        await self.redis.hdel(FAIR_CAPACITY, worker_id)
