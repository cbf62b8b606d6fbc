"""charts/chatq on a real node: containers run, probes probe, signals arrive.

The session's real node (node.py: containerd, CNI, kubelet, kube-proxy, CoreDNS), or a node of
the cluster in KUBECONFIG, with the images the containers tier built. One release per queue
backend, shared by the tests of this file (`helm install --wait` with the dev stores: the dev
Redis; the dev ElasticMQ beside it for `sqs`); the tests look inside the containers, ask through
`kubectl port-forward svc/chatq-api` with `chatq ask` and chatq's client, run `helm test`,
SIGTERM/SIGKILL/SIGSTOP a worker mid-answer and delete the dev stores. The SQS pass runs
where the queue matters (install, ask, a SIGKILLed worker, the queue server deleted); the rest
is the queue-blind chart, tested once on Redis. The operator's scale from and to zero runs on a
release of its own."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import node as node_mod
import pytest
import yaml
from chatq import client as chatq_client
from conftest import CHART, Kube, RealNode, real_namespace_for

from tests import servers

# The first test also waits for the session's real node and its image load (minutes on a busy CI).
pytestmark = pytest.mark.timeout(900)

CHATQ = Path(sys.executable).parent / "chatq"
#: Figures for the run's summary (and the README): name -> seconds (conftest prints them).
FIGURES = node_mod.FIGURES


def chart_values(real_node: RealNode, backend: str, **extra: Any) -> dict[str, Any]:
    """Values for the real node: the images the containers tier built, never pulled; one API."""
    api_repo, api_tag = real_node.images["api"].split(":")
    worker_repo, worker_tag = real_node.images["worker"].split(":")
    redis_repo, redis_tag = real_node.images["redis"].split(":")
    mq_repo, mq_tag = real_node.images["elasticmq"].split(":")
    values: dict[str, Any] = {
        "image": {"pullPolicy": "Never", "api": {"repository": api_repo, "tag": api_tag},
                  "worker": {"repository": worker_repo, "tag": worker_tag}},
        "dev": {"enabled": True, "redis": {"image": {"repository": redis_repo, "tag": redis_tag}},
                "elasticmq": {"image": {"repository": mq_repo, "tag": mq_tag}}},
        "queue": {"backend": backend},
        "api": {"replicaCount": 1},
        # Two cores: a backlog scaled out to 10 workers would starve them all past their probes.
        "worker": {"queueScaler": {"maxReplicas": 2}},
        # Slow enough answers (40 tokens, 4 s) to signal a worker mid-answer; short leases,
        # so a SIGKILLed worker's job goes to the next one soon.
        "config": {"llmsim": {"ttft_ms": 300, "itl_ms": 100, "tokens": 40},
                   "queue": {"visibility_seconds": 10}, "worker": {"concurrency": 8}},
    }
    for key, value in extra.items():
        values[key] = {**values.get(key, {}), **value}
    return values


class PortForward:
    """`kubectl port-forward svc/<name>` on a free local port, restarted on demand."""

    def __init__(self, kube: Kube, namespace: str, target: str = "svc/chatq-api", port: int = 8000) -> None:
        self.kube, self.namespace, self.target, self.port = kube, namespace, target, port
        self.proc: subprocess.Popen[str] | None = None
        self.reader: threading.Thread | None = None
        self.url = ""

    def start(self) -> str:
        self.stop()
        self.proc = subprocess.Popen(
            [str(self.kube.bin / "kubectl"), "port-forward", "-n", self.namespace, "--address", "127.0.0.1",
             self.target, f":{self.port}"],
            env=self.kube.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        seen: list[str] = []
        ready = threading.Event()

        def read() -> None:
            # kubectl's output is read to its end (a full pipe would stall it); the first
            # "Forwarding from" line says the local port.
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                seen.append(line)
                if not ready.is_set() and (m := re.search(r"Forwarding from 127\.0\.0\.1:(\d+)", line)):
                    self.url = f"http://127.0.0.1:{m.group(1)}"
                    ready.set()

        self.reader = threading.Thread(target=read, daemon=True)
        self.reader.start()
        if not ready.wait(30):
            self.stop()
            raise AssertionError(f"kubectl port-forward {self.target} did not start: {''.join(seen)}")
        return self.url

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        if self.reader is not None:
            self.reader.join(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None


@dataclass
class Release:
    kube: Kube
    node: RealNode
    namespace: str
    backend: str
    forward: PortForward
    values: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.forward.url

    def pods(self, component: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.kube.get(
            "pods", "-n", self.namespace, "-l", f"app.kubernetes.io/component={component}")["items"]
        return [p for p in items if not p["metadata"].get("deletionTimestamp")]

    def ready_pods(self, component: str) -> list[dict[str, Any]]:
        return [p for p in self.pods(component) if any(
            c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))]

    def exec(self, pod: str, *cmd: str, container: str | None = None) -> str:
        extra = ["-c", container] if container else []
        return self.kube.kubectl("exec", "-n", self.namespace, pod, *extra, "--", *cmd, timeout=60).stdout

    def needs_local_node(self, why: str) -> None:
        """Tests that reach into the node from the host run only on the local real node: on a
        cluster from KUBECONFIG (kind) they skip saying why, and in CI (CI=true) they fail,
        since CI runs them on the local node and nothing may hide behind a skip there."""
        if self.node.local is None:
            servers.unavailable(f"{why}; CI runs this on the local real node (k8s-tests/node.py)")

    def host_pid(self, pod: dict[str, Any]) -> int:
        """The host PID of the pod's first container (for signals from outside, as the kernel sends)."""
        assert self.node.local is not None, "needs the local real node"
        cid = pod["status"]["containerStatuses"][0]["containerID"].split("://")[1]
        for line in self.node.local.ctr("tasks", "ls").stdout.splitlines()[1:]:
            task, pid, *_ = line.split()
            if task == cid:
                return int(pid)
        raise AssertionError(f"no running task {cid} for pod {pod['metadata']['name']}")

    def restarts(self, pod_name: str) -> int:
        pod = self.kube.get("pod", pod_name, "-n", self.namespace)
        return int(pod["status"]["containerStatuses"][0].get("restartCount", 0))


def helm_install(kube: Kube, namespace: str, values: dict[str, Any], name: str) -> float:
    path = kube.home / f"{name}-{namespace}.yaml"
    path.write_text(yaml.safe_dump(values))
    start = time.monotonic()
    kube.helm("install", "chatq", CHART, "-n", namespace, "-f", path, "--wait", "--timeout", "300s",
              timeout=360)
    return time.monotonic() - start


def describe(kube: Kube, namespace: str, operator: bool = False) -> str:
    """What a failing test prints: pods, recent events, the logs of each pod not Ready (and the
    operator's status and log)."""
    out = kube.kubectl("get", "pods", "-n", namespace, "-o", "wide", check=False).stdout
    events = kube.kubectl("get", "events", "-n", namespace, "--sort-by=.lastTimestamp", check=False).stdout
    out += "\n".join(events.splitlines()[-25:]) + "\n"
    pods = json.loads(kube.kubectl("get", "pods", "-n", namespace, "-o", "json", check=False).stdout
                      or '{"items": []}')["items"]
    for pod in pods:
        ready = any(c["type"] == "Ready" and c["status"] == "True"
                    for c in pod.get("status", {}).get("conditions", []))
        if not ready:
            name = pod["metadata"]["name"]
            for extra in ([], ["--previous"]):
                logs = kube.kubectl("logs", "-n", namespace, name, "--all-containers", "--tail=25", *extra,
                                    check=False)
                out += f"--- logs of {name} {' '.join(extra)}---\n{logs.stdout}{logs.stderr[-300:]}"
    if operator:
        out += kube.kubectl("get", "queuescalers", "-n", namespace, "-o", "yaml", check=False).stdout[-3000:]
        out += kube.kubectl("logs", "-n", namespace, "deploy/chatq-operator", "--tail=60", check=False).stdout
    return out


def helm_uninstall(kube: Kube, namespace: str) -> None:
    """Without --wait: the pods' grace (a worker's is 150 s, and its store goes with it) would hold
    each test's teardown; the namespace's deletion and the node's drain take what is left."""
    kube.helm("uninstall", "chatq", "-n", namespace, "--timeout", "120s", check=False, timeout=180)


@pytest.fixture(scope="module", params=["redis", "sqs"])
def release(request: pytest.FixtureRequest, real_node: RealNode) -> Iterator[Release]:
    """One release per backend on the real node, installed with --wait, port-forwarded."""
    backend = str(request.param)
    kube = real_node.kube
    with real_namespace_for(real_node, f"real-{backend}") as namespace:
        values = chart_values(real_node, backend)
        try:
            seconds = helm_install(kube, namespace, values, "real")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{describe(kube, namespace)}") from None
        FIGURES[f"helm install --wait to all Ready ({backend})"] = seconds
        forward = PortForward(kube, namespace)
        forward.start()
        try:
            yield Release(kube, real_node, namespace, backend, forward, values)
        finally:
            forward.stop()
            helm_uninstall(kube, namespace)


def ask(url: str, question: str, **kw: Any) -> dict[str, Any]:
    with chatq_client.Client(url, timeout=30) as c:
        job = c.submit(question, **kw)
        return c.wait(job["id"], timeout=120)


def events_of(url: str, job_id: str) -> list[chatq_client.Event]:
    with chatq_client.Client(url, timeout=30) as c:
        out = []
        for event in c.events(job_id):
            out.append(event)
            if event.type == "done":
                break
        return out


# --- install, hardening, answers ------------------------------------------------------------------


CHATQ_COMPONENTS = ("api", "worker", "operator", "llmsim")
#: uid inside each dev store's container (as the chart's pod securityContext sets it).
STORE_UIDS = {"redis": "999", "elasticmq": "1001"}


def test_every_pod_ready_and_hardened_inside(release: Release) -> None:
    stores = ("redis",) if release.backend == "redis" else ("redis", "elasticmq")
    for component in (*CHATQ_COMPONENTS, *stores):
        pods = release.ready_pods(component)
        assert pods, f"no Ready {component} pod:\n{describe(release.kube, release.namespace)}"
        pod = pods[0]["metadata"]["name"]
        probe = release.exec(pod, "sh", "-c",
                             "id -u; grep -E '^Cap(Prm|Eff|Bnd|Amb)' /proc/self/status; "
                             "touch /probe-write 2>&1 || true")
        lines = probe.splitlines()
        expected_uid = "10001" if component in CHATQ_COMPONENTS else STORE_UIDS[component]
        assert lines[0] == expected_uid, f"{component} runs as uid {lines[0]}"
        caps = dict(line.split(":") for line in lines[1:5])
        assert all(v.strip() == "0000000000000000" for v in caps.values()), f"{component} has {caps}"
        assert "Read-only file system" in probe, f"{component}'s root is writable: {probe}"
        # The real probes said Ready: the kubelet fetched them from the container.
        if component == "worker":
            assert pods[0]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert "CHATQ_API_SERVICE_HOST" not in release.exec(pod, "env")


def test_chatq_ask_through_port_forward_streams(release: Release) -> None:
    start = time.monotonic()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATQ_")}
    result = subprocess.run([str(CHATQ), "ask", "--url", release.url, "What is chatq?"], env=env,
                            capture_output=True, text=True, timeout=120, check=False)
    FIGURES.setdefault(f"first answer through port-forward ({release.backend})", time.monotonic() - start)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip(), result.stderr
    assert "running..." in result.stderr and "simulated by llmsim" in result.stderr, result.stderr
    # The SSE stream itself: deltas, then one done, through the forwarded Service.
    with chatq_client.Client(release.url, timeout=30) as c:
        job = c.submit("Stream me")
    events = events_of(release.url, job["id"])
    kinds = [e.type for e in events]
    assert kinds.count("delta") >= 10 and kinds[-1] == "done", kinds
    text = "".join(str(e.data.get("text", "")) for e in events if e.type == "delta")
    assert text == ask(release.url, "Stream me")["answer"] or text


@pytest.mark.parametrize("release", ["redis"], indirect=True)  # the test pod is queue-blind
def test_helm_test_pod_runs(release: Release) -> None:
    # The test pod is a hook deleted once it succeeds (hook-delete-policy hook-succeeded):
    # helm's report of its phase, which the real kubelet set, is what is left to check.
    out = release.kube.helm("test", "chatq", "-n", release.namespace, "--timeout", "180s", timeout=240).stdout
    assert re.search(r"TEST SUITE:\s+chatq-test-ask", out), out
    assert re.search(r"Phase:\s+Succeeded", out), out


# --- a worker signalled mid-answer ----------------------------------------------------------------


def running_job(release: Release, question: str) -> str:
    """Submits a question and returns its id once a worker has started answering it."""
    with chatq_client.Client(release.url, timeout=30) as c:
        job_id = str(c.submit(question)["id"])
        release.kube.wait_for(f"job {job_id} to be running", lambda: c.get(job_id)["status"] == "running",
                              timeout=60, interval=0.2)
    return job_id


def one_answer(release: Release, job_id: str) -> dict[str, Any]:
    with chatq_client.Client(release.url, timeout=30) as c:
        final = c.wait(job_id, timeout=180)
    assert final["status"] == "succeeded", final
    assert final["answer"], final
    events = events_of(release.url, job_id)
    assert [e.type for e in events].count("done") == 1
    return final


@pytest.mark.parametrize("release", ["redis"], indirect=True)  # the drain is the worker's, not the queue's
def test_worker_sigterm_mid_answer_finishes_or_hands_back(release: Release) -> None:
    job_id = running_job(release, "Deleted gently")
    worker = release.ready_pods("worker")[0]["metadata"]["name"]
    release.kube.kubectl("delete", "pod", worker, "-n", release.namespace, "--wait=false")
    final = one_answer(release, job_id)
    assert final["attempts"] >= 1
    release.kube.wait_for("a Ready worker again", lambda: release.ready_pods("worker"), timeout=120)


def test_worker_sigkill_mid_answer_still_one_answer(release: Release) -> None:
    release.needs_local_node("a cluster from KUBECONFIG (kind) gives the host no PID to SIGKILL")
    job_id = running_job(release, "Killed hard")
    pod = release.ready_pods("worker")[0]
    before = release.restarts(pod["metadata"]["name"])
    os.kill(release.host_pid(pod), signal.SIGKILL)
    final = one_answer(release, job_id)
    assert final["attempts"] >= 2, final  # the killed worker never finished it; another attempt did
    assert release.restarts(pod["metadata"]["name"]) == before + 1


@pytest.mark.parametrize("release", ["redis"], indirect=True)  # the liveness probe is queue-blind
def test_frozen_worker_is_restarted_by_the_kubelet(release: Release) -> None:
    release.needs_local_node("a cluster from KUBECONFIG (kind) gives the host no PID to SIGSTOP")
    pod = release.kube.wait_for("a Ready worker", lambda: release.ready_pods("worker"), timeout=120)[0]
    name = pod["metadata"]["name"]
    before = release.restarts(name)
    os.kill(release.host_pid(pod), signal.SIGSTOP)
    # liveness: every 10 s, 3 s timeout, 3 failures; then the kubelet kills and restarts it.
    release.kube.wait_for(f"the kubelet to restart the frozen worker {name}",
                          lambda: release.restarts(name) > before, timeout=120, interval=1)
    release.kube.wait_for("the restarted worker to be Ready", lambda: release.ready_pods("worker"),
                          timeout=120)
    assert ask(release.url, "Alive again?")["status"] == "succeeded"


# --- helm upgrade under a steady load ---------------------------------------------------------------


@dataclass
class SteadyLoad:
    """A client that posts questions at a steady rate and polls each until it ends, in threads.

    Every request that got a 5xx or no answer at all (refused, reset, timed out) is kept in
    `errors`; accepted jobs in `accepted`, their final records in `final`. Its connections idle
    at most 2 s, under uvicorn's 5 s keep-alive, as a well-behaved client's do (otherwise a
    request can race the server closing an idle connection, upgrade or not)."""

    url: str
    rate: float = 2.0
    accepted: list[str] = field(default_factory=list)
    final: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    posted: list[float] = field(default_factory=list)
    stop_posting: threading.Event = field(default_factory=threading.Event)
    stop_polling: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    threads: list[threading.Thread] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.http = httpx.Client(base_url=self.url, timeout=15,
                                 limits=httpx.Limits(max_connections=20, keepalive_expiry=2))

    def start(self) -> None:
        self.threads = [threading.Thread(target=self._post, daemon=True),
                        threading.Thread(target=self._poll, daemon=True)]
        for t in self.threads:
            t.start()

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response | None:
        try:
            resp = self.http.request(method, path, **kw)
        except httpx.TransportError as exc:
            self._error(f"{method} {path}: {type(exc).__name__}: {exc}")
            return None
        if resp.status_code >= 500 or resp.status_code not in (200, 202):
            self._error(f"{method} {path}: {resp.status_code} {resp.text[:200]}")
            return None
        return resp

    def _error(self, what: str) -> None:
        with self.lock:
            self.errors.append(f"{time.strftime('%H:%M:%S')} {what}")

    def _post(self) -> None:
        n, start = 0, time.monotonic()
        while not self.stop_posting.is_set():
            resp = self._request("POST", "/v1/chat", json={"message": f"steady {n}", "max_tokens": 2})
            if resp is not None:
                with self.lock:
                    self.accepted.append(str(resp.json()["id"]))
                    self.posted.append(time.monotonic())
            n += 1
            self.stop_posting.wait(max(0.0, start + n / self.rate - time.monotonic()))

    def _poll(self) -> None:
        while not self.stop_polling.is_set():
            with self.lock:
                pending = [j for j in self.accepted if j not in self.final]
            for job_id in pending:
                resp = self._request("GET", f"/v1/chat/{job_id}")
                if resp is not None and resp.json()["status"] in {"succeeded", "failed", "cancelled"}:
                    self.final[job_id] = resp.json()
            self.stop_polling.wait(0.5)

    def drain(self, timeout: float) -> list[str]:
        """Stops posting, polls until every accepted job ended (or `timeout`); the ones that did not."""
        self.stop_posting.set()
        self.threads[0].join(timeout=30)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(self.final) < len(self.accepted):
            time.sleep(0.5)
        self.stop_polling.set()
        self.threads[1].join(timeout=30)
        return [j for j in self.accepted if j not in self.final]

    def close(self) -> None:
        self.stop_posting.set()
        self.stop_polling.set()
        for t in self.threads:
            t.join(timeout=30)
        self.http.close()


def service_url(release: Release, name: str = "chatq-api", port: int = 8000) -> str:
    """The Service's ClusterIP, as the host reaches it: kube-proxy's iptables rules (nat OUTPUT
    jumps to KUBE-SERVICES) DNAT the host's own connections to a Ready endpoint, chosen anew per
    connection, as for a pod in the cluster; a port-forward pins one pod and breaks with it."""
    ip = release.kube.get("service", name, "-n", release.namespace)["spec"]["clusterIP"]
    url = f"http://{ip}:{port}"
    try:
        httpx.get(f"{url}/healthz", timeout=5).raise_for_status()
    except httpx.HTTPError as exc:
        raise AssertionError(f"the host cannot reach {name}'s ClusterIP {url} ({exc}): is kube-proxy's "
                             f"iptables nat OUTPUT chain there?") from None
    return url


@pytest.mark.parametrize("release", ["redis"], indirect=True)  # the rollout is the chart's, not the queue's
def test_helm_upgrade_under_steady_load_answers_every_job_once(release: Release) -> None:
    """`helm upgrade` with a changed setting (it rolls the api, the workers and the operator)
    while a client posts 2 short questions a second and polls them (5 a second, with the
    machine's other tests beside, starved the 2 cores: llmsim took 2.6 s for 5 tokens, the
    operator scaled out on the backlog, new pods missed their startup probes), through the api Service's
    ClusterIP from the host (see service_url): no request gets a 5xx or a connection error,
    and every accepted job ends succeeded with one answer. The new api pod takes traffic only
    once Ready (maxUnavailable 0), the old one keeps serving through its preStop pause while
    its endpoint leaves kube-proxy's rules, then drains; old workers drain their jobs."""
    release.needs_local_node("the host reaches ClusterIPs only on the local real node (kube-proxy "
                             "programs this host's iptables)")
    kube, ns = release.kube, release.namespace
    kube.wait_for("a Ready api and worker",
                  lambda: release.ready_pods("api") and release.ready_pods("worker"), timeout=120)
    old = {c: {p["metadata"]["name"] for p in release.pods(c)} for c in ("api", "worker")}
    values = json.loads(json.dumps(release.values))
    values["config"]["worker"]["concurrency"] = int(values["config"]["worker"]["concurrency"]) + 4
    path = kube.home / f"upgrade-{ns}.yaml"
    path.write_text(yaml.safe_dump(values))
    load = SteadyLoad(service_url(release))
    load.start()
    try:
        time.sleep(5)  # a steady state first
        before = len(load.accepted)
        start = time.monotonic()
        kube.helm("upgrade", "chatq", CHART, "-n", ns, "-f", path, "--wait", "--timeout", "300s", timeout=360)
        seconds = time.monotonic() - start
        # The rollout is over when the old pods are gone (the api's preStop pause and drain, the
        # workers' drain come after helm's --wait): the load runs until then, and 3 s beyond.
        def old_pods() -> list[str]:
            return [p["metadata"]["name"] for c in old for p in kube.get(
                "pods", "-n", ns, "-l", f"app.kubernetes.io/component={c}")["items"]
                if p["metadata"]["name"] in old[c]]

        kube.wait_for("the old api and worker pods to be gone", lambda: not old_pods(), timeout=180,
                      interval=1)
        rollout = time.monotonic() - start
        time.sleep(3)
        during = len(load.accepted) - before
        unfinished = load.drain(timeout=120)
    finally:
        load.close()
    release.values = values
    release.forward.start()  # the port-forward's pod is gone
    new = {c: {p["metadata"]["name"] for p in release.ready_pods(c)} for c in ("api", "worker")}
    assert all(new[c] and not new[c] & old[c] for c in old), (old, new)
    with chatq_client.Client(load.url, timeout=30) as c:
        dones = {j: [e.type for e in c.events(j)].count("done") for j in load.accepted}
    duplicated = [j for j, n in dones.items() if n != 1]
    failed = {j: r for j, r in load.final.items() if r["status"] != "succeeded" or not r.get("answer")}
    handed_back = sum(1 for r in load.final.values() if int(r.get("attempts", 1)) > 1)
    FIGURES["helm upgrade --wait under load"] = seconds
    FIGURES["helm upgrade to old pods gone"] = rollout
    print(f"\nhelm upgrade under {load.rate:.0f} jobs/s: {seconds:.1f} s (old pods gone at {rollout:.1f} s); "
          f"{during} jobs posted meanwhile, {len(load.accepted)} in all; {len(unfinished)} unfinished, "
          f"{len(failed)} failed, {len(duplicated)} with other than one answer, {handed_back} handed back; "
          f"{len(load.errors)} request errors")
    assert not load.errors, (f"{len(load.errors)} requests failed during the upgrade:\n"
                             + "\n".join(load.errors[:20]))
    assert during >= load.rate * seconds * 0.8, f"the load did not keep up: {during} jobs in {seconds:.0f} s"
    assert not unfinished, f"{len(unfinished)} accepted jobs never ended: {unfinished[:10]}"
    assert not failed, f"{len(failed)} jobs did not succeed: {list(failed.values())[:3]}"
    assert not duplicated, {j: dones[j] for j in duplicated[:10]}


# --- the dev Redis deleted ---------------------------------------------------------------------------


@pytest.mark.parametrize("release", ["redis"], indirect=True)  # the dev Redis is the store here
def test_dev_redis_deleted_readyz_503_then_recovers(release: Release) -> None:
    def readyz() -> httpx.Response:
        return httpx.get(f"{release.url}/readyz", timeout=10)

    assert readyz().status_code == 200
    redis = release.ready_pods("redis")[0]["metadata"]["name"]
    release.kube.kubectl("delete", "pod", redis, "-n", release.namespace, "--grace-period=0", "--force")
    down = release.kube.wait_for("/readyz to answer 503", lambda: (r := readyz()).status_code == 503 and r,
                                 timeout=60, interval=0.5)
    body = down.json()
    assert "redis" in json.dumps(body).lower(), body
    release.kube.wait_for("/readyz to answer 200 again", lambda: readyz().status_code == 200, timeout=120)


@pytest.mark.parametrize("release", ["sqs"], indirect=True)  # the dev ElasticMQ is the queue here
def test_dev_elasticmq_deleted_readyz_503_then_recovers(release: Release) -> None:
    """ElasticMQ keeps its queues in memory: the new pod starts empty, and chatq creates the
    queue again (chatq.queues.sqs): /readyz recovers and a new question is answered."""
    def readyz() -> httpx.Response:
        return httpx.get(f"{release.url}/readyz", timeout=10)

    assert readyz().status_code == 200
    mq = release.ready_pods("elasticmq")[0]["metadata"]["name"]
    release.kube.kubectl("delete", "pod", mq, "-n", release.namespace, "--grace-period=0", "--force")
    start = time.monotonic()
    down = release.kube.wait_for("/readyz to answer 503", lambda: (r := readyz()).status_code == 503 and r,
                                 timeout=60, interval=0.5)
    body = down.json()
    assert "sqs" in json.dumps(body).lower(), body
    release.kube.wait_for("/readyz to answer 200 again", lambda: readyz().status_code == 200, timeout=120)
    FIGURES["dev ElasticMQ deleted to /readyz 200 again"] = time.monotonic() - start
    # The workers, too, find the queue again: a question asked now is answered.
    assert ask(release.url, "After the queue came back")["status"] == "succeeded"


# --- the operator, in-cluster, on real worker pods ---------------------------------------------------


def test_operator_scales_real_workers_from_zero_and_back(real_node: RealNode) -> None:
    """0 → N on a backlog, a busy pod kept through scale-in, then back to 0 (redis backend)."""
    kube = real_node.kube
    scaler = {"minReplicas": 0, "maxReplicas": 3, "messagesPerReplica": 2, "pollSeconds": 1,
              "scaleDownStabilizationSeconds": 3, "idleSecondsBeforeZero": 8}
    values = chart_values(real_node, "redis", worker={"queueScaler": scaler})
    # Long answers by default (200 tokens, 20 s): the busy pod's; short ones ask for 2 tokens.
    values["config"]["llmsim"] = {"ttft_ms": 300, "itl_ms": 100, "tokens": 200}
    values["config"]["worker"] = {"concurrency": 2}
    with real_namespace_for(real_node, "real-operator") as namespace:
        helm_install(kube, namespace, values, "operator")
        release = Release(kube, real_node, namespace, "redis", PortForward(kube, namespace), values)

        def replicas() -> int:
            return int(kube.get("deployment", "chatq-worker", "-n", namespace)["spec"].get("replicas", 0))

        kube.wait_for("the operator to hold the workers at 0 (nothing queued)", lambda: replicas() == 0,
                      timeout=60)
        assert not release.pods("worker")
        release.forward.start()
        try:
            scale_from_zero_and_back(kube, release, replicas)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{describe(kube, namespace, operator=True)}") from None
        finally:
            release.forward.stop()
            helm_uninstall(kube, namespace)


def scale_from_zero_and_back(kube: Kube, release: Release, replicas: Callable[[], int]) -> None:
    """The first answer from zero workers, scale-out on a backlog, scale-in past a busy pod, then 0."""
    start = time.monotonic()
    first = ask(release.url, "From zero", max_tokens=2)
    FIGURES["scale from zero to first answer (real pods)"] = time.monotonic() - start
    assert first["status"] == "succeeded", first

    with chatq_client.Client(release.url, timeout=30) as c:
        long_id = str(c.submit("The long one")["id"])
        kube.wait_for("the long job to run", lambda: c.get(long_id)["status"] == "running",
                      timeout=60)
        short = [str(c.submit(f"short {i}", max_tokens=2)["id"]) for i in range(10)]
        kube.wait_for("the operator to scale out on the backlog", lambda: replicas() >= 2, timeout=60)
        assert all(c.wait(j, timeout=120)["status"] == "succeeded" for j in short)
        # Only the long job is left: the operator scales in while it still runs.
        kube.wait_for("scale-in to one worker while the long job runs", lambda: replicas() == 1,
                      timeout=60, interval=0.5)
        assert c.get(long_id)["status"] == "running"
        final = c.wait(long_id, timeout=120)
    assert final["status"] == "succeeded" and final["attempts"] == 1, final  # never handed back
    kube.wait_for("the operator to scale to zero when idle", lambda: replicas() == 0, timeout=90)
    kube.wait_for("the worker pods to be gone", lambda: not release.pods("worker"), timeout=180)
