"""A real Prometheus scrapes a running api and worker; PromQL sees exactly the known load.

Every PromQL expression of the Grafana dashboard and of the alerting rules is then evaluated
against that Prometheus: each must parse, and each returns data unless it is one of the few
that must be empty here (the operator's series: no operator runs in this test; 5xx ratios:
no request failed). The alert rules are loaded the way Prometheus loads them and must
evaluate without errors; the dead-letter and error-rate alerts go pending after the failed
job, and "no workers" goes pending once the worker is stopped while a message waits.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests import servers
from tests.conftest import Stack, StackFactory
from tests.observability.conftest import Prometheus, run
from tests.servers import wait_done

CHART = servers.REPO / "charts" / "chatq"
DASHBOARD = CHART / "dashboards" / "chatq.json"
ALERTS = CHART / "dashboards" / "chatq-alerts.yaml"

QUESTION = "what does the observability test ask"
OK_JOBS = 5


def dashboard_expressions(kind: str = "prometheus") -> list[tuple[str, str]]:
    """(panel title, expr) of every query of one data source type in the dashboard."""
    dashboard = json.loads(DASHBOARD.read_text())
    found = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            if target.get("datasource", panel.get("datasource", {})).get("type") == kind:
                found.append((panel["title"], target["expr"]))
    return found


def concrete(expr: str) -> str:
    """A dashboard expression with Grafana's variables as Grafana would fill them in here."""
    return (expr.replace("$__rate_interval", "1m").replace("$__interval", "15s")
            .replace("$namespace", ".*"))


def alert_rules() -> list[dict[str, Any]]:
    import yaml  # type: ignore[import-untyped]

    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def must_be_empty(expr: str) -> bool:
    """Expressions that rightly return nothing in this test, and why."""
    return ("chatq_operator_" in expr  # no operator runs here (k8s-tests cover it)
            or 'status=~"5.."' in expr  # no request failed
            or "chatq_provider_rate_limited" in expr  # llmsim is not limited here
            or "chatq_quota_refusals" in expr)  # and no key has a quota


def run_known_load(stack: Stack) -> list[str]:
    """5 jobs that succeed, one retried after a 429, one failing for good; returns job ids."""
    with stack.client() as http:
        ids = [http.post("/v1/chat", json={"message": f"{QUESTION} #{i}"}).json()["id"]
               for i in range(OK_JOBS)]
        retried = http.post("/v1/chat", json={"message": f"{QUESTION} llmsim:fail=429 llmsim:times=1"})
        failed = http.post("/v1/chat", json={"message": f"{QUESTION} llmsim:fail=400"})
        ids += [retried.json()["id"], failed.json()["id"]]
        jobs = {job_id: wait_done(http, job_id, timeout=60) for job_id in ids}
        assert http.get("/v1/chat/00000000000000000000000000000000").status_code == 404
    statuses = [job["status"] for job in jobs.values()]
    assert statuses.count("succeeded") == OK_JOBS + 1 and statuses.count("failed") == 1, statuses
    return ids


def rule_states(prom: Prometheus) -> dict[str, dict[str, Any]]:
    return {rule["name"]: rule for rule in prom.rules()}


def wait_rule(prom: Prometheus, name: str, check: Callable[[dict[str, Any]], bool], what: str,
              timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    rule: dict[str, Any] = {}
    while time.monotonic() < deadline:
        rule = rule_states(prom).get(name, {})
        if rule and check(rule):
            return rule
        time.sleep(0.5)
    raise AssertionError(f"alert {name}: timed out waiting for {what}; last: {rule}")


def test_rule_file_passes_promtool(promtool: str) -> None:
    result = run([promtool, "check", "rules", str(ALERTS)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_dashboard_is_grafana_json_with_the_panels_the_issue_asks_for() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "chatq-overview"
    titles = {p["title"] for p in dashboard["panels"] if p["type"] == "row"}
    assert titles == {"Throughput", "Latency", "Backlog", "Errors", "Tokens", "Replicas", "Logs",
                      "Rate budget and quotas"}
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    queries = [t for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(dashboard_expressions()) + len(dashboard_expressions("loki")) == len(queries)
    for title, expr in dashboard_expressions() + dashboard_expressions("loki"):
        assert "$namespace" in expr, f"panel {title!r} ignores the namespace variable: {expr}"
    # The logs panel: chatq's services from the Loki data source, narrowed to one job or trace.
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["logs"]["type"] == "datasource" and variables["logs"]["query"] == "loki"
    assert variables["job_id"]["type"] == "textbox"
    logs = next(p for p in dashboard["panels"] if p["type"] == "logs")
    assert logs["datasource"] == {"type": "loki", "uid": "${logs}"}
    [(_, logql)] = dashboard_expressions("loki")
    assert 'service_name=~"chatq-api|chatq-worker|chatq-operator"' in logql
    assert "job_id=~" in logql and "trace_id=~" in logql


def test_prometheus_sees_the_known_load(stack_factory: StackFactory,
                                        prometheus_factory: Callable[..., Prometheus]) -> None:
    stack = stack_factory("redis", workers=1, CHATQ_WORKER_CONCURRENCY="4")
    worker = stack.workers[0]
    prom = prometheus_factory({"chatq-api": [f"127.0.0.1:{stack.api.port}"],
                               "chatq-worker": [f"127.0.0.1:{worker.port}"]},
                              rule_files=[ALERTS])
    # One job first, so that every series exists before the load: rate() sees an increase
    # only between two samples of a series, and a series is born with its first sample.
    # A failed job among them: the dead-letter alert must see even the first dead letter.
    with stack.client() as http:
        first = http.post("/v1/chat", json={"message": f"{QUESTION} first"}).json()["id"]
        first_failed = http.post("/v1/chat", json={"message": f"{QUESTION} llmsim:fail=400"}).json()["id"]
        assert wait_done(http, first, timeout=60)["status"] == "succeeded"
        assert wait_done(http, first_failed, timeout=60)["status"] == "failed"
        assert http.get("/v1/chat/no-such-job").status_code == 404
    prom.wait_samples("chatq_jobs_finished_total", 2)
    wait_rule(prom, "ChatqDeadLettersGrowing", lambda r: r["state"] in ("pending", "firing"),
              "pending after the first dead letter of a new process")
    job_ids = [first, first_failed, *run_known_load(stack)]
    total = OK_JOBS + 4

    # Scrapes are every second; wait until the last job's counters are in.
    prom.wait_value("sum(chatq_jobs_finished_total)", lambda v: v == total, "all jobs finished")
    prom.wait_value("sum(chatq_jobs_enqueued_total)", lambda v: v == total, "all jobs enqueued")
    prom.wait_value('sum(chatq_http_requests_total{route="/v1/chat/{job_id}", status="404"})',
                    lambda v: v == 2, "the two 404s")
    prom.wait_value('chatq_queue_messages{job="chatq-api", state="visible"}', lambda v: v == 0,
                    "the api to see an empty queue")
    assert set(prom.targets_up().values()) == {"up"}, prom.targets_up()
    expect = {
        'sum(chatq_jobs_finished_total{status="succeeded"})': OK_JOBS + 2,
        'sum(chatq_jobs_finished_total{status="failed", reason="model_error_400"})': 2,
        "sum(chatq_dead_letters_total)": 2,
        'sum(chatq_dead_letters_total{reason="model_error_400"})': 2,
        'sum(chatq_model_retries_total{reason="model_rate_limited"})': 1,
        'sum(chatq_http_requests_total{method="POST", route="/v1/chat", status="202"})': total,
        'sum(chatq_http_request_duration_seconds_count{route="/v1/chat", status="202"})': total,
        'sum(chatq_http_requests_total{route="/v1/chat/{job_id}", status="404"})': 2,
        "sum(chatq_queue_wait_seconds_count)": total,
        'sum(chatq_model_request_duration_seconds_count{outcome="ok"})': OK_JOBS + 2,
        'sum(chatq_model_request_duration_seconds_count{outcome="error"})': 3,
        "sum(chatq_model_time_to_first_token_seconds_count)": OK_JOBS + 2,
        "sum(chatq_deliveries_total)": total,
        'chatq_worker_concurrency{job="chatq-worker"}': 4,
        'chatq_worker_in_flight{job="chatq-worker"}': 0,
        'chatq_queue_messages{job="chatq-api", state="visible"}': 0,
    }
    got = {expr: prom.value(expr) for expr in expect}
    assert got == expect
    completion = prom.value('sum(chatq_tokens_total{kind="completion"})')
    prompt = prom.value('sum(chatq_tokens_total{kind="prompt"})')
    assert completion is not None and completion >= OK_JOBS + 2
    assert prompt is not None and prompt >= OK_JOBS + 2
    # rate() needs two samples of a series: wait for the next scrapes.
    p95 = "histogram_quantile(0.95, sum by (le) (rate(chatq_model_request_duration_seconds_bucket[1m])))"
    prom.wait_value(p95, lambda v: 0 < v < 30, "a model latency p95")

    # No job id and no user text in any label of any chatq series.
    series = prom.query('{__name__=~"chatq_.+"}')
    assert len(series) > 50
    for s in series:
        for name, value in s["metric"].items():
            assert not any(job_id in value for job_id in job_ids), f"job id in label {name}: {s}"
            assert "observability test" not in value, f"user text in label {name}: {s}"

    # Every dashboard query parses, and returns data unless it must be empty here (once every
    # series has the two samples that rate() needs).
    prom.wait_samples('{__name__=~"chatq_.+"}', 2)
    empty = []
    for title, expr in dashboard_expressions():
        result = prom.query(concrete(expr))
        if must_be_empty(expr):
            continue
        if not result:
            empty.append(f"{title}: {expr}")
    assert not empty, "dashboard queries without data after the load:\n" + "\n".join(empty)

    # The alert rules loaded and evaluate cleanly; their expressions parse as queries too.
    rules = alert_rules()
    assert {r["alert"] for r in rules} == {"ChatqBacklogTooOld", "ChatqDeadLettersGrowing",
                                          "ChatqJobErrorRateHigh", "ChatqApiErrorRateHigh",
                                          "ChatqNoWorkers"}
    for rule in rules:
        prom.query(rule["expr"])
    wait_rule(prom, "ChatqJobErrorRateHigh", lambda r: r["state"] in ("pending", "firing"),
              "pending: 2 of 9 jobs failed")
    states = rule_states(prom)
    for name, rule in states.items():
        assert rule["health"] == "ok", f"{name}: {rule.get('lastError')}"
    assert states["ChatqBacklogTooOld"]["state"] == "inactive"
    assert states["ChatqApiErrorRateHigh"]["state"] == "inactive"
    assert states["ChatqNoWorkers"]["state"] == "inactive"
    dead = states["ChatqDeadLettersGrowing"]["alerts"][0]["labels"]
    assert dead["reason"] == "model_error_400" and dead["severity"] == "warning"

    # No worker while a message waits: the api still reports the backlog, the alert goes off.
    assert worker.stop() == 0
    with stack.client() as http:
        waiting = http.post("/v1/chat", json={"message": "nobody will answer this yet"})
        assert waiting.status_code == 202
    prom.wait_value('max(chatq_queue_messages{state="visible"})', lambda v: v >= 1,
                    "the api to report the waiting message")
    wait_rule(prom, "ChatqNoWorkers", lambda r: r["state"] in ("pending", "firing"),
              "pending with a message waiting and no worker", timeout=45)


@pytest.mark.parametrize("path", [DASHBOARD, ALERTS], ids=["dashboard", "alerts"])
def test_no_user_text_or_job_ids_in_label_sets(path: Path) -> None:
    """The label names the dashboard and alerts group by are all bounded ones."""
    text = path.read_text()
    grouped = set(re.findall(r"by \(([^)]*)\)", text))
    labels = {label.strip() for group in grouped for label in group.split(",")}
    assert labels <= {"le", "route", "status", "reason", "model", "kind", "queue", "state",
                      "name", "namespace", "pod", "instance",
                      "endpoint", "priority", "key"}, labels  # endpoint, key: digests or names
