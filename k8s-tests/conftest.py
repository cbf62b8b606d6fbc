"""Fixtures of the k8s tier: the tools, a cluster, and one namespace per test.

With KUBECONFIG set, tests run against that cluster (kind, or any other); without it, a local
control plane (controlplane.py: etcd, kube-apiserver, controller-manager, scheduler, kwok)
is started once per session and stopped at the end, and, where this machine allows (root,
scripts/setup-k8s's node binaries), a real node beside kwok's (node.py: containerd, CNI,
kubelet, kube-proxy, CoreDNS) for the tests that need containers to run. The binaries come from
scripts/setup-k8s; where they are missing a test is skipped with the reason, except in CI
(CI=true), where that is a failure that says what to run.

Every test file in k8s-tests may use:
  tools      session: the binaries folder and helm/kubectl runners that need no cluster
  kube       session: a cluster (.kubeconfig, .kubectl(), .helm(), .bin, .local)
  namespace  function: a fresh namespace, always deleted afterwards
  real_node  session: a node that runs containers, with chatq's images on it (real_pods.py)
  real_namespace  function: a fresh namespace whose pods all go to that node
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import controlplane
import node as node_mod
import pytest
import yaml

REPO = controlplane.REPO
if str(REPO) not in sys.path:  # tests.containers (the images) when k8s-tests run alone
    sys.path.insert(0, str(REPO))
from tests import servers  # noqa: E402
from tests.containers.conftest import chatq_images, docker  # noqa: E402,F401  (fixtures)

CHART = REPO / "charts" / "chatq"
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def unavailable(message: str) -> NoReturn:
    """Skip (locally) or fail (in CI) because a prerequisite is missing."""
    if IN_CI:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def missing(what: str) -> NoReturn:
    unavailable(f"{what}; run scripts/setup-k8s (it builds and caches the k8s tools)")


@dataclass
class Tools:
    """The k8s binaries and runners that need no cluster (helm template, lint, ct...)."""

    bin: Path
    home: Path
    env: dict[str, str] = field(default_factory=dict)

    def run(
        self,
        *args: str | Path,
        check: bool = True,
        input: str | None = None,
        timeout: float = 120,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Runs a command with the tools' environment; on failure the error shows its output."""
        argv = [str(a) for a in args]
        try:
            result = subprocess.run(
                argv,
                env=env or self.env,
                input=input,
                capture_output=True,
                text=True,
                timeout=timeout,
                cwd=cwd or REPO,
            )
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(
                f"`{' '.join(argv)}` did not finish in {timeout:.0f} s\n"
                f"stdout: {exc.stdout}\nstderr: {exc.stderr}"
            ) from None
        if check and result.returncode != 0:
            raise AssertionError(
                f"`{' '.join(argv)}` exited with {result.returncode}\n"
                f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
            )
        return result

    def helm(self, *args: str | Path, **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.run(self.bin / "helm", *args, **kw)

    def template(
        self,
        *args: str | Path,
        values: dict[str, Any] | None = None,
        release: str = "chatq",
        namespace: str = "chatq",
    ) -> list[dict[str, Any]]:
        """`helm template` of charts/chatq, as a list of objects (values given as a dict)."""
        extra: list[str | Path] = []
        if values is not None:
            path = self.home / f"values-{uuid.uuid4().hex[:8]}.yaml"
            path.write_text(yaml.safe_dump(values))
            extra = ["-f", path]
        out = self.helm("template", release, CHART, "--namespace", namespace, *extra, *args).stdout
        return [d for d in yaml.safe_load_all(out) if d]


@dataclass
class Kube(Tools):
    """A cluster: kubectl and helm pointed at it."""

    kubeconfig: str = ""
    local: bool = False
    """True when the tests started the control plane themselves (kwok: no container runs)."""
    plane: controlplane.ControlPlane | None = None
    host: node_mod.Host | None = None
    """The real node's host side (its address), when this machine can run one."""
    no_real_node: str = ""
    """Why there is no real node (empty when there is one)."""

    def kubectl(self, *args: str | Path, **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.run(self.bin / "kubectl", *args, **kw)

    def get(self, *args: str) -> Any:
        """`kubectl get ... -o yaml`, parsed."""
        return yaml.safe_load(self.kubectl("get", *args, "-o", "yaml").stdout)

    def wait_for(self, what: str, check: Any, timeout: float = 60, interval: float = 0.5) -> Any:
        """Polls check() until it returns something truthy; fails with `what` after timeout."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            last = check()
            if last:
                return last
            time.sleep(interval)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


def _find_bin() -> Path:
    """The binaries: scripts/setup-k8s's cache; kubectl/helm may also come from PATH (kind users)."""
    return controlplane.bin_dir()


@pytest.fixture(scope="session")
def tools(tmp_path_factory: pytest.TempPathFactory) -> Tools:
    bin_dir = _find_bin()
    home = tmp_path_factory.mktemp("k8s-tools")
    linked = home / "bin"
    linked.mkdir()
    for name in (
        "helm",
        "kubectl",
        "ct",
        "kwok",
        "skaffold",
        "etcd",
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
        *node_mod.NODE_BINARIES,
    ):
        found = bin_dir / name if (bin_dir / name).exists() else shutil.which(name)
        if found:
            (linked / name).symlink_to(found)
    if not (linked / "helm").exists():
        missing(f"helm was not found in {bin_dir} or on PATH")
    venv_bin = Path(sys.executable).parent  # yamllint and yamale for ct
    env = {
        **os.environ,
        "PATH": f"{linked}{os.pathsep}{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
        # helm keeps its state in the session's folder; the plugins (helm-unittest) in the cache.
        "HELM_CONFIG_HOME": str(home / "helm-config"),
        "HELM_CACHE_HOME": str(home / "helm-cache"),
        "HELM_DATA_HOME": str(home / "helm-data"),
        "HELM_PLUGINS": str(bin_dir.parent / "helm-plugins"),
    }
    return Tools(bin=linked, home=home, env=env)


@pytest.fixture(scope="session")
def kube(tools: Tools, request: pytest.FixtureRequest) -> Iterator[Kube]:
    given = os.environ.get("KUBECONFIG")
    if given:
        if not (tools.bin / "kubectl").exists():
            missing("kubectl was not found")
        cluster = Kube(bin=tools.bin, home=tools.home, env=dict(tools.env), kubeconfig=given)
        cluster.kubectl("version")
        yield cluster
        return
    absent = [b for b in (*controlplane.CONTROL_PLANE_BINARIES, "kubectl") if not (tools.bin / b).exists()]
    if absent:
        missing(f"the local control plane needs {', '.join(absent)} in {controlplane.bin_dir()}")
    why = node_mod.Host.available(tools.bin)
    if os.environ.get("CHATQ_K8S_REAL_NODE", "1") == "0":
        why = "CHATQ_K8S_REAL_NODE=0 turns the real node off"
    elif not any("real_node" in getattr(item, "fixturenames", ()) for item in request.session.items):
        why = "no selected test needs the real node"  # kwok only: the control plane stays on loopback
    with contextlib.ExitStack() as stack:
        # The real node's address must exist before the apiserver binds it.
        host = None if why else stack.enter_context(node_mod.host_network(tools.bin))
        plane = stack.enter_context(controlplane.running(
            tools.bin, address=host.node_ip if host else "127.0.0.1"))
        env = {**tools.env, "KUBECONFIG": plane.kubeconfig}
        yield Kube(bin=tools.bin, home=tools.home, env=env, kubeconfig=plane.kubeconfig, local=True,
                   plane=plane, host=host, no_real_node=why)


@contextlib.contextmanager
def fresh_namespace(kube: Kube, stem: str, annotations: dict[str, str] | None = None) -> Iterator[str]:
    """A namespace named after `stem`, ready for pods (its default ServiceAccount made); deleted
    afterwards, whatever happened."""
    stem = re.sub(r"[^a-z0-9]+", "-", stem.lower()).strip("-")[:40].strip("-")
    name = f"{stem}-{uuid.uuid4().hex[:6]}"
    manifest = {"apiVersion": "v1", "kind": "Namespace", "metadata": {
        "name": name, "labels": {"chatq.io/k8s-tests": "true"}, "annotations": annotations or {}}}
    kube.kubectl("create", "-f", "-", input=json.dumps(manifest))
    try:
        # The controller-manager makes the ServiceAccount: seconds when idle, but 30 s was
        # not enough with the other test processes loading both cores.
        kube.wait_for(
            f"the default ServiceAccount in {name}",
            lambda: kube.kubectl("get", "sa", "default", "-n", name, check=False).returncode == 0,
            timeout=90,
        )
        yield name
    finally:
        kube.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found", check=False)


@pytest.fixture
def namespace(kube: Kube, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace named after the test."""
    with fresh_namespace(kube, request.node.name) as name:
        yield name


@pytest.fixture(scope="session")
def scratch() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="chatq-k8s-tests-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def crd(kube: Kube) -> None:
    """The QueueScaler CRD, installed and established (tests must not rely on run order)."""
    kube.kubectl("apply", "--server-side", "--force-conflicts", "-f",
                 CHART / "crds" / "queuescalers.chatq.io.yaml")
    kube.kubectl("wait", "--for=condition=Established", "crd/queuescalers.chatq.io", "--timeout=60s")


@dataclass
class RealNode:
    """A node that runs containers: node.py's (started here) or one of KUBECONFIG's cluster."""

    kube: Kube
    name: str
    local: node_mod.Node | None
    images: dict[str, str] = field(default_factory=dict)
    figures: dict[str, float] = field(default_factory=dict)


#: Images on the real node, as the chart's values name them (docker's tags; no registry).
NODE_IMAGES = ["chatq-ci/redis:local", "chatq-ci/elasticmq:local"]


@pytest.fixture(scope="session")
def real_node(kube: Kube, chatq_images: dict[str, str]) -> Iterator[RealNode]:  # noqa: F811
    """The local real node with chatq's images loaded, or KUBECONFIG's cluster (images loaded by you)."""
    images = {**chatq_images, "redis": NODE_IMAGES[0], "elasticmq": NODE_IMAGES[1]}
    if not kube.local:
        # kind and friends: any node kwok does not manage; `kind load docker-image` puts the images there.
        nodes = kube.get("nodes")["items"]
        kwok = controlplane.KWOK_NODE_ANNOTATION
        real = [n for n in nodes if kwok not in n["metadata"].get("annotations", {})]
        if not real:
            unavailable("the cluster in KUBECONFIG has no node that runs containers")
        yield RealNode(kube, real[0]["metadata"]["name"], None, images)
        return
    if kube.host is None or kube.plane is None:
        unavailable(f"no real node: {kube.no_real_node}")
    node = node_mod.Node(kube.plane, kube.host)
    try:
        node.start()
        seconds = node.load_docker_images([*chatq_images.values(), *NODE_IMAGES])
        node.figures["image load (4 images side by side, docker save | ctr import)"] = seconds
        node_mod.FIGURES.update(node.figures)
        yield RealNode(kube, node_mod.NODE_NAME, node, images, node.figures)
    finally:
        node.stop()


@contextlib.contextmanager
def real_namespace_for(real_node: RealNode, stem: str) -> Iterator[str]:
    """A fresh namespace whose pods all run on the real node (tolerating its taint)."""
    annotations = {}
    if real_node.local is not None:
        annotations = {
            "scheduler.alpha.kubernetes.io/node-selector": f"kubernetes.io/hostname={real_node.name}",
            "scheduler.alpha.kubernetes.io/defaultTolerations": json.dumps(
                [{"key": node_mod.TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}]),
        }
    with fresh_namespace(real_node.kube, stem, annotations) as name:
        yield name


@pytest.fixture
def real_namespace(real_node: RealNode, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace on the real node, named after the test."""
    with real_namespace_for(real_node, request.node.name) as name:
        yield name


# Under pytest-xdist every test here runs on one worker with tests/containers (the images):
# the local control plane is one per machine. Marked here too, so that it holds when
# k8s-tests run alone (tests/conftest.py is not loaded then).
pytest_collection_modifyitems = servers.mark_xdist_groups


def pytest_sessionfinish(session: pytest.Session) -> None:
    servers.hand_section(session.config, "real node figures",
                         {name: f"{seconds:.1f} s" for name, seconds in node_mod.FIGURES.items()})


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if node_mod.FIGURES:
        terminalreporter.section("real node figures")
        for name, seconds in node_mod.FIGURES.items():
            terminalreporter.write_line(f"{name}: {seconds:.1f} s")
