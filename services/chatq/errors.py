"""chatq's own exceptions; third-party errors are translated into these at the boundary."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


class ChatqError(Exception):
    """Base of every chatq error."""


class TemporaryError(ChatqError):
    """Worth trying again after `delay` seconds (a 429, a 5xx, a timeout, an outage)."""

    #: Text the model streamed before the failure, and how many pieces of it.
    partial: str = ""
    streamed: int = 0

    def __init__(self, message: str, delay: float | None = None, code: str = "temporary",
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.delay = delay
        self.code = code
        self.headers = headers
        """The model's response headers, when it answered (its x-ratelimit-* for the budget)."""


class ModelUnavailable(TemporaryError):
    """The model cannot be reached or says it is overloaded: the job waits for it (handed
    back to the queue) instead of spending its attempts."""

    def __init__(self, message: str, delay: float | None = None,
                 code: str = "model_unavailable") -> None:
        super().__init__(message, delay, code)


class PermanentError(ChatqError):
    """Trying again will not help: record the failure and dead-letter the message."""

    #: Text the model streamed before the failure, kept on the failed job.
    partial: str = ""

    def __init__(self, message: str, code: str = "permanent") -> None:
        super().__init__(message)
        self.code = code


class StoreUnavailable(ChatqError):
    """Redis (or the queue) cannot be reached; the API answers 503."""


class MalformedMessage(PermanentError):
    """A queue message that is not a chatq job; it goes to dead-letter."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="malformed_message")


def translated(convert: Callable[[Exception], ChatqError | None]
               ) -> Callable[[Callable[P, Coroutine[Any, Any, R]]],
                             Callable[P, Coroutine[Any, Any, R]]]:
    """A decorator for a boundary's coroutines (Redis, SQS, S3): an exception that `convert`
    maps to one of ours is raised as that (`from None`, so the third party's traceback stays
    out of logs); anything it maps to None goes up unchanged."""

    def decorate(fn: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return await fn(*args, **kwargs)
            except Exception as exc:
                ours = convert(exc)
                if ours is None:
                    raise
                raise ours from None

        return wrapper

    return decorate


async def rounds(step: Callable[[], Awaitable[object]], every: float, what: str,
                 log: logging.Logger) -> None:
    """Run `step` every `every` seconds until cancelled. One of our errors (Redis or the
    queue away) is logged and retried with a backoff doubling up to 5 s, so an outage
    never ends a background loop."""
    delay = every
    while True:
        try:
            await step()
            delay = every
        except ChatqError as exc:
            log.warning("%s: %s (retrying in %.1fs)", what, exc, delay)
            delay = min(5.0, delay * 2)
        await asyncio.sleep(delay)
