"""node.py's pure decisions: which addresses the real node takes, which iptables rules it owns,
and the sandbox image it writes (no root, no cluster)."""

from __future__ import annotations

import io
import json
import tarfile

import node
import pytest


@pytest.mark.parametrize(("routes", "expected"), [
    (["192.0.2.0/24", "172.17.0.0/16"], ("10.218.0.1", "10.217.0.0/24")),
    (["10.217.0.0/16"], ("172.31.250.1", "172.31.251.0/24")),
    (["10.218.0.0/24", "172.16.0.0/12"], ("192.168.251.1", "192.168.250.0/24")),
    (["10.218.0.1"], ("172.31.250.1", "172.31.251.0/24")),  # a host route
    (["fd00::/64", "192.0.2.0/24"], ("10.218.0.1", "10.217.0.0/24")),
    (["not-a-route", "192.0.2.0/24"], ("10.218.0.1", "10.217.0.0/24")),
])
def test_pick_addresses_avoids_the_machines_routes(routes: list[str], expected: tuple[str, str]) -> None:
    assert node.pick_addresses(routes) == expected


@pytest.mark.parametrize("routes", [
    ["10.217.0.0/16", "172.16.0.0/12", "192.168.0.0/16"],
    ["10.0.0.0/8"],  # the Service range (10.96.0.0/16) would be routed off the machine
])
def test_pick_addresses_refuses_when_all_collide(routes: list[str]) -> None:
    with pytest.raises(node.ControlPlaneError, match="collides"):
        node.pick_addresses(routes)


SAVE = """*nat
:PREROUTING ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:DOCKER - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-POSTROUTING - [0:0]
:CNI-HOSTPORT-DNAT - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE
-A KUBE-SERVICES -j CNI-HOSTPORT-DNAT
-A FORWARD -s 10.217.0.0/24 -j CHATQ-NODE-GUARD
COMMIT
"""


def test_foreign_rules_are_the_jumps_into_our_chains() -> None:
    assert node.foreign_rules(SAVE) == [
        ["-D", "PREROUTING", "-m", "comment", "--comment", "kubernetes service portals",
         "-j", "KUBE-SERVICES"],
        ["-D", "POSTROUTING", "-m", "comment", "--comment", "kubernetes postrouting rules",
         "-j", "KUBE-POSTROUTING"],
        ["-D", "FORWARD", "-s", "10.217.0.0/24", "-j", "CHATQ-NODE-GUARD"],
    ]


def test_our_chains_leave_dockers_alone() -> None:
    assert node.our_chains(SAVE) == ["KUBE-SERVICES", "KUBE-POSTROUTING", "CNI-HOSTPORT-DNAT"]


def test_oci_image_is_an_image_layout_with_one_layer() -> None:
    data = node.oci_image("chatq.local/pause:1", {"pause": (b"\x7fELF", 0o755)}, ["/pause"])
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    index = json.loads(files["index.json"])
    entry = index["manifests"][0]
    assert entry["annotations"]["io.containerd.image.name"] == "chatq.local/pause:1"
    manifest = json.loads(files[f"blobs/sha256/{entry['digest'].split(':')[1]}"])
    config = json.loads(files[f"blobs/sha256/{manifest['config']['digest'].split(':')[1]}"])
    assert config["config"]["Entrypoint"] == ["/pause"]
    layer = files[f"blobs/sha256/{manifest['layers'][0]['digest'].split(':')[1]}"]
    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        member = tar.getmember("pause")
        assert member.mode == 0o755 and tar.extractfile(member).read() == b"\x7fELF"  # type: ignore[union-attr]
