"""Logging, tracing and the trace context that travels with each queue message.

The rest of chatq calls only these functions; what they do with OpenTelemetry lives here.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
from collections.abc import Iterator
from typing import Any

from chatq import settings as settings_mod

#: The job being worked on, so every log line about it carries `job_id`.
current_job_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("job_id", default=None)


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with job_id when a job is in hand."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        job_id = current_job_id.get()
        if job_id:
            entry["job_id"] = job_id
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(log: settings_mod.LogSettings) -> None:
    """Set up the root logger once, in the entry point."""
    handler = logging.StreamHandler(sys.stderr)
    if log.json_format:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-5s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(log.level.upper())
    # httpx logs every request at INFO; the openai client makes many.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def setup(settings: settings_mod.Settings, service: str) -> None:
    """Start tracing for this process when OTEL_* variables ask for it."""


def instrument_app(app: Any) -> None:
    """Trace the FastAPI app's requests."""


@contextlib.contextmanager
def producer_span(backend: str, queue: str, job_id: str) -> Iterator[dict[str, str]]:
    """Span around an enqueue; yields the carrier (traceparent...) to put in the message."""
    yield {}


@contextlib.contextmanager
def consumer_span(backend: str, queue: str, job_id: str, carrier: dict[str, str]) -> Iterator[None]:
    """Span around processing one message, linked to (child of) the producer's context."""
    token = current_job_id.set(job_id)
    try:
        yield
    finally:
        current_job_id.reset(token)
