"""The operator's ServiceAccount can do what the operator needs, and no more
(`kubectl auth can-i` against the chart's Role in a real API server). The API's and workers'
ServiceAccount can do nothing at all."""

from __future__ import annotations

import pytest
import yaml
from conftest import Kube

# (verb, resource, subresource): what the operator does.
ALLOWED = [
    ("get", "queuescalers.chatq.io", ""),
    ("list", "queuescalers.chatq.io", ""),
    ("watch", "queuescalers.chatq.io", ""),
    ("patch", "queuescalers.chatq.io", ""),
    ("patch", "queuescalers.chatq.io", "status"),
    ("get", "deployments.apps", ""),
    ("patch", "deployments.apps", ""),
    ("update", "deployments.apps", ""),
    ("get", "deployments.apps", "scale"),
    ("patch", "deployments.apps", "scale"),
    ("update", "deployments.apps", "scale"),
    ("list", "pods", ""),
    ("patch", "pods", ""),  # pod-deletion-cost before a scale-in
    ("create", "events", ""),
    ("create", "events.events.k8s.io", ""),
]
# Things it must not be able to do.
DENIED = [
    ("create", "queuescalers.chatq.io", ""),
    ("delete", "queuescalers.chatq.io", ""),
    ("update", "queuescalers.chatq.io", ""),
    ("create", "deployments.apps", ""),
    ("delete", "deployments.apps", ""),
    ("list", "deployments.apps", ""),
    ("get", "pods", ""),
    ("delete", "pods", ""),
    ("create", "pods", ""),
    ("create", "pods", "eviction"),
    ("create", "pods", "exec"),
    ("get", "secrets", ""),
    ("list", "secrets", ""),
    ("get", "configmaps", ""),
    ("create", "roles.rbac.authorization.k8s.io", ""),
    ("create", "rolebindings.rbac.authorization.k8s.io", ""),
    ("patch", "statefulsets.apps", ""),
    ("delete", "events", ""),
]
CLUSTER_DENIED = [
    ("list", "namespaces"),
    ("list", "nodes"),
    ("list", "customresourcedefinitions.apiextensions.k8s.io"),
    ("create", "clusterrolebindings.rbac.authorization.k8s.io"),
    ("list", "kopfpeerings.kopf.dev"),
]


@pytest.fixture
def installed(kube: Kube, namespace: str, crd: None) -> str:
    """The chart's ServiceAccounts, Role and RoleBinding, applied as rendered (with the CRD,
    so `can-i` knows the queuescalers resource)."""
    objects = kube.template("--show-only", "templates/operator-rbac.yaml",
                            "--show-only", "templates/serviceaccount.yaml",
                            namespace=namespace, values={"redis": {"url": "redis://r:6379/0"}})
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(objects))
    return namespace


def can_i(
    kube: Kube,
    namespace: str,
    sa: str,
    verb: str,
    resource: str,
    sub: str = "",
    other_namespace: str | None = None,
) -> bool:
    args = [
        "auth",
        "can-i",
        verb,
        resource,
        f"--as=system:serviceaccount:{namespace}:{sa}",
        "-n",
        other_namespace or namespace,
    ]
    if sub:
        args.append(f"--subresource={sub}")
    result = kube.kubectl(*args, check=False)
    answer = result.stdout.strip()
    assert answer in {"yes", "no"}, f"kubectl auth can-i said {answer!r}: {result.stderr}"
    return answer == "yes"


def test_operator_can_do_what_it_needs(kube: Kube, installed: str) -> None:
    missing = [
        f"{v} {r}{'/' + s if s else ''}"
        for v, r, s in ALLOWED
        if not can_i(kube, installed, "chatq-operator", v, r, s)
    ]
    assert not missing, f"the operator's Role lacks: {missing}"


def test_operator_can_do_no_more(kube: Kube, installed: str) -> None:
    extra = [
        f"{v} {r}{'/' + s if s else ''}"
        for v, r, s in DENIED
        if can_i(kube, installed, "chatq-operator", v, r, s)
    ]
    assert not extra, f"the operator's Role allows more than it needs: {extra}"
    cluster = [f"{v} {r}" for v, r in CLUSTER_DENIED if can_i(kube, installed, "chatq-operator", v, r)]
    assert not cluster, f"the operator may act cluster-wide: {cluster}"


def test_operator_is_confined_to_its_namespace(kube: Kube, installed: str) -> None:
    for verb, resource in (
        ("list", "queuescalers.chatq.io"),
        ("patch", "deployments.apps"),
        ("patch", "pods"),
    ):
        assert not can_i(kube, installed, "chatq-operator", verb, resource, other_namespace="kube-system")


def test_api_and_worker_service_account_has_no_access(kube: Kube, installed: str) -> None:
    for verb, resource in (
        ("get", "pods"),
        ("list", "configmaps"),
        ("get", "secrets"),
        ("list", "queuescalers.chatq.io"),
        ("patch", "deployments.apps"),
    ):
        assert not can_i(kube, installed, "chatq", verb, resource), f"chatq's SA may {verb} {resource}"
