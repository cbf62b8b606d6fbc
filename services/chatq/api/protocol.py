"""The api's HTTP/1.1 protocol: uvicorn's httptools protocol with two limits it lacks.

uvicorn bounds the idle time between requests (`timeout_keep_alive`) but not the time a
client takes to send a request's headers, nor their size (`h11_max_incomplete_event_size`
exists only for the slower h11 parser). A client that dribbles a header line byte by byte
(slowloris), or sends headers for ever, would hold its connection and grow its header list
without end. Here, as nginx's `client_header_timeout` and `large_client_header_buffers` do:

- headers must be complete within `header_timeout` of the connection opening or of the
  first byte of the next request on it; past that, 408 and the connection is closed;
- the request line and headers together may be at most `max_header_bytes`; past that,
  431 and the connection is closed;
- a response may wait at most `send_timeout` for a client that stopped reading (its
  socket's buffers full, uvicorn's writes paused): past that the connection is aborted,
  as nginx's `send_timeout` does, so an unread SSE stream or download holds no memory and
  no task for longer.

Bodies are bounded apart (CHATQ_API_MAX_BODY_BYTES, the middleware's 413).
"""

from __future__ import annotations

import asyncio

import httptools
from uvicorn.protocols.http import httptools_impl

from chatq import metrics
from chatq import settings as settings_mod


class GuardedHttpToolsProtocol(httptools_impl.HttpToolsProtocol):
    """HttpToolsProtocol with a header deadline and a header size cap (class attributes,
    set per app by `protocol_for`)."""

    header_timeout: float = 10.0
    max_header_bytes: int = 32 * 1024

    send_timeout: float = 30.0

    _header_timer: asyncio.TimerHandle | None = None
    _send_timer: asyncio.TimerHandle | None = None
    _header_bytes: int = 0
    _refusal: int = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_timer is None:
            self._send_timer = self.loop.call_later(self.send_timeout, self._client_gone)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _client_gone(self) -> None:
        # The buffered bytes will never be read: drop them, and uvicorn's connection_lost
        # tells the app (http.disconnect) so its stream ends.
        self._send_timer = None
        metrics.http_send_timeouts.inc()
        self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.cycle is None or self.cycle.response_complete:
            self._arm()  # the first bytes of a new request: its headers are on the clock
        super().data_received(data)

    def on_message_begin(self) -> None:
        self._header_bytes = 0
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def send_400_response(self, msg: str) -> None:
        # The parser stops at the first callback that raises; uvicorn answers that with a
        # 400, which here is our own refusal when one was made.
        if self._refusal == 431:
            self._refuse(431, "request headers too large")
        else:
            super().send_400_response(msg)

    def _count(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > self.max_header_bytes:
            self._refusal = 431
            raise httptools.HttpParserError("request headers too large")

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_late)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self._refuse(408, "request headers not received in time")

    def _refuse(self, status: int, msg: str) -> None:
        # Counted with the requests the app answered, on no route (it never saw them).
        metrics.http_requests.labels("unknown", "unmatched", str(status)).inc()
        body = msg.encode()
        self.transport.write(b"".join([
            httptools_impl.STATUS_LINE[status],
            b"content-type: text/plain; charset=utf-8\r\n",
            b"content-length: ", str(len(body)).encode(), b"\r\n",
            b"connection: close\r\n\r\n", body]))
        self.transport.close()


def protocol_for(cfg: settings_mod.ApiSettings) -> type[GuardedHttpToolsProtocol]:
    """The protocol class uvicorn runs (`http=`), with this api's limits."""
    return type("ChatqHttpProtocol", (GuardedHttpToolsProtocol,), {
        "header_timeout": cfg.header_timeout_seconds, "max_header_bytes": cfg.max_header_bytes,
        "send_timeout": cfg.send_timeout_seconds})
