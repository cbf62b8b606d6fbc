"""`helm template` of charts/chatq for the defaults and each documented combination of values.

No cluster needed: these assert on the rendered objects, the fields that matter to a
running chatq (images, env, probes, hardening, selectors, scaling) and to its operators.

Which suite holds a chart fact: helm-unittest (charts/chatq/tests) holds the facts of one
template given some values, what a chart user reads in that template; pytest (this file and
test_chart_consistency.py) holds the facts that span objects or other files (labels and
selectors of every object, the kinds of a whole render, hardening and service-link variables
on every pod, a value that must agree between two objects, env vars that are real settings,
the schema generated from the settings, images vs Dockerfiles, skaffold) and what
helm-unittest cannot express. A fact is asserted in one of them, never both.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from chart import all_env, all_of, configmap_env, container, env, find, kinds, labels, pod_spec
from chatq import settings as settings_mod
from chatq.api.routes import health
from conftest import CHART, Tools

REDIS = {"redis": {"url": "redis://redis.example:6379/0"}}
APP_VERSION = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]


def merged(*parts: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merged(out[key], value)
            else:
                out[key] = value
    return out


def render_fails(tools: Tools, values: dict[str, Any]) -> str:
    path = tools.home / "failing-values.yaml"
    path.write_text(yaml.safe_dump(values))
    result = tools.helm("template", "chatq", CHART, "-f", path, check=False)
    assert result.returncode != 0, f"expected helm template to fail; it rendered:\n{result.stdout[:2000]}"
    return result.stderr


# --- the defaults (plus the one value they need) -------------------------------------------


def test_defaults_render_the_expected_objects(tools: Tools) -> None:
    objs = tools.template(values=REDIS)
    assert kinds(objs) == sorted(
        [
            "ConfigMap/chatq",
            "Secret/chatq",
            "ServiceAccount/chatq",
            "ServiceAccount/chatq-operator",
            "Deployment/chatq-api",
            "Service/chatq-api",
            # no PodDisruptionBudget/chatq-api: without files.s3.bucket the file store is the
            # api pod's emptyDir, one replica, and minAvailable 1 would block node drains
            "Deployment/chatq-worker",
            "Service/chatq-worker-metrics",
            "PodDisruptionBudget/chatq-worker",
            "QueueScaler/chatq-worker",
            "Deployment/chatq-operator",
            "Role/chatq-operator",
            "RoleBinding/chatq-operator",
            "Pod/chatq-test-ask",
            # the pre-delete hook that lets the operator release the QueueScaler first
            "ServiceAccount/chatq-cleanup",
            "Role/chatq-cleanup",
            "RoleBinding/chatq-cleanup",
            "Job/chatq-cleanup",
        ]
    )


def test_every_object_has_the_standard_labels(tools: Tools) -> None:
    for obj in tools.template(values=REDIS, release="prod"):
        got = labels(obj)
        assert got["app.kubernetes.io/name"] == "chatq", obj["metadata"]["name"]
        assert got["app.kubernetes.io/instance"] == "prod"
        assert got["app.kubernetes.io/version"] == APP_VERSION
        assert got["app.kubernetes.io/managed-by"] == "Helm"
        assert (
            got["helm.sh/chart"] == f"chatq-{yaml.safe_load((CHART / 'Chart.yaml').read_text())['version']}"
        )


def test_selectors_match_their_pods_and_services(tools: Tools) -> None:
    objs = tools.template(values=merged(REDIS, {"dev": {"enabled": False}, "files": {"s3": {"bucket": "b"}}}))
    for deployment in all_of(objs, "Deployment"):
        selector = deployment["spec"]["selector"]["matchLabels"]
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= pod_labels.items(), deployment["metadata"]["name"]
        assert set(selector) == {
            "app.kubernetes.io/name",
            "app.kubernetes.io/instance",
            "app.kubernetes.io/component",
        }
    api = find(objs, "Deployment", "chatq-api")
    assert find(objs, "Service", "chatq-api")["spec"]["selector"] == api["spec"]["selector"]["matchLabels"]
    worker = find(objs, "Deployment", "chatq-worker")
    assert (
        find(objs, "Service", "chatq-worker-metrics")["spec"]["selector"]
        == worker["spec"]["selector"]["matchLabels"]
    )
    for pdb, target in (("chatq-api", api), ("chatq-worker", worker)):
        assert (
            find(objs, "PodDisruptionBudget", pdb)["spec"]["selector"]["matchLabels"]
            == target["spec"]["selector"]["matchLabels"]
        )


def test_hardening_of_every_chatq_pod(tools: Tools) -> None:
    objs = tools.template(values=merged(REDIS, {"dev": {"enabled": True}}))
    for obj in [*all_of(objs, "Deployment"), *all_of(objs, "Pod"), *all_of(objs, "Job")]:
        name = obj["metadata"]["name"]
        spec = pod_spec(obj)
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            assert c["resources"]["requests"]["memory"], name
            assert c["resources"]["limits"]["memory"], name
            assert not c["image"].endswith(":latest"), name
        if labels(obj)["app.kubernetes.io/component"] in {"operator", "cleanup"}:
            assert spec.get("automountServiceAccountToken", True) is True, f"{name} talks to the API server"
        else:
            assert spec["automountServiceAccountToken"] is False, f"{name} needs no Kubernetes API token"


def test_api_and_worker_probes(tools: Tools) -> None:
    objs = tools.template(values=REDIS)
    api = container(find(objs, "Deployment", "chatq-api"))
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # /readyz bounds its own checks under the probe's timeout: the kubelet reads its 503.
    assert api["readinessProbe"]["timeoutSeconds"] > health.READY_WITHIN_SECONDS
    worker = container(find(objs, "Deployment", "chatq-worker"))
    assert worker["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert worker["livenessProbe"]["terminationGracePeriodSeconds"] == 10  # a frozen worker: no 150 s wait
    operator = container(find(objs, "Deployment", "chatq-operator"))
    assert operator["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert env(find(objs, "Deployment", "chatq-operator"))["CHATQ_OPERATOR_LIVENESS"].endswith(
        ":8081/healthz"
    )


def test_worker_outlives_its_grace(tools: Tools) -> None:
    objs = tools.template(values=REDIS)
    worker = find(objs, "Deployment", "chatq-worker")
    grace = float(all_env(objs, worker)["CHATQ_WORKER_GRACE_SECONDS"])
    assert pod_spec(worker)["terminationGracePeriodSeconds"] > grace >= 120
    assert env(worker)["CHATQ_TELEMETRY_METRICS_PORT"] == "9100"
    # Probes and scrapes come from outside the pod: loopback would fail them all.
    assert env(worker)["CHATQ_TELEMETRY_METRICS_HOST"] == "0.0.0.0"


def test_api_grace_outlasts_its_pause_and_drain(tools: Tools) -> None:
    """The api's grace against the settings (helm-unittest holds the rest of the rollout's
    needs): the preStop pause, then uvicorn's drain of long-polls, up to max_wait_seconds + 5
    (chatq.cli.cmd_api), must end before the kill; test_real_pods' upgrade under load runs it."""
    api = find(tools.template(values=REDIS), "Deployment", "chatq-api")
    command = container(api)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    drain = settings_mod.ApiSettings().max_wait_seconds + 5
    assert pod_spec(api)["terminationGracePeriodSeconds"] > int(command[1]) + drain, (command, drain)


def test_queuescaler_scales_by_the_workers_concurrency(tools: Tools) -> None:
    objs = tools.template(values=merged(REDIS, {"config": {"worker": {"concurrency": 8}}}))
    worker = find(objs, "Deployment", "chatq-worker")
    qs = find(objs, "QueueScaler", "chatq-worker")
    assert (
        qs["spec"]["messagesPerReplica"] == 8 == int(configmap_env(objs, worker)["CHATQ_WORKER_CONCURRENCY"])
    )


def test_no_cluster_wide_rbac(tools: Tools) -> None:
    objs = tools.template(values=REDIS, namespace="team-a")
    assert not all_of(objs, "ClusterRole") and not all_of(objs, "ClusterRoleBinding")


# --- dev clusters ----------------------------------------------------------------------------


def test_dev_with_redis(tools: Tools) -> None:
    objs = tools.template(values={"dev": {"enabled": True}})
    assert find(objs, "Deployment", "chatq-redis") and find(objs, "Service", "chatq-redis")
    assert not [o for o in objs if "elasticmq" in o["metadata"]["name"]]
    worker = find(objs, "Deployment", "chatq-worker")
    cfg = all_env(objs, worker)
    assert cfg["CHATQ_REDIS_URL"] == "redis://chatq-redis:6379/0"
    assert cfg["CHATQ_QUEUE_BACKEND"] == "redis"
    assert cfg["CHATQ_LLMSIM_HOST"] == "chatq-llmsim" and cfg["CHATQ_LLMSIM_PORT"] == "8100"
    llmsim = find(objs, "Deployment", "chatq-llmsim")
    assert container(llmsim)["image"] == f"chatq-api:{APP_VERSION}"
    assert container(llmsim)["args"] == ["llmsim"]
    assert env(llmsim)["CHATQ_LLMSIM_HOST"] == "0.0.0.0"
    redis = container(find(objs, "Deployment", "chatq-redis"))
    assert redis["image"] == "redis:7.4.2-alpine"
    assert find(objs, "Service", "chatq-llmsim")["spec"]["ports"][0]["port"] == 8100


def test_dev_with_sqs_runs_elasticmq(tools: Tools) -> None:
    objs = tools.template(values={"dev": {"enabled": True}, "queue": {"backend": "sqs"}})
    mq = find(objs, "Deployment", "chatq-elasticmq")
    assert container(mq)["image"].startswith("softwaremill/elasticmq-native:")
    conf = find(objs, "ConfigMap", "chatq-elasticmq")["data"]["elasticmq.conf"]
    assert 'host = "chatq-elasticmq"' in conf and "bind-port = 9324" in conf
    worker = find(objs, "Deployment", "chatq-worker")
    cfg = all_env(objs, worker)
    assert cfg["CHATQ_QUEUE_BACKEND"] == "sqs"
    assert cfg["CHATQ_QUEUE_ENDPOINT"] == "http://chatq-elasticmq:9324"
    assert cfg["AWS_ACCESS_KEY_ID"] and cfg["AWS_SECRET_ACCESS_KEY"]
    assert "CHATQ_QUEUE_GROUP" not in cfg
    qs = find(objs, "QueueScaler", "chatq-worker")
    assert qs["spec"]["queue"] == {
        "sqs": {"name": "chatq-jobs", "region": "us-east-1", "endpoint": "http://chatq-elasticmq:9324"}
    }


@pytest.mark.parametrize("backend", ["redis", "sqs"])
def test_no_pod_gets_service_link_variables(tools: Tools, backend: str) -> None:
    # Kubernetes puts CHATQ_API_PORT=tcp://... and friends into every pod for each Service
    # named chatq-...; chatq reads CHATQ_* as settings, so no pod of the chart may get them.
    values = {"dev": {"enabled": True}, "queue": {"backend": backend}}
    objs = tools.template(values=values)
    pods = [o for o in objs if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job", "Pod")]
    assert len(pods) >= 7, kinds(pods)  # api, worker, operator, redis/elasticmq, llmsim, hooks
    specs = {f"{o['kind']}/{o['metadata']['name']}": o["spec"]["template"]["spec"] if o["kind"] == "Job"
             else pod_spec(o) for o in pods}
    missing = [name for name, spec in specs.items() if spec.get("enableServiceLinks") is not False]
    assert not missing, f"these pods would get Kubernetes service-link variables: {missing}"


def test_sqs_in_production_with_irsa(tools: Tools) -> None:
    url = "https://sqs.eu-west-1.amazonaws.com/123456789012/chatq-jobs"
    role = {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/chatq"}
    objs = tools.template(
        values=merged(
            REDIS,
            {
                "queue": {"backend": "sqs", "sqs": {"url": url, "region": "eu-west-1"}},
                "serviceAccount": {"annotations": role},
                "operator": {"serviceAccount": {"annotations": role}},
            },
        )
    )
    assert find(objs, "ServiceAccount", "chatq")["metadata"]["annotations"] == role
    worker = find(objs, "Deployment", "chatq-worker")
    cfg = all_env(objs, worker)
    assert (cfg["CHATQ_QUEUE_URL"], cfg["CHATQ_QUEUE_REGION"]) == (url, "eu-west-1")
    assert cfg["CHATQ_QUEUE_ENDPOINT"] == ""
    assert "AWS_ACCESS_KEY_ID" not in cfg, "IRSA provides the credentials"
    assert pod_spec(worker)["serviceAccountName"] == "chatq"
    assert not [
        o for o in objs if labels(o).get("app.kubernetes.io/component") in {"redis", "elasticmq", "llmsim"}
    ]


# --- secrets and settings --------------------------------------------------------------------


def test_openai_key_and_api_keys_reach_the_pods_through_the_secret(tools: Tools) -> None:
    objs = tools.template(
        values=merged(
            REDIS,
            {
                "llm": {"apiKey": "sk-test", "model": "gpt-4o-mini"},
                "api": {"keys": ["alpha", "sha256:" + "ab" * 32]},
            },
        )
    )
    for name in ("chatq-api", "chatq-worker"):
        got = env(find(objs, "Deployment", name))
        assert got["CHATQ_LLM_API_KEY"] == {
            "secretKeyRef": {"name": "chatq", "key": "llm-api-key", "optional": True}
        }
        assert got["CHATQ_API_KEYS"]["secretKeyRef"]["key"] == "api-keys"
    cm = find(objs, "ConfigMap", "chatq")["data"]
    assert cm["CHATQ_LLM_MODEL"] == "gpt-4o-mini"
    assert "sk-test" not in json.dumps(cm)
    deployments = [find(objs, "Deployment", n) for n in ("chatq-api", "chatq-worker")]
    checksums = {d["spec"]["template"]["metadata"]["annotations"]["checksum/secret"] for d in deployments}
    assert len(checksums) == 1, "a changed Secret must roll the pods"


def test_existing_secrets(tools: Tools) -> None:
    objs = tools.template(
        values={"secrets": {"existingSecret": "chatq-keys"}, "redis": {"existingSecret": "redis-auth"}}
    )
    assert not all_of(objs, "Secret")
    worker = find(objs, "Deployment", "chatq-worker")
    got = env(worker)
    assert got["CHATQ_LLM_API_KEY"]["secretKeyRef"]["name"] == "chatq-keys"
    assert got["CHATQ_REDIS_URL"] == {"secretKeyRef": {"name": "redis-auth", "key": "redis-url"}}
    assert "CHATQ_REDIS_URL" not in find(objs, "ConfigMap", "chatq")["data"]
    assert "url" not in find(objs, "QueueScaler", "chatq-worker")["spec"]["queue"]["redis"]


@pytest.mark.parametrize(
    "config",
    [
        {"nonsense": {"x": 1}},
        {"worker": {"no_such_field": 1}},
        {"queue": {"backend": "sqs"}},  # queue.* has its own values
        {"worker": {"concurrency": 0}},  # settings' own bounds
        {"log": {"json_format": "maybe"}},
    ],
)
def test_schema_rejects_unknown_or_managed_settings(tools: Tools, config: dict[str, Any]) -> None:
    assert "values don't meet the specifications of the schema" in render_fails(
        tools, merged(REDIS, {"config": config})
    )


def test_schema_rejects_unknown_values(tools: Tools) -> None:
    assert "additional properties" in render_fails(tools, merged(REDIS, {"api": {"replicas": 3}})).lower()


# --- traffic ---------------------------------------------------------------------------------


def test_topology_spread(tools: Tools) -> None:
    objs = tools.template(values=REDIS)
    spread = pod_spec(find(objs, "Deployment", "chatq-api"))["topologySpreadConstraints"]
    assert [s["topologyKey"] for s in spread] == ["kubernetes.io/hostname", "topology.kubernetes.io/zone"]
    assert all(s["whenUnsatisfiable"] == "ScheduleAnyway" for s in spread)
    assert spread[0]["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "api"
    assert "topologySpreadConstraints" not in pod_spec(find(objs, "Deployment", "chatq-operator"))
    off = tools.template(values=merged(REDIS, {"topologySpread": {"enabled": False}}))
    assert "topologySpreadConstraints" not in pod_spec(find(off, "Deployment", "chatq-worker"))


# --- observability ---------------------------------------------------------------------------


def test_service_and_pod_monitors_and_dashboard(tools: Tools) -> None:
    objs = tools.template(
        values=merged(
            REDIS,
            {
                "metrics": {
                    "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
                    "dashboard": {"enabled": True},
                }
            },
        )
    )
    monitors = {m["metadata"]["name"]: m for m in all_of(objs, "ServiceMonitor")}
    assert set(monitors) == {"chatq-api", "chatq-worker"}
    assert monitors["chatq-worker"]["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitors["chatq-api"]["spec"]["endpoints"][0] == {
        "port": "http",
        "path": "/metrics",
        "interval": "30s",
    }
    assert all(labels(m)["release"] == "kube-prometheus-stack" for m in monitors.values())
    board = find(objs, "ConfigMap", "chatq-dashboard")
    assert labels(board)["grafana_dashboard"] == "1"
    dashboard = json.loads(board["data"]["chatq.json"])
    panels = [*dashboard["panels"], *(q for p in dashboard["panels"] for q in p.get("panels", []))]
    exprs = " ".join(t["expr"] for p in panels for t in p.get("targets", []))
    for metric in ("chatq_http_requests_total", "chatq_worker_in_flight", "chatq_queue_wait_seconds_bucket"):
        assert metric in exprs

    pods = tools.template(
        values=merged(
            REDIS, {"metrics": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}}}
        )
    )
    assert [m["metadata"]["name"] for m in all_of(pods, "ServiceMonitor")] == ["chatq-api"]
    podmonitor = find(pods, "PodMonitor", "chatq-worker")
    assert podmonitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"


def test_otel_environment(tools: Tools) -> None:
    objs = tools.template(
        values=merged(
            REDIS,
            {
                "otel": {
                    "enabled": True,
                    "endpoint": "http://tempo:4317",
                    "resourceAttributes": {"deployment.environment": "prod"},
                }
            },
        )
    )
    for name, service in (("chatq-api", "chatq-api"), ("chatq-worker", "chatq-worker")):
        got = env(find(objs, "Deployment", name))
        assert got["OTEL_SERVICE_NAME"] == service
        assert got["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://tempo:4317"
        assert "deployment.environment=prod" in got["OTEL_RESOURCE_ATTRIBUTES"]
        # Logs follow the spec's default (to the same endpoint) unless told otherwise.
        assert not {"OTEL_LOGS_EXPORTER", "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT"} & set(got)
    assert "OTEL_SERVICE_NAME" not in env(find(tools.template(values=REDIS), "Deployment", "chatq-api"))


@pytest.mark.parametrize(("otel", "expected"), [
    ({"logs": False}, {"OTEL_LOGS_EXPORTER": "none"}),
    ({"logsEndpoint": "http://loki-gateway/otlp/v1/logs"},
     {"OTEL_EXPORTER_OTLP_LOGS_ENDPOINT": "http://loki-gateway/otlp/v1/logs",
      "OTEL_EXPORTER_OTLP_LOGS_PROTOCOL": "http/protobuf"}),
])
def test_otel_logs_environment(tools: Tools, otel: dict[str, Any], expected: dict[str, str]) -> None:
    values = merged(REDIS, {"otel": {"enabled": True, "endpoint": "http://tempo:4318", **otel}})
    objs = tools.template(values=values)
    for name in ("chatq-api", "chatq-worker"):
        got = env(find(objs, "Deployment", name))
        assert {k: got.get(k) for k in expected} == expected, (name, got)


# --- helm test -------------------------------------------------------------------------------


def test_helm_test_pod_asks_through_the_api_service(tools: Tools) -> None:
    objs = tools.template(values=merged(REDIS, {"tests": {"apiKeySecret": {"name": "k", "key": "plain"}}}))
    pod = find(objs, "Pod", "chatq-test-ask")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    ask = container(pod)
    assert ask["image"] == f"chatq-api:{APP_VERSION}"
    assert ask["args"][0] == "ask" and "--no-stream" in ask["args"]
    assert ask["args"][ask["args"].index("--url") + 1] == "http://chatq-api:8000"
    assert env(pod)["CHATQ_CLIENT_API_KEY"] == {"secretKeyRef": {"name": "k", "key": "plain"}}
    assert pod["spec"]["restartPolicy"] == "Never"
    assert not all_of(tools.template(values=merged(REDIS, {"tests": {"enabled": False}})), "Pod")


def test_prometheus_rule_with_the_alerts(tools: Tools) -> None:
    objs = tools.template(
        values=merged(REDIS, {"metrics": {"prometheusRule": {"enabled": True, "labels": {"release": "kps"}}}})
    )
    rule = find(objs, "PrometheusRule", "chatq")
    assert labels(rule)["release"] == "kps"
    alerts = yaml.safe_load((CHART / "dashboards" / "chatq-alerts.yaml").read_text())
    assert rule["spec"] == alerts and alerts["groups"][0]["rules"]
    assert not all_of(tools.template(values=REDIS), "PrometheusRule")
