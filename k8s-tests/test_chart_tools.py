"""The chart through the standard tools: helm lint, chart-testing's `ct lint`, the
helm-unittest suites (charts/chatq/tests), the umbrella chart, and skaffold offline."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import yaml
from conftest import CHART, REPO, Tools, missing

STACK = REPO / "charts" / "chatq-stack"


def need(tools: Tools, binary: str) -> Path:
    path = tools.bin / binary
    if not path.exists():
        missing(f"{binary} is missing")
    return path


@pytest.mark.parametrize("values", ["dev-redis-values.yaml", "dev-sqs-values.yaml", "openai-values.yaml"])
def test_helm_lint_strict(tools: Tools, values: str) -> None:
    out = tools.helm("lint", "--strict", CHART, "-f", CHART / "ci" / values).stdout
    assert "1 chart(s) linted, 0 chart(s) failed" in out


def test_helm_lint_explains_a_missing_redis(tools: Tools) -> None:
    # helm lint reports a template's `fail` (here: no Redis given) as information, not an error.
    result = tools.helm("lint", CHART, check=False)
    assert "chatq needs Redis: set redis.url" in result.stdout + result.stderr


def test_ct_lint(tools: Tools, tmp_path: Path) -> None:
    ct = need(tools, "ct")
    # ct wants a git work tree for the chart; a throwaway copy keeps it off the real index.
    work = tmp_path / "repo"
    shutil.copytree(REPO / "charts", work / "charts", ignore=shutil.ignore_patterns("chatq-stack"))
    shutil.copy(REPO / "ct.yaml", work / "ct.yaml")
    for args in (
        ["init", "-q", "-b", "main"],
        ["add", "-A"],
        ["-c", "user.name=k8s-tests", "-c", "user.email=k8s-tests@invalid", "commit", "-q", "-m", "chart"],
    ):
        tools.run("git", *args, cwd=work)
    result = tools.run(ct, "lint", "--config", "ct.yaml", "--charts", "charts/chatq", cwd=work, timeout=300)
    assert "All charts linted successfully" in result.stdout + result.stderr


def test_helm_unittest_suites(tools: Tools) -> None:
    suites = sorted((CHART / "tests").glob("*_test.yaml"))
    assert len(suites) >= 4, "charts/chatq/tests holds the helm-unittest suites"
    plugins = Path(tools.env["HELM_PLUGINS"])
    if not (plugins / "helm-unittest").exists() and not any(plugins.glob("*/plugin.yaml")):
        missing(f"the helm-unittest plugin is not installed in {plugins}")
    out = tools.helm("unittest", "--strict", "--color=false", CHART, timeout=300).stdout
    assert f"Test Suites: {len(suites)} passed, {len(suites)} total" in out, out
    assert "failed" not in out.split("Test Suites:")[1].split("\n")[1], out


def test_umbrella_chart_lints_and_wires_observability(tools: Tools, tmp_path: Path) -> None:
    chart = yaml.safe_load((STACK / "Chart.yaml").read_text())
    deps = {d["name"]: d for d in chart["dependencies"]}
    assert set(deps) == {"chatq", "kube-prometheus-stack", "loki", "tempo", "ingress-nginx"}
    for name, dep in deps.items():
        assert dep.get("condition"), f"{name} must be optional"
        assert dep["version"][0].isdigit() and not set("^~*x><=") & set(dep["version"]), (
            f"{name} must be pinned to one version, not {dep['version']}"
        )
    assert deps["chatq"]["repository"] == "file://../chatq"
    for name in ("loki", "tempo"):
        assert "grafana-community" in deps[name]["repository"]

    # The remote charts cannot be fetched here: lint what helm and yamllint check without them...
    out = tools.helm("lint", STACK).stdout
    assert "0 chart(s) failed" in out
    tools.run(
        sys.executable,
        "-m",
        "yamllint",
        "--strict",
        "-c",
        REPO / "charts" / "lintconf.yaml",
        STACK / "Chart.yaml",
        STACK / "values.yaml",
    )

    # ...and render the umbrella with chatq alone (a copy without the remote dependencies).
    copy = tmp_path / "chatq-stack"
    shutil.copytree(STACK, copy, ignore=shutil.ignore_patterns("charts", "Chart.lock"))
    local = dict(chart, dependencies=[dict(deps["chatq"], repository=f"file://{CHART}")])
    (copy / "Chart.yaml").write_text(yaml.safe_dump(local))
    tools.helm("dependency", "build", copy)
    rendered = tools.helm("template", "stack", copy, "-n", "chatq").stdout
    objs = [d for d in yaml.safe_load_all(rendered) if d]
    monitors = [o for o in objs if o["kind"] == "ServiceMonitor"]
    assert monitors, "the stack turns chatq's ServiceMonitors on"
    stack_values = yaml.safe_load((STACK / "values.yaml").read_text())
    selector = stack_values["kube-prometheus-stack"]["prometheus"]["prometheusSpec"]
    release_label = stack_values["chatq"]["metrics"]["serviceMonitor"]["labels"]
    assert all(release_label.items() <= o["metadata"]["labels"].items() for o in monitors)
    assert (
        selector.get("serviceMonitorSelectorNilUsesHelmValues") is False
        or selector.get("serviceMonitorSelector", {}).get("matchLabels", {}).items() <= release_label.items()
    )
    worker = next(o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-worker"))
    env = {e["name"]: e.get("value") for e in worker["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "tempo" in env["OTEL_EXPORTER_OTLP_ENDPOINT"], env
    # Logs over OTLP to the stack's Loki (its gateway's native /otlp), from every component.
    loki_url = "http://chatq-loki-gateway/otlp/v1/logs"  # the stack assumes release `chatq`
    chatq = [o for o in objs if o["kind"] == "Deployment"
             and o["metadata"]["name"].endswith(("-api", "-worker", "-operator"))]
    assert len(chatq) >= 2, [o["metadata"]["name"] for o in objs if o["kind"] == "Deployment"]
    for deployment in chatq:
        name = deployment["metadata"]["name"]
        spec = deployment["spec"]["template"]["spec"]
        got = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
        assert got["OTEL_EXPORTER_OTLP_LOGS_ENDPOINT"] == loki_url, (name, got)
        assert got["OTEL_EXPORTER_OTLP_LOGS_PROTOCOL"] == "http/protobuf"
        assert "OTEL_LOGS_EXPORTER" not in got
    loki = next(d for d in stack_values["kube-prometheus-stack"]["grafana"]["additionalDataSources"]
                if d["type"] == "loki")
    assert loki_url.startswith(loki["url"] + "/"), "chatq writes to the Loki that Grafana reads"
    board = next(o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-dashboard"))
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1"
    cm = next(o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "stack-chatq")
    assert cm["data"]["CHATQ_LOG_JSON_FORMAT"] == "true", "Loki gets one JSON object per line"


def test_skaffold_offline(tools: Tools, tmp_path: Path) -> None:
    skaffold = need(tools, "skaffold")
    env = {
        **tools.env,
        "SKAFFOLD_UPDATE_CHECK": "false",
        "SKAFFOLD_DISABLE_MONITORING": "true",
        "HOME": str(tmp_path),
    }
    diagnose = tools.run(
        skaffold, "diagnose", "--yaml-only", "--filename", REPO / "skaffold.yaml", cwd=REPO, env=env
    )
    parsed = yaml.safe_load(diagnose.stdout)
    assert parsed["apiVersion"].startswith("skaffold/v4beta")
    assert [a["image"] for a in parsed["build"]["artifacts"]] == ["chatq-api", "chatq-worker"]

    # render with images that exist locally by name and tag: nothing is built, pulled or pushed.
    images = tmp_path / "images.json"
    images.write_text(
        '{"builds": [{"imageName": "chatq-api", "tag": "chatq-api:0.1.0-dev"},'
        ' {"imageName": "chatq-worker", "tag": "chatq-worker:0.1.0-dev"}]}'
    )
    result = tools.run(
        skaffold,
        "render",
        "--offline=true",
        "--digest-source=tag",
        "--build-artifacts",
        images,
        "--filename",
        REPO / "skaffold.yaml",
        cwd=REPO,
        timeout=180,
        env=env,
    )
    objs = [d for d in yaml.safe_load_all(result.stdout) if d]
    by_name = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Deployment"}
    assert set(by_name) >= {"chatq-api", "chatq-worker", "chatq-operator", "chatq-redis", "chatq-llmsim"}
    image = {n: d["spec"]["template"]["spec"]["containers"][0]["image"] for n, d in by_name.items()}
    assert image["chatq-api"] == "chatq-api:0.1.0-dev"
    assert image["chatq-worker"] == "chatq-worker:0.1.0-dev"
    assert image["chatq-operator"] == "chatq-worker:0.1.0-dev"
    assert image["chatq-llmsim"] == "chatq-api:0.1.0-dev"
