"""The chart's operator wiring, end to end: the real operator process, logged in with the
token of the chart's operator ServiceAccount (so only the chart's Role applies), scales the
chart's worker Deployment through the chart's QueueScaler on a real Redis stream.

This is what `kubectl auth can-i` (test_rbac.py) cannot show: that the Role is enough for
what kopf and the operator actually do (watch, finalizers, status, scale, pod deletion
cost, Events). kwok's pods run nothing, so no worker consumes the messages: the test adds
them and takes them away. Phases as in KEDA's e2e tests: scale-out, then scale-in.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import yaml
from conftest import CHART, REPO, Kube, unavailable

pytestmark = pytest.mark.timeout(300)

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from tests import servers  # noqa: E402


@pytest.fixture
def redis_url() -> Iterator[str]:
    if shutil.which("redis-server") is None:
        unavailable("redis-server is not installed; run scripts/setup (it installs Debian's redis-server)")
    with servers.redis_server() as server:
        yield server.url


def service_account_kubeconfig(kube: Kube, namespace: str, account: str, path: Path) -> str:
    """A kubeconfig for the cluster that logs in as the ServiceAccount (a TokenRequest token)."""
    token = kube.kubectl("create", "token", account, "-n", namespace, "--duration=1h").stdout.strip()
    config = yaml.safe_load(kube.kubectl("config", "view", "--raw", "--minify", "-o", "yaml").stdout)
    config["users"] = [{"name": account, "user": {"token": token}}]
    config["contexts"][0]["context"]["user"] = account
    config["contexts"][0]["context"]["namespace"] = namespace
    path.write_text(yaml.safe_dump(config))
    return str(path)


@contextlib.contextmanager
def operator_process(
    kubeconfig: str, namespace: str, redis_url: str, log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    env = servers.chatq_env(
        KUBECONFIG=kubeconfig,
        CHATQ_OPERATOR_NAMESPACES=namespace,
        CHATQ_OPERATOR_METRICS_PORT=str(servers.free_port()),
        CHATQ_REDIS_URL=redis_url,
        PYTHONUNBUFFERED="1",
    )
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "chatq_operator"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def run_cleanup_hook(kube: Kube, namespace: str, tmp_path: Path) -> str:
    """The chart's pre-delete hook script, with the hook's own ServiceAccount and Role."""
    objects = kube.template("--show-only", "templates/operator-cleanup-hook.yaml",
                            namespace=namespace, values={"redis": {"url": "redis://r:6379/0"}})
    job = next(o for o in objects if o["kind"] == "Job")
    access = [o for o in objects if o["kind"] != "Job"]
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(access))
    account = job["spec"]["template"]["spec"]["serviceAccountName"]
    kubeconfig = service_account_kubeconfig(kube, namespace, account, tmp_path / "cleanup.kubeconfig")
    container = job["spec"]["template"]["spec"]["containers"][0]
    env = {**os.environ, "KUBECONFIG": kubeconfig, **{e["name"]: e["value"] for e in container["env"]}}
    script = container["args"][0]
    try:
        result = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=150
        )
    finally:
        kube.kubectl(
            "delete", "-n", namespace, "-f", "-", "--ignore-not-found", input=yaml.safe_dump_all(access)
        )
    assert result.returncode == 0, f"the hook failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def replicas(kube: Kube, namespace: str) -> int:
    return int(kube.get("deployment", "chatq-worker", "-n", namespace)["spec"]["replicas"])


def test_operator_scales_the_chart_workers_with_its_own_service_account(
    kube: Kube, namespace: str, redis_url: str, tmp_path: Path
) -> None:
    values = {
        "redis": {"url": redis_url},
        "config": {"worker": {"concurrency": 2}},
        "worker": {
            "queueScaler": {
                "minReplicas": 1,
                "maxReplicas": 4,
                "pollSeconds": 1,
                "scaleDownStabilizationSeconds": 2,
                "activationMessages": 0,
            }
        },
        "tests": {"enabled": False},
        # The operator under test runs here, as a process; none in the cluster (on kind one would).
        "operator": {"replicaCount": 0},
    }
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    kube.helm(
        "install", "chatq", CHART, "-n", namespace, "-f", path, "--wait", "--timeout", "120s", timeout=180
    )
    assert replicas(kube, namespace) == 1

    stream, group = "chatq-jobs", "chatq-workers"
    client = redis.Redis.from_url(redis_url)
    client.xgroup_create(stream, group, id="$", mkstream=True)
    kubeconfig = service_account_kubeconfig(
        kube, namespace, "chatq-operator", tmp_path / "operator.kubeconfig"
    )
    log = tmp_path / "operator.log"
    try:
        with operator_process(kubeconfig, namespace, redis_url, log) as proc:
            # scale-out: 5 waiting messages at 2 per worker need 3 workers.
            for i in range(5):
                client.xadd(stream, {"job": f"job-{i}"})
            kube.wait_for(
                "the operator to scale the workers to 3",
                lambda: proc.poll() is None and replicas(kube, namespace) == 3,
                timeout=60,
            )
            status = kube.get("queuescaler", "chatq-worker", "-n", namespace)["status"]
            assert status["visible"] == 5 and status["desiredReplicas"] == 3, status
            events = kube.kubectl(
                "get",
                "events",
                "-n",
                namespace,
                "--field-selector",
                "involvedObject.kind=QueueScaler",
                "-o",
                "json",
            ).stdout
            assert json.loads(events)["items"], "the operator records Events"

            # scale-in: the queue drains, and after the stabilization window one worker is left.
            client.xtrim(stream, maxlen=0)
            kube.wait_for(
                "the operator to scale the workers back to 1",
                lambda: proc.poll() is None and replicas(kube, namespace) == 1,
                timeout=60,
            )

            # The chart's pre-delete hook, run here as its own ServiceAccount (kwok runs no
            # pods): it deletes the QueueScaler and waits while the operator lifts its finalizer.
            released = run_cleanup_hook(kube, namespace, tmp_path)
            assert "released every QueueScaler" in released, released
            assert not kube.kubectl("get", "queuescalers", "-n", namespace, "-o", "name").stdout.strip()
            assert proc.poll() is None, "the operator kept running"
        text = log.read_text(errors="replace")
        forbidden = [line for line in text.splitlines() if " 403" in line or "orbidden" in line]
        assert not forbidden, "the operator's Role lacks something:\n" + "\n".join(forbidden[:10])

        # helm uninstall (its hook finds nothing left to release) leaves nothing behind.
        kube.helm("uninstall", "chatq", "-n", namespace, "--wait", "--timeout", "90s", timeout=120)
        kube.wait_for(
            "the release's objects to be gone",
            lambda: (
                not kube.kubectl(
                    "get",
                    "deployments,jobs,pods,serviceaccounts,roles,rolebindings,queuescalers",
                    "-n",
                    namespace,
                    "-l",
                    "app.kubernetes.io/instance=chatq",
                    "-o",
                    "name",
                ).stdout.strip()
            ),
            timeout=90,
        )
    finally:
        text = log.read_text(errors="replace") if log.exists() else ""
        sys.stderr.write(f"--- operator log (tail) ---\n{text[-3000:]}\n")
        client.close()
        for name in kube.kubectl(
            "get", "queuescalers", "-n", namespace, "-o", "name", check=False
        ).stdout.split():
            kube.kubectl(
                "patch", name, "-n", namespace, "--type=merge", "-p", '{"metadata":{"finalizers":null}}'
            )
