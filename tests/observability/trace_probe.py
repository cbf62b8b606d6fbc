"""Run chatq.telemetry in a process of its own and print what it did, as JSON.

Tracing state is process-global (one tracer provider, patched libraries), so the tests run
this module with `python -m tests.observability.trace_probe` instead of touching pytest's
own process. Spans are also kept in memory here so the test can read them back.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
from typing import Any


def main() -> None:
    from chatq import settings as settings_mod
    from chatq import telemetry
    from opentelemetry import trace

    stream = io.StringIO()
    telemetry.configure_logging(settings_mod.LogSettings(json_format=True))
    logging.getLogger().handlers[0].stream = stream  # type: ignore[attr-defined]
    telemetry.setup(settings_mod.Settings(), "probe")
    out: dict[str, Any] = {"enabled": telemetry.enabled(),
                           "sdk_imported": "opentelemetry.sdk" in sys.modules}
    memory = None
    if telemetry.enabled():
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        memory = InMemorySpanExporter()
        telemetry._state["provider"].add_span_processor(SimpleSpanProcessor(memory))

    tracer = telemetry.tracer()
    log = logging.getLogger("probe")
    with tracer.start_as_current_span("POST /v1/chat", kind=trace.SpanKind.SERVER):
        with telemetry.producer_span("sqs", "jobs", "job-1") as carrier:
            log.info("enqueued")
    out["carrier"] = carrier
    with telemetry.consumer_span("sqs", "jobs", "job-1", carrier, message_id="m-1"):
        log.info("processing")
        with tracer.start_as_current_span("child client", kind=trace.SpanKind.CLIENT):
            pass
        with telemetry.span("chatq.result.write"):
            pass
    with tracer.start_as_current_span("orphan client", kind=trace.SpanKind.CLIENT):
        pass
    log.info("after the job")
    out["logs"] = [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]
    out["spans"] = []
    if memory is not None:
        for span in memory.get_finished_spans():
            out["spans"].append({
                "name": span.name, "kind": span.kind.name,
                "trace_id": format(span.context.trace_id, "032x"),
                "span_id": format(span.context.span_id, "016x"),
                "parent_id": format(span.parent.span_id, "016x") if span.parent else None,
                "links": [format(link.context.span_id, "016x") for link in span.links],
                "attributes": dict(span.attributes or {}),
                "resource": {k: str(v) for k, v in span.resource.attributes.items()},
            })
    print(json.dumps(out))
    sys.stdout.flush()
    # The OTLP exporter points nowhere; do not wait for it to give up.
    os._exit(0)


if __name__ == "__main__":
    main()
