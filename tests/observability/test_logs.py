"""Each job's log lines in a real log store, found by job id and by the trace id Jaeger holds.

The api and the worker run as processes with only the standard OTEL_* variables set:
traces to Jaeger v2, logs over OTLP/HTTP to VictoriaLogs (the log store that stands in for
Loki here: Loki is under the AGPL; VictoriaLogs ingests OTLP natively, as Loki 3 does at
/otlp). A known load runs (jobs that succeed, one that fails for good); then, for each job,
a LogsQL query by `job_id` finds the api's "queued" line and the worker's outcome line, all
with one trace id, and a query by that trace id finds the same lines; Jaeger holds a trace
with that id whose spans name the job. The failed job's line carries its error code. No
question or answer text is anywhere in the log store, and the JSON lines on stderr stay.
The operator's records reach the store too, under service.name chatq-operator.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from tests import servers
from tests.conftest import StackFactory
from tests.observability.conftest import Jaeger, VictoriaLogs
from tests.observability.test_traces import flatten
from tests.servers import wait_done

QUESTION = "which colour is the sky over the log store"
OK_JOBS = 3


def messages(entries: list[dict[str, Any]]) -> list[str]:
    return sorted(e["_msg"] for e in entries)


def test_each_jobs_lines_are_found_by_job_id_and_by_the_trace_id_jaeger_holds(
        victorialogs: VictoriaLogs, jaeger: Jaeger, stack_factory: StackFactory) -> None:
    # The stores come first: they are stopped after the api and worker have flushed.
    stack = stack_factory(
        "redis", workers=1, CHATQ_LOG_JSON_FORMAT="true",
        OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=f"{jaeger.otlp_http}/v1/traces",
        OTEL_EXPORTER_OTLP_LOGS_ENDPOINT=victorialogs.otlp_logs,
        OTEL_BSP_SCHEDULE_DELAY="100", OTEL_BLRP_SCHEDULE_DELAY="100")
    questions = [f"{QUESTION} #{i} {uuid.uuid4().hex[:6]}" for i in range(OK_JOBS)]
    questions.append(f"{QUESTION} doomed llmsim:fail=400")
    with stack.client() as http:
        ids = [http.post("/v1/chat", json={"message": q}).json()["id"] for q in questions]
        jobs = {job_id: wait_done(http, job_id, timeout=60) for job_id in ids}
    failed = ids[-1]
    assert [jobs[i]["status"] for i in ids] == ["succeeded"] * OK_JOBS + ["failed"], jobs
    code = jobs[failed]["error"]["code"]
    assert code == "model_error_400", jobs[failed]

    for job_id in ids:
        outcome = "failed" if job_id == failed else "succeeded"

        def both_lines(entries: list[dict[str, Any]], outcome: str = outcome) -> bool:
            return (any(f" {outcome}" in e["_msg"] for e in entries)
                    and any("queued" in e["_msg"] for e in entries))

        by_job = victorialogs.wait_query(f'job_id:="{job_id}"', both_lines,
                                         f"job {job_id}'s queued and {outcome} lines")
        services = {e["_msg"].split(":")[0]: e["service.name"] for e in by_job}
        queued = next(e for e in by_job if "queued" in e["_msg"])
        done = next(e for e in by_job if f"job {job_id} {outcome}" in e["_msg"])
        assert queued["service.name"] == "chatq-api", services
        assert done["service.name"] == "chatq-worker", services
        assert done["severity_text"] == ("WARN" if outcome == "failed" else "INFO"), done

        # One trace from the request to the outcome: every line of the job names it.
        trace_ids = {str(e.get("trace_id", "")) for e in by_job}
        assert len(trace_ids) == 1 and "" not in trace_ids, by_job
        trace_id = trace_ids.pop()
        assert len(trace_id) == 32 and all(len(e["span_id"]) == 16 for e in by_job), by_job
        by_trace = victorialogs.query(f'trace_id:="{trace_id}"')
        assert {e.get("job_id") for e in by_trace} == {job_id}, by_trace
        assert set(messages(by_job)) <= set(messages(by_trace))

        # Jaeger holds that trace, and its spans name the job.
        deadline = time.monotonic() + 30
        trace = jaeger.trace(trace_id)
        while trace is None and time.monotonic() < deadline:
            time.sleep(0.3)
            trace = jaeger.trace(trace_id)
        assert trace is not None, f"trace {trace_id} of job {job_id} is not in jaeger"
        assert job_id in {s["attributes"].get("chatq.job.id") for s in flatten(trace)}

        if outcome == "failed":
            assert done["error_code"] == code, done
        else:
            assert "error_code" not in done, done

    # The failed job's line, found as a person would: by its error code.
    coded = victorialogs.query(f'error_code:="{code}"')
    assert {e["job_id"] for e in coded} == {failed}, coded

    # Nothing of the users' text in the store (prompt capture is off by default).
    everything = json.dumps(victorialogs.query("*", limit=100_000))
    for question in questions:
        assert question not in everything and question.split(" #")[-1] not in everything
    for job in jobs.values():
        if job.get("answer"):
            assert job["answer"][:40] not in everything

    # The JSON lines on stderr stay as they were, error code included.
    worker_lines = [json.loads(x) for x in stack.workers[0].logs().splitlines() if x.startswith("{")]
    line = next(x for x in worker_lines if x["msg"].startswith(f"job {failed} failed:"))
    assert line["error_code"] == code and len(line["trace_id"]) == 32


def test_the_operator_sends_its_records_as_chatq_operator(victorialogs: VictoriaLogs,
                                                          tmp_path: Path) -> None:
    # No cluster: kopf's startup fails (an ERROR record with the exception) and retries.
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\nusers: []\n")
    env = servers.chatq_env(KUBECONFIG=str(kubeconfig), CHATQ_OPERATOR_METRICS_PORT="0",
                            OTEL_EXPORTER_OTLP_LOGS_ENDPOINT=victorialogs.otlp_logs,
                            OTEL_BLRP_SCHEDULE_DELAY="100")
    env["PYTHONPATH"] = os.pathsep.join([str(servers.REPO / "operator"), env.get("PYTHONPATH", "")])
    log = tmp_path / "operator.log"
    proc = servers._popen([sys.executable, "-m", "chatq_operator", "--namespace", "nowhere"], log, env)
    operator = servers.Server("", 0, proc, log)
    try:
        entries = victorialogs.wait_query(
            '"service.name":="chatq-operator"',
            lambda es: any(e.get("severity_text") == "ERROR" for e in es), "the operator's records")
    finally:
        operator.stop(timeout=10)
    assert any(e["_msg"].startswith("logs on: OTLP to") for e in entries), messages(entries)
    failure = next(e for e in entries if e.get("severity_text") == "ERROR")
    assert failure["exception.type"] and "Traceback" in failure["exception.stacktrace"], failure
    assert failure["logger"].startswith("kopf"), failure
