"""The QueueScaler CRD (charts/chatq/crds) in a real API server: its schema rejects bad specs
and defaults the fields a spec leaves out."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from conftest import Kube

GOOD: dict[str, Any] = {
    "apiVersion": "chatq.io/v1alpha1",
    "kind": "QueueScaler",
    "metadata": {"name": "workers"},
    "spec": {
        "targetRef": {"name": "chatq-worker"},
        "queue": {"redis": {"url": "redis://redis:6379/0"}},
        "minReplicas": 0,
        "maxReplicas": 5,
    },
}


def with_spec(**changes: Any) -> dict[str, Any]:
    body = copy.deepcopy(GOOD)
    for key, value in changes.items():
        if value is None:
            body["spec"].pop(key, None)
        else:
            body["spec"][key] = value
    return body


def create(kube: Kube, namespace: str, body: dict[str, Any], dry_run: bool = True) -> Any:
    args = ["create", "-n", namespace, "--validate=strict", "-f", "-", "-o", "json"]
    if dry_run:
        args.append("--dry-run=server")
    return kube.kubectl(*args, input=json.dumps(body), check=False)


BAD = {
    "no targetRef": (with_spec(targetRef=None), "targetRef"),
    "empty target name": (with_spec(targetRef={"name": ""}), "spec.targetRef.name"),
    "a StatefulSet target": (
        with_spec(targetRef={"name": "w", "kind": "StatefulSet"}),
        "spec.targetRef.kind",
    ),
    "no queue": (with_spec(queue=None), "queue"),
    "an empty queue": (with_spec(queue={}), "spec.queue"),
    "two queues": (with_spec(queue={"redis": {"url": "redis://r"}, "sqs": {"name": "q"}}), "spec.queue"),
    "sqs without url or name": (
        with_spec(queue={"sqs": {"region": "eu-west-1"}}),
        "sqs needs a url or a name",
    ),
    "negative minReplicas": (with_spec(minReplicas=-1), "spec.minReplicas"),
    "zero maxReplicas": (with_spec(maxReplicas=0), "spec.maxReplicas"),
    "min above max": (
        with_spec(minReplicas=6, maxReplicas=5),
        "minReplicas must not be greater than maxReplicas",
    ),
    "zero messagesPerReplica": (with_spec(messagesPerReplica=0), "spec.messagesPerReplica"),
    "too fast polling": (with_spec(pollSeconds=0.1), "spec.pollSeconds"),
    "a string for a number": (with_spec(maxReplicas="ten"), "spec.maxReplicas"),
    "a string for a bool": (with_spec(includeInFlight="yes"), "spec.includeInFlight"),
    "negative fallback": (with_spec(fallbackReplicas=-2), "spec.fallbackReplicas"),
    "an unknown field": (with_spec(replicas=3), "unknown field"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_queuescalers_are_rejected(kube: Kube, crd: None, namespace: str, case: str) -> None:
    body, expected = BAD[case]
    result = create(kube, namespace, body)
    assert result.returncode != 0, f"{case}: the API server accepted {body['spec']}"
    assert expected in result.stderr, f"{case}: expected {expected!r} in:\n{result.stderr}"


def test_a_good_queuescaler_is_stored_with_defaults(kube: Kube, crd: None, namespace: str) -> None:
    result = create(kube, namespace, GOOD, dry_run=False)
    assert result.returncode == 0, result.stderr
    stored = kube.get("queuescaler", "workers", "-n", namespace)["spec"]
    assert stored["targetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "chatq-worker"}
    assert stored["queue"]["redis"] == {
        "url": "redis://redis:6379/0",
        "stream": "chatq-jobs",
        "group": "chatq-workers",
    }
    assert stored["includeInFlight"] is True
    assert stored["pollSeconds"] == 5
    assert stored["messagesPerReplica"] >= 1
    # The status subresource: a status write goes through /status, and the spec stays.
    patch = {"status": {"visible": 7, "inFlight": 2, "desiredReplicas": 1, "currentReplicas": 0}}
    kube.kubectl(
        "patch",
        "queuescaler",
        "workers",
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(patch),
    )
    got = kube.get("queuescaler", "workers", "-n", namespace)
    assert got["status"]["visible"] == 7 and got["spec"]["maxReplicas"] == 5
    columns = kube.kubectl("get", "qs", "-n", namespace).stdout
    assert "VISIBLE" in columns and "chatq-worker" in columns


def test_an_sqs_queuescaler_by_name(kube: Kube, crd: None, namespace: str) -> None:
    body = with_spec(queue={"sqs": {"name": "chatq-jobs", "endpoint": "http://elasticmq:9324"}})
    result = create(kube, namespace, body)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["spec"]["queue"]["sqs"]["region"] == "us-east-1"
