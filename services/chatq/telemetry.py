"""Logging, tracing and the trace context that travels with each queue message.

The rest of chatq calls only these functions; what they do with OpenTelemetry lives here.

Tracing is off, and costs nothing but a few no-op calls, unless an OTLP endpoint is set
(`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`). When it is on, the
standard `OTEL_*` variables configure it (service name, resource attributes, sampler,
headers, batch sizes), and FastAPI, Redis, the SQS client (aiobotocore), httpx/httpx2 and
the openai SDK (GenAI semantic conventions) are instrumented. Messages carry W3C
`traceparent`/`tracestate` in their attributes: `producer_span` yields them for the queue to
store, `consumer_span` takes them back, so one trace runs from the API request through the
queue to the model call and the result write.

Logs go to stderr as today (JSON lines with `CHATQ_LOG_JSON_FORMAT=true`, for collectors
that scrape pods) and, when an OTLP endpoint is set (`OTEL_EXPORTER_OTLP_ENDPOINT` or
`OTEL_EXPORTER_OTLP_LOGS_ENDPOINT`; `OTEL_LOGS_EXPORTER=none` turns it off), also over
OpenTelemetry's logs signal: each record carries the resource's `service.name`, the
trace and span ids of the span it was written in, and `job_id` (plus `error_code` on a
failed job's line) as attributes. Log messages never hold a question's or an answer's text.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

from chatq import settings as settings_mod

log = logging.getLogger(__name__)

#: The job being worked on, so every log line about it carries `job_id`.
current_job_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("job_id", default=None)

#: The instrumentation scope of chatq's own spans.
TRACER_NAME = "chatq"
#: Span attribute that holds the job id (search for it in Tempo or Jaeger to find a job).
JOB_ID_ATTRIBUTE = "chatq.job.id"
#: Paths whose requests are never traced: probes and scrapes would drown the real traffic.
EXCLUDED_URLS = "healthz,readyz,metrics"

# messaging.system per queue backend: `aws_sqs` is the semantic conventions' own value;
# Redis Streams has none, so it is named plainly.
_MESSAGING_SYSTEM = {"sqs": "aws_sqs", "redis": "redis"}

#: Structured fields that a log call may pass with `extra=`; they become JSON keys and OTLP
#: log attributes. Only ids and codes: never user text.
LOG_FIELDS = ("error_code",)

_state: dict[str, Any] = {"enabled": False, "provider": None, "log_provider": None}


def tracing_requested(env: Mapping[str, str] | None = None) -> bool:
    """True when the OTEL_* variables ask for traces to be exported."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return False
    return bool(env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def logs_requested(env: Mapping[str, str] | None = None) -> bool:
    """True when the OTEL_* variables ask for logs to be exported over OTLP.

    As the specification says, OTEL_LOGS_EXPORTER defaults to `otlp`: an endpoint for all
    signals (a collector's) sends logs too; a traces-only store needs OTEL_LOGS_EXPORTER=none.
    """
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if env.get("OTEL_LOGS_EXPORTER", "otlp").strip().lower() == "none":
        return False
    return bool(env.get("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def enabled() -> bool:
    """Whether this process exports traces."""
    return bool(_state["enabled"])


# --- logs --------------------------------------------------------------------------------


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with trace_id/span_id in a span and job_id with a job."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(log_context())
        entry.update(record_fields(record))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)

    converter = time.gmtime  # type: ignore[assignment]  # stdlib stub: gmtime's arg is optional


def log_context() -> dict[str, str]:
    """trace_id, span_id and job_id of what this task is doing now (those that are known)."""
    out: dict[str, str] = {}
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        out["trace_id"] = format(ctx.trace_id, "032x")
        out["span_id"] = format(ctx.span_id, "016x")
    job_id = current_job_id.get()
    if job_id:
        out["job_id"] = job_id
    return out


def record_fields(record: logging.LogRecord) -> dict[str, str]:
    """The LOG_FIELDS a log call passed with `extra=`."""
    return {name: str(getattr(record, name)) for name in LOG_FIELDS if hasattr(record, name)}


class TextFormatter(logging.Formatter):
    """The plain-text format, with trace_id/span_id/job_id (and LOG_FIELDS) appended."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-5s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        extra = {**log_context(), **record_fields(record)}
        text = super().format(record)
        return text + (" " + " ".join(f"{k}={v}" for k, v in extra.items()) if extra else "")


class OtlpLogHandler(logging.Handler):
    """Sends each record over OpenTelemetry's logs signal (the SDK's batch processor).

    The SDK's own LoggingHandler is deprecated and exports every attribute a record has
    (file paths, formatter state); this one sends the message as the body, the severity,
    the current context (so the trace and span ids), and only `job_id`, the logger's name
    and LOG_FIELDS as attributes. Records of the OpenTelemetry SDK itself (an exporter that
    cannot reach its endpoint) stay on stderr: exporting them would feed the failure.
    """

    def __init__(self, provider: Any) -> None:
        super().__init__()
        self.provider = provider

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("opentelemetry"):
            return
        from opentelemetry._logs import SeverityNumber

        try:
            attributes: dict[str, str] = {"logger": record.name}
            job_id = current_job_id.get()
            if job_id:
                attributes["job_id"] = job_id
            attributes.update(record_fields(record))
            if record.exc_info and record.exc_info[0] is not None:
                attributes["exception.type"] = record.exc_info[0].__name__
                attributes["exception.stacktrace"] = logging.Formatter().formatException(record.exc_info)
            self.provider.get_logger(record.name).emit(
                timestamp=int(record.created * 1e9),
                context=otel_context.get_current(),
                severity_number=_SEVERITY.get(record.levelno, SeverityNumber.INFO),
                severity_text=_SEVERITY_TEXT.get(record.levelname, record.levelname),
                body=record.getMessage(),
                attributes=attributes,
            )
        except Exception:  # a log line must never break the code that wrote it
            self.handleError(record)


def _severity_numbers() -> dict[int, Any]:
    from opentelemetry._logs import SeverityNumber

    return {logging.DEBUG: SeverityNumber.DEBUG, logging.INFO: SeverityNumber.INFO,
            logging.WARNING: SeverityNumber.WARN, logging.ERROR: SeverityNumber.ERROR,
            logging.CRITICAL: SeverityNumber.FATAL}


_SEVERITY = _severity_numbers()
# OpenTelemetry's names where Python's differ (the data model's "displaying severity").
_SEVERITY_TEXT = {"WARNING": "WARN", "CRITICAL": "FATAL"}


def configure_logging(log_settings: settings_mod.LogSettings) -> None:
    """Set up the root logger once, in the entry point."""
    handler = logging.StreamHandler(sys.stderr)
    if log_settings.json_format:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(log_settings.level.upper())
    # httpx logs every request at INFO; the openai client makes many.
    for noisy in ("httpx", "httpx2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# --- tracing setup -----------------------------------------------------------------------


def setup(settings: settings_mod.Settings, service: str, instance_id: str = "") -> None:
    """Start tracing and OTLP logs for this process when OTEL_* variables ask for them;
    `instance_id` (the worker's id) becomes `service.instance.id`."""
    start_tracing(service, capture_content=settings.telemetry.capture_content,
                  instance_id=instance_id)
    start_logs(service, instance_id)


def _resource(service: str, instance_id: str = "") -> Any:
    """The process's resource: service name (unless OTEL_SERVICE_NAME), version, instance."""
    from opentelemetry.sdk.resources import Resource

    attributes: dict[str, str] = {"service.version": _version()}
    if not os.environ.get("OTEL_SERVICE_NAME"):
        attributes["service.name"] = service
    if instance_id:
        attributes["service.instance.id"] = instance_id
    # Resource.create() adds OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME.
    return Resource.create(attributes)


def start_logs(service: str, instance_id: str = "") -> bool:
    """Also send the root logger's records over OTLP; False when not asked to.

    Call it after the process's logging is configured (`configure_logging`, or kopf's),
    since it adds a handler to the root logger beside the stderr one.
    """
    if _state["log_provider"] is not None or not logs_requested():
        return _state["log_provider"] is not None
    from opentelemetry._logs import set_logger_provider
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import BatchLogRecordProcessor

    resource = _resource(service, instance_id)
    provider = LoggerProvider(resource=resource)
    provider.add_log_record_processor(BatchLogRecordProcessor(_exporter("logs")))
    set_logger_provider(provider)
    logging.getLogger().addHandler(OtlpLogHandler(provider))
    _state["log_provider"] = provider
    log.info("logs on: OTLP to %s as %s", _endpoint_for_log("logs"),
             resource.attributes.get("service.name", service))
    return True


def start_tracing(service: str, capture_content: bool = False, instance_id: str = "") -> bool:
    """Set up the SDK, the OTLP exporter and the instrumentations; False when not asked to.

    For processes without chatq's Settings (the operator): `start_tracing("chatq-operator")`.
    """
    if _state["enabled"] or not tracing_requested():
        return bool(_state["enabled"])
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = _resource(service, instance_id)
    provider = TracerProvider(resource=resource, sampler=_sampler())
    provider.add_span_processor(BatchSpanProcessor(_exporter("traces")))
    trace.set_tracer_provider(provider)
    _state.update(enabled=True, provider=provider)
    _instrument_libraries(provider, capture_content)
    log.info("tracing on: OTLP to %s as %s", _endpoint_for_log("traces"),
             resource.attributes.get("service.name", service))
    return True


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("chatq")
    except metadata.PackageNotFoundError:
        return "0"


def shutdown() -> None:
    """Flush and stop the exporters (also done at exit)."""
    provider = _state["provider"]
    if provider is not None:
        provider.shutdown()
        _state.update(enabled=False, provider=None)
    log_provider = _state["log_provider"]
    if log_provider is not None:
        root = logging.getLogger()
        root.handlers[:] = [h for h in root.handlers if not isinstance(h, OtlpLogHandler)]
        log_provider.shutdown()
        _state["log_provider"] = None


def _endpoint_for_log(signal: str) -> str:
    url = (os.environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT")
           or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", ""))
    return url.split("@")[-1]


def _exporter(signal: str) -> Any:
    """The OTLP exporter of `signal` (traces, logs) the OTEL_EXPORTER_OTLP_* variables describe."""
    protocol = (os.environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL")
                or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf")
    if protocol == "grpc":
        try:
            if signal == "logs":
                from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
                return OTLPLogExporter()
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError:
            log.warning("OTEL_EXPORTER_OTLP_PROTOCOL=grpc but the gRPC exporter is not installed "
                        "(pip install opentelemetry-exporter-otlp-proto-grpc); using http/protobuf: "
                        "point the endpoint at the collector's OTLP/HTTP port (4318)")
        else:
            return OTLPSpanExporter()
    if protocol not in ("grpc", "http/protobuf"):
        log.warning("OTEL_EXPORTER_OTLP_PROTOCOL=%s is not supported by the Python SDK; "
                    "using http/protobuf", protocol)
    if signal == "logs":
        from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter as HttpLogExporter

        return HttpLogExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    return HttpExporter()


def _sampler() -> Any:
    """The OTEL_TRACES_SAMPLER sampler, minus client spans that have no parent.

    A worker's idle long-polls (XREADGROUP, ReceiveMessage), its busy-count reports and the
    api's background readers would each make a one-span trace every few seconds; client
    spans only matter inside a request or a job, so those without a parent are dropped.
    """
    from opentelemetry.sdk.trace import sampling

    try:  # the sampler OTEL_TRACES_SAMPLER names; the SDK offers no public way to read it
        inner = sampling._get_from_env_or_default()
    except Exception:
        inner = sampling.ParentBased(sampling.ALWAYS_ON)

    class NoOrphanClientSpans(sampling.Sampler):
        def should_sample(self, parent_context: otel_context.Context | None, trace_id: int, name: str,
                          kind: trace.SpanKind | None = None, attributes: Any = None,
                          links: Sequence[trace.Link] | None = None,
                          trace_state: trace.TraceState | None = None) -> sampling.SamplingResult:
            parent = trace.get_current_span(parent_context).get_span_context()
            if kind == trace.SpanKind.CLIENT and not parent.is_valid:
                return sampling.SamplingResult(sampling.Decision.DROP)
            return inner.should_sample(parent_context, trace_id, name, kind, attributes, links,
                                       trace_state)

        def get_description(self) -> str:
            return f"NoOrphanClientSpans{{{inner.get_description()}}}"

    return NoOrphanClientSpans()


def _instrument_libraries(provider: Any, capture_content: bool) -> None:
    """Instrument what chatq's processes use; a library that is missing is skipped."""
    if capture_content:
        os.environ.setdefault("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "span_only")
    instrumentors: list[tuple[str, str]] = [
        ("opentelemetry.instrumentation.redis", "RedisInstrumentor"),
        ("opentelemetry.instrumentation.botocore", "AiobotocoreInstrumentor"),
        ("opentelemetry.instrumentation.botocore", "BotocoreInstrumentor"),
        ("opentelemetry.instrumentation.httpx", "HTTPXClientInstrumentor"),
        ("opentelemetry.instrumentation.httpx", "HTTPX2ClientInstrumentor"),
        ("opentelemetry.instrumentation.genai.openai", "OpenAIInstrumentor"),
    ]
    import importlib

    for module_name, class_name in instrumentors:
        try:
            instrumentor = getattr(importlib.import_module(module_name), class_name)()
            if not instrumentor.is_instrumented_by_opentelemetry:
                instrumentor.instrument(tracer_provider=provider)
        except Exception as exc:  # an instrumentation must never stop the service
            log.warning("cannot instrument with %s.%s: %s", module_name, class_name, exc)


def instrument_app(app: Any) -> None:
    """Trace the FastAPI app's requests (server spans named by route), when tracing is on."""
    if not _state["enabled"]:
        return
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    excluded = os.environ.get("OTEL_PYTHON_FASTAPI_EXCLUDED_URLS") or EXCLUDED_URLS
    FastAPIInstrumentor.instrument_app(app, tracer_provider=_state["provider"], excluded_urls=excluded)


def tracer() -> trace.Tracer:
    """chatq's own tracer (a no-op one while tracing is off)."""
    return trace.get_tracer(TRACER_NAME)


# --- spans of chatq's own --------------------------------------------------------------------


def _messaging_attributes(backend: str, queue: str, operation: str, op_type: str,
                          job_id: str) -> dict[str, str]:
    return {
        "messaging.system": _MESSAGING_SYSTEM.get(backend, backend),
        "messaging.operation.name": operation,
        "messaging.operation.type": op_type,
        "messaging.destination.name": queue,
        JOB_ID_ATTRIBUTE: job_id,
    }


@contextlib.contextmanager
def producer_span(backend: str, queue: str, job_id: str) -> Iterator[dict[str, str]]:
    """Span around an enqueue; yields the carrier (traceparent...) to put in the message.

    The span is the message's creation context (`send`, kind PRODUCER); the carrier is empty
    while tracing is off, so messages then carry no trace attributes at all.
    """
    token = current_job_id.set(job_id)  # so the api's lines about the enqueue carry job_id
    try:
        if not _state["enabled"]:
            yield {}
            return
        attributes = _messaging_attributes(backend, queue, "send", "send", job_id)
        with tracer().start_as_current_span(f"send {queue}", kind=trace.SpanKind.PRODUCER,
                                            attributes=attributes):
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
            yield carrier
    finally:
        current_job_id.reset(token)


@contextlib.contextmanager
def consumer_span(backend: str, queue: str, job_id: str, carrier: Mapping[str, str],
                  message_id: str = "") -> Iterator[None]:
    """Span around processing one message, linked to (child of) the producer's context.

    Kind CONSUMER, operation `process`; its parent is the context the producer injected, and
    it links to that context too, as the messaging conventions ask of a consumer, so tools
    that show only links or only parents both find the way back to the API request.
    """
    token = current_job_id.set(job_id)
    try:
        if not _state["enabled"]:
            yield
            return
        parent = propagate.extract(dict(carrier))
        creation = trace.get_current_span(parent).get_span_context()
        links = [trace.Link(creation, {"messaging.operation.type": "send"})] if creation.is_valid else []
        attributes = _messaging_attributes(backend, queue, "process", "process", job_id)
        if message_id:
            attributes["messaging.message.id"] = message_id
        with tracer().start_as_current_span(f"process {queue}", context=parent,
                                            kind=trace.SpanKind.CONSUMER, attributes=attributes,
                                            links=links):
            yield
    finally:
        current_job_id.reset(token)


@contextlib.contextmanager
def span(name: str, **attributes: str | int | float | bool) -> Iterator[None]:
    """An internal span of chatq's own (e.g. the result write), a child of the current one."""
    if not _state["enabled"]:
        yield
        return
    with tracer().start_as_current_span(name, attributes=attributes):
        yield
