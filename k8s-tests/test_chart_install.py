"""charts/chatq in a real API server: install --wait, helm test, upgrade, rollback, uninstall.

On the local control plane kwok reports pods Running and Ready without running them, so this
checks what Kubernetes and helm do with the chart (admission, defaulting, controllers, hooks,
rollout, garbage collection); on kind the same test runs the containers too (load
chatq-api and chatq-worker into kind first, see the README).
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from conftest import CHART, Kube

pytestmark = pytest.mark.timeout(420)

# Everything the chart can create in a namespace; after uninstall none of it may remain.
NAMESPACED_KINDS = (
    "deployments.apps,replicasets.apps,jobs.batch,pods,services,configmaps,secrets,serviceaccounts,"
    "roles.rbac.authorization.k8s.io,rolebindings.rbac.authorization.k8s.io,"
    "poddisruptionbudgets.policy,horizontalpodautoscalers.autoscaling,"
    "networkpolicies.networking.k8s.io,ingresses.networking.k8s.io,queuescalers.chatq.io"
)
# What a namespace holds before anything is installed.
BASELINE = {"configmap/kube-root-ca.crt", "serviceaccount/default"}


def write_values(kube: Kube, name: str, values: dict[str, Any]) -> str:
    path = kube.home / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def leftovers(kube: Kube, namespace: str) -> set[str]:
    out = kube.kubectl("get", NAMESPACED_KINDS, "-n", namespace, "-o", "name").stdout.split()
    # kubectl prints e.g. "deployment.apps/chatq-api": keep kind (without group) and name.
    names = {f"{n.split('/')[0].split('.')[0]}/{n.split('/', 1)[1]}" for n in out}
    return names - BASELINE


def deployment_status(kube: Kube, namespace: str) -> dict[str, tuple[int, int]]:
    """{name: (spec replicas, ready replicas)} of the namespace's Deployments."""
    items = kube.get("deployments", "-n", namespace)["items"]
    return {
        d["metadata"]["name"]: (d["spec"].get("replicas", 1), d["status"].get("readyReplicas", 0))
        for d in items
    }


def helm_revision(kube: Kube, namespace: str) -> tuple[int, str]:
    status = yaml.safe_load(kube.helm("status", "chatq", "-n", namespace, "-o", "yaml").stdout)
    return int(status["version"]), str(status["info"]["status"])


def test_install_test_upgrade_rollback_uninstall(kube: Kube, namespace: str) -> None:
    values = write_values(kube, "dev", {"dev": {"enabled": True}})

    # install --wait: every Deployment available, pods placed on (kwok's) nodes.
    installed = kube.helm(
        "install", "chatq", CHART, "-n", namespace, "-f", values, "--wait", "--timeout", "180s", timeout=240
    ).stdout
    assert helm_revision(kube, namespace) == (1, "deployed")
    # NOTES.txt: how to reach the API.
    assert f"kubectl -n {namespace} port-forward svc/chatq-api 8000:8000" in installed
    assert "curl -s -X POST http://127.0.0.1:8000/v1/chat" in installed
    assert "answers come from llmsim" in installed
    # No files.s3.bucket: the file store is the api pod's emptyDir, so one api replica.
    assert "The api runs 1 replica, not api.replicaCount=2" in installed
    status = deployment_status(kube, namespace)
    assert status == {
        "chatq-api": (1, 1),
        "chatq-worker": (1, 1),
        "chatq-operator": (1, 1),
        "chatq-redis": (1, 1),
        "chatq-llmsim": (1, 1),
    }, status
    pods = kube.get("pods", "-n", namespace, "-l", "app.kubernetes.io/instance=chatq")["items"]
    assert len(pods) == 5
    for pod in pods:
        assert pod["status"]["phase"] == "Running", pod["metadata"]["name"]
        assert pod["spec"]["nodeName"], f"{pod['metadata']['name']} was never scheduled"
    worker_pod = next(p for p in pods if p["metadata"]["labels"]["app.kubernetes.io/component"] == "worker")
    assert worker_pod["spec"]["serviceAccountName"] == "chatq"
    assert worker_pod["spec"]["terminationGracePeriodSeconds"] == 150
    qs = kube.get("queuescaler", "chatq-worker", "-n", namespace)
    assert qs["spec"]["targetRef"]["name"] == "chatq-worker"
    assert qs["spec"]["queue"]["redis"]["url"] == "redis://chatq-redis:6379/0"
    kube.kubectl("get", "crd", "queuescalers.chatq.io")

    # helm test: the hook pod asks through the API (on kwok the pod only pretends to run).
    tested = kube.helm("test", "chatq", "-n", namespace, "--timeout", "150s", timeout=180)
    assert "chatq-test-ask" in tested.stdout and "Succeeded" in tested.stdout, tested.stdout

    # upgrade: a shared file store, so more API replicas, and another log level; the pods roll
    # because the ConfigMap changed. (On kwok no pod opens the bucket.)
    before = kube.get("deployment", "chatq-api", "-n", namespace)
    old_checksum = before["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    kube.helm(
        "upgrade",
        "chatq",
        CHART,
        "-n",
        namespace,
        "-f",
        values,
        "--set",
        "api.replicaCount=3",
        "--set",
        "files.s3.bucket=chatq-files",
        "--set",
        "config.log.level=DEBUG",
        "--wait",
        "--timeout",
        "180s",
        timeout=240,
    )
    assert helm_revision(kube, namespace) == (2, "deployed")
    kube.wait_for(
        "3 ready API replicas (old pods of the rollout may still count for a moment)",
        lambda: deployment_status(kube, namespace)["chatq-api"] == (3, 3),
        timeout=90,
    )
    cm = kube.get("configmap", "chatq", "-n", namespace)
    assert cm["data"]["CHATQ_LOG_LEVEL"] == "DEBUG"
    after = kube.get("deployment", "chatq-api", "-n", namespace)
    assert after["spec"]["template"]["metadata"]["annotations"]["checksum/config"] != old_checksum
    kube.wait_for(
        "the API rollout to finish",
        lambda: (
            kube.kubectl(
                "rollout", "status", "deployment/chatq-api", "-n", namespace, "--timeout=5s", check=False
            ).returncode
            == 0
        ),
    )

    # rollback to revision 1: the local file store, one replica and INFO again.
    kube.helm("rollback", "chatq", "1", "-n", namespace, "--wait", "--timeout", "180s", timeout=240)
    assert helm_revision(kube, namespace) == (3, "deployed")
    assert kube.get("configmap", "chatq", "-n", namespace)["data"]["CHATQ_LOG_LEVEL"] == "INFO"
    kube.wait_for(
        "the API back at 1 ready replica",
        lambda: deployment_status(kube, namespace)["chatq-api"] == (1, 1),
        timeout=90,
    )

    # uninstall: nothing of the release is left in the namespace (the CRD stays, as helm does
    # with crds/: deleting it would delete every QueueScaler in the cluster).
    kube.helm("uninstall", "chatq", "-n", namespace, "--wait", "--timeout", "120s", timeout=180)
    kube.wait_for(
        "every object of the release to be gone",
        lambda: not leftovers(kube, namespace),
        timeout=90,
        interval=1,
    )
    assert not kube.kubectl(
        "get", "secrets", "-n", namespace, "-l", "owner=helm", "-o", "name"
    ).stdout.strip()
    kube.kubectl("get", "crd", "queuescalers.chatq.io")


def test_install_sqs_pipeline_with_the_builtin_extras(kube: Kube, namespace: str) -> None:
    # ci/dev-sqs-values.yaml: ElasticMQ, NetworkPolicies, HPA, Ingress, OTEL.
    kube.helm(
        "install",
        "chatq",
        CHART,
        "-n",
        namespace,
        "-f",
        CHART / "ci" / "dev-sqs-values.yaml",
        "--wait",
        "--timeout",
        "180s",
        timeout=240,
    )
    status = deployment_status(kube, namespace)
    assert {
        "chatq-api",
        "chatq-worker",
        "chatq-operator",
        "chatq-redis",
        "chatq-llmsim",
        "chatq-elasticmq",
    } == set(status), status
    assert all(ready >= 1 for _, ready in status.values()), status
    assert kube.get("hpa", "chatq-api", "-n", namespace)["spec"]["minReplicas"] == 2
    policies = kube.kubectl("get", "networkpolicies", "-n", namespace, "-o", "name").stdout.split()
    assert len(policies) == 6, policies
    ingress = kube.get("ingress", "chatq-api", "-n", namespace)
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    qs = kube.get("queuescaler", "chatq-worker", "-n", namespace)
    assert qs["spec"]["queue"]["sqs"]["endpoint"] == "http://chatq-elasticmq:9324"
    kube.helm("uninstall", "chatq", "-n", namespace, "--wait", "--timeout", "120s", timeout=180)
    kube.wait_for(
        "every object of the release to be gone",
        lambda: not leftovers(kube, namespace),
        timeout=90,
        interval=1,
    )
