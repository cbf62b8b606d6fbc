"""One job, one trace: a real trace store receives OTLP from the api and the worker.

The api and the worker run as processes with only the standard OTEL_* variables set; the
trace store is Jaeger v2 (in memory). For one job the test finds the trace id in the
worker's JSON log line for that job, fetches the trace, and checks that it holds the api
request, the enqueue, the worker's receive (process), the model call (GenAI attributes) and
the result write, each with the right parent, the consumer also linked to the producer;
that the job can be found by its id; and that no question or answer text is in it.
Both queue backends; the redis one exports over OTLP/HTTP, the SQS one over OTLP/gRPC.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest

from tests.conftest import Stack, StackFactory
from tests.observability.conftest import Jaeger

QUESTION = "which colour is the sky over the trace store"


def _id(value: str) -> str:
    """A trace or span id as lower-case hex, whether the JSON gave hex or base64."""
    if len(value) in (16, 32) and all(c in "0123456789abcdefABCDEF" for c in value):
        return value.lower()
    return base64.b64decode(value).hex()


def _value(v: dict[str, Any]) -> Any:
    for key in ("stringValue", "intValue", "doubleValue", "boolValue"):
        if key in v:
            return int(v[key]) if key == "intValue" else v[key]
    return v


def _kind(kind: Any) -> str:
    names = {1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}
    if isinstance(kind, int):
        return names.get(kind, "UNSPECIFIED")
    return str(kind).removeprefix("SPAN_KIND_")


def flatten(trace: dict[str, Any]) -> list[dict[str, Any]]:
    """OTLP JSON → one dict per span: ids, parent, service, kind, attributes, links."""
    spans = []
    for rs in trace["resourceSpans"]:
        resource = {a["key"]: _value(a["value"]) for a in rs.get("resource", {}).get("attributes", [])}
        for ss in rs.get("scopeSpans", []):
            for s in ss.get("spans", []):
                spans.append({
                    "name": s["name"], "kind": _kind(s.get("kind", 0)),
                    "trace_id": _id(s["traceId"]), "span_id": _id(s["spanId"]),
                    "parent_id": _id(s["parentSpanId"]) if s.get("parentSpanId") else None,
                    "service": resource.get("service.name"),
                    "attributes": {a["key"]: _value(a["value"]) for a in s.get("attributes", [])},
                    "links": [_id(link["spanId"]) for link in s.get("links", [])],
                })
    return spans


def one(spans: list[dict[str, Any]], what: str, **match: Any) -> dict[str, Any]:
    found = [s for s in spans if all(s.get(k) == v for k, v in match.items())]
    names = sorted((s["service"], s["kind"], s["name"]) for s in spans)
    assert len(found) == 1, f"{what}: expected one span matching {match}, found {len(found)} in {names}"
    return found[0]


def ancestors(spans: list[dict[str, Any]], span: dict[str, Any]) -> list[str]:
    by_id = {s["span_id"]: s for s in spans}
    chain = []
    while span["parent_id"] and span["parent_id"] in by_id:
        span = by_id[span["parent_id"]]
        chain.append(span["span_id"])
    return chain


def job_log_line(logs: str, job_id: str) -> dict[str, Any]:
    for line in logs.splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("job_id") == job_id and "succeeded" in entry["msg"]:
                return dict(entry)
    raise AssertionError(f"no JSON log line for job {job_id} in:\n{logs[-3000:]}")


def traced_job(backend: str, jaeger: Jaeger, stack_factory: StackFactory,
               **env: str) -> tuple[Stack, dict[str, Any], str, list[dict[str, Any]]]:
    """Run one job on a traced stack; return the stack, the job, its trace id and spans."""
    if backend == "sqs":
        otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": jaeger.otlp_grpc, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    else:
        otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": jaeger.otlp_http,
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
    # Jaeger stores traces only; logs over OTLP have their own test (test_logs.py).
    stack = stack_factory(backend, workers=1, CHATQ_LOG_JSON_FORMAT="true", OTEL_LOGS_EXPORTER="none",
                          OTEL_BSP_SCHEDULE_DELAY="100", **otel, **env)
    queue = stack.env["CHATQ_QUEUE_NAME"]
    with stack.client() as http:
        job_id = http.post("/v1/chat", json={"message": QUESTION}).json()["id"]
        job = http.get(f"/v1/chat/{job_id}", params={"wait": 30}).json()
    assert job["status"] == "succeeded", job

    # The worker's log line for the job names the trace.
    deadline = time.monotonic() + 10
    while True:
        try:
            line = job_log_line(stack.workers[0].logs(), job_id)
            break
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    trace_id = line["trace_id"]
    assert len(trace_id) == 32 and len(line["span_id"]) == 16

    # Wait for both processes' batches to reach the store.
    spans: list[dict[str, Any]] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        trace = jaeger.trace(trace_id)
        spans = flatten(trace) if trace else []
        names = {s["name"] for s in spans}
        if {"POST /v1/chat", f"send {queue}", f"process {queue}", "chatq.result.write"} <= names \
                and any(n.startswith("chat ") for n in names):
            break
        time.sleep(0.3)
    assert spans, f"trace {trace_id} never reached jaeger:\n{jaeger.server.logs()[-2000:]}"
    assert {s["trace_id"] for s in spans} == {trace_id}

    return stack, job, trace_id, spans


@pytest.mark.parametrize("backend", ["redis", "sqs"])
def test_one_trace_from_request_to_result(backend: str, jaeger: Jaeger,
                                          stack_factory: StackFactory) -> None:
    # jaeger comes first: it is stopped after the api and worker have flushed their spans.
    stack, job, trace_id, spans = traced_job(backend, jaeger, stack_factory)
    job_id = job["id"]
    queue = stack.env["CHATQ_QUEUE_NAME"]
    request = one(spans, "the api request", name="POST /v1/chat", kind="SERVER", service="chatq-api")
    send = one(spans, "the enqueue", name=f"send {queue}", kind="PRODUCER", service="chatq-api")
    process = one(spans, "the worker's receive", name=f"process {queue}", kind="CONSUMER",
                  service="chatq-worker")
    model_calls = [s for s in spans if s["name"].startswith("chat ") and s["service"] == "chatq-worker"]
    assert len(model_calls) == 1, [s["name"] for s in spans]
    model = model_calls[0]
    write = one(spans, "the result write", name="chatq.result.write", service="chatq-worker")

    # Parents and links.
    assert request["parent_id"] is None
    assert request["span_id"] in ancestors(spans, send)
    assert process["parent_id"] == send["span_id"], "the consumer continues the producer's trace"
    assert process["links"] == [send["span_id"]], "and links to the message's creation context"
    assert process["span_id"] in ancestors(spans, model)
    assert write["parent_id"] == process["span_id"]

    # Messaging semantic conventions.
    system = "aws_sqs" if backend == "sqs" else "redis"
    for span, operation in ((send, "send"), (process, "process")):
        attrs = span["attributes"]
        assert attrs["messaging.system"] == system
        assert attrs["messaging.operation.name"] == operation
        assert attrs["messaging.operation.type"] == operation
        assert attrs["messaging.destination.name"] == queue
        assert attrs["chatq.job.id"] == job_id

    # The model call: GenAI attributes, time to first token, no prompt or answer text.
    gen = model["attributes"]
    assert model["kind"] == "CLIENT"
    assert gen["gen_ai.operation.name"] == "chat"
    assert gen["gen_ai.request.model"] == job["model"] or gen["gen_ai.response.model"] == job["model"]
    assert gen["gen_ai.usage.input_tokens"] == job["usage"]["prompt_tokens"]
    assert gen["gen_ai.usage.output_tokens"] == job["usage"]["completion_tokens"]
    assert 0 < float(gen["gen_ai.response.time_to_first_chunk"]) < 30
    http_calls = [s for s in spans if s["parent_id"] == model["span_id"] and s["kind"] == "CLIENT"]
    assert http_calls, "the model's HTTP call (httpx2) is a child of the GenAI span"

    # Redis (and, for SQS, the AWS SDK) calls are traced inside the request and the job.
    db_spans = [s for s in spans if s["attributes"].get("db.system") == "redis"
                or s["attributes"].get("db.system.name") == "redis"]
    assert any(write["span_id"] in ancestors(spans, s) for s in db_spans), "the write's Redis calls"
    if backend == "sqs":
        aws = [s for s in spans if s["attributes"].get("rpc.system") == "aws-api"]
        # Acks go out as DeleteMessageBatch calls shared by many jobs, from a loop of their
        # own, so they belong to no job's trace; the send does.
        sends = [s for s in aws if s["attributes"].get("rpc.method") == "SendMessage"]
        assert len(sends) == 1 and send["span_id"] in ancestors(spans, sends[0])

    # No user text anywhere in the trace (prompt capture is off by default).
    text = json.dumps(spans)
    assert QUESTION not in text
    assert job["answer"][:40] not in text

    # A person finds the trace by the job id.
    found = jaeger.find_traces("chatq-worker", {"chatq.job.id": job_id})
    assert [t["traceID"] for t in found] == [trace_id]

    # The api logged in JSON as well, with trace ids when in a span.
    api_lines = [json.loads(x) for x in stack.api.logs().splitlines() if x.startswith("{")]
    assert api_lines and all("ts" in x and "level" in x for x in api_lines)


def test_capture_content_setting_puts_the_prompt_in_the_model_span(
        jaeger: Jaeger, stack_factory: StackFactory) -> None:
    _, _, _, spans = traced_job("redis", jaeger, stack_factory, CHATQ_TELEMETRY_CAPTURE_CONTENT="true")
    model = next(s for s in spans if s["name"].startswith("chat "))
    assert QUESTION in json.dumps(model["attributes"]), model["attributes"]
