"""The model: an OpenAI-compatible chat API through the openai SDK, and process_query().

Model errors are classified by what they mean, not by the SDK's class alone (`classify`,
a pure function): an error event inside a 200 stream (llama.cpp sends
`data: {"error": {"code": 500, ...}}`) carries its code, so a 500 there is as temporary as
a 500 status; a prompt over the context is permanent, `context_length_exceeded`, while an
answer that runs into the context after streaming is a truncation (`finish_reason:
"length"`), not a failure; an unreachable or overloaded model (connection refused,
502/503/504) is `ModelUnavailable`: the job waits for it rather than spending attempts.

A stream must end with a finish_reason and have text; one that stops without either was
cut (some servers end a running stream when another request arrives) and is retried.
Three clocks bound a streamed call: the first token, the silence between tokens, and
(optionally) the whole answer, so a slow but steady model is never cut off.
A server that sends no usage gets it counted here (its /tokenize when it has one, else
about four characters a token), and the usage is marked estimated.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
import openai

from chatq import errors, jobs, metrics, telemetry
from chatq import settings as settings_mod

log = logging.getLogger(__name__)

#: How a context-length refusal reads on OpenAI, vLLM, llama.cpp and Ollama.
_CONTEXT = re.compile(r"context[ _](length|size|window)|maximum context|exceeds? the available "
                      r"context|prompt is too long", re.IGNORECASE)


@dataclass
class Answer:
    """What the model said, how it ended, and what it cost."""

    text: str
    model: str
    """The model name the server reported (it may differ from the one asked for)."""
    usage: dict[str, int]
    model_seconds: float
    """Time spent in model calls, retries' waits included."""
    finish_reason: str | None = None
    """The model's own: `stop`, `length` (cut by max_tokens or the context)..."""
    usage_estimated: bool = False
    """True when the server sent no usage and chatq counted the tokens itself."""
    headers: dict[str, str] = field(default_factory=dict)
    """The call's response headers (the provider's x-ratelimit-*, for the rate budget)."""


class CallBudget(Protocol):
    """The rate budget, asked before each model call and told how it went (budget.JobBudget)."""

    async def before_call(self, attempt: int) -> None:
        """Wait until the budget allows another call."""

    async def after_call(self, answer: Answer | None, error: errors.ChatqError | None) -> None:
        """The call ended: with an answer, or with an error."""


class _Unlimited:
    """No budget: every call may go at once."""

    async def before_call(self, attempt: int) -> None:
        return None

    async def after_call(self, answer: Answer | None, error: errors.ChatqError | None) -> None:
        return None


class Sink(Protocol):
    """Where process_query sends the answer as it is produced."""

    async def delta(self, text: str) -> None:
        """Another piece of the answer."""

    async def restart(self, attempt: int) -> None:
        """An attempt failed; what was sent so far is void."""

    def attempt_failed(self, attempt: int, error: errors.ChatqError) -> None:
        """Attempt `attempt` ended with `error` (kept on the job, so attempts say why)."""


class Health(Protocol):
    """The model's health as all workers see it (chatq.breaker's circuit breaker)."""

    async def failure(self, error: errors.TemporaryError) -> bool:
        """A call failed with a server error or an outage; True when the model is now down."""

    async def success(self) -> None:
        """A call succeeded: the model is up."""


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


def classify(status: int | None, code: str | None, kind: str | None, message: str) -> tuple[str, str]:
    """What a model error means: (verdict, chatq's error code).

    `status` is the HTTP status (None for an error event inside a stream, whose `code` may
    hold one); verdicts: `context` (the prompt does not fit), `unavailable` (the model is
    down or overloaded), `temporary` (worth retrying), `permanent`.
    """
    if status is None and code is not None and code.isdigit():
        status = int(code)
    if status == 429:
        return "temporary", "model_rate_limited"
    if (code == "context_length_exceeded" or kind == "exceed_context_size_error"
            or _CONTEXT.search(message)):
        if status is not None and status >= 500:
            # Not this prompt's fault: the server ran out of room mid-answer, in a KV cache
            # it shares with other requests (llama.cpp's unified cache); alone it may fit.
            return "temporary", "model_context_full"
        return "context", "context_length_exceeded"
    if status is None:
        # An error event with no status: the server failed mid-answer.
        return "temporary", "model_stream_error"
    if status in (502, 503, 504):
        return "unavailable", "model_unavailable"
    if status >= 500 or status == 408:
        return "temporary", "model_server_error"
    return "permanent", f"model_error_{status}"


def translate(exc: Exception) -> errors.TemporaryError | errors.PermanentError:
    """An openai SDK error as ours (a context-length error becomes PermanentError)."""
    if isinstance(exc, openai.APITimeoutError | asyncio.TimeoutError):
        return errors.TemporaryError("the model did not answer in time", code="model_timeout")
    if isinstance(exc, openai.APIConnectionError):
        return errors.ModelUnavailable(f"cannot reach the model: {exc}")
    if not isinstance(exc, openai.APIError):
        return errors.PermanentError(f"model call failed: {exc}", code="model_error")
    status = exc.status_code if isinstance(exc, openai.APIStatusError) else None
    headers = exc.response.headers if isinstance(exc, openai.APIStatusError) else None
    message = _short(exc)
    verdict, code = classify(status, exc.code, exc.type, message)
    said = f"the model answered {status}" if status else "the model's stream reported an error"
    if verdict == "context":
        return errors.PermanentError(
            f"the conversation does not fit the model's context ({message}): shorten it, "
            "lower max_tokens or use a model with a longer context", code=code)
    if verdict == "unavailable":
        return errors.ModelUnavailable(f"{said}: {message}", delay=retry_after_seconds(headers))
    if verdict == "temporary":
        return errors.TemporaryError(f"{said}: {message}", delay=retry_after_seconds(headers),
                                     code=code, headers=dict(headers or {}))
    return errors.PermanentError(f"{said}: {message}", code=code)


def _short(exc: openai.APIError) -> str:
    body: Any = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and "message" in inner:
            return str(inner["message"])[:300]
    return str(exc.message)[:300]


def estimate_tokens(text: str) -> int:
    """About four characters a token (OpenAI's rule of thumb), when no tokenizer answers."""
    return max(1, round(len(text) / 4)) if text else 0


class Llm:
    """An AsyncOpenAI client set up from settings."""

    def __init__(self, settings: settings_mod.Settings) -> None:
        self.cfg = settings.llm
        self.default_model = settings.llm_model
        self.simulated = settings.uses_simulator
        base = settings.llm_base_url
        # The streaming clocks are ours (stream_once); the SDK's timeout only backs them up.
        backstop = max(self.cfg.first_token_seconds, self.cfg.idle_seconds) + 5
        self.client = openai.AsyncOpenAI(
            base_url=base, api_key=settings.llm.api_key or "none",
            max_retries=0,  # retries are ours: they honour retry-after and count attempts
            timeout=backstop,
        )
        # llama.cpp and vLLM serve /tokenize beside /v1; OpenAI has none.
        self._tokenize_url: str | None = None
        if base:
            self._tokenize_url = re.sub(r"/v1/?$", "", base.rstrip("/")) + "/tokenize"
        self._http = httpx.AsyncClient(timeout=5.0)
        # The SDK imports its resources on first use; do it now, not in the first job.
        self._completions = self.client.chat.completions

    async def close(self) -> None:
        """Close the HTTP connections."""
        await self.client.close()
        await self._http.aclose()

    async def probe(self) -> None:
        """Ask the server whether it serves (GET /models); raise ModelUnavailable if not."""
        try:
            await self.client.models.list(timeout=self.cfg.probe_seconds)
        except openai.APIStatusError as exc:
            if exc.status_code in (404, 405):
                return  # it answers, it just has no model list
            raise errors.ModelUnavailable(f"the model answered {exc.status_code}") from None
        except openai.OpenAIError as exc:
            raise errors.ModelUnavailable(f"cannot reach the model: {exc}") from None

    async def count_tokens(self, text: str) -> int:
        """Tokens in `text` by the server's tokenizer when it has one, else estimated."""
        if self._tokenize_url and text:
            try:
                resp = await self._http.post(self._tokenize_url, json={"content": text})
                if resp.status_code == 200:
                    return len(resp.json()["tokens"])
                if resp.status_code in (404, 405):
                    self._tokenize_url = None  # no tokenizer here: do not ask again
            except (httpx.HTTPError, ValueError, KeyError, TypeError):
                pass
        return estimate_tokens(text)

    async def estimate_usage(self, messages: list[dict[str, str]], answer: str) -> dict[str, int]:
        """Usage counted by chatq, for a server that sent none."""
        # Chat templates add a few tokens per turn (ChatML: about four).
        prompt = sum([await self.count_tokens(m["content"]) + 4 for m in messages])
        completion = await self.count_tokens(answer)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    async def stream_once(self, request: jobs.ChatRequest, sink: Sink,
                          last_attempt: bool = True) -> Answer:
        """One streamed model call, no retries (`last_attempt`: none will follow)."""
        model = request.model or self.default_model
        kwargs: dict[str, Any] = {"max_tokens": request.max_tokens or self.cfg.max_tokens}
        if request.temperature is not None:
            kwargs["temperature"] = request.temperature
        messages = request.chat_messages()
        started = time.monotonic()
        got = _Reading(model)
        outcome = "error"
        clock = _Clocks(self.cfg, started)
        try:
            async with asyncio.timeout_at(clock.deadline()) as timer:
                stream = await self._open_stream(model, messages, kwargs)
                got.headers = dict(stream.response.headers)
                # Closed on the way out, cancelled or not: the server notices the closed
                # connection and stops generating (a garbage-collected stream closes late).
                async with stream:
                    async for chunk in stream:
                        for text in got.take(chunk if isinstance(chunk, dict)
                                             else chunk.to_dict()):
                            if not got.parts:
                                metrics.model_ttft.labels(got.model).observe(
                                    time.monotonic() - started)
                            got.parts.append(text)
                            await sink.delta(text)
                        clock.piece(bool(got.parts))
                        timer.reschedule(clock.deadline())
            outcome = "ok"
        except TimeoutError:
            raise _with_partial(clock.timeout_error(len(got.parts)), got.parts) from None
        except openai.OpenAIError as exc:
            error = translate(exc)
            if error.code == "model_context_full" and got.parts and last_attempt:
                # Out of retries: what was said stands, cut at the end of the context, as an
                # answer cut by max_tokens is.
                log.info("the answer ran out of context after %d pieces; kept as finish_reason "
                         "length", len(got.parts))
                got.finish, outcome = "length", "ok"
            else:
                raise _with_partial(error, got.parts) from None
        finally:
            metrics.model_latency.labels(got.model, outcome).observe(time.monotonic() - started)
        return await self._answer(got, messages, started)

    async def _open_stream(self, model: str, messages: list[dict[str, str]],
                           kwargs: dict[str, Any]) -> openai.AsyncStream[Any]:
        """The streamed call. Traced, through `chat.completions.create`, whose chunk objects
        the OpenAI instrumentation reads for its gen_ai span. Otherwise the same request
        through the same SDK client (transport, SSE decoding, errors: `client.post`, the
        SDK's way to any route), its chunks left as the JSON objects they arrive as:
        without a ChatCompletionChunk built per chunk a worker spends 16% less CPU an answer."""
        if telemetry.enabled():
            # The SDK's overloads want TypedDict messages; ours are plain dicts of them.
            return await self._completions.create(  # type: ignore[call-overload,no-any-return]
                model=model, messages=messages,
                stream=True, stream_options={"include_usage": True}, **kwargs)
        body = {"model": model, "messages": messages, "stream": True,
                "stream_options": {"include_usage": True}, **kwargs}
        return await self.client.post("/chat/completions", cast_to=object, body=body,
                                      stream=True, stream_cls=openai.AsyncStream[object])

    async def _answer(self, got: _Reading, messages: list[dict[str, str]],
                      started: float) -> Answer:
        """The Answer of a finished stream, or the TemporaryError of one that is not."""
        text, finish, usage = "".join(got.parts), got.finish, got.usage
        if finish is None:
            raise _with_partial(errors.TemporaryError(
                f"the model's stream ended without a finish_reason after {len(got.parts)} pieces "
                "(the server cut it)",
                code="model_stream_cut" if got.parts else "model_empty_stream"), got.parts)
        if not text:
            raise errors.TemporaryError(f"the model's answer was empty (finish_reason {finish})",
                                        code="model_empty_answer")
        estimated = not usage
        if estimated:
            usage = await self.estimate_usage(messages, text)
        for kind in ("prompt_tokens", "completion_tokens"):
            metrics.tokens.labels(got.model, kind.removesuffix("_tokens")).inc(usage.get(kind, 0))
        return Answer(text, got.model, usage, time.monotonic() - started, finish, estimated,
                      got.headers)


@dataclass
class _Reading:
    """What a stream has said so far."""

    model: str
    parts: list[str] = field(default_factory=list)
    usage: dict[str, int] = field(default_factory=dict)
    finish: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def take(self, chunk: Any) -> list[str]:
        """Note a chunk's model, usage and finish_reason (a chunk as its JSON object);
        return its pieces of text. Whatever is not the shape OpenAI's API gives is none."""
        if not isinstance(chunk, dict):
            return []
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.usage = {kind: n if isinstance(n := usage.get(kind), int) else 0
                          for kind in ("prompt_tokens", "completion_tokens", "total_tokens")}
        if isinstance(model := chunk.get("model"), str) and model:
            self.model = model
        texts = []
        choices = chunk.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            if not isinstance(choice, dict):
                continue
            self.finish = choice.get("finish_reason") or self.finish
            delta = choice.get("delta")
            text = delta.get("content") if isinstance(delta, dict) else None
            if isinstance(text, str) and text:
                texts.append(text)
        return texts


class _Clocks:
    """The three bounds of a streamed call, as one deadline that moves with each piece."""

    def __init__(self, cfg: settings_mod.LlmSettings, started: float) -> None:
        self.cfg = cfg
        self.started = started
        self.last = started
        self.has_text = False

    def piece(self, has_text: bool) -> None:
        """A chunk arrived (with text so far, or not yet)."""
        self.last = time.monotonic()
        self.has_text = has_text

    def deadline(self) -> float:
        """The event-loop time at which the call times out."""
        now_loop, now = asyncio.get_running_loop().time(), time.monotonic()
        if self.has_text:
            until = self.last + self.cfg.idle_seconds
        else:
            until = self.started + self.cfg.first_token_seconds
        if self.cfg.timeout_seconds:
            until = min(until, self.started + self.cfg.timeout_seconds)
        return now_loop + (until - now)

    def timeout_error(self, pieces: int) -> errors.TemporaryError:
        """Which bound ran out, said plainly."""
        now = time.monotonic()
        cfg = self.cfg
        if cfg.timeout_seconds and now - self.started >= cfg.timeout_seconds - 0.01:
            return errors.TemporaryError(
                f"the answer took longer than CHATQ_LLM_TIMEOUT_SECONDS={cfg.timeout_seconds:g}s "
                f"({pieces} pieces streamed)", code="model_answer_timeout")
        if not self.has_text:
            return errors.TemporaryError(
                f"no token within CHATQ_LLM_FIRST_TOKEN_SECONDS={cfg.first_token_seconds:g}s",
                code="model_first_token_timeout")
        return errors.TemporaryError(
            f"the model went silent for CHATQ_LLM_IDLE_SECONDS={cfg.idle_seconds:g}s after "
            f"{pieces} pieces", code="model_idle_timeout")


def _with_partial(error: errors.ChatqError, parts: list[str]) -> errors.ChatqError:
    if isinstance(error, errors.TemporaryError):
        error.partial, error.streamed = "".join(parts), len(parts)
    elif isinstance(error, errors.PermanentError):
        error.partial = "".join(parts)
    return error


async def process_query(llm: Llm, request: jobs.ChatRequest, sink: Sink,
                        health: Health | None = None, budget: CallBudget | None = None) -> Answer:
    """Turn a request into an answer: the model call, retried on transient errors.

    Retries wait with jittered exponential backoff that honours the server's retry-after;
    after `max_attempts` the last TemporaryError is raised. PermanentError is raised at once.
    With `health` (the workers' shared circuit breaker), an outage is not the job's
    failure: ModelUnavailable is raised at once for the worker to hand the job back, and so
    is any server error once the breaker says the model is down.
    An attempt that fails after `retry_streamed_tokens` pieces is not retried: the job fails
    with its partial answer, rather than having a long answer regenerated.
    With `budget` (the shared rate budget), each call waits for it and reports to it after.
    """
    started = time.monotonic()
    cfg = llm.cfg
    calls = budget or _Unlimited()
    limit, attempt = cfg.max_attempts, 0
    while attempt < limit:
        attempt += 1
        if attempt > 1:
            await sink.restart(attempt)
        await calls.before_call(attempt)
        try:
            answer = await llm.stream_once(request, sink, attempt == limit)
            await calls.after_call(answer, None)
            if health is not None:
                await health.success()
            answer.model_seconds = time.monotonic() - started
            return answer
        except errors.TemporaryError as exc:
            await calls.after_call(None, exc)
            sink.attempt_failed(attempt, exc)
            if health is not None and _counts_against_model(exc):
                down = await health.failure(exc)
                if isinstance(exc, errors.ModelUnavailable):
                    raise
                if down:
                    raise errors.ModelUnavailable(f"the model is down: {exc}") from None
            if cfg.retry_streamed_tokens and exc.streamed >= cfg.retry_streamed_tokens:
                final = errors.PermanentError(
                    f"{exc} (not retried: {exc.streamed} pieces had been streamed, "
                    f"CHATQ_LLM_RETRY_STREAMED_TOKENS={cfg.retry_streamed_tokens})", code=exc.code)
                final.partial = exc.partial
                raise final from None
            limit = _more_attempts(exc, limit, cfg.max_attempts)
            if attempt >= limit:
                raise
            delay = jobs.backoff_delay(attempt, cfg.backoff_base_seconds, cfg.backoff_max_seconds,
                                       exc.delay, random.random())
            metrics.model_retries.labels(exc.code).inc()
            log.info("model call failed (%s), attempt %d of %d, retrying in %.2fs",
                     exc.code, attempt, limit, delay)
            await asyncio.sleep(delay)
        except errors.PermanentError as exc:
            await calls.after_call(None, exc)
            sink.attempt_failed(attempt, exc)
            raise
    raise AssertionError("unreachable")


def _more_attempts(exc: errors.TemporaryError, limit: int, max_attempts: int) -> int:
    """The attempt budget after `exc`: a server whose shared cache filled before this answer
    said a word was busy, as with a 429, so that call is not counted (up to twice the
    budget, so a server that never has room still ends the job)."""
    if exc.code == "model_context_full" and not exc.streamed and limit < 2 * max_attempts:
        return limit + 1
    return limit


def _counts_against_model(exc: errors.TemporaryError) -> bool:
    """Outages and server errors say something about the model; a 429 or a timeout of one
    long answer does not."""
    return isinstance(exc, errors.ModelUnavailable) or exc.code in (
        "model_server_error", "model_stream_error")  # not model_context_full: that is load
