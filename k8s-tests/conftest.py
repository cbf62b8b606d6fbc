"""Fixtures of the k8s tier: the tools, a cluster, and one namespace per test.

With KUBECONFIG set, tests run against that cluster (kind, or any other); without it, a local
control plane (controlplane.py: etcd, kube-apiserver, controller-manager, scheduler, kwok)
is started once per session and stopped at the end. The binaries come from
scripts/setup-k8s; where they are missing a test is skipped with the reason, except in CI
(CI=true), where that is a failure that says what to run.

Every test file in k8s-tests may use:
  tools      session: the binaries folder and helm/kubectl runners that need no cluster
  kube       session: a cluster (.kubeconfig, .kubectl(), .helm(), .bin, .local)
  namespace  function: a fresh namespace, always deleted afterwards
"""

from __future__ import annotations

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
import pytest
import yaml

REPO = controlplane.REPO
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
def kube(tools: Tools) -> Iterator[Kube]:
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
    with controlplane.running(tools.bin) as plane:
        env = {**tools.env, "KUBECONFIG": plane.kubeconfig}
        yield Kube(
            bin=tools.bin, home=tools.home, env=env, kubeconfig=plane.kubeconfig, local=True, plane=plane
        )


@pytest.fixture
def namespace(kube: Kube, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace named after the test; deleted afterwards, whatever happened."""
    stem = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"{stem}-{uuid.uuid4().hex[:6]}"
    kube.kubectl("create", "namespace", name)
    kube.kubectl("label", "namespace", name, "chatq.io/k8s-tests=true")
    try:
        kube.wait_for(
            f"the default ServiceAccount in {name}",
            lambda: kube.kubectl("get", "sa", "default", "-n", name, check=False).returncode == 0,
            timeout=30,
        )
        yield name
    finally:
        kube.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found", check=False)


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
