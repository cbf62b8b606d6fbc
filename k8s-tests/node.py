"""A real Kubernetes node on this machine, beside controlplane.py's control plane.

A second containerd (Debian's, whose CRI plugin Docker's own containerd has disabled) with
its own config, root, state and socket; Debian's CNI plugins (bridge, host-local, loopback,
portmap, firewall); kubelet and kube-proxy (iptables mode) from scripts/setup-k8s; CoreDNS
on the host with its kubernetes plugin as the cluster DNS; a static `pause` as the sandbox
image. Pods run real containers, so the chart's probes, users and signals are the real ones.

The network stays on this machine: the apiserver, kubelet, kube-proxy and CoreDNS listen on
a /32 on an interface that this module adds (and removes), pods live in a subnet of
their own behind a bridge of their own, and a guard chain drops anything a pod sends to an
address that is neither a pod's nor the node's. Everything the node changes on the host
(sysctls, iptables chains and rules, interfaces, mounts, network namespaces, cgroups) is
recorded before and put back at teardown; a run that was killed is cleaned up by the next.

Without root or the binaries, `Host.available()` says why and the k8s tier runs kwok only.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import hashlib
import io
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import controlplane
from controlplane import ControlPlaneError, free_port

NODE_NAME = "chatq-node"
#: The taint on the real node; only pods in namespaces made by `real_namespace` tolerate it,
#: so kwok's tests never land on it.
TAINT_KEY = "chatq.io/real-node"
DUMMY = "chatq-node0"
BRIDGE = "chatq-cni0"
CNI_NETWORK = "chatq-k8s"
GUARD = "CHATQ-NODE-GUARD"
PAUSE_IMAGE = "chatq.local/pause:1"
CNI_BIN = Path("/usr/lib/cni")
CNI_STATE = Path("/var/lib/cni")
CONTAINERD = Path("/usr/bin/containerd")
CTR = Path("/usr/bin/ctr")
LOCK = Path("/run/chatq-k8s-node.lock")
CGROUP_ROOT = "chatq-node"
NODE_BINARIES = ("kubelet", "kube-proxy", "coredns", "pause")
#: Candidate (node /32, pod /24) pairs; the first that no route of this machine touches wins.
CANDIDATES = [("10.218.0.1", "10.217.0.0/24"), ("172.31.250.1", "172.31.251.0/24"),
              ("192.168.251.1", "192.168.250.0/24")]
SERVICE_CIDR = "10.96.0.0/16"
#: Host sysctls that kubelet, kube-proxy and the CNI plugins set; restored at teardown.
SYSCTLS = (
    "vm.overcommit_memory", "vm.panic_on_oom", "kernel.panic", "kernel.panic_on_oops",
    "kernel.keys.root_maxkeys", "kernel.keys.root_maxbytes", "net.ipv4.ip_forward",
    "net.ipv4.conf.all.route_localnet", "net.bridge.bridge-nf-call-iptables",
    "net.bridge.bridge-nf-call-ip6tables", "net.ipv6.conf.all.forwarding",
    "net.netfilter.nf_conntrack_max", "net.netfilter.nf_conntrack_tcp_timeout_established",
    "net.netfilter.nf_conntrack_tcp_timeout_close_wait",
)
#: iptables chains that belong to the node (kubelet and kube-proxy: KUBE-, CNI: CNI-, ours).
OUR_CHAINS = re.compile(r"^(KUBE-|CNI-|CHATQ-NODE-)")


#: Figures of this run (node start, image load, installs, answers): printed at the end.
FIGURES: dict[str, float] = {}


def log(message: str) -> None:
    controlplane.log(f"node: {message}")


def sh(*args: str, check: bool = True, input: str | bytes | None = None,
       timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Runs a host command; on failure the error names it and shows its output."""
    data = input.encode() if isinstance(input, str) else input
    proc = subprocess.run(list(args), input=data, capture_output=True, timeout=timeout, check=False)
    out = proc.stdout.decode(errors="replace")
    err = proc.stderr.decode(errors="replace")
    if check and proc.returncode != 0:
        said = err.strip() or out.strip()
        raise ControlPlaneError(f"`{' '.join(args)}` exited with {proc.returncode}: {said}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


# --- pure decisions (table-tested in test_node_pieces.py) ---------------------------------------


def pick_addresses(routes: list[str]) -> tuple[str, str]:
    """The first (node address, pod subnet) pair that none of the machine's routes overlaps."""
    taken = []
    for route in routes:
        with contextlib.suppress(ValueError):
            taken.append(ipaddress.ip_network(route, strict=False))
    service = ipaddress.ip_network(SERVICE_CIDR)
    for node, pods in CANDIDATES:
        ours = [ipaddress.ip_network(f"{node}/32"), ipaddress.ip_network(pods), service]
        if not any(a.overlaps(b) for a in ours for b in taken if b.prefixlen > 0):
            return node, pods
    raise ControlPlaneError(f"every candidate node/pod network collides with this machine's routes {routes}")


def foreign_rules(save: str) -> list[list[str]]:
    """From `iptables-save` output: the `-D` arguments of rules in other chains that jump to ours."""
    out = []
    for line in save.splitlines():
        if not line.startswith("-A "):
            continue
        parts = shlex.split(line)  # comments are quoted: one argument each
        chain = parts[1]
        target = parts[parts.index("-j") + 1] if "-j" in parts else ""
        if not OUR_CHAINS.match(chain) and OUR_CHAINS.match(target):
            out.append(["-D", *parts[1:]])
    return out


def our_chains(save: str) -> list[str]:
    """From `iptables-save` output of one table: the chains that belong to the node."""
    return [line[1:].split()[0] for line in save.splitlines()
            if line.startswith(":") and OUR_CHAINS.match(line[1:].split()[0])]


def oci_image(name: str, files: dict[str, tuple[bytes, int]], entrypoint: list[str]) -> bytes:
    """An OCI image layout tar with one layer of `files` (path: (content, mode)), for ctr import."""
    layer_buf = io.BytesIO()
    with tarfile.open(fileobj=layer_buf, mode="w") as layer:
        for path, (content, mode) in files.items():
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(content), mode, 0
            layer.addfile(info, io.BytesIO(content))
    blobs: dict[str, bytes] = {}

    def blob(data: bytes) -> dict[str, object]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return {"digest": digest, "size": len(data)}

    layer_bytes = layer_buf.getvalue()
    config = json.dumps({
        "architecture": "amd64", "os": "linux", "config": {"Entrypoint": entrypoint},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer_bytes).hexdigest()]},
    }).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **blob(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", **blob(layer_bytes)}],
    }).encode()
    index = json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", **blob(manifest),
        "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": name},
    }]}).encode()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        entries = {"oci-layout": b'{"imageLayoutVersion":"1.0.0"}', "index.json": index}
        entries.update({f"blobs/sha256/{d.split(':')[1]}": data for d, data in blobs.items()})
        for path, data in entries.items():
            info = tarfile.TarInfo(path)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


# --- the host side: addresses, lock, what is restored ---------------------------------------


@dataclass
class Host:
    """The host changes a node needs, made before the control plane starts and undone last."""

    bin: Path
    node_ip: str = ""
    pod_cidr: str = ""
    sysctls: dict[str, str] = field(default_factory=dict)
    netns_before: set[str] = field(default_factory=set)
    cni_state_existed: bool = True
    lock: int = -1

    @staticmethod
    def available(binaries: Path) -> str:
        """Empty when a real node can run here, else why not (and what to run)."""
        if os.geteuid() != 0:
            return "the real node needs root (containerd, kubelet, iptables)"
        absent = [str(p) for p in (CONTAINERD, CTR, CNI_BIN / "bridge", Path("/usr/sbin/runc"))
                  if not p.exists()]
        absent += [str(binaries / b) for b in NODE_BINARIES if not (binaries / b).exists()]
        if not shutil.which("iptables-save") or not shutil.which("ip"):
            absent.append("iptables, iproute2")
        if absent:
            return f"the real node needs {', '.join(absent)}: run scripts/setup-k8s"
        return ""

    def prepare(self) -> None:
        """Takes the machine-wide lock, cleans a killed run's leftovers, adds the node's address."""
        LOCK.parent.mkdir(parents=True, exist_ok=True)
        self.lock = os.open(LOCK, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"another k8s-tests session runs a real node; waiting for it (lock {LOCK}, up to 10 min)...")
            deadline = time.monotonic() + 600
            while True:
                try:
                    fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise ControlPlaneError(f"{LOCK} stayed locked for 10 min: another session holds "
                                                "the real node; wait for it, or kill that session") from None
                    time.sleep(2)
        self.cleanup_leftovers()
        self.sysctls = {k: v for k in SYSCTLS if (v := read_sysctl(k)) is not None}
        self.netns_before = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
        self.cni_state_existed = CNI_STATE.exists()
        routes = [r.get("dst", "") for r in json.loads(sh("ip", "-j", "route").stdout or "[]")]
        routes = [r for r in routes if r and r != "default"]
        self.node_ip, self.pod_cidr = pick_addresses(routes)
        # A veth pair stands in for a dummy interface (this kernel has no dummy module): its
        # far end is left unused, so nothing leaves through it; the address is just local.
        log(f"adding {self.node_ip}/32 on an interface of its own ({DUMMY}); pods get {self.pod_cidr}")
        sh("ip", "link", "add", DUMMY, "type", "veth", "peer", "name", f"{DUMMY}p")
        sh("ip", "addr", "add", f"{self.node_ip}/32", "dev", DUMMY)
        for link in (DUMMY, f"{DUMMY}p"):
            sh("ip", "link", "set", link, "up")

    def restore(self) -> None:
        """Undoes everything prepare() and the node did; safe to call twice."""
        self.cleanup_leftovers()
        for key, value in self.sysctls.items():
            if read_sysctl(key) != value:
                write_sysctl(key, value)
        if os.path.isdir("/run/netns"):
            for ns in set(os.listdir("/run/netns")) - self.netns_before:
                if ns.startswith("cni-"):
                    sh("ip", "netns", "delete", ns, check=False)
        if not self.cni_state_existed:  # libcni's cache, made for our pods only
            shutil.rmtree(CNI_STATE, ignore_errors=True)
        if self.lock >= 0:
            os.close(self.lock)
            self.lock = -1

    def cleanup_leftovers(self) -> None:
        """Containers, mounts, interfaces, iptables chains, cgroups of a node (this one or a killed run's)."""
        kill_shims(b"/node/containerd/containerd.sock")
        for folder in Path(tempfile.gettempdir()).glob("chatq-k8s-*/node"):
            for point in mounts_under(folder):
                sh("umount", "-l", point, check=False)
        for link in (BRIDGE, DUMMY):
            if Path(f"/sys/class/net/{link}").exists():
                sh("ip", "link", "delete", link, check=False)
        for tool in ("iptables", "ip6tables"):
            if shutil.which(f"{tool}-save"):
                clean_iptables(tool)
        for ctrl in Path("/sys/fs/cgroup").iterdir():
            remove_cgroup_tree(ctrl / CGROUP_ROOT)
        results = CNI_STATE / "results"
        if results.is_dir():
            for f in results.glob(f"{CNI_NETWORK}-*"):
                f.unlink(missing_ok=True)


def read_sysctl(key: str) -> str | None:
    path = Path("/proc/sys") / key.replace(".", "/")
    try:
        return path.read_text().strip()
    except OSError:
        return None


def write_sysctl(key: str, value: str) -> None:
    try:
        (Path("/proc/sys") / key.replace(".", "/")).write_text(value + "\n")
    except OSError as exc:
        log(f"could not restore {key}={value}: {exc}")


def tables(save: str) -> dict[str, str]:
    """`iptables-save` output split by table: {name: that table's part}."""
    out: dict[str, str] = {}
    current = ""
    for line in save.splitlines():
        if line.startswith("*"):
            current = line[1:].strip()
            out[current] = ""
        elif current:
            out[current] += line + "\n"
    return out


def clean_iptables(tool: str) -> None:
    """Deletes the node's chains (KUBE-*, CNI-*, CHATQ-NODE-*) and every rule that jumps to one."""
    # Only the tables that exist (iptables-save without -t lists them): naming one would create it.
    for table, save in tables(sh(f"{tool}-save", check=False).stdout).items():
        for rule in foreign_rules(save):
            sh(tool, "-w", "5", "-t", table, *rule, check=False)
        chains = our_chains(save)
        for chain in chains:
            sh(tool, "-w", "5", "-t", table, "-F", chain, check=False)
        for chain in chains:
            sh(tool, "-w", "5", "-t", table, "-X", chain, check=False)


def remove_cgroup_tree(path: Path) -> None:
    if not path.is_dir():
        return
    for sub in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            sub.rmdir()
    with contextlib.suppress(OSError):
        path.rmdir()


def mounts_under(root: Path) -> list[str]:
    """Mount points under root, deepest first (from /proc/self/mountinfo)."""
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == str(root) or point.startswith(f"{root}/"):
            points.append(point)
    return sorted(points, key=len, reverse=True)


# --- the node ------------------------------------------------------------------------------------


class Node:
    """containerd + kubelet + kube-proxy + CoreDNS on the host's dummy address, for a ControlPlane."""

    def __init__(self, plane: controlplane.ControlPlane, host: Host) -> None:
        self.plane = plane
        self.host = host
        self.bin = plane.bin
        self.dir = plane.dir / "node"
        self.sock = self.dir / "containerd" / "containerd.sock"
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.figures: dict[str, float] = {}

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        started = time.monotonic()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._guard()
            self._containerd()
            self._certificates()
            self._kubelet()
            self._kube_proxy()
            self._coredns()
        except BaseException:
            self.stop()
            raise
        self.figures["node start to Ready"] = self.figures.pop("_ready_at") - started
        self.figures["node start to DNS"] = time.monotonic() - started
        log(f"node {NODE_NAME} Ready in {self.figures['node start to Ready']:.1f} s, "
            f"DNS in {self.figures['node start to DNS']:.1f} s")

    def stop(self) -> None:
        """Pods, then node processes, then containers, mounts, chains: nothing is left behind."""
        if any(name == "kubelet" and p.poll() is None for name, p in self.procs):
            self._drain()
        for name in ("coredns", "kube-proxy", "kubelet"):
            self._terminate(name)
        if self.sock.exists():
            self._kill_containers()
        self._terminate("containerd")
        self._kill_shims()
        for point in mounts_under(self.dir):
            sh("umount", "-l", point, check=False)
        if (self.bin / "kube-proxy").exists():
            sh(str(self.bin / "kube-proxy"), "--cleanup", check=False, timeout=60)
        self.procs.clear()

    # --- steps -------------------------------------------------------------------------------

    def _guard(self) -> None:
        """Pods may talk to pods and to the node's own address, and to nothing else."""
        pods, node = self.host.pod_cidr, self.host.node_ip
        sh("iptables", "-w", "5", "-N", GUARD)
        for rule in (["-d", pods, "-j", "RETURN"], ["-d", f"{node}/32", "-j", "RETURN"],
                     ["-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "RETURN"],
                     ["-j", "DROP"]):
            sh("iptables", "-w", "5", "-A", GUARD, *rule)
        for chain in ("INPUT", "FORWARD"):
            sh("iptables", "-w", "5", "-I", chain, "1", "-s", pods, "-j", GUARD)

    def _containerd(self) -> None:
        d = self.dir / "containerd"
        net = self.dir / "cni"
        (net / "net.d").mkdir(parents=True, exist_ok=True)
        d.mkdir(parents=True, exist_ok=True)
        (net / "net.d" / "10-chatq.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": CNI_NETWORK, "plugins": [
                {"type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": False,
                 "hairpinMode": True, "ipam": {
                     "type": "host-local", "ranges": [[{"subnet": self.host.pod_cidr}]],
                     "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(net / "ipam")}},
                {"type": "portmap", "capabilities": {"portMappings": True}},
                {"type": "firewall"},
            ]}, indent=1))
        (d / "config.toml").write_text(f'''version = 2
root = "{d / 'root'}"
state = "{d / 'state'}"
disabled_plugins = ["io.containerd.internal.v1.tracing", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{self.sock}"
[ttrpc]
  address = "{self.sock}.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{d / 'opt'}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # This machine lacks CAP_SYS_RESOURCE: without this, runc fails every sandbox
  # ("can't get final child's PID from pipe") writing an oom_score_adj below its own.
  restrict_oom_score_adj = true
  disable_apparmor = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN}"
    conf_dir = "{net / 'net.d'}"
''')
        self._spawn("containerd", [str(CONTAINERD), f"--config={d / 'config.toml'}", "--log-level=warn"])
        self._wait("containerd to answer on its socket", lambda: self._ctr_ok("version"), 30, "containerd")
        pause = (self.bin / "pause").read_bytes()
        tar = oci_image(PAUSE_IMAGE, {"pause": (pause, 0o755)}, ["/pause"])
        self.ctr("images", "import", "-", input=tar)
        log(f"imported the sandbox image {PAUSE_IMAGE} (static pause, {len(pause) // 1024} KiB)")

    def _certificates(self) -> None:
        """Client certificates of the kubelet (system:node:<name>) and kube-proxy, from the plane's CA."""
        for name, subject in (("kubelet", f"/O=system:nodes/CN=system:node:{NODE_NAME}"),
                              ("kube-proxy", "/CN=system:kube-proxy")):
            self.plane.client_certificate(name, subject)
            self.plane.write_kubeconfig(self.dir / f"{name}.kubeconfig", name)

    def _kubelet(self) -> None:
        d = self.dir / "kubelet"
        d.mkdir(parents=True, exist_ok=True)
        for ctrl in Path("/sys/fs/cgroup").iterdir():
            if ctrl.is_dir() and (ctrl / "cgroup.procs").exists():
                make_cgroup(ctrl / CGROUP_ROOT)
        # Pods with dnsPolicy Default get this file, not the host's: no nameserver off the node.
        (d / "resolv.conf").write_text(f"nameserver {self.host.node_ip}\n")
        self.kubelet_port = free_port()
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "address": self.host.node_ip, "port": self.kubelet_port, "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1", "healthzPort": free_port(),
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": False},
                               "x509": {"clientCAFile": str(self.plane.dir / "ca.crt")}},
            "authorization": {"mode": "AlwaysAllow"},
            # cgroup v1 here: kubelet 1.34 refuses it unless told, and there is no systemd.
            "failCgroupV1": False, "cgroupDriver": "cgroupfs", "cgroupRoot": f"/{CGROUP_ROOT}",
            "failSwapOn": False,
            "containerRuntimeEndpoint": f"unix://{self.sock}",
            "clusterDNS": [self.host.node_ip], "clusterDomain": "cluster.local",
            "resolvConf": str(d / "resolv.conf"), "podCIDR": self.host.pod_cidr,
            "podLogsDir": str(self.dir / "pod-logs"), "maxPods": 60,
            # Nothing can be pulled here: never collect images, evict only when truly short.
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "evictionHard": {"memory.available": "200Mi", "nodefs.available": "2%",
                             "imagefs.available": "2%", "nodefs.inodesFree": "2%"},
            "serializeImagePulls": False, "nodeStatusUpdateFrequency": "5s", "syncFrequency": "10s",
            "registerWithTaints": [{"key": TAINT_KEY, "value": "true", "effect": "NoSchedule"}],
            "shutdownGracePeriod": "0s",
        }
        (d / "config.yaml").write_text(json.dumps(config, indent=1))
        self._spawn("kubelet", [
            str(self.bin / "kubelet"), f"--config={d / 'config.yaml'}",
            f"--kubeconfig={self.dir / 'kubelet.kubeconfig'}", f"--root-dir={d / 'root'}",
            f"--cert-dir={d / 'pki'}", f"--hostname-override={NODE_NAME}",
            f"--node-ip={self.host.node_ip}", "--v=1",
        ])
        self._wait(f"the kubelet to register {NODE_NAME} and report it Ready",
                   lambda: self._node_ready(), 120, "kubelet")
        self.figures["_ready_at"] = time.monotonic()

    def _kube_proxy(self) -> None:
        config = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(self.dir / "kube-proxy.kubeconfig")},
            "mode": "iptables", "clusterCIDR": self.host.pod_cidr, "hostnameOverride": NODE_NAME,
            "healthzBindAddress": f"127.0.0.1:{free_port()}",
            "metricsBindAddress": f"127.0.0.1:{free_port()}",
            # Leave the host's conntrack table alone; NodePorts only on the node's own address.
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s",
                          "tcpCloseWaitTimeout": "0s"},
            "nodePortAddresses": [f"{self.host.node_ip}/32"],
            "iptables": {"localhostNodePorts": False, "syncPeriod": "30s", "minSyncPeriod": "0s"},
        }
        path = self.dir / "kube-proxy.yaml"
        path.write_text(json.dumps(config, indent=1))
        self._spawn("kube-proxy", [str(self.bin / "kube-proxy"), f"--config={path}", "--v=1"])
        self._wait("kube-proxy to program the kubernetes Service", lambda: "KUBE-SERVICES" in sh(
            "iptables-save", "-t", "nat", check=False).stdout and "default/kubernetes" in sh(
            "iptables-save", "-t", "nat", check=False).stdout, 60, "kube-proxy")

    def _coredns(self) -> None:
        ready = free_port()
        corefile = self.dir / "Corefile"
        corefile.write_text(f""".:53 {{
    bind {self.host.node_ip}
    errors
    ready 127.0.0.1:{ready}
    kubernetes cluster.local in-addr.arpa ip6.arpa {{
        kubeconfig {self.plane.kubeconfig} chatq-local
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    cache 5
}}
""")
        self._spawn("coredns", [str(self.bin / "coredns"), "-conf", str(corefile)])
        self._wait("CoreDNS to be ready (its kubernetes plugin synced)",
                   lambda: controlplane._http_ok(f"http://127.0.0.1:{ready}/ready"), 60, "coredns")

    def _drain(self) -> None:
        """Deletes every pod on the node and waits until its containers are gone."""
        log("deleting the pods on the real node and waiting for their containers to stop...")
        self.plane._kubectl_ok("delete", "pods", "--all-namespaces", "--field-selector",
                               f"spec.nodeName={NODE_NAME}", "--grace-period=0", "--force", "--wait=false")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            tasks = self.ctr("tasks", "ls", "-q", check=False).stdout.split()
            if len(tasks) == 0:
                return
            time.sleep(1)
        log("containers still running after 60 s; killing them through containerd")

    def _kill_containers(self) -> None:
        for task in self.ctr("tasks", "ls", "-q", check=False).stdout.split():
            self.ctr("tasks", "kill", "-s", "SIGKILL", task, check=False)
        time.sleep(0.5)
        for task in self.ctr("tasks", "ls", "-q", check=False).stdout.split():
            self.ctr("tasks", "delete", "-f", task, check=False)

    def _kill_shims(self) -> None:
        kill_shims(str(self.sock).encode())

    # --- images ------------------------------------------------------------------------------

    def load_docker_images(self, images: list[str]) -> float:
        """`docker save | ctr import` of the given images into the node's containerd, all at once; seconds.

        One pipe per image, side by side: each is mostly waiting (the engine streaming a tar,
        containerd unpacking it), so the four images take about as long as the largest alone."""
        start = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(images) or 1) as pool:
            for done in concurrent.futures.as_completed([pool.submit(self._load_one, i) for i in images]):
                done.result()  # the first failure, with its image named
        return time.monotonic() - start

    def _load_one(self, image: str) -> None:
        log(f"loading {image} from the Docker engine into the node's containerd...")
        save = subprocess.Popen(["docker", "save", image], stdout=subprocess.PIPE)
        try:
            result = subprocess.run([str(CTR), f"--address={self.sock}", "-n", "k8s.io", "images",
                                     "import", "--no-unpack=false", "-"], stdin=save.stdout,
                                    capture_output=True, timeout=300, check=False)
        finally:
            assert save.stdout is not None
            save.stdout.close()
            save.wait(timeout=60)
        if save.returncode != 0 or result.returncode != 0:
            raise ControlPlaneError(f"loading {image} failed: docker save exited {save.returncode}, "
                                    f"ctr import: {result.stderr.decode(errors='replace')[-1000:]}")

    # --- helpers -----------------------------------------------------------------------------

    def ctr(self, *args: str, input: bytes | None = None,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh(str(CTR), f"--address={self.sock}", "-n", "k8s.io", *args, input=input, check=check,
                  timeout=300)

    def _ctr_ok(self, *args: str) -> bool:
        return self.sock.exists() and self.ctr(*args, check=False).returncode == 0

    def _node_ready(self) -> bool:
        try:
            out = self.plane._kubectl("get", "node", NODE_NAME, "-o", "json").stdout
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            return False
        conditions = json.loads(out)["status"].get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    def _spawn(self, name: str, argv: list[str]) -> None:
        log(f"starting {name}...")
        with open(self.dir / f"{name}.log", "wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, preexec_fn=controlplane._die_with_parent)
        self.procs.append((name, proc))

    def _terminate(self, name: str) -> None:
        for n, proc in self.procs:
            if n != name or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                log(f"{name} ignored SIGTERM for 20 s; killing it")
                proc.kill()
                proc.wait()

    def _wait(self, what: str, ready: Callable[[], bool], timeout: float, component: str) -> None:
        log(f"waiting for {what} (up to {timeout:.0f} s)...")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs:
                if proc.poll() is not None:
                    raise ControlPlaneError(f"{name} exited with {proc.returncode} while waiting for "
                                            f"{what}:\n{self.log_tail(name)}")
            if ready():
                return
            time.sleep(0.25)
        raise ControlPlaneError(
            f"timed out after {timeout:.0f} s waiting for {what}:\n{self.log_tail(component)}")

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.dir / f"{name}.log"
        if not path.exists():
            return f"(no log of {name})"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def kill_shims(socket_suffix: bytes) -> None:
    """containerd-shim processes outlive their containerd; those of a node's containerd go (SIGKILL:
    the kernel then kills the containers under them, whose parent the shim is)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd and cmd[0].endswith(b"containerd-shim-runc-v2") and any(
                a.endswith(socket_suffix) and b"/chatq-k8s-" in a for a in cmd):
            for child in _children(int(pid)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


def _children(pid: int) -> list[int]:
    try:
        tasks = Path(f"/proc/{pid}/task").iterdir()
        return [int(c) for t in tasks for c in (t / "children").read_text().split()]
    except OSError:
        return []


def make_cgroup(path: Path) -> None:
    """mkdir of a v1 cgroup; a new cpuset needs its parent's cpus and mems before it takes tasks."""
    path.mkdir(exist_ok=True)
    for knob in ("cpuset.cpus", "cpuset.mems"):
        mine, parent = path / knob, path.parent / knob
        if mine.exists() and not mine.read_text().strip():
            mine.write_text(parent.read_text())


@contextlib.contextmanager
def host_network(binaries: Path) -> Iterator[Host]:
    """The node's address (and the lock) for a session; everything restored on exit."""
    host = Host(binaries)
    try:
        host.prepare()
        yield host
    finally:
        host.restore()


def socket_ok(address: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((address, port), timeout=1):
        return True
    return False
