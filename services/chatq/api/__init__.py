"""The HTTP API: `create_app(settings)` builds the FastAPI app; `chatq api` serves it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatq import (
    catalog,
    dispatcher,
    errors,
    fair,
    feeder,
    filestore,
    metrics,
    quotas,
    results,
    telemetry,
    wakeups,
    webhooks,
)
from chatq import settings as settings_mod
from chatq.api import auth, deps, held, openai_errors
from chatq.api.routes import batches, chat, files, health, responses
from chatq.api.routes import webhooks as webhook_routes
from chatq.queues import open_queue

log = logging.getLogger(__name__)

_ERROR_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
                409: "conflict", 413: "too_large", 422: "invalid_request", 429: "too_many_requests",
                503: "unavailable"}


def _error(status: int, code: str, message: str, headers: Mapping[str, str] | None = None,
           path: str = "") -> JSONResponse:
    """chatq's error shape, or OpenAI's on the routes that speak its protocol."""
    if openai_errors.is_openai_path(path):
        return openai_errors.from_chatq(status, code, message, headers)
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status,
                        headers=headers)


#: Response headers a browser page may read (CORS), beyond the CORS-safelisted ones.
CORS_EXPOSED = ["Location", "Retry-After", "Idempotent-Replayed", "x-ratelimit-limit-requests",
                "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
                "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens",
                "x-ratelimit-reset-tokens"]


class BodyTooLarge(Exception):
    """The request body passed CHATQ_API_MAX_BODY_BYTES."""


class LimitsAndMetrics:
    """Pure ASGI middleware: request-size limit (413) and per-route Prometheus metrics."""

    def __init__(self, app: ASGIApp, max_body: int, upload_paths: tuple[str, ...] = ()) -> None:
        self.app = app
        self.max_body = max_body
        # Uploads (POST /v1/files) hold their own, larger limit while they stream.
        self.upload_paths = upload_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["method"] == "POST" and scope["path"] in self.upload_paths:
            await self._measured(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            await _error(413, "too_large", f"the request body is over {self.max_body} bytes",
                         path=scope.get("path", ""))(scope, receive, send)
            self._observe(scope, 413, 0.0)
            return
        seen, too_large, refused = 0, False, False

        async def limited_receive() -> Message:
            nonlocal seen, too_large
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body:
                too_large = True
                raise BodyTooLarge()
            return message

        async def refusing_send(message: Message) -> None:
            # A body without Content-Length passes the limit while the route reads it, and
            # FastAPI answers any failed body read with its own 400: the answer is our 413.
            nonlocal refused
            if not too_large:
                await send(message)
            elif not refused:
                refused = True
                await _error(413, "too_large", f"the request body is over {self.max_body} bytes",
                             path=scope.get("path", ""))(scope, receive, send)

        await self._measured(scope, limited_receive, refusing_send, lambda: too_large)

    async def _measured(self, scope: Scope, receive: Receive, send: Send,
                        refused: Callable[[], bool] = lambda: False) -> None:

        status = 500
        started = time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self._observe(scope, 413 if refused() else status, time.perf_counter() - started)

    @staticmethod
    def _observe(scope: Scope, status: int, seconds: float) -> None:
        route = scope.get("route")
        path = getattr(route, "path", "unmatched")
        metrics.http_requests.labels(scope["method"], path, str(status)).inc()
        metrics.http_latency.labels(scope["method"], path, str(status)).observe(seconds)


def _validation_message(exc: RequestValidationError) -> tuple[int, str, str]:
    problems = exc.errors()
    first = problems[0] if problems else {}
    if first.get("type") == "json_invalid":
        return 400, "invalid_json", "the request body is not valid JSON"
    if first.get("type") == "missing" and tuple(first.get("loc", ())) == ("body",):
        return 400, "empty_body", "the request needs a JSON body"
    parts = []
    for p in problems[:5]:
        where = ".".join(str(x) for x in p.get("loc", ()) if x != "body") or "body"
        parts.append(f"{where}: {p.get('msg', 'invalid')}")
    return 422, "invalid_request", "; ".join(parts)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail: Any = exc.detail
        path = request.url.path
        if isinstance(detail, dict) and "code" in detail:
            return _error(exc.status_code, detail["code"], detail["message"], exc.headers, path)
        return _error(exc.status_code, _ERROR_CODES.get(exc.status_code, "error"), str(detail),
                      exc.headers, path)

    @app.exception_handler(openai_errors.OpenAIError)
    async def openai_error(_: Request, exc: openai_errors.OpenAIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        status, code, message = _validation_message(exc)
        if openai_errors.is_openai_path(request.url.path):
            # OpenAI answers a bad parameter with 400 (the SDKs' BadRequestError), not 422.
            status = 400
        return _error(status, code, message, path=request.url.path)

    @app.exception_handler(BodyTooLarge)
    async def too_large(request: Request, _: BodyTooLarge) -> JSONResponse:
        limit = request.app.state.settings.api.max_body_bytes
        return _error(413, "too_large", f"the request body is over {limit} bytes",
                      path=request.url.path)

    @app.exception_handler(errors.StoreUnavailable)
    async def unavailable(request: Request, exc: errors.StoreUnavailable) -> JSONResponse:
        return _error(503, "store_unavailable", f"chatq cannot reach its store: {exc}",
                      {"Retry-After": "1"}, request.url.path)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return _error(500, "internal", "internal error; the server log has the details",
                      path=request.url.path)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: settings_mod.Settings = app.state.settings
    store = results.Store.from_settings(settings.redis)
    queue = open_queue(settings)
    waiter = wakeups.Wakeups(store.redis)
    files_store = filestore.open_store(settings.files)
    cat = catalog.Catalog(store.redis)
    lane = open_queue(settings, lane="batch")
    quota_default = quotas.Quota(settings.api.key_rpm, settings.api.key_tokens_per_day)
    per_key: dict[str, quotas.Quota] = app.state.quotas
    limits = (quotas.Quotas(store.redis, quota_default, per_key)
              if per_key or not quota_default.unlimited else None)
    window = fair.open_fair(store.redis, settings)
    app.state.services = services = deps.Services(
        settings, store, queue, waiter, held.Holds(settings.api.max_held_per_key), cat,
        files_store, limits, window)

    async def batch_event(event: str, batch: catalog.BatchRecord) -> None:
        await webhooks.emit(store.redis, batch.owner, event, batch.id)

    # Every API process runs a feeder candidate; a Redis lease lets one feed at a time.
    # The same feeder releases held interactive jobs into the queue's fair window.
    releaser = fair.Releaser(window, queue, settings) if window is not None else None
    feeding = asyncio.create_task(feeder.Feeder(settings, store, cat, files_store, lane,
                                                batch_event, releaser).run(), name="batch-feeder")
    try:
        await services.ensure_queue()
    except errors.ChatqError as exc:
        log.warning("the %s queue is not ready yet (%s); retrying on the first request",
                    queue.backend, exc)
    await waiter.start()
    app.state.webhook_endpoints = endpoints = webhooks.EndpointStore(
        store.redis, app.state.configured_webhooks)
    sender = None
    if settings.webhook.dispatch:
        # Its XREADGROUP blocks: the events client's socket timeout allows for that.
        sender = dispatcher.Dispatcher(store.events, endpoints, settings.webhook,
                                       consumer=f"{socket.gethostname()}-{os.getpid()}")
        await sender.start()
    if not app.state.key_hashes:
        log.warning("no CHATQ_API_KEYS set: the API is open to anyone who can reach it")
    log.info("api ready: %s queue %r, redis %s, model %s%s", queue.backend, queue.name,
             settings.redis.url.split("@")[-1], settings.llm_model,
             " (llmsim)" if settings.uses_simulator else "")
    try:
        yield
    finally:
        if sender is not None:
            await sender.stop()
        feeding.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await feeding
        await waiter.stop()
        await lane.close()
        await files_store.close()
        await queue.close()
        await store.close()


def create_app(settings: settings_mod.Settings) -> FastAPI:
    """The chatq API app for these settings."""
    app = FastAPI(
        title="chatq", version="1",
        description="Asynchronous LLM questions: POST a chat, get a job id, poll or stream it.",
        lifespan=_lifespan,
    )
    app.state.settings = settings
    app.state.key_hashes = deps.parse_keys(settings.api.keys)
    app.state.auth_guard = auth.AuthGuard(settings.api.auth_failures_per_minute)
    # Checked here, so a bad CHATQ_WEBHOOK_ENDPOINTS stops the api at start, saying why.
    app.state.configured_webhooks = webhooks.configured_endpoints(settings.webhook)
    app.state.quotas = quotas.parse(settings.api.quotas, deps.owner_of_entry)  # bad: fail at start
    app.include_router(chat.router)
    app.include_router(chat.aliases)
    app.include_router(chat.seed)
    app.include_router(responses.router)
    app.include_router(webhook_routes.router)
    app.include_router(files.router)
    app.include_router(batches.router)
    app.include_router(health.router)
    _install_error_handlers(app)
    app.add_middleware(LimitsAndMetrics, max_body=settings.api.max_body_bytes,
                       upload_paths=("/v1/files",))
    origins = [o.strip() for o in settings.api.cors_origins.split(",") if o.strip()]
    if origins:
        # Outermost, so refusals (413, 429...) carry the headers too and a browser can read
        # them. Keys travel as bearer tokens, never cookies: no credentials mode.
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_headers=["*"],
                           allow_methods=["GET", "POST", "DELETE"], expose_headers=CORS_EXPOSED,
                           max_age=600)
    telemetry.instrument_app(app)
    return app
