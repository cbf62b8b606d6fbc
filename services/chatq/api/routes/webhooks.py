"""Webhook endpoints of the calling API key, in the shape of OpenAI's `/v1/webhook_endpoints`
(so `client.webhooks.create/list/retrieve/delete` of the SDK work), and the dead letters.

The signing secret is shown once, in the answer to create. Endpoints set by configuration
(CHATQ_WEBHOOK_ENDPOINTS) are listed too, and cannot be deleted here.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from chatq import webhooks
from chatq.api.deps import OwnerDep, SettingsDep
from chatq.api.openai_errors import OpenAIError, not_found

router = APIRouter(prefix="/v1/webhook_endpoints", tags=["webhooks"])

EndpointId = Annotated[str, Path(description="A webhook endpoint id, `we_...`.", max_length=80)]


async def get_endpoints(request: Request) -> webhooks.EndpointStore:
    endpoints: webhooks.EndpointStore = request.app.state.webhook_endpoints
    return endpoints


EndpointsDep = Annotated[webhooks.EndpointStore, Depends(get_endpoints)]


class EndpointCreate(BaseModel):
    """The body of POST /v1/webhook_endpoints."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"url": "https://example.com/hooks/chatq", "name": "answers",
         "event_types": ["response.completed", "response.failed"]}]})

    url: Annotated[str, Field(min_length=1, max_length=2000)]
    name: Annotated[str, Field(max_length=200)] = ""
    event_types: list[str] | None = None
    """Which events to send; all of them when absent or empty."""


async def _refusal(url: str, allow_private: bool) -> str | None:
    """Why chatq would refuse to call this URL now (checked again at each delivery)."""
    problem = webhooks.url_problem(url)
    if problem:
        return problem
    host = urlsplit(url).hostname or ""
    try:
        ipaddress.ip_address(host)
        addresses = [host]
    except ValueError:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, None,
                                                                  type=socket.SOCK_STREAM)
        except OSError as exc:
            return f"cannot resolve {host}: {exc}"
        addresses = [str(i[4][0]) for i in infos]
    refused = [a for a in addresses if not webhooks.address_allowed(a, allow_private)]
    if refused:
        return (f"{host} is or resolves to a loopback, link-local or private address "
                f"({', '.join(refused)}); chatq only calls those with "
                "CHATQ_WEBHOOK_ALLOW_PRIVATE=true")
    return None


@router.post("", summary="Create a webhook endpoint (the signing secret is shown only here)")
async def create_endpoint(body: EndpointCreate, owner: OwnerDep, settings: SettingsDep,
                          endpoints: EndpointsDep) -> dict[str, Any]:
    problem = await _refusal(body.url, settings.webhook.allow_private)
    if problem:
        raise OpenAIError(400, problem, param="url", code="invalid_url")
    kinds = list(body.event_types or webhooks.EVENT_TYPES)
    unknown = sorted(set(kinds) - set(webhooks.EVENT_TYPES))
    if unknown:
        raise OpenAIError(400, f"unknown event types {unknown}; chatq sends "
                               f"{', '.join(webhooks.EVENT_TYPES)}",
                          param="event_types", code="invalid_event_type")
    endpoint = webhooks.Endpoint(id=webhooks.new_endpoint_id(), owner=owner, url=body.url,
                                 secret=webhooks.new_secret(), event_types=kinds,
                                 name=body.name, created_at=int(time.time()))
    await endpoints.add(endpoint)
    return endpoint.public(with_secret=True)


@router.get("", summary="The webhook endpoints of this API key")
async def list_endpoints(owner: OwnerDep, endpoints: EndpointsDep,
                         limit: Annotated[int, Query(ge=1, le=100)] = 100,
                         after: str | None = None) -> dict[str, Any]:
    found = await endpoints.list(owner)
    if after is not None:
        ids = [e.id for e in found]
        found = found[ids.index(after) + 1:] if after in ids else []
    page = found[:limit]
    return {"object": "list", "data": [e.public() for e in page],
            "first_id": page[0].id if page else None, "last_id": page[-1].id if page else None,
            "has_more": len(found) > limit}


@router.get("/dead_letters", summary="Deliveries that were given up, newest first")
async def dead_letters(owner: OwnerDep, endpoints: EndpointsDep,
                       limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict[str, Any]:
    return {"object": "list", "data": await endpoints.dead_letters(owner, limit)}


@router.get("/{endpoint_id}", summary="One webhook endpoint (without its secret)")
async def get_endpoint(endpoint_id: EndpointId, owner: OwnerDep,
                       endpoints: EndpointsDep) -> dict[str, Any]:
    endpoint = await endpoints.get(owner, endpoint_id)
    if endpoint is None:
        raise not_found("webhook endpoint", endpoint_id)
    return endpoint.public()


@router.delete("/{endpoint_id}", summary="Delete a webhook endpoint")
async def delete_endpoint(endpoint_id: EndpointId, owner: OwnerDep,
                          endpoints: EndpointsDep) -> dict[str, Any]:
    endpoint = await endpoints.get(owner, endpoint_id)
    if endpoint is None:
        raise not_found("webhook endpoint", endpoint_id)
    if endpoint.configured:
        raise OpenAIError(409, "this endpoint is set by CHATQ_WEBHOOK_ENDPOINTS; change the "
                               "configuration to remove it", code="configured_endpoint")
    await endpoints.remove(owner, endpoint_id)
    return {"id": endpoint_id, "object": "webhook_endpoint.deleted", "deleted": True}
