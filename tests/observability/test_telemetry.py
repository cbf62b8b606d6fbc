"""chatq.telemetry on its own: off unless asked, trace context through a message, JSON logs.

Each case runs tests/observability/trace_probe.py in a fresh process (tracing is global).
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from tests import servers


def probe(**env: str) -> dict[str, Any]:
    """Run the probe with only these OTEL_/CHATQ_ variables; return what it printed."""
    proc = subprocess.run([sys.executable, "-m", "tests.observability.trace_probe"],
                          cwd=servers.REPO, env=servers.chatq_env(**env), capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_off_without_an_endpoint() -> None:
    out = probe()
    assert out["enabled"] is False
    assert out["sdk_imported"] is False, "the SDK must not even be imported while tracing is off"
    assert out["carrier"] == {}, "messages carry no trace attributes while tracing is off"
    # The job id is still on every log line of the job; there is no trace to name.
    processing = next(line for line in out["logs"] if line["msg"] == "processing")
    assert processing["job_id"] == "job-1" and "trace_id" not in processing


def test_sdk_disabled_wins_over_an_endpoint() -> None:
    out = probe(OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9", OTEL_SDK_DISABLED="true")
    assert out["enabled"] is False


def test_message_carries_the_trace_from_producer_to_consumer() -> None:
    out = probe(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT="http://127.0.0.1:9/v1/traces",
                OTEL_SERVICE_NAME="probe-svc", OTEL_RESOURCE_ATTRIBUTES="deployment.environment=test")
    assert out["enabled"] is True
    spans = {s["name"]: s for s in out["spans"]}
    server, send, process = spans["POST /v1/chat"], spans["send jobs"], spans["process jobs"]

    traceparent = out["carrier"]["traceparent"]
    assert traceparent.split("-")[1:3] == [send["trace_id"], send["span_id"]], (
        "the carrier is the producer span's W3C context")
    assert send["kind"] == "PRODUCER" and send["parent_id"] == server["span_id"]
    assert process["kind"] == "CONSUMER"
    assert process["trace_id"] == server["trace_id"], "one trace from request to consumer"
    assert process["parent_id"] == send["span_id"], "the consumer is a child of the producer"
    assert process["links"] == [send["span_id"]], "and links to the creation context"
    assert send["attributes"] == {
        "messaging.system": "aws_sqs", "messaging.operation.name": "send",
        "messaging.operation.type": "send", "messaging.destination.name": "jobs",
        "chatq.job.id": "job-1"}
    assert process["attributes"]["messaging.operation.type"] == "process"
    assert process["attributes"]["messaging.message.id"] == "m-1"
    assert spans["child client"]["parent_id"] == process["span_id"]
    assert spans["chatq.result.write"]["parent_id"] == process["span_id"]
    assert "orphan client" not in spans, "client spans without a parent are dropped"

    resource = server["resource"]
    assert resource["service.name"] == "probe-svc"
    assert resource["deployment.environment"] == "test"

    logs = {line["msg"]: line for line in out["logs"]}
    assert logs["enqueued"]["span_id"] == send["span_id"]
    assert logs["enqueued"]["trace_id"] == send["trace_id"]
    assert logs["processing"]["span_id"] == process["span_id"]
    assert logs["processing"]["job_id"] == "job-1"
    assert "job_id" not in logs["after the job"] and "trace_id" not in logs["after the job"]



@pytest.mark.parametrize(("env", "expected"), [
    ({}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),  # the spec's default: otlp
    ({"OTEL_EXPORTER_OTLP_LOGS_ENDPOINT": "http://logs:9428/insert/opentelemetry/v1/logs"}, True),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://jaeger:4318/v1/traces"}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://jaeger:4318", "OTEL_LOGS_EXPORTER": "none"}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_SDK_DISABLED": "true"}, False),
])
def test_logs_are_exported_when_the_otel_variables_ask(env: dict[str, str], expected: bool) -> None:
    from chatq import telemetry

    assert telemetry.logs_requested(env) is expected
