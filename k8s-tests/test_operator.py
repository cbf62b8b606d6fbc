"""The QueueScaler operator as a real process against the control plane (kwok pods).

Each test gets its own namespace (the `namespace` fixture), its own queue, and an operator
process (`python -m chatq_operator --namespace <ns>`) with KUBECONFIG pointing at the
cluster. Queues are real: ElasticMQ for SQS, redis-server for Redis streams and for the
busy counts. kwok pods run no code, so the tests write the busy counts a worker would.
Phases are named as in KEDA's e2e tests: activation → scale-out → scale-in. Polls are 1 s
and windows a few seconds, so the whole file runs in a few minutes.
"""

from __future__ import annotations

import contextlib
import math
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import botocore.session  # type: ignore[import-untyped,unused-ignore]
import pytest
import redis
import yaml  # type: ignore[import-untyped,unused-ignore]

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from chatq_operator import kube as kube_api  # noqa: E402

from tests import servers  # noqa: E402

CRD = REPO / "charts" / "chatq" / "crds" / "queuescalers.chatq.io.yaml"
QS_PATH = "/apis/chatq.io/v1alpha1/namespaces/{ns}/queuescalers"
POLL = 1.0
T = TypeVar("T")


def _missing(what: str) -> None:
    servers.unavailable(
        f"{what}; run scripts/setup --elasticmq (redis-server, ElasticMQ) and scripts/setup-k8s")


def wait_until(check: Callable[[], T], what: str, timeout: float, every: float = 0.1) -> T:
    """Call `check` until it returns something truthy; fail saying what was awaited."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


# --- the cluster -----------------------------------------------------------------------------

@dataclass
class Cluster:
    """The API as this test sees it, in one namespace."""

    api: kube_api.Kube
    ns: str
    kubeconfig: str

    def get(self, path: str, **query: str) -> dict[str, Any]:
        return self.api.request("GET", path, query=query or None)

    def deployment(self, name: str, replicas: int) -> None:
        labels = {"app": name}
        self.api.request("POST", f"/apis/apps/v1/namespaces/{self.ns}/deployments", {
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
            "spec": {"replicas": replicas, "selector": {"matchLabels": labels}, "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "worker", "image": "chatq-worker:kwok"}],
                         "tolerations": [{"operator": "Exists"}]}}}})

    def replicas(self, name: str) -> int:
        scale = self.get(f"/apis/apps/v1/namespaces/{self.ns}/deployments/{name}/scale")
        return int(scale.get("spec", {}).get("replicas") or 0)

    def pods(self, name: str) -> dict[str, dict[str, Any]]:
        """Live pods of a Deployment, by name."""
        items = self.get(f"/api/v1/namespaces/{self.ns}/pods", labelSelector=f"app={name}")["items"]
        return {p["metadata"]["name"]: p for p in items if not p["metadata"].get("deletionTimestamp")}

    def running(self, name: str) -> list[str]:
        return sorted(n for n, p in self.pods(name).items() if p.get("status", {}).get("phase") == "Running")

    def scaler(self, name: str, spec: dict[str, Any]) -> None:
        self.api.request("POST", QS_PATH.format(ns=self.ns), {
            "apiVersion": "chatq.io/v1alpha1", "kind": "QueueScaler", "metadata": {"name": name},
            "spec": spec})

    def edit(self, name: str, spec: dict[str, Any]) -> None:
        self.api.request("PATCH", QS_PATH.format(ns=self.ns) + f"/{name}", {"spec": spec},
                         content_type=kube_api.MERGE_PATCH)

    def status(self, name: str) -> dict[str, Any]:
        return dict(self.get(QS_PATH.format(ns=self.ns) + f"/{name}").get("status") or {})

    def condition(self, name: str, kind: str) -> dict[str, str]:
        return next((c for c in self.status(name).get("conditions", []) if c["type"] == kind), {})

    def events(self, name: str) -> list[str]:
        items = self.get(f"/api/v1/namespaces/{self.ns}/events",
                         fieldSelector=f"involvedObject.name={name},involvedObject.kind=QueueScaler")["items"]
        return [e["reason"] for e in sorted(items, key=lambda e: e["metadata"]["creationTimestamp"])]

    def delete_scalers(self) -> None:
        for item in self.get(QS_PATH.format(ns=self.ns))["items"]:
            with contextlib.suppress(kube_api.KubeError):
                self.api.request("DELETE", QS_PATH.format(ns=self.ns) + f"/{item['metadata']['name']}")

    def strip_finalizers(self) -> None:
        """When the operator is gone, nothing else would remove them."""
        for item in self.get(QS_PATH.format(ns=self.ns))["items"]:
            with contextlib.suppress(kube_api.KubeError):
                self.api.request("PATCH", QS_PATH.format(ns=self.ns) + f"/{item['metadata']['name']}",
                                 {"metadata": {"finalizers": None}}, content_type=kube_api.MERGE_PATCH)


@pytest.fixture(scope="session")
def crd(kube: Any) -> str:
    """The QueueScaler CRD, applied (server-side, idempotently) and established."""
    api = kube_api.Kube.connect(str(kube.kubeconfig))
    path = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/queuescalers.chatq.io"
    try:
        api.request("PATCH", path, yaml.safe_load(CRD.read_text()),
                    query={"fieldManager": "chatq-k8s-tests", "force": "true"},
                    content_type="application/apply-patch+yaml")
        wait_until(lambda: any(c["type"] == "Established" and c["status"] == "True"
                               for c in api.request("GET", path).get("status", {}).get("conditions") or []),
                   "the QueueScaler CRD to be established", 30)
    finally:
        api.close()
    return str(kube.kubeconfig)


@pytest.fixture
def cluster(crd: str, namespace: Any) -> Iterator[Cluster]:
    ns = str(getattr(namespace, "name", namespace))
    api = kube_api.Kube.connect(crd)
    try:
        yield Cluster(api, ns, crd)
    finally:
        api.close()


# --- the operator and the queues -------------------------------------------------------------

@dataclass
class Operator:
    proc: subprocess.Popen[bytes]
    log: Path
    metrics_port: int

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as resp:
            return str(resp.read().decode())

    def sample(self, metric: str, **labels: str) -> float:
        """The value of one series on /metrics (0 when absent)."""
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in self.metrics().splitlines():
            m = re.match(r"^(\w+)\{(.*)\} (\S+)$", line)
            if m and m.group(1) == metric and ",".join(sorted(m.group(2).split(","))) == want:
                return float(m.group(3))
        return 0.0


@contextlib.contextmanager
def run_operator(cluster: Cluster, busy_url: str, tmp_path: Path) -> Iterator[Operator]:
    """`python -m chatq_operator` watching the test's namespace, with `cluster.kubeconfig`."""
    port = servers.free_port()
    env = servers.chatq_env(KUBECONFIG=cluster.kubeconfig, CHATQ_OPERATOR_METRICS_PORT=str(port),
                            CHATQ_OPERATOR_BUSY_REDIS_URL=busy_url, AWS_ACCESS_KEY_ID="x",
                            AWS_SECRET_ACCESS_KEY="x", AWS_DEFAULT_REGION="us-east-1", PYTHONUNBUFFERED="1")
    log = tmp_path / "operator.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "chatq_operator", "--namespace", cluster.ns],
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    op = Operator(proc, log, port)
    try:
        servers.wait_for(lambda: servers.http_ok(f"http://127.0.0.1:{port}/metrics"),
                         "the operator's metrics port", 60, proc, log)
        yield op
    finally:
        # Deleted while the operator runs, so it stops their daemons and lifts its finalizers.
        cluster.delete_scalers()
        with contextlib.suppress(BaseException):
            wait_until(lambda: not cluster.get(QS_PATH.format(ns=cluster.ns))["items"],
                       "the QueueScalers to be deleted", 20)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        cluster.strip_finalizers()
        sys.stderr.write(f"--- operator log (tail) ---\n{log.read_text(errors='replace')[-4000:]}\n")


@pytest.fixture
def operator(cluster: Cluster, busy_redis: servers.Server, tmp_path: Path) -> Iterator[Operator]:
    """The operator, with the cluster's admin credentials."""
    with run_operator(cluster, busy_redis.url, tmp_path) as op:
        yield op


@pytest.fixture
def busy_redis() -> Iterator[servers.Server]:
    """The Redis where workers (here: the test) report `chatq:busy:<pod>`."""
    try:
        cm = servers.redis_server()
        server = cm.__enter__()
    except RuntimeError as exc:
        _missing(str(exc))
    try:
        yield server
    finally:
        cm.__exit__(None, None, None)


@pytest.fixture(scope="session")
def mq() -> Iterator[servers.Server]:
    try:
        cm = servers.elasticmq_server()
        server = cm.__enter__()
    except (RuntimeError, TimeoutError) as exc:
        _missing(f"ElasticMQ is not available ({exc})")
    try:
        yield server
    finally:
        cm.__exit__(None, None, None)


class Sqs:
    """One SQS queue on ElasticMQ, through botocore's plain client."""

    def __init__(self, endpoint: str) -> None:
        session = botocore.session.get_session()
        self.client = session.create_client("sqs", region_name="us-east-1", endpoint_url=endpoint,
                                            aws_access_key_id="x", aws_secret_access_key="x")
        self.endpoint = endpoint
        self.url = self.client.create_queue(QueueName=f"jobs-{uuid.uuid4().hex[:8]}")["QueueUrl"]

    def send(self, n: int) -> None:
        for start in range(0, n, 10):
            self.client.send_message_batch(QueueUrl=self.url, Entries=[
                {"Id": str(i), "MessageBody": f"job {start + i}"} for i in range(min(10, n - start))])

    def receive(self, n: int, visibility: int = 120) -> list[str]:
        """Take n messages in flight; their receipt handles."""
        handles: list[str] = []
        while len(handles) < n:
            reply = self.client.receive_message(
                QueueUrl=self.url, MaxNumberOfMessages=min(10, n - len(handles)),
                VisibilityTimeout=visibility, WaitTimeSeconds=1)
            handles += [m["ReceiptHandle"] for m in reply.get("Messages", [])]
        return handles

    def delete(self, handles: list[str]) -> None:
        for h in handles:
            self.client.delete_message(QueueUrl=self.url, ReceiptHandle=h)

    def drain(self) -> None:
        """Receive and delete everything (what the workers would do)."""
        while True:
            reply = self.client.receive_message(QueueUrl=self.url, MaxNumberOfMessages=10, WaitTimeSeconds=0)
            if not reply.get("Messages"):
                return
            self.delete([m["ReceiptHandle"] for m in reply["Messages"]])

    def spec(self) -> dict[str, Any]:
        return {"sqs": {"url": self.url, "endpoint": self.endpoint}}


@pytest.fixture
def sqs(mq: servers.Server) -> Sqs:
    return Sqs(mq.url)


def scaler_spec(target: str, queue: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"targetRef": {"name": target}, "queue": queue, "pollSeconds": POLL, **fields}


# --- the tests -------------------------------------------------------------------------------

def test_activation_scale_out_scale_in_on_sqs(cluster: Cluster, operator: Operator, sqs: Sqs) -> None:
    """Zero → ceil(N / messagesPerReplica) within two polls → down after the window → zero."""
    window, idle = 3.0, 6.0
    cluster.deployment("worker", 0)
    cluster.scaler("qs", scaler_spec("worker", sqs.spec(), maxReplicas=4, messagesPerReplica=5,
                                     activationMessages=2, scaleDownStabilizationSeconds=window,
                                     idleSecondsBeforeZero=idle))
    wait_until(lambda: cluster.status("qs").get("reason") == "BelowActivation", "the first poll", 30)

    # activation: two messages do not pass activationMessages=2.
    sqs.send(2)
    wait_until(lambda: cluster.status("qs").get("visible") == 2, "the operator to see 2 messages", 10)
    time.sleep(2 * POLL)
    assert cluster.replicas("worker") == 0

    # scale-out: 13 more → ceil(15 / 5) = 3, within two polls.
    sqs.send(13)
    started = time.monotonic()
    wait_until(lambda: cluster.replicas("worker") == 3, "3 replicas", 2 * POLL + 2.5, every=0.05)
    reaction = time.monotonic() - started
    sys.stderr.write(f"reaction from zero: {reaction:.2f}s (pollSeconds {POLL})\n")
    wait_until(lambda: len(cluster.running("worker")) == 3, "3 running kwok pods", 30)
    sqs.send(25)  # 40 → 8 wanted, clamped to maxReplicas 4
    wait_until(lambda: cluster.replicas("worker") == 4, "4 replicas (clamped)", 2 * POLL + 2.5, every=0.05)
    wait_until(lambda: cluster.status("qs").get("desiredReplicas") == 4, "the status to follow", 5)
    status = cluster.status("qs")
    assert (status["visible"], status["inFlight"], status["desiredReplicas"]) == (40, 0, 4)
    assert status["lastScaleTime"].endswith("Z")
    assert cluster.condition("qs", "Ready")["status"] == "True"
    assert cluster.condition("qs", "Active")["status"] == "True"

    # scale-in: drained; down to one warm pod after the window, to zero after the idle time.
    sqs.drain()
    drained = time.monotonic()
    time.sleep(window - 1.5)
    assert cluster.replicas("worker") == 4, "scaled down before the stabilization window"
    wait_until(lambda: cluster.replicas("worker") == 1, "one warm replica", window + 4)
    down = time.monotonic() - drained
    wait_until(lambda: cluster.status("qs")["reason"] in ("KeepWarm", "ScaleToZero"), "a warm pod kept", 5)
    wait_until(lambda: cluster.replicas("worker") == 0, "zero replicas", idle + 4)
    zero = time.monotonic() - drained
    sys.stderr.write(f"scale-down after drain: {down:.1f}s (window {window}); zero after {zero:.1f}s "
                     f"(idle {idle})\n")
    assert down >= window - 1.5 and zero >= idle - 1.5  # the last busy poll may precede the drain by one poll
    wait_until(lambda: {"WakeFromZero", "ScaleUp", "ScaleDown", "ScaleToZero"} <= set(cluster.events("qs")),
               "an Event for every change of replicas", 10)
    assert operator.sample("chatq_operator_desired_replicas", namespace=cluster.ns, name="qs") == 0
    ups = operator.sample("chatq_operator_scalings_total", namespace=cluster.ns, name="qs", direction="up")
    assert ups >= 2


def test_busy_pod_survives_scale_in(cluster: Cluster, operator: Operator, sqs: Sqs,
                                    busy_redis: servers.Server) -> None:
    """The pod in the middle of a job stays; the idle ones go."""
    cluster.deployment("worker", 3)
    wait_until(lambda: len(cluster.running("worker")) == 3, "3 running kwok pods", 30)
    pods = cluster.running("worker")
    busy_pod = pods[1]  # neither the oldest nor the newest: the ReplicaSet's own order would not keep it
    rds = redis.Redis.from_url(busy_redis.url)
    rds.set(f"chatq:busy:{busy_pod}", 2, ex=600)
    sqs.send(2)
    sqs.receive(2)  # two messages in flight, on the busy pod
    cluster.scaler("qs", scaler_spec("worker", sqs.spec(), maxReplicas=3, messagesPerReplica=5,
                                     scaleDownStabilizationSeconds=1, idleSecondsBeforeZero=600))
    wait_until(lambda: cluster.replicas("worker") == 1, "scale-in to 1", 15)
    wait_until(lambda: len(cluster.pods("worker")) == 1, "the idle pods to go", 30)
    survivor = cluster.pods("worker")
    assert list(survivor) == [busy_pod]
    cost = survivor[busy_pod]["metadata"]["annotations"][kube_api.DELETION_COST]
    assert cost == "2"
    assert cluster.status("qs")["inFlight"] == 2
    rds.close()


def test_queue_down_holds_then_falls_back(cluster: Cluster, operator: Operator) -> None:
    """A Redis-stream queue that stops answering: hold, then fallbackReplicas, with a condition."""
    with servers.redis_server() as queue_redis:
        rds = redis.Redis.from_url(queue_redis.url)
        rds.xgroup_create("jobs", "workers", id="0", mkstream=True)
        for i in range(12):
            rds.xadd("jobs", {"n": str(i)})
        rds.close()
        cluster.deployment("worker", 1)
        cluster.scaler("qs", scaler_spec(
            "worker", {"redis": {"url": queue_redis.url, "stream": "jobs", "group": "workers"}},
            maxReplicas=10, messagesPerReplica=4, fallbackReplicas=6, errorsBeforeFallback=3,
            scaleDownStabilizationSeconds=60))
        wait_until(lambda: cluster.replicas("worker") == 3, "3 replicas for 12 entries", 15)
    # The queue's Redis is gone now.
    wait_until(lambda: cluster.condition("qs", "Ready").get("reason") == "SourceError", "Ready=False", 15)
    assert cluster.replicas("worker") == 3  # held at first
    wait_until(lambda: cluster.replicas("worker") == 6, "fallbackReplicas", 15)
    # The operator scales first and writes its status after (two API calls): on a busy box the
    # replicas can be read between them.
    fallback = wait_until(lambda: (c := cluster.condition("qs", "Fallback"))
                          and (c["status"], c["reason"]) == ("True", "FallbackReplicas") and c,
                          "the Fallback condition", 10)
    assert "fallbackReplicas 6" in fallback["message"]
    wait_until(lambda: "Fallback" in cluster.events("qs"), "a Fallback Event", 10)
    assert operator.sample("chatq_operator_source_errors_total", namespace=cluster.ns, name="qs") >= 3


def test_spec_edits_take_effect(cluster: Cluster, operator: Operator, sqs: Sqs) -> None:
    cluster.deployment("worker", 1)
    sqs.send(40)
    cluster.scaler("qs", scaler_spec("worker", sqs.spec(), maxReplicas=10, messagesPerReplica=5,
                                     scaleDownStabilizationSeconds=1))
    wait_until(lambda: cluster.replicas("worker") == 8, "8 replicas", 15)
    cluster.edit("qs", {"maxReplicas": 3})
    wait_until(lambda: cluster.replicas("worker") == 3, "maxReplicas 3 to apply", 2 * POLL + 3)
    cluster.edit("qs", {"maxReplicas": 10, "messagesPerReplica": 20})
    wait_until(lambda: cluster.replicas("worker") == 2, "messagesPerReplica 20 to apply", 10)
    # The scale is written before the status that records it: wait for the status too.
    wait_until(lambda: cluster.status("qs").get("observedGeneration") == 3,
               "observedGeneration 3 in the status", 2 * POLL + 3)


def test_deleting_the_queuescaler_stops_scaling(cluster: Cluster, operator: Operator, sqs: Sqs) -> None:
    cluster.deployment("worker", 0)
    cluster.scaler("qs", scaler_spec("worker", sqs.spec(), maxReplicas=10, messagesPerReplica=5))
    sqs.send(10)
    wait_until(lambda: cluster.replicas("worker") == 2, "2 replicas", 15)
    cluster.delete_scalers()
    wait_until(lambda: not cluster.get(QS_PATH.format(ns=cluster.ns))["items"],
               "the QueueScaler to be gone (its finalizer lifted)", 20)
    sqs.send(30)
    time.sleep(4 * POLL)
    assert cluster.replicas("worker") == 2
    assert f"stopped polling QueueScaler {cluster.ns}/qs" in operator.log.read_text()


def test_missing_deployment_and_two_scalers_on_one_deployment(cluster: Cluster, operator: Operator,
                                                               sqs: Sqs) -> None:
    cluster.scaler("first", scaler_spec("worker", sqs.spec(), maxReplicas=5, messagesPerReplica=5))
    wait_until(lambda: cluster.condition("first", "Ready").get("reason") == "TargetNotFound",
               "TargetNotFound", 15)
    wait_until(lambda: "TargetNotFound" in cluster.events("first"), "a TargetNotFound Event", 10)
    cluster.deployment("worker", 0)
    sqs.send(10)
    wait_until(lambda: cluster.condition("first", "Ready").get("status") == "True",
               "Ready once it exists", 15)
    wait_until(lambda: cluster.replicas("worker") == 2, "2 replicas", 10)
    time.sleep(1.1)  # a later creationTimestamp (whole seconds) for the second one
    cluster.scaler("second", scaler_spec("worker", sqs.spec(), maxReplicas=5, messagesPerReplica=1))
    wait_until(lambda: cluster.condition("second", "Ready").get("reason") == "TargetConflict",
               "TargetConflict on the second", 15)
    assert "first" in cluster.condition("second", "Ready")["message"]
    time.sleep(3 * POLL)
    assert cluster.replicas("worker") == 2  # the second one (10 per pod → 5) did nothing


def test_one_read_per_poll_for_scalers_sharing_a_queue(cluster: Cluster, operator: Operator,
                                                       sqs: Sqs) -> None:
    for name in ("a", "b", "c"):
        cluster.deployment(f"worker-{name}", 0)
        cluster.scaler(f"qs-{name}", scaler_spec(f"worker-{name}", sqs.spec(), maxReplicas=5,
                                                 messagesPerReplica=5))
    sqs.send(10)
    wait_until(lambda: all(cluster.replicas(f"worker-{n}") == 2 for n in "abc"), "each worker at 2", 15)
    queue = f"sqs:{sqs.url}"
    before, started = operator.sample("chatq_operator_queue_reads_total", queue=queue), time.monotonic()
    time.sleep(6 * POLL)
    reads = operator.sample("chatq_operator_queue_reads_total", queue=queue) - before
    polls = (time.monotonic() - started) / POLL
    sys.stderr.write(f"3 scalers, {polls:.0f} polls each: {reads:.0f} reads of the queue\n")
    assert reads <= math.ceil(polls) + 1, f"{reads} reads for 3 scalers over {polls:.1f} polls"


def test_the_rate_budget_caps_scale_out(cluster: Cluster, operator: Operator) -> None:
    """80 waiting entries want 10 pods of 4, but the workers' shared budget (60 RPM, calls
    of 8 s: 8 calls in flight) keeps only 2 busy: the operator stops there, says so in the
    RateLimited condition and an Event, and scales out when the budget grows."""
    import asyncio

    import redis.asyncio as aioredis
    from chatq import budget

    async def write_budget(url: str, rpm: int) -> None:
        client = aioredis.from_url(url, decode_responses=True)
        try:
            shared = budget.Budget(client, "ep-test", rpm=rpm, tpm=None)
            assert (await shared.take(100)).granted
            await shared.settle(budget.Outcome(reserved=100, used=40, model_seconds=8.0))
        finally:
            await client.aclose()

    with servers.redis_server() as queue_redis:
        rds = redis.Redis.from_url(queue_redis.url)
        rds.xgroup_create("jobs", "workers", id="0", mkstream=True)
        for i in range(80):
            rds.xadd("jobs", {"n": str(i)})
        rds.close()
        asyncio.run(write_budget(queue_redis.url, 60))
        cluster.deployment("worker", 1)
        cluster.scaler("qs", scaler_spec(
            "worker", {"redis": {"url": queue_redis.url, "stream": "jobs", "group": "workers"}},
            maxReplicas=10, messagesPerReplica=4, budget={"redisUrl": queue_redis.url}))
        wait_until(lambda: cluster.condition("qs", "RateLimited").get("status") == "True",
                   "RateLimited=True", 20)
        assert cluster.replicas("worker") == 2
        assert "keeps only 2 busy" in cluster.condition("qs", "RateLimited")["message"]
        wait_until(lambda: "RateLimited" in cluster.events("qs"), "a RateLimited Event", 10)
        time.sleep(3 * POLL)
        assert cluster.replicas("worker") == 2  # held at the cap, poll after poll
        # The budget grows (a higher limit): the cap lifts with it.
        asyncio.run(write_budget(queue_redis.url, 300))
        wait_until(lambda: cluster.replicas("worker") == 10, "10 replicas under a 300 RPM budget", 20)
