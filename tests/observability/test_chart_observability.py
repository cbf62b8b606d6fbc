"""The chart ships the dashboard and the alerts exactly as tested here, when asked to.

Renders charts/chatq with helm (built by scripts/setup-k8s) and compares the dashboard
ConfigMap and the PrometheusRule with the files that test_prometheus.py evaluates.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from typing import Any

import pytest

from tests.observability.conftest import require, run
from tests.observability.test_prometheus import ALERTS, CHART, DASHBOARD


@pytest.fixture(scope="module")
def helm() -> str:
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "chatq", "k8s")
    found = shutil.which("helm") or next(iter(sorted(glob.glob(f"{cache}/*/bin/helm"), reverse=True)), None)
    if not found:
        require("helm", "not on PATH nor in ~/.cache/chatq/k8s; run scripts/setup-k8s")
    assert found is not None
    return found


def render(helm: str, *sets: str) -> list[dict[str, Any]]:
    import yaml  # type: ignore[import-untyped]

    args = [helm, "template", "obs", str(CHART), "--namespace", "chatq", "--set", "dev.enabled=true",
            # metrics.prometheusRule is read with a default, whether or not the schema has it yet.
            "--skip-schema-validation"]
    for s in sets:
        args += ["--set", s]
    result = run(args)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def test_off_by_default(helm: str) -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for d in render(helm)}
    assert not any(kind == "PrometheusRule" for kind, _ in kinds)
    assert ("ConfigMap", "obs-chatq-dashboard") not in kinds


def test_dashboard_configmap_carries_the_tested_json(helm: str) -> None:
    docs = render(helm, "metrics.dashboard.enabled=true",
                  "metrics.dashboard.annotations.grafana_folder=chatq")
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "obs-chatq-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1", "Grafana's sidecar looks for this label"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "chatq"}
    assert json.loads(cm["data"]["chatq.json"]) == json.loads(DASHBOARD.read_text())


def test_prometheus_rule_carries_the_tested_alerts(helm: str) -> None:
    import yaml

    docs = render(helm, "metrics.prometheusRule.enabled=true",
                  "metrics.prometheusRule.labels.release=kube-prometheus-stack")
    rule = next(d for d in docs if d["kind"] == "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert rule["spec"] == yaml.safe_load(ALERTS.read_text())
