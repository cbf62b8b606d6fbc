"""The compose `observability` profile: one question's trace, metrics and log lines arrive.

compose.ci.yaml swaps grafana/otel-lgtm (which cannot be pulled here) for chatq-ci/lgtm,
built by scripts/setup-docker from docker/lgtm: Jaeger v2 as the OTLP collector and trace
store, VictoriaLogs for logs, Debian's Prometheus scraping the api replicas and the worker.
The stack runs with `OTEL_EXPORTER_OTLP_ENDPOINT=http://lgtm:4318`, as the README says; one
question through nginx is then found in all three by the same ids: its trace in Jaeger by
`chatq.job.id`, its log lines in VictoriaLogs by `job_id` and by that trace's id, and its
counters in Prometheus. No question text reaches the log store.
"""

from __future__ import annotations

import functools
import json
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests import servers
from tests.containers.conftest import Stack, compose_env, free_port, run

pytestmark = pytest.mark.timeout(900)

QUESTION = f"which colour is the sky over compose {uuid.uuid4().hex[:8]}"


def get_json(url: str, data: bytes | None = None) -> Any:
    with urllib.request.urlopen(url, data=data, timeout=10) as resp:
        return json.loads(resp.read())


# The stores take their batches in seconds: ask once a second, for up to a minute.
poll = functools.partial(servers.poll, timeout=60, interval=1)


@pytest.fixture(scope="module")
def observed(docker: list[str], chatq_images: dict[str, str],
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, dict[str, int]]]:
    for image in ("chatq-ci/lgtm:local",):
        if run(["docker", "image", "inspect", image], check=False).returncode != 0:
            from tests.containers.conftest import _unavailable

            _unavailable(f"the local image {image} is missing")
    ports = {name: free_port() for name in ("http", "grafana", "grpc", "otlp", "traces", "logs", "metrics")}
    env = compose_env(
        CHATQ_HTTP_PORT=str(ports["http"]), CHATQ_GRAFANA_PORT=str(ports["grafana"]),
        CHATQ_OTLP_GRPC_PORT=str(ports["grpc"]), CHATQ_OTLP_HTTP_PORT=str(ports["otlp"]),
        CHATQ_LGTM_TRACES_PORT=str(ports["traces"]), CHATQ_LGTM_LOGS_PORT=str(ports["logs"]),
        CHATQ_LGTM_METRICS_PORT=str(ports["metrics"]),
        OTEL_EXPORTER_OTLP_ENDPOINT="http://lgtm:4318", OTEL_BSP_SCHEDULE_DELAY="200",
        OTEL_BLRP_SCHEDULE_DELAY="200")
    st = Stack(compose=[*docker], project=f"chatqobs{uuid.uuid4().hex[:8]}", port=ports["http"],
               env=env, files=["compose.yaml", "compose.ci.yaml"])
    try:
        # With the machine busy, the api replicas can take longer to turn healthy than
        # nginx's depends_on waits; `up` then fails on nginx alone. Wait for them, then
        # bring up what is left.
        first = st.cmd("--profile", "observability", "up", "-d", timeout=600, check=False)
        if first.returncode != 0:
            for service in ("api-1", "api-2"):
                container = st.container(service)
                health = ["docker", "inspect", "-f", "{{.State.Health.Status}}", container]
                poll(lambda h=health: run(h).stdout, lambda out: out.strip() == "healthy",
                     f"{service} to be healthy", timeout=300)
            st.cmd("--profile", "observability", "up", "-d", timeout=600)
        st.wait_healthy(timeout=300)
        yield st, ports
    finally:
        st.cmd("--profile", "observability", "down", "-v", "--remove-orphans", "--timeout", "40",
               timeout=180, check=False)


def test_one_questions_trace_metrics_and_logs_arrive(observed: tuple[Stack, dict[str, int]]) -> None:
    st, ports = observed
    job_id = st.ask(QUESTION)
    job = st.wait_status(job_id, {"succeeded", "failed"}, timeout=120)
    assert job["status"] == "succeeded", job

    # Traces: Jaeger finds the job's trace by its id, with the api's and the worker's spans.
    query = urllib.parse.urlencode({"service": "chatq-worker", "tags": json.dumps({"chatq.job.id": job_id}),
                                    "lookback": "1h", "limit": "5"})
    def services(d: list[dict[str, Any]]) -> set[str]:
        return {p["serviceName"] for t in d for p in t["processes"].values()}

    # Each process exports its spans in its own batches, so the worker's can land first:
    # wait for the api's part of the same trace too.
    traces = poll(lambda: get_json(f"http://127.0.0.1:{ports['traces']}/api/traces?{query}")["data"],
                  lambda d: len(d) == 1 and services(d) >= {"chatq-api", "chatq-worker"},
                  f"job {job_id}'s trace, with the api's and the worker's spans, in the lgtm "
                  "container's Jaeger")
    trace_id = traces[0]["traceID"]

    # Logs: the job's lines by job_id carry that trace id; by trace id, the same job.
    def logsql(q: str) -> list[dict[str, Any]]:
        body = urllib.parse.urlencode({"query": q, "limit": "1000"}).encode()
        with urllib.request.urlopen(f"http://127.0.0.1:{ports['logs']}/select/logsql/query",
                                    data=body, timeout=10) as resp:
            return [json.loads(x) for x in resp.read().decode().splitlines() if x.strip()]

    lines = poll(lambda: logsql(f'job_id:="{job_id}"'),
                 lambda es: {e.get("service.name") for e in es} >= {"chatq-api", "chatq-worker"}
                 and any("succeeded" in e["_msg"] for e in es),
                 f"job {job_id}'s log lines from the api and the worker")
    assert {e["trace_id"] for e in lines} == {trace_id}, lines
    assert {e.get("job_id") for e in logsql(f'trace_id:="{trace_id}"')} == {job_id}
    everything = json.dumps(logsql("*"))
    assert QUESTION not in everything and QUESTION.split()[-1] not in everything

    # Metrics: Prometheus scraped both api replicas and the worker, and counted the job.
    def promql(expr: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{ports['metrics']}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        return list(get_json(url)["data"]["result"])

    poll(lambda: promql('sum(chatq_jobs_finished_total{status="succeeded"})'),
         lambda r: bool(r) and float(r[0]["value"][1]) >= 1, "the finished job's counter in Prometheus")
    up = poll(lambda: promql("up"), lambda r: len(r) >= 3 and all(x["value"][1] == "1" for x in r
                                                                  if x["metric"]["job"] != "otlp"),
              "api-1, api-2 and the worker up")
    assert {x["metric"]["job"] for x in up} >= {"chatq-api", "chatq-worker"}
