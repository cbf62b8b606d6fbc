"""Real observability backends on free loopback ports: Prometheus, a trace and a log store.

Prometheus comes from Debian's package (`/usr/bin/prometheus`); the trace store is Jaeger v2
built by scripts/setup-observability (Tempo cannot be fetched from the module proxy here);
the log store is VictoriaLogs, built by the same script (Loki is under the AGPL, which this
project does not take in; VictoriaLogs ingests OTLP logs natively as Loki 3 does).
Each server runs with a configuration of its own in a temporary folder and is always
stopped. Outside CI a missing binary skips, saying why; in CI (CI=true) it fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests import servers

SETUP_HINT = ("run scripts/setup-observability (apt-get install prometheus; Jaeger v2 and "
              "VictoriaLogs via go install)")


def require(what: str, why: str) -> None:
    """Skip outside CI, fail in CI: a missing backend must never pass silently there."""
    servers.unavailable(f"{what} is not available ({why}); {SETUP_HINT}")


def prometheus_binary() -> str | None:
    """The prometheus executable: $CHATQ_PROMETHEUS_BIN, PATH, or Debian's path."""
    for candidate in (os.environ.get("CHATQ_PROMETHEUS_BIN"), shutil.which("prometheus"),
                      "/usr/bin/prometheus"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def jaeger_binary() -> str | None:
    """The jaeger (v2) executable: $CHATQ_JAEGER_BIN, or what setup-observability built."""
    candidates = [os.environ.get("CHATQ_JAEGER_BIN")]
    marker = servers.REPO / ".venv" / ".obs-jaeger"
    if marker.exists():
        candidates.append(marker.read_text().strip())
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "chatq" / "obs"
    candidates += [str(p) for p in sorted(cache.glob("jaeger-*/bin/jaeger"), reverse=True)]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def victorialogs_binary() -> str | None:
    """The victoria-logs executable: $CHATQ_VICTORIALOGS_BIN, or what setup-observability built."""
    candidates = [os.environ.get("CHATQ_VICTORIALOGS_BIN")]
    marker = servers.REPO / ".venv" / ".obs-victorialogs"
    if marker.exists():
        candidates.append(marker.read_text().strip())
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "chatq" / "obs"
    candidates += [str(p) for p in sorted(cache.glob("victoria-logs-*/bin/victoria-logs"), reverse=True)]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def get_json(url: str, timeout: float = 5.0) -> Any:
    """GET url and decode its JSON body."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


@dataclass
class Prometheus:
    """A running Prometheus and a small client for its HTTP API."""

    server: servers.Server
    config: Path

    @property
    def url(self) -> str:
        return self.server.url

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query; returns the result vector (raises on a PromQL error)."""
        try:
            data = get_json(f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"PromQL {expr!r} failed: {exc.code} {exc.read()!r}") from None
        if data.get("status") != "success":
            raise AssertionError(f"PromQL {expr!r} failed: {data}")
        result = data["data"]["result"]
        return result if isinstance(result, list) else [{"value": result}]

    def value(self, expr: str) -> float | None:
        """The single value of an expression (None when it returns nothing)."""
        result = self.query(expr)
        if not result:
            return None
        assert len(result) == 1, f"{expr!r} returned {len(result)} series: {result}"
        return float(result[0]["value"][1])

    def wait_value(self, expr: str, check: Callable[[float], bool], what: str,
                   timeout: float = 30.0) -> float:
        """Poll until `expr` has a value that passes `check`."""
        got = servers.poll(lambda: self.value(expr), lambda v: v is not None and check(v),
                           f"{what} ({expr})", timeout, interval=0.5)
        assert got is not None
        return got

    def wait_samples(self, selector: str, count: int, window: str = "1m", timeout: float = 30.0) -> None:
        """Wait until every series `selector` matches has `count` samples in `window`."""
        servers.poll(lambda: min((len(s["values"]) for s in self.query(f"{selector}[{window}]")),
                                 default=0),
                     lambda fewest: fewest >= count, f"{count} samples of each {selector}",
                     timeout, interval=0.5)

    def targets_up(self) -> dict[str, str]:
        """scrape URL → health of each active target."""
        data = get_json(f"{self.url}/api/v1/targets")
        return {t["scrapeUrl"]: t["health"] for t in data["data"]["activeTargets"]}

    def rules(self) -> list[dict[str, Any]]:
        """The loaded rules, with their health and last evaluation error."""
        data = get_json(f"{self.url}/api/v1/rules")
        return [rule for group in data["data"]["groups"] for rule in group["rules"]]


@contextlib.contextmanager
def prometheus_server(jobs: dict[str, list[str]], rule_files: list[Path] | None = None,
                      interval: str = "1s") -> Iterator[Prometheus]:
    """Prometheus scraping `jobs` (job name → host:port targets) every `interval`."""
    exe = prometheus_binary()
    if exe is None:
        require("prometheus", "no prometheus binary")
    assert exe is not None
    port = servers.free_port()
    with tempfile.TemporaryDirectory(prefix="chatq-prometheus-") as tmp:
        config = Path(tmp) / "prometheus.yml"
        lines = ["global:", f"  scrape_interval: {interval}", f"  evaluation_interval: {interval}"]
        if rule_files:
            lines.append("rule_files:")
            lines += [f"  - {path}" for path in rule_files]
        lines.append("scrape_configs:")
        for job, targets in jobs.items():
            lines += [f"  - job_name: {job}", "    static_configs:",
                      f"      - targets: [{', '.join(repr(t) for t in targets)}]"]
        config.write_text("\n".join(lines) + "\n")
        log = Path(tmp) / "prometheus.log"
        proc = servers._popen([exe, f"--config.file={config}", f"--storage.tsdb.path={tmp}/data",
                               f"--web.listen-address=127.0.0.1:{port}",
                               "--storage.tsdb.retention.time=1h", "--log.level=warn"], log)
        server = servers.Server(f"http://127.0.0.1:{port}", port, proc, log)
        try:
            servers.wait_for(lambda: servers.http_ok(f"{server.url}/-/ready"),
                             f"prometheus on port {port}", 60, proc, log)
            yield Prometheus(server, config)
        finally:
            server.stop()


@dataclass
class Jaeger:
    """A running Jaeger v2 (in-memory store): OTLP in, query API out."""

    server: servers.Server
    otlp_http: str
    """Base URL of the OTLP/HTTP receiver (what OTEL_EXPORTER_OTLP_ENDPOINT takes)."""
    otlp_grpc: str
    """URL of the OTLP/gRPC receiver (with OTEL_EXPORTER_OTLP_PROTOCOL=grpc)."""
    query_url: str

    def trace(self, trace_id: str) -> dict[str, Any] | None:
        """The trace as OTLP JSON (api/v3), or None while it is not there."""
        try:
            data = get_json(f"{self.query_url}/api/v3/traces/{trace_id}")
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise
        result = data.get("result", data)
        return result if result.get("resourceSpans") else None

    def find_traces(self, service: str, tags: dict[str, str]) -> list[dict[str, Any]]:
        """Search by service and span tags (the UI's API, as a person would search)."""
        query = urllib.parse.urlencode({"service": service, "tags": json.dumps(tags),
                                        "lookback": "1h", "limit": "20"})
        data = get_json(f"{self.query_url}/api/traces?{query}")
        return list(data.get("data") or [])


JAEGER_CONFIG = """\
service:
  extensions: [jaeger_storage, jaeger_query, healthcheckv2]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [jaeger_storage_exporter]
  telemetry:
    resource:
      service.name: jaeger
    metrics:
      level: none
    logs:
      level: info
extensions:
  healthcheckv2:
    use_v2: true
    http:
      endpoint: 127.0.0.1:{health}
  jaeger_query:
    storage:
      traces: memstore
    http:
      endpoint: 127.0.0.1:{query}
    grpc:
      endpoint: 127.0.0.1:{query_grpc}
  jaeger_storage:
    backends:
      memstore:
        memory:
          max_traces: 10000
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:{otlp_grpc}
      http:
        endpoint: 127.0.0.1:{otlp_http}
processors:
  batch:
    timeout: 100ms
exporters:
  jaeger_storage_exporter:
    trace_storage: memstore
"""


@contextlib.contextmanager
def jaeger_server() -> Iterator[Jaeger]:
    """Jaeger v2 with an in-memory store, every port a free loopback one."""
    exe = jaeger_binary()
    if exe is None:
        require("the trace store (jaeger v2)", "no jaeger binary")
    assert exe is not None
    ports = {name: servers.free_port() for name in ("health", "query", "query_grpc", "otlp_grpc",
                                                     "otlp_http")}
    with tempfile.TemporaryDirectory(prefix="chatq-jaeger-") as tmp:
        config = Path(tmp) / "jaeger.yaml"
        config.write_text(JAEGER_CONFIG.format(**ports))
        log = Path(tmp) / "jaeger.log"
        proc = servers._popen([exe, f"--config={config}"], log)
        server = servers.Server(f"http://127.0.0.1:{ports['query']}", ports["query"], proc, log)
        try:
            servers.wait_for(lambda: servers.http_ok(f"{server.url}/api/services"),
                             f"jaeger's query API on port {ports['query']}", 60, proc, log)
            yield Jaeger(server, f"http://127.0.0.1:{ports['otlp_http']}",
                         f"http://127.0.0.1:{ports['otlp_grpc']}", server.url)
        finally:
            # Jaeger takes 10 s to drain on SIGTERM; its in-memory store needs none of that.
            server.stop(timeout=2)


@dataclass
class VictoriaLogs:
    """A running VictoriaLogs (filesystem storage in a temp dir): OTLP logs in, LogsQL out."""

    server: servers.Server

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def otlp_logs(self) -> str:
        """The OTLP/HTTP logs URL (what OTEL_EXPORTER_OTLP_LOGS_ENDPOINT takes)."""
        return f"{self.url}/insert/opentelemetry/v1/logs"

    def query(self, logsql: str, limit: int = 1000) -> list[dict[str, Any]]:
        """Every log entry a LogsQL query matches, as the HTTP API returns them (JSON lines)."""
        # Entries are searchable once their in-memory part is flushed; ask for that first.
        with urllib.request.urlopen(f"{self.url}/internal/force_flush", timeout=10):
            pass
        body = urllib.parse.urlencode({"query": logsql, "limit": str(limit)}).encode()
        try:
            with urllib.request.urlopen(f"{self.url}/select/logsql/query", data=body, timeout=10) as resp:
                text = resp.read().decode()
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"LogsQL {logsql!r} failed: {exc.code} {exc.read()!r}") from None
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def wait_query(self, logsql: str, check: Callable[[list[dict[str, Any]]], bool], what: str,
                   timeout: float = 30.0) -> list[dict[str, Any]]:
        """Poll a query until its entries pass `check` (batches arrive a moment later)."""
        return servers.poll(lambda: self.query(logsql), check, f"{what} ({logsql!r})", timeout,
                            interval=0.5)


@contextlib.contextmanager
def victorialogs_server() -> Iterator[VictoriaLogs]:
    """VictoriaLogs storing in a temporary folder, on a free loopback port."""
    exe = victorialogs_binary()
    if exe is None:
        require("the log store (VictoriaLogs)", "no victoria-logs binary")
    assert exe is not None
    port = servers.free_port()
    with tempfile.TemporaryDirectory(prefix="chatq-victorialogs-") as tmp:
        log = Path(tmp) / "victoria-logs.log"
        proc = servers._popen([exe, f"-storageDataPath={tmp}/data", f"-httpListenAddr=127.0.0.1:{port}",
                               "-retentionPeriod=1d", "-loggerLevel=WARN"], log)
        server = servers.Server(f"http://127.0.0.1:{port}", port, proc, log)
        try:
            servers.wait_for(lambda: servers.http_ok(f"{server.url}/health"),
                             f"victoria-logs on port {port}", 60, proc, log)
            yield VictoriaLogs(server)
        finally:
            server.stop()


@pytest.fixture
def victorialogs() -> Iterator[VictoriaLogs]:
    """A fresh VictoriaLogs for this test."""
    with victorialogs_server() as server:
        yield server


@pytest.fixture
def prometheus_factory() -> Iterator[Callable[..., Prometheus]]:
    """`prometheus_factory({"chatq-api": ["127.0.0.1:8000"]}, rule_files=[...])`."""
    stack = contextlib.ExitStack()

    def make(jobs: dict[str, list[str]], rule_files: list[Path] | None = None) -> Prometheus:
        return stack.enter_context(prometheus_server(jobs, rule_files))

    with stack:
        yield make


@pytest.fixture
def jaeger() -> Iterator[Jaeger]:
    """A fresh Jaeger v2 for this test."""
    with jaeger_server() as server:
        yield server


@pytest.fixture
def promtool() -> str:
    """Debian's promtool, which comes with the prometheus package."""
    exe = shutil.which("promtool") or "/usr/bin/promtool"
    if not os.access(exe, os.X_OK):
        require("promtool", "not installed")
    return exe


def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing its output."""
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
