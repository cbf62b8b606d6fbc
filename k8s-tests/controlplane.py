"""A real Kubernetes control plane on this machine, for k8s-tests when no KUBECONFIG is given.

etcd, kube-apiserver, kube-controller-manager and kube-scheduler run as processes on free
ports in a temporary folder, with a CA, serving certificate and service-account key made
here by openssl; kwok stands in for kubelets, so scheduled pods are reported Running and
Ready (no container runs). The binaries come from scripts/setup-k8s (built once, cached by
version). Each step logs what it waits for; a failure shows the tail of the log concerned.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from tests.servers import free_port  # one helper for every suite; the conftest puts the repo on sys.path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
KWOK_STAGES = HERE / "kwok-stages.yaml"
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
CONTROL_PLANE_BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
TOOL_BINARIES = ("kubectl", "helm")


class ControlPlaneError(RuntimeError):
    """The control plane did not come up; the message names the step and shows its log."""


def kubernetes_version() -> str:
    """The Kubernetes version k8s-tests/kube-build builds (its go.mod's requirement)."""
    for line in (HERE / "kube-build" / "go.mod").read_text().splitlines():
        parts = line.replace("require ", "").split()
        if len(parts) >= 2 and parts[0] == "k8s.io/kubernetes" and parts[1].startswith("v"):
            return parts[1]
    raise ControlPlaneError("k8s-tests/kube-build/go.mod requires no k8s.io/kubernetes")


def bin_dir() -> Path:
    """Where scripts/setup-k8s puts the binaries (CHATQ_K8S_BIN overrides)."""
    if override := os.environ.get("CHATQ_K8S_BIN"):
        return Path(override)
    cache = Path(os.environ.get("CHATQ_CACHE") or Path.home() / ".cache" / "chatq")
    return cache / "k8s" / kubernetes_version() / "bin"



def log(message: str) -> None:
    print(f"[controlplane] {message}", file=sys.stderr, flush=True)


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler + kwok, started and stopped."""

    def __init__(self, binaries: Path, nodes: int = 2, address: str = "127.0.0.1") -> None:
        self.bin = binaries
        self.nodes = nodes
        self.address = address
        """Where the apiserver listens: loopback, or the real node's address (node.py) so pods reach it."""
        self.dir = Path(tempfile.mkdtemp(prefix="chatq-k8s-"))
        self.kubeconfig = str(self.dir / "kubeconfig")
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.api_port = 0
        self.token = secrets.token_hex(16)
        self.startup_seconds = 0.0

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        started = time.monotonic()
        try:
            self._certificates()
            self._etcd()
            self._apiserver()
            self._spawn(
                "kube-controller-manager",
                [
                    f"--kubeconfig={self.kubeconfig}",
                    "--leader-elect=false",
                    "--secure-port=0",
                    f"--service-account-private-key-file={self.dir / 'sa.key'}",
                    f"--root-ca-file={self.dir / 'ca.crt'}",
                    "--use-service-account-credentials=false",
                    # Nodes are kwok's: no kubelet heartbeats for the lifecycle controller to judge.
                    "--controllers=*,-node-lifecycle-controller",
                    "--concurrent-deployment-syncs=10",
                    "--concurrent-replicaset-syncs=10",
                    "--concurrent-namespace-syncs=10",
                ],
            )
            self._spawn(
                "kube-scheduler",
                [
                    f"--kubeconfig={self.kubeconfig}",
                    "--leader-elect=false",
                    "--secure-port=0",
                ],
            )
            self._spawn(
                "kwok",
                [
                    f"--kubeconfig={self.kubeconfig}",
                    f"--config={KWOK_STAGES}",
                    "--manage-all-nodes=false",
                    f"--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION}=fake",
                    "--cidr=10.244.0.0/16",
                    "--node-ip=10.0.0.1",
                ],
            )
            self._nodes()
            self._wait(
                "the controller manager to create the default ServiceAccount",
                lambda: self._kubectl_ok("get", "serviceaccount", "default", "-n", "default"),
                60,
                "kube-controller-manager",
            )
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        log(f"control plane ready in {self.startup_seconds:.1f} s (kubeconfig {self.kubeconfig})")

    def stop(self) -> None:
        for _name, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in reversed(self.procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                log(f"{name} ignored SIGTERM for 15 s; killing it")
                proc.kill()
                proc.wait()
        self.procs.clear()
        if os.environ.get("CHATQ_K8S_KEEP"):
            log(f"kept {self.dir} (CHATQ_K8S_KEEP is set)")
        else:
            shutil.rmtree(self.dir, ignore_errors=True)

    # --- steps -------------------------------------------------------------------------------

    def _openssl(self, *args: str) -> None:
        subprocess.run(["openssl", *args], cwd=self.dir, check=True, capture_output=True)

    def _certificates(self) -> None:
        """A CA, the API server's serving certificate, the service-account key, a token."""
        log("making certificates with openssl...")
        self._openssl(
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "30",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-subj",
            "/CN=chatq-k8s-tests-ca",
        )
        (self.dir / "serving.ext").write_text(
            f"subjectAltName=IP:127.0.0.1,IP:{self.address},IP:10.96.0.1,DNS:localhost,DNS:kubernetes,"
            "DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n"
            "extendedKeyUsage=serverAuth\n"
        )
        self._openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "serving.key",
            "-out",
            "serving.csr",
            "-subj",
            "/CN=kube-apiserver",
        )
        self._openssl(
            "x509",
            "-req",
            "-in",
            "serving.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "30",
            "-extfile",
            "serving.ext",
            "-out",
            "serving.crt",
        )
        self._openssl("genrsa", "-out", "sa.key", "2048")
        self._openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub")
        # One static token in system:masters for the tests, controllers and scheduler.
        (self.dir / "tokens.csv").write_text(f'{self.token},admin,admin,"system:masters"\n')
        # The apiserver's client certificate towards kubelets (logs, exec, port-forward).
        self.client_certificate("apiserver-kubelet", "/O=system:masters/CN=kube-apiserver-kubelet-client")

    def client_certificate(self, name: str, subject: str) -> None:
        """<name>.crt/.key signed by the CA; the subject's CN is the user, each O a group."""
        self._openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                      "-subj", subject)
        (self.dir / f"{name}.ext").write_text("extendedKeyUsage=clientAuth\n")
        self._openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                      "-CAcreateserial", "-days", "30", "-extfile", f"{name}.ext", "-out", f"{name}.crt")

    def write_kubeconfig(self, path: Path, cert: str | None = None) -> None:
        """A kubeconfig for the admin token, or for the client certificate `cert` (client_certificate)."""
        ca = base64.b64encode((self.dir / "ca.crt").read_bytes()).decode()
        if cert is None:
            user: dict[str, str] = {"token": self.token}
        else:
            user = {"client-certificate": str(self.dir / f"{cert}.crt"),
                    "client-key": str(self.dir / f"{cert}.key")}
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "chatq-local",
            "clusters": [{"name": "chatq-local", "cluster": {
                "server": f"https://{self.address}:{self.api_port}", "certificate-authority-data": ca}}],
            "users": [{"name": "admin", "user": user}],
            "contexts": [{"name": "chatq-local", "context": {"cluster": "chatq-local", "user": "admin"}}],
        }, indent=2))

    def _etcd(self) -> None:
        client, peer = free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{client}"
        self._spawn(
            "etcd",
            [
                f"--data-dir={self.dir / 'etcd'}",
                f"--listen-client-urls={self.etcd_url}",
                f"--advertise-client-urls={self.etcd_url}",
                f"--listen-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-cluster=default=http://127.0.0.1:{peer}",
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        )
        self._wait("etcd to answer /health", lambda: _http_ok(f"{self.etcd_url}/health"), 30, "etcd")

    def _apiserver(self) -> None:
        self.api_port = free_port()
        d = self.dir
        if self.address == "127.0.0.1":
            # 127.0.0.1 is no valid endpoint of the `kubernetes` Service; only kwok's nodes need none.
            reconciler = ["--endpoint-reconciler-type=none"]
        else:
            # Pods of the real node reach the apiserver through the `kubernetes` Service.
            reconciler = ["--endpoint-reconciler-type=lease"]
        self._spawn(
            "kube-apiserver",
            [
                f"--etcd-servers={self.etcd_url}",
                f"--bind-address={self.address}",
                f"--advertise-address={self.address}",
                f"--secure-port={self.api_port}",
                f"--tls-cert-file={d / 'serving.crt'}",
                f"--tls-private-key-file={d / 'serving.key'}",
                f"--client-ca-file={d / 'ca.crt'}",
                f"--token-auth-file={d / 'tokens.csv'}",
                # Node: the real node's kubelet (system:node:<name>) gets what it needs.
                "--authorization-mode=Node,RBAC",
                f"--kubelet-client-certificate={d / 'apiserver-kubelet.crt'}",
                f"--kubelet-client-key={d / 'apiserver-kubelet.key'}",
                "--kubelet-preferred-address-types=InternalIP",
                f"--service-account-key-file={d / 'sa.pub'}",
                f"--service-account-signing-key-file={d / 'sa.key'}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                "--service-cluster-ip-range=10.96.0.0/16",
                *reconciler,
                # New nodes get a not-ready taint that only the node lifecycle controller lifts,
                # and that controller is off (kwok's nodes send no kubelet heartbeats to judge).
                "--disable-admission-plugins=TaintNodesByCondition",
                # Namespaces of real-pod tests pin their pods to the real node (node.py).
                "--enable-admission-plugins=PodNodeSelector,PodTolerationRestriction",
                "--allow-privileged=true",
                "--profiling=false",
                "--event-ttl=1h",
            ],
        )
        self.write_kubeconfig(Path(self.kubeconfig))
        context = ssl.create_default_context(cafile=str(d / "ca.crt"))
        self._wait(
            "kube-apiserver to answer /readyz (it bootstraps RBAC roles first)",
            lambda: _http_ok(f"https://{self.address}:{self.api_port}/readyz", context, self.token),
            90,
            "kube-apiserver",
        )

    def _nodes(self) -> None:
        for i in range(self.nodes):
            node = {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": f"kwok-node-{i}",
                    "annotations": {KWOK_NODE_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
                    "labels": {
                        "kubernetes.io/hostname": f"kwok-node-{i}",
                        "kubernetes.io/os": "linux",
                        "kubernetes.io/arch": "amd64",
                        "type": "kwok",
                        "topology.kubernetes.io/zone": f"zone-{i % 2}",
                    },
                },
            }
            self._kubectl("apply", "-f", "-", input=json.dumps(node))
        self._wait(
            f"kwok to report {self.nodes} node(s) Ready",
            lambda: self._kubectl_ok("wait", "--for=condition=Ready", "node", "--all", "--timeout=2s"),
            60,
            "kwok",
        )

    # --- helpers -----------------------------------------------------------------------------

    def _spawn(self, name: str, args: list[str]) -> None:
        log(f"starting {name}...")
        with open(self.dir / f"{name}.log", "wb") as out:  # the child keeps its own descriptor
            proc = subprocess.Popen(
                [str(self.bin / name), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        self.procs.append((name, proc))

    def _kubectl(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.bin / "kubectl"), f"--kubeconfig={self.kubeconfig}", *args],
            input=input,
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )

    def _kubectl_ok(self, *args: str) -> bool:
        try:
            self._kubectl(*args)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            return False
        return True

    def _wait(self, what: str, ready: object, timeout: float, component: str) -> None:
        log(f"waiting for {what} (up to {timeout:.0f} s)...")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs:
                if proc.poll() is not None:
                    raise ControlPlaneError(
                        f"{name} exited with {proc.returncode} while waiting for "
                        f"{what}:\n{self.log_tail(name)}"
                    )
            if ready():  # type: ignore[operator]
                return
            time.sleep(0.25)
        raise ControlPlaneError(
            f"timed out after {timeout:.0f} s waiting for {what}:\n{self.log_tail(component)}"
        )

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.dir / f"{name}.log"
        if not path.exists():
            return f"(no log of {name})"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the test process dies, even by SIGKILL (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _http_ok(url: str, context: ssl.SSLContext | None = None, token: str = "") -> bool:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=2, context=context) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def running(binaries: Path, nodes: int = 2, address: str = "127.0.0.1") -> Iterator[ControlPlane]:
    """A started control plane, stopped (and its folder removed) on exit."""
    plane = ControlPlane(binaries, nodes, address)
    plane.start()
    try:
        yield plane
    finally:
        plane.stop()


def _stop_on_signal(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


if __name__ == "__main__":
    # `python k8s-tests/controlplane.py`: start one by hand, print how to use it, stop on ^C
    # or SIGTERM (both stop every component and remove the folder).
    signal.signal(signal.SIGINT, _stop_on_signal)
    signal.signal(signal.SIGTERM, _stop_on_signal)
    with contextlib.suppress(KeyboardInterrupt), running(bin_dir()) as plane:
        print(f"export KUBECONFIG={plane.kubeconfig}", flush=True)
        while True:
            signal.pause()
