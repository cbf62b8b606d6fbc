"""The operator under the chart's own RBAC: a ServiceAccount bound to the chart's Role only.

The chart grants the operator the least it needs, in its namespace. This runs the real
operator with that ServiceAccount's token (no admin rights) and checks that it still scales,
writes pod deletion costs, its status and Events, and that the API refused it nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml  # type: ignore[import-untyped,unused-ignore]

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import test_operator as ops  # noqa: E402
from chatq_operator import kube as kube_api  # noqa: E402

# The fixtures of test_operator.py, shared.
crd, cluster, busy_redis, mq, sqs = ops.crd, ops.cluster, ops.busy_redis, ops.mq, ops.sqs


@pytest.fixture
def operator_kubeconfig(kube: Any, cluster: ops.Cluster, tmp_path: Path) -> str:
    """A kubeconfig holding the token of the chart's operator ServiceAccount, in the test namespace."""
    objects = kube.template("--show-only", "templates/operator-rbac.yaml", namespace=cluster.ns,
                            values={"redis": {"url": "redis://redis:6379/0"}})
    kinds = {o["kind"]: o for o in objects}
    assert {"ServiceAccount", "Role", "RoleBinding"} <= set(kinds), sorted(kinds)
    rbac = f"/apis/rbac.authorization.k8s.io/v1/namespaces/{cluster.ns}"
    paths = {"ServiceAccount": f"/api/v1/namespaces/{cluster.ns}/serviceaccounts",
             "Role": f"{rbac}/roles", "RoleBinding": f"{rbac}/rolebindings"}
    for obj in objects:
        cluster.api.request("POST", paths[obj["kind"]], obj)
    account = kinds["ServiceAccount"]["metadata"]["name"]
    token = cluster.api.request(
        "POST", f"/api/v1/namespaces/{cluster.ns}/serviceaccounts/{account}/token",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
         "spec": {"expirationSeconds": 3600}},
    )["status"]["token"]
    config = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    context = next(c for c in config["contexts"] if c["name"] == config["current-context"])
    config["users"] = [{"name": "chatq-operator", "user": {"token": token}}]
    context["context"]["user"] = "chatq-operator"
    context["context"]["namespace"] = cluster.ns
    out = tmp_path / "operator.kubeconfig"
    out.write_text(yaml.safe_dump(config))
    return str(out)


@pytest.fixture
def restricted_operator(cluster: ops.Cluster, busy_redis: Any, operator_kubeconfig: str,
                        tmp_path: Path) -> Iterator[ops.Operator]:
    """The operator with the chart's ServiceAccount; cleanup still goes through the admin client."""
    restricted = ops.Cluster(cluster.api, cluster.ns, operator_kubeconfig)
    with ops.run_operator(restricted, busy_redis.url, tmp_path) as op:
        yield op


def test_the_charts_role_is_enough(cluster: ops.Cluster, restricted_operator: ops.Operator, sqs: ops.Sqs,
                                   busy_redis: Any) -> None:
    cluster.deployment("worker", 2)
    ops.wait_until(lambda: len(cluster.running("worker")) == 2, "2 running kwok pods", 30)
    busy_pod = cluster.running("worker")[0]
    rds = redis.Redis.from_url(busy_redis.url)
    rds.set(f"chatq:busy:{busy_pod}", 1, ex=600)
    rds.close()
    sqs.send(1)
    sqs.receive(1)
    cluster.scaler("qs", ops.scaler_spec("worker", sqs.spec(), maxReplicas=4, messagesPerReplica=5,
                                         scaleDownStabilizationSeconds=1))
    ops.wait_until(lambda: cluster.replicas("worker") == 1, "scale-in to 1 under the chart's Role", 20)
    ops.wait_until(lambda: list(cluster.pods("worker")) == [busy_pod], "the busy pod to stay", 30)
    ops.wait_until(lambda: "ScaleDown" in cluster.events("qs"), "an Event", 10)
    assert cluster.status("qs")["desiredReplicas"] == 1
    log = restricted_operator.log.read_text()
    assert "Forbidden" not in log and " 403" not in log, log[-3000:]
    denied = [line for line in log.splitlines() if "forbidden" in line.lower()]
    assert not denied, denied
    assert kube_api.DELETION_COST in cluster.pods("worker")[busy_pod]["metadata"]["annotations"]
