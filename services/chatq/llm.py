"""The model: an OpenAI-compatible chat API through the openai SDK, and process_query().

openai's own errors are translated here: 429, 5xx, timeouts and connection errors become
TemporaryError (with the server's retry-after), everything else PermanentError.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import openai

from chatq import errors, jobs, metrics
from chatq import settings as settings_mod

log = logging.getLogger(__name__)


@dataclass
class Answer:
    """What the model said, and what it cost."""

    text: str
    model: str
    usage: dict[str, int]
    model_seconds: float
    """Time spent in model calls, retries' waits included."""


class Sink(Protocol):
    """Where process_query sends the answer as it is produced."""

    async def delta(self, text: str) -> None:
        """Another piece of the answer."""

    async def restart(self, attempt: int) -> None:
        """An attempt failed; what was sent so far is void."""


def retry_after_seconds(headers: Mapping[str, str] | None) -> float | None:
    """The server's `retry-after` (seconds or retry-after-ms), if it gave one."""
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value:
            try:
                return float(value) * scale
            except ValueError:
                return None  # an HTTP date: fall back to our own backoff
    return None


def translate(exc: Exception) -> errors.ChatqError:
    """An openai SDK error as ours."""
    if isinstance(exc, openai.APITimeoutError | asyncio.TimeoutError):
        return errors.TemporaryError("the model did not answer in time", code="model_timeout")
    if isinstance(exc, openai.APIConnectionError):
        return errors.TemporaryError(f"cannot reach the model: {exc}", code="model_unreachable")
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        delay = retry_after_seconds(exc.response.headers)
        message = f"the model answered {status}: {_short(exc)}"
        if status == 429:
            return errors.TemporaryError(message, delay=delay, code="model_rate_limited")
        if status >= 500 or status == 408:
            return errors.TemporaryError(message, delay=delay, code="model_unavailable")
        return errors.PermanentError(message, code=f"model_error_{status}")
    return errors.PermanentError(f"model call failed: {exc}", code="model_error")


def _short(exc: openai.APIStatusError) -> str:
    body: Any = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and "message" in inner:
            return str(inner["message"])[:300]
    return str(exc.message)[:300]


class Llm:
    """An AsyncOpenAI client set up from settings."""

    def __init__(self, settings: settings_mod.Settings) -> None:
        self.cfg = settings.llm
        self.default_model = settings.llm_model
        self.simulated = settings.uses_simulator
        self.client = openai.AsyncOpenAI(
            base_url=settings.llm_base_url, api_key=settings.llm.api_key or "none",
            max_retries=0,  # retries are ours: they honour retry-after and count attempts
            timeout=settings.llm.timeout_seconds,
        )
        # The SDK imports its resources on first use; do it now, not in the first job.
        self._completions = self.client.chat.completions

    async def close(self) -> None:
        """Close the HTTP connections."""
        await self.client.close()

    async def stream_once(self, request: jobs.ChatRequest, sink: Sink) -> Answer:
        """One streamed model call, no retries."""
        model = request.model or self.default_model
        kwargs: dict[str, Any] = {"max_tokens": request.max_tokens or self.cfg.max_tokens}
        if request.temperature is not None:
            kwargs["temperature"] = request.temperature
        started = time.monotonic()
        parts: list[str] = []
        usage: dict[str, int] = {}
        first = True
        outcome = "error"
        try:
            async with asyncio.timeout(self.cfg.timeout_seconds):
                # The SDK's overloads want TypedDict messages; ours are plain dicts of them.
                stream = await self._completions.create(  # type: ignore[call-overload]
                    model=model, messages=request.chat_messages(),
                    stream=True, stream_options={"include_usage": True}, **kwargs)
                async for chunk in stream:
                    if chunk.usage is not None:
                        usage = {"prompt_tokens": chunk.usage.prompt_tokens,
                                 "completion_tokens": chunk.usage.completion_tokens,
                                 "total_tokens": chunk.usage.total_tokens}
                    if chunk.model:
                        model = chunk.model
                    for choice in chunk.choices:
                        text = choice.delta.content if choice.delta else None
                        if text:
                            if first:
                                metrics.model_ttft.labels(model).observe(time.monotonic() - started)
                                first = False
                            parts.append(text)
                            await sink.delta(text)
            outcome = "ok"
        except (TimeoutError, openai.OpenAIError) as exc:
            raise translate(exc) from None
        finally:
            metrics.model_latency.labels(model, outcome).observe(time.monotonic() - started)
        for kind in ("prompt_tokens", "completion_tokens"):
            if kind in usage:
                metrics.tokens.labels(model, kind.removesuffix("_tokens")).inc(usage[kind])
        return Answer("".join(parts), model, usage, time.monotonic() - started)


async def process_query(llm: Llm, request: jobs.ChatRequest, sink: Sink) -> Answer:
    """Turn a request into an answer: the model call, retried on transient errors.

    Retries wait with jittered exponential backoff that honours the server's retry-after;
    after `max_attempts` the last TemporaryError is raised. PermanentError is raised at once.
    """
    started = time.monotonic()
    cfg = llm.cfg
    for attempt in range(1, cfg.max_attempts + 1):
        if attempt > 1:
            await sink.restart(attempt)
        try:
            answer = await llm.stream_once(request, sink)
            answer.model_seconds = time.monotonic() - started
            return answer
        except errors.TemporaryError as exc:
            if attempt == cfg.max_attempts:
                raise
            delay = jobs.backoff_delay(attempt, cfg.backoff_base_seconds, cfg.backoff_max_seconds,
                                       exc.delay, random.random())
            metrics.model_retries.labels(exc.code).inc()
            log.info("model call failed (%s), attempt %d of %d, retrying in %.2fs",
                     exc.code, attempt, cfg.max_attempts, delay)
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")
