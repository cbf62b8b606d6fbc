"""Requests held open: long-polls and SSE streams, counted per API key in this process.

Each held request costs the api a connection, its buffers and a task while it waits (see
the README's "Guarantees" for the measured figures), so one key may hold at most
`CHATQ_API_MAX_HELD_PER_KEY` at once; the next is refused with 429 `too_many_held` and
Retry-After, before it holds anything. `HeldStream` is a StreamingResponse that gives its
hold back however its stream ends (finished, client gone, send timeout), even when the
stream never started.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from fastapi import HTTPException
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from chatq import metrics

RETRY_AFTER_SECONDS = 1


class Holds:
    """How many requests each key holds open here, capped at `per_key`."""

    def __init__(self, per_key: int) -> None:
        self.per_key = per_key
        self._held: dict[str, int] = {}

    def check(self, owner: str) -> None:
        """Raise the 429 now if owner could not hold one more (before work is done for it)."""
        if self._held.get(owner, 0) >= self.per_key:
            self.take(owner)

    def take(self, owner: str) -> None:
        """Count one more for owner, or raise the 429 that refuses it."""
        held = self._held.get(owner, 0)
        if held >= self.per_key:
            metrics.http_held_refused.inc()
            raise HTTPException(429, detail={
                "code": "too_many_held",
                "message": f"this API key holds {held} long-polls and streams open on this "
                           "server, its limit: close some, or poll without ?wait="},
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        self._held[owner] = held + 1
        metrics.http_held.inc()

    def give_back(self, owner: str) -> None:
        """One of owner's held requests ended."""
        held = self._held.get(owner, 0) - 1
        if held > 0:
            self._held[owner] = held
        else:
            self._held.pop(owner, None)
        metrics.http_held.dec()

    @contextlib.contextmanager
    def hold(self, owner: str) -> Iterator[None]:
        """Held for the block (a long-poll)."""
        self.take(owner)
        try:
            yield
        finally:
            self.give_back(owner)

    def stream(self, owner: str, content: Any, **kwargs: Any) -> HeldStream:
        """A streaming response held for its whole life (an SSE stream)."""
        self.take(owner)
        return HeldStream(content, release=lambda: self.give_back(owner), **kwargs)


class HeldStream(StreamingResponse):
    """A StreamingResponse that calls `release` once, when it is done with the client."""

    def __init__(self, content: Any, release: Any, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            release, self._release = self._release, None
            if release is not None:
                release()
