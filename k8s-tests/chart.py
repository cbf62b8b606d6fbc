"""Small readers of rendered chart objects, shared by the k8s-tests."""

from __future__ import annotations

from typing import Any

Obj = dict[str, Any]


def find(objs: list[Obj], kind: str, name: str | None = None, component: str | None = None) -> Obj:
    """The one object of this kind (and name, or app.kubernetes.io/component label)."""
    hits = [
        o
        for o in objs
        if o["kind"] == kind
        and (name is None or o["metadata"]["name"] == name)
        and (component is None or labels(o).get("app.kubernetes.io/component") == component)
    ]
    assert len(hits) == 1, (
        f"expected one {kind} (name={name}, component={component}), found "
        f"{[o['metadata']['name'] for o in hits]}; all: {kinds(objs)}"
    )
    return hits[0]


def all_of(objs: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind]


def kinds(objs: list[Obj]) -> list[str]:
    return sorted(f"{o['kind']}/{o['metadata']['name']}" for o in objs)


def labels(obj: Obj) -> dict[str, str]:
    return dict(obj["metadata"].get("labels") or {})


def pod_spec(obj: Obj) -> Obj:
    """The pod spec of a Deployment (or the spec of a Pod)."""
    return obj["spec"]["template"]["spec"] if obj["kind"] != "Pod" else obj["spec"]


def container(obj: Obj, name: str | None = None) -> Obj:
    containers = pod_spec(obj)["containers"]
    if name is None:
        assert len(containers) == 1, [c["name"] for c in containers]
        return dict(containers[0])
    return dict(next(c for c in containers if c["name"] == name))


def env(obj: Obj, name: str | None = None) -> dict[str, Any]:
    """A container's env as {name: value or valueFrom}."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(obj, name).get("env", [])}


def configmap_env(objs: list[Obj], deployment: Obj) -> dict[str, str]:
    """The variables a Deployment's container takes from ConfigMaps (envFrom)."""
    out: dict[str, str] = {}
    for source in container(deployment).get("envFrom", []):
        if "configMapRef" in source:
            out.update(find(objs, "ConfigMap", source["configMapRef"]["name"])["data"])
    return out


def all_env(objs: list[Obj], deployment: Obj) -> dict[str, Any]:
    """envFrom ConfigMaps, then env (which wins, as in Kubernetes)."""
    return {**configmap_env(objs, deployment), **env(deployment)}
