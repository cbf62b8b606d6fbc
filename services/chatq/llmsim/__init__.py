"""llmsim: an OpenAI-compatible chat server that simulates a model.

`/v1/chat/completions` (streaming and not) and `/v1/models`, with time to first token,
inter-token latency and answer length from settings, and error injection: 429 with
`retry-after`, 500, and hanging requests, by rate (settings) or per request by a directive
in the last user message, e.g. `llmsim:fail=429 llmsim:times=3` (the first three calls of
that conversation get 429) or `llmsim:ttft_ms=1000 llmsim:tokens=50`.

It also does what real servers were seen doing (llama.cpp's among them), so chatq's handling
of each is tested without one: `fail=midstream` streams `after` tokens (default: half) and
then an error event `data: {"error": {"code": 500, ...}}` inside the HTTP 200 stream;
`fail=cut` stops the stream after `after` tokens with no finish_reason and no `[DONE]`;
`fail=empty` sends a stream with no text and no finish_reason; `usage=none` leaves the
usage chunk out even when asked for it; an answer cut by `max_tokens` finishes with
`finish_reason: "length"`; `context=N` gives the model an N-token context: a longer prompt
is refused with OpenAI's 400 `context_length_exceeded`, and an answer that reaches it ends
with `length`. `/tokenize` counts tokens the way llmsim does (words), as llama.cpp's does.
With `CHATQ_LLMSIM_RPM` / `_TPM` it limits like a provider (`RateLimiter`): every answer
carries OpenAI's `x-ratelimit-*` headers, and a call over the limit gets 429 with
`retry-after` / `retry-after-ms`. Every answer says that it came from the simulator.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from chatq import settings as settings_mod

PREFIX = "[simulated answer from llmsim]"
_DIRECTIVE = re.compile(r"llmsim:(\w+)=([\w.]+)")
#: Failures that happen inside an HTTP 200 stream rather than as an error status.
STREAM_FAILURES = ("midstream", "cut", "empty")
_WORDS = ("the quick model considers your question and answers it with care while "
          "every token arrives after a short simulated pause so that streaming clients "
          "see the answer grow word by word").split()


def directives(messages: list[dict[str, Any]]) -> dict[str, str]:
    """`llmsim:key=value` pairs of the last user message."""
    for m in reversed(messages):
        if m.get("role") == "user":
            return dict(_DIRECTIVE.findall(str(m.get("content", ""))))
    return {}


def answer_tokens(messages: list[dict[str, Any]], count: int) -> list[str]:
    """The simulated answer, as `count` tokens: deterministic for a conversation."""
    seed = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).digest()
    rng = random.Random(seed)
    words = [PREFIX] + [rng.choice(_WORDS) for _ in range(max(0, count - 1))]
    return [w if i == 0 else " " + w for i, w in enumerate(words[:count])]


def _error(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}},
                        status_code=status, headers=headers)


def _duration(seconds: float) -> str:
    """OpenAI's reset format: `1m2.5s`, `340ms`."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{rest:.3g}s" if minutes else f"{rest:.3g}s"


class RateLimiter:
    """A provider's RPM/TPM limit: two buckets of one minute's worth, refilled continuously.

    A call holds prompt + max_tokens while it runs and is charged its real usage when it
    ends (the reservation model chatq's budget uses too, so honest clients see no 429).
    """

    def __init__(self, rpm: int | None, tpm: int | None) -> None:
        self.rpm, self.tpm = rpm, tpm
        self.req, self.tok = float(rpm or 0), float(tpm or 0)
        self.ts = time.monotonic()
        self.limited = 0

    @property
    def active(self) -> bool:
        return bool(self.rpm or self.tpm)

    def _refill(self) -> None:
        now = time.monotonic()
        dt, self.ts = now - self.ts, now
        if self.rpm:
            self.req = min(self.rpm, self.req + self.rpm * dt / 60)
        if self.tpm:
            self.tok = min(self.tpm, self.tok + self.tpm * dt / 60)

    def admit(self, cost: int) -> float:
        """Take one request and `cost` tokens: 0 when admitted, else the seconds to wait."""
        self._refill()
        wait = 0.0
        if self.rpm and self.req < 1:
            wait = max(wait, (1 - self.req) * 60 / self.rpm)
        if self.tpm and self.tok < min(cost, self.tpm):
            wait = max(wait, (min(cost, self.tpm) - self.tok) * 60 / self.tpm)
        if wait > 0:
            self.limited += 1
            return wait
        if self.rpm:
            self.req -= 1
        if self.tpm:
            self.tok -= cost
        return 0.0

    def settle(self, reserved: int, used: int) -> None:
        """The call ended having used `used` tokens of the `reserved`."""
        if self.tpm:
            self._refill()
            self.tok = min(self.tpm, self.tok + reserved - used)

    def headers(self) -> dict[str, str]:
        """OpenAI's six x-ratelimit-* headers, as of now."""
        self._refill()
        out: dict[str, str] = {}
        for kind, limit, level in (("requests", self.rpm, self.req), ("tokens", self.tpm, self.tok)):
            if limit:
                out[f"x-ratelimit-limit-{kind}"] = str(limit)
                out[f"x-ratelimit-remaining-{kind}"] = str(max(0, int(level)))
                out[f"x-ratelimit-reset-{kind}"] = _duration((limit - level) * 60 / limit)
        return out


class Simulator:
    """The simulated model: timing, answers and injected failures."""

    def __init__(self, cfg: settings_mod.LlmsimSettings) -> None:
        self.cfg = cfg
        # Calls seen per conversation, for `llmsim:times=N` (bounded memory).
        self.calls: OrderedDict[str, int] = OrderedDict()
        self.stats = {"requests": 0, "failed": 0, "rate_limited": 0}
        self.limiter = RateLimiter(cfg.rpm, cfg.tpm)

    def failure(self, messages: list[dict[str, Any]], d: dict[str, str]) -> str | None:
        """Which failure to inject for this call, if any: '429', '500', 'hang', a status."""
        fail = d.get("fail")
        if fail:
            key = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()
            self.calls[key] = seen = self.calls.get(key, 0) + 1
            self.calls.move_to_end(key)
            while len(self.calls) > 100_000:
                self.calls.popitem(last=False)
            return None if "times" in d and seen > int(d["times"]) else fail
        roll, cfg = random.random(), self.cfg
        for kind, rate in (("429", cfg.error_rate_429), ("500", cfg.error_rate_500),
                           ("hang", cfg.hang_rate)):
            if roll < rate:
                return kind
            roll -= rate
        return None

    async def fail(self, failure: str) -> Response:
        self.stats["failed"] += 1
        if failure == "hang":
            await asyncio.sleep(3600)
        if failure == "429":
            return _error(429, "rate limited by llmsim", "rate_limit_error",
                          {"retry-after": str(self.cfg.retry_after_seconds)})
        status = int(failure) if failure.isdigit() else 500
        return _error(status, f"llmsim injected a {status}",
                      "server_error" if status >= 500 else "invalid_request_error")

    def limit(self, reserved: int) -> dict[str, str] | Response:
        """The x-ratelimit-* headers of an admitted call, or the 429 of a refused one."""
        if not self.limiter.active:
            return {}
        wait = self.limiter.admit(reserved)
        limits = self.limiter.headers()
        if wait <= 0:
            return limits
        self.stats["rate_limited"] += 1
        return _error(429, "Rate limit reached (llmsim's RPM/TPM limit)", "requests",
                      {**limits, "retry-after": str(math.ceil(wait)),
                       "retry-after-ms": str(math.ceil(wait * 1000))})

    async def complete(self, body: dict[str, Any]) -> Response:
        """One /v1/chat/completions call."""
        self.stats["requests"] += 1
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return _error(400, "'messages' must be a non-empty list", "invalid_request_error")
        d = directives(messages)
        failure = self.failure(messages, d)
        stream_failure = failure if failure in STREAM_FAILURES and body.get("stream") else None
        if failure is not None and stream_failure is None:
            return await self.fail(failure)
        ttft = float(d.get("ttft_ms", self.cfg.ttft_ms)) / 1000
        itl = float(d.get("itl_ms", self.cfg.itl_ms)) / 1000
        count = int(d.get("tokens", self.cfg.tokens))
        prompt_tokens = sum(count_tokens(str(m.get("content", ""))) for m in messages)
        reserved = prompt_tokens + int(body.get("max_tokens") or self.cfg.tokens)
        limits = self.limit(reserved)
        if isinstance(limits, Response):
            return limits
        finish = "stop"
        if "context" in d:
            room = int(d["context"]) - prompt_tokens
            if room <= 0:
                return _context_error(prompt_tokens, int(d["context"]))
            if count > room:
                count, finish = room, "length"
        if body.get("max_tokens") and int(body["max_tokens"]) < count:
            count, finish = int(body["max_tokens"]), "length"
        tokens = answer_tokens(messages, max(1, count))
        model = body.get("model") or settings_mod.SIMULATOR_MODEL
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(tokens),
                 "total_tokens": prompt_tokens + len(tokens)}
        head = {"id": f"chatcmpl-{uuid.uuid4().hex[:20]}", "created": int(time.time()),
                "model": model}
        def settle() -> None:
            if self.limiter.active:
                self.limiter.settle(reserved, usage["total_tokens"])

        if not body.get("stream"):
            try:
                await asyncio.sleep(ttft + itl * (len(tokens) - 1))
            finally:
                settle()
            return JSONResponse({**head, "object": "chat.completion", "usage": usage, "choices": [
                {"index": 0, "finish_reason": finish,
                 "message": {"role": "assistant", "content": "".join(tokens)}}]}, headers=limits)
        with_usage = (bool((body.get("stream_options") or {}).get("include_usage"))
                      and d.get("usage") != "none")
        plan = StreamPlan(tokens, finish, ttft, itl, usage if with_usage else None,
                          stream_failure, int(d.get("after", len(tokens) // 2)))
        if stream_failure is not None:
            self.stats["failed"] += 1
        return StreamingResponse(_settled(_stream(head, plan), settle),
                                 media_type="text/event-stream", headers=limits)


def count_tokens(text: str) -> int:
    """llmsim's tokenizer: one token per word."""
    return len(text.split())


def _context_error(prompt_tokens: int, context: int) -> Response:
    # The shape OpenAI (and vLLM, in its own words) answers a prompt over the context with.
    return JSONResponse({"error": {
        "message": f"This model's maximum context length is {context} tokens. However, your "
                   f"messages resulted in {prompt_tokens} tokens.",
        "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}},
        status_code=400)


@dataclass
class StreamPlan:
    """What one streamed answer does: its tokens and timing, and how it ends."""

    tokens: list[str]
    finish: str
    ttft: float
    itl: float
    usage: dict[str, int] | None
    failure: str | None
    """None, or one of STREAM_FAILURES."""
    after: int
    """Tokens sent before a `midstream` or `cut` failure."""


async def _stream(head: dict[str, Any], plan: StreamPlan) -> AsyncIterator[bytes]:
    def chunk(delta: dict[str, Any], finish: str | None = None,
              use: dict[str, int] | None = None) -> bytes:
        data = {**head, "object": "chat.completion.chunk", "usage": use,
                "choices": [] if use else [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return b"data: " + json.dumps(data).encode() + b"\n\n"

    await asyncio.sleep(plan.ttft)
    if plan.failure == "empty":
        yield chunk({"role": "assistant", "content": ""})
        yield b"data: [DONE]\n\n"
        return
    for i, token in enumerate(plan.tokens):
        if plan.failure in ("midstream", "cut") and i == plan.after:
            if plan.failure == "midstream":
                # As llama.cpp's server does: an error object as an event of the 200 stream.
                error = {"code": 500, "message": "llmsim injected a mid-stream error",
                         "type": "server_error"}
                yield b"data: " + json.dumps({"error": error}).encode() + b"\n\n"
            return  # cut: the connection just ends
        if i:
            await asyncio.sleep(plan.itl)
        yield chunk({"content": token} if i else {"role": "assistant", "content": token})
    yield chunk({}, plan.finish)
    if plan.usage is not None:
        yield chunk({}, None, plan.usage)
    yield b"data: [DONE]\n\n"


async def _settled(stream: AsyncIterator[bytes], settle: Callable[[], None]
                   ) -> AsyncIterator[bytes]:
    """The stream, then the rate limiter told what it used (however the stream ends)."""
    try:
        async for piece in stream:
            yield piece
    finally:
        settle()


def create_app(cfg: settings_mod.LlmsimSettings) -> FastAPI:
    """The llmsim ASGI app."""
    app = FastAPI(title="llmsim", description="An OpenAI-compatible model simulator.")
    sim = Simulator(cfg)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", **sim.stats}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": settings_mod.SIMULATOR_MODEL, "object": "model",
                                            "created": 0, "owned_by": "llmsim"}]}

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        # llama.cpp's route and shape: {"content": text} -> {"tokens": [ids]}.
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the body is not JSON", "invalid_request_error")
        content = body.get("content") if isinstance(body, dict) else None
        if not isinstance(content, str):
            return _error(400, "'content' must be a string", "invalid_request_error")
        return JSONResponse({"tokens": list(range(count_tokens(content)))})

    @app.post("/v1/chat/completions")
    async def completions(request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the body is not JSON", "invalid_request_error")
        if not isinstance(body, dict):
            return _error(400, "the body must be a JSON object", "invalid_request_error")
        return await sim.complete(body)

    return app
