"""The few Kubernetes API calls the operator makes, as plain JSON, off the event loop.

The official client's connection handling and auth (in-cluster service account, or
KUBECONFIG with its exec plugins) are used; its generated models are not: every call
goes through `_call` and returns the API's JSON, and API errors become `KubeError`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import kubernetes  # type: ignore[import-untyped,unused-ignore]

from chatq_operator import config

log = logging.getLogger(__name__)

#: controller.kubernetes.io/pod-deletion-cost: the ReplicaSet controller removes the pods
#: with the lowest value first on scale-in.
DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
MERGE_PATCH = "application/merge-patch+json"
REQUEST_TIMEOUT_SECONDS = 10.0


class KubeError(Exception):
    """A Kubernetes API call failed; `status` is the HTTP status (0: no answer)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True)
class Scale:
    """A Deployment's scale subresource."""

    replicas: int
    """spec.replicas: what the Deployment is asked to run."""
    running: int
    """status.replicas: pods that exist now."""
    selector: str
    """status.selector: the label selector of its pods."""


@dataclasses.dataclass(frozen=True)
class Pod:
    """A live (not terminating, not finished) pod of the target."""

    name: str
    deletion_cost: int | None


class Kube:
    """An API client: load credentials once, then call."""

    def __init__(self, api: Any) -> None:
        self._api = api

    @classmethod
    def connect(cls, kubeconfig: str | None = None) -> Kube:
        """In a pod: its service account; elsewhere: `kubeconfig`, KUBECONFIG or ~/.kube/config."""
        if kubeconfig:
            return cls(kubernetes.config.new_client_from_config(  # type: ignore[no-untyped-call,unused-ignore]
                config_file=kubeconfig))
        try:
            kubernetes.config.load_incluster_config()  # type: ignore[no-untyped-call,unused-ignore]
        except kubernetes.config.ConfigException:
            kubernetes.config.load_kube_config()  # type: ignore[no-untyped-call,unused-ignore]
        return cls(kubernetes.client.ApiClient())

    def close(self) -> None:
        self._api.close()

    async def _call(self, method: str, path: str, body: Any = None, *, query: Mapping[str, str] | None = None,
                    content_type: str = "application/json") -> dict[str, Any]:
        return await asyncio.to_thread(self.request, method, path, body, query, content_type)

    def request(self, method: str, path: str, body: Any = None, query: Mapping[str, str] | None = None,
                content_type: str = "application/json") -> dict[str, Any]:
        """One API call, blocking: the JSON answer; raises KubeError (its status 404 etc.)."""
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        try:
            _, url, headers, _, _ = self._api.param_serialize(
                method=method, resource_path=path, query_params=list((query or {}).items()) or None,
                header_params=headers, auth_settings=["BearerToken"])
            resp = self._api.call_api(method, url, header_params=headers,
                                      body=body,
                                      _request_timeout=REQUEST_TIMEOUT_SECONDS)
            data = resp.read()
        except kubernetes.client.exceptions.ApiException as exc:
            raise KubeError(f"{method} {path}: {exc.status} {exc.reason}", int(exc.status or 0)) from None
        except Exception as exc:  # urllib3 and socket errors: the API server did not answer
            raise KubeError(f"{method} {path}: {exc!r}") from None
        if not 200 <= resp.status < 300:
            raise KubeError(f"{method} {path}: {resp.status} {_message(data)}", int(resp.status))
        return dict(json.loads(data)) if data else {}

    async def scale(self, namespace: str, deployment: str) -> Scale | None:
        """The Deployment's scale, or None when there is no such Deployment."""
        try:
            body = await self._call("GET", _deployment(namespace, deployment) + "/scale")
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise
        return Scale(int(body.get("spec", {}).get("replicas") or 0),
                     int(body.get("status", {}).get("replicas") or 0),
                     str(body.get("status", {}).get("selector") or ""))

    async def set_replicas(self, namespace: str, deployment: str, replicas: int) -> None:
        """Patch the scale subresource (so other fields of the Deployment are not touched)."""
        await self._call("PATCH", _deployment(namespace, deployment) + "/scale",
                         {"spec": {"replicas": replicas}}, content_type=MERGE_PATCH)

    async def pods(self, namespace: str, selector: str) -> list[Pod]:
        """The live pods matching a label selector."""
        if not selector:
            return []
        body = await self._call("GET", f"/api/v1/namespaces/{quote(namespace)}/pods",
                                query={"labelSelector": selector})
        out = []
        for item in body.get("items", []):
            meta = item.get("metadata", {})
            finished = item.get("status", {}).get("phase") in ("Succeeded", "Failed")
            if meta.get("deletionTimestamp") or finished:
                continue
            cost = (meta.get("annotations") or {}).get(DELETION_COST)
            out.append(Pod(str(meta.get("name")), _int_or_none(cost)))
        return out

    async def set_deletion_cost(self, namespace: str, pod: str, cost: int) -> None:
        await self._call("PATCH", f"/api/v1/namespaces/{quote(namespace)}/pods/{quote(pod)}",
                         {"metadata": {"annotations": {DELETION_COST: str(cost)}}}, content_type=MERGE_PATCH)

    async def patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        """Merge-patch a QueueScaler's status subresource."""
        path = (f"/apis/{config.GROUP}/{config.VERSION}/namespaces/{quote(namespace)}/"
                f"{config.PLURAL}/{quote(name)}/status")
        await self._call("PATCH", path, {"status": dict(status)}, content_type=MERGE_PATCH)


def _deployment(namespace: str, name: str) -> str:
    return f"/apis/apps/v1/namespaces/{quote(namespace)}/deployments/{quote(name)}"


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _message(data: bytes | None) -> str:
    """The `message` of an API error Status, or the raw text."""
    try:
        return str(json.loads(data or b"{}").get("message", ""))
    except ValueError:
        return (data or b"").decode(errors="replace")[:300]
