"""Webhooks: endpoints, events, Standard Webhooks signatures, the SSRF guard, retry policy.

An event (`response.completed`, `chat.failed`, `batch.completed`...) is recorded in Redis
atomically with the outcome that causes it (the Lua scripts in `results`), or by `emit()`
for events that are not a job's end. The dispatcher (`chatq.dispatcher`) fans each event
out to the owner's endpoints and delivers it at least once, signed as Standard Webhooks
sign (`webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64 HMAC-SHA256 of
"id.timestamp.body">`), so the SDKs' `client.webhooks.unwrap()` verifies it.

Pure code here (apart from `emit` and the endpoint store); the dispatcher does the sending.
"""

from __future__ import annotations

import base64
import builtins
import hashlib
import hmac
import ipaddress
import json
import secrets
import time
from collections.abc import Mapping
from typing import Annotated, Any, cast
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from chatq import errors, jobs, redis_client, results
from chatq import settings as settings_mod

#: Every event type chatq sends; an endpoint subscribes to all unless it names some.
EVENT_TYPES = ("response.completed", "response.failed", "response.cancelled",
               "response.incomplete", "chat.completed", "chat.failed", "chat.cancelled",
               "batch.completed", "batch.failed", "batch.expired", "batch.cancelled")
OPEN_OWNER = "open"  # the owner of every job while no API keys are configured


class EndpointRefused(errors.PermanentError):
    """A webhook URL chatq will not call: bad scheme, or a private address (SSRF guard)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="endpoint_refused")


class Endpoint(BaseModel):
    """One receiver of one API key's events."""

    model_config = ConfigDict(extra="forbid")

    id: str
    owner: str
    url: str
    secret: str
    event_types: list[str] = Field(default_factory=lambda: list(EVENT_TYPES))
    name: str = ""
    created_at: int = 0
    configured: bool = False
    """Set by CHATQ_WEBHOOK_ENDPOINTS (read-only through the API)."""

    def wants(self, event_type: str) -> bool:
        """True when this endpoint subscribed to the event type."""
        return event_type in self.event_types

    def public(self, with_secret: bool = False) -> dict[str, Any]:
        """The SDK's WebhookEndpoint (WebhookEndpointWithSecret once, at creation)."""
        out: dict[str, Any] = {"id": self.id, "object": "webhook_endpoint", "url": self.url,
                               "name": self.name, "event_types": self.event_types,
                               "created_at": self.created_at, "updated_at": self.created_at,
                               "signing_secret_hint": f"whsec_...{self.secret[-4:]}"}
        if with_secret:
            out["signing_secret"] = self.secret
        return out


class _Configured(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: str = ""
    url: Annotated[str, Field(min_length=1)]
    secret: Annotated[str, Field(pattern=r"^whsec_[A-Za-z0-9+/=]+$")]
    events: list[str] | None = None
    name: str = ""


def owner_of_key(key: str) -> str:
    """The owner id of an API key, as the API derives it (empty key: the open API)."""
    if not key:
        return OPEN_OWNER
    digest = key.removeprefix("sha256:").lower() if key.startswith("sha256:") else \
        hashlib.sha256(key.encode()).hexdigest()
    return digest[:32]


def configured_endpoints(cfg: settings_mod.WebhookSettings) -> list[Endpoint]:
    """The endpoints of CHATQ_WEBHOOK_ENDPOINTS; ValueError says what is wrong."""
    if not cfg.endpoints.strip():
        return []
    try:
        entries = TypeAdapter(list[_Configured]).validate_json(cfg.endpoints)
    except ValidationError as exc:
        raise ValueError(f"CHATQ_WEBHOOK_ENDPOINTS is not a list of endpoints: "
                         f"{exc.errors()[0]['msg']}") from None
    out = []
    for entry in entries:
        problem = url_problem(entry.url)
        if problem:
            raise ValueError(f"CHATQ_WEBHOOK_ENDPOINTS: {entry.url}: {problem}")
        unknown = set(entry.events or ()) - set(EVENT_TYPES)
        if unknown:
            raise ValueError(f"CHATQ_WEBHOOK_ENDPOINTS: unknown event types {sorted(unknown)}")
        owner = owner_of_key(entry.key)
        ident = "we_cfg_" + hashlib.sha256(f"{owner} {entry.url}".encode()).hexdigest()[:16]
        out.append(Endpoint(id=ident, owner=owner, url=entry.url, secret=entry.secret,
                            event_types=list(entry.events or EVENT_TYPES), name=entry.name,
                            configured=True))
    return out


def new_secret() -> str:
    """A signing secret in the Standard Webhooks form: `whsec_` + base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def new_endpoint_id() -> str:
    """An endpoint id made by the API."""
    return "we_" + secrets.token_hex(12)


def sign(secret: str, message_id: str, timestamp: int, body: str) -> str:
    """The `webhook-signature` header value: `v1,<base64 HMAC-SHA256>` of id.timestamp.body,
    keyed with the base64-decoded part of a `whsec_` secret."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{message_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def headers(secret: str, message_id: str, body: str, now: float | None = None) -> dict[str, str]:
    """The headers of one delivery attempt (a fresh timestamp each attempt)."""
    stamp = int(time.time() if now is None else now)
    return {"webhook-id": message_id, "webhook-timestamp": str(stamp),
            "webhook-signature": sign(secret, message_id, stamp, body),
            "content-type": "application/json", "user-agent": "chatq-webhooks/1"}


def event_type(kind: str, status: str, finish_reason: str = "") -> str | None:
    """The webhook event of a job that ended with `status`; None for kinds without events
    (batch lines: their batch has its own events)."""
    if kind == "response":
        if status == jobs.Status.SUCCEEDED:
            return "response.incomplete" if finish_reason == "length" else "response.completed"
        return {"failed": "response.failed", "cancelled": "response.cancelled"}.get(status)
    if kind == "chat":
        return {"succeeded": "chat.completed", "failed": "chat.failed",
                "cancelled": "chat.cancelled"}.get(status)
    return None


def object_id(kind: str, job_id: str) -> str:
    """The id the event's `data.id` names: a response id, or the chat job's id."""
    return f"resp_{job_id}" if kind == "response" else job_id


def event_id(entry_id: str) -> str:
    """The event id of a Redis stream entry: stable, so every retry carries the same one."""
    return "evt_" + hashlib.sha256(entry_id.encode()).hexdigest()[:24]


def payload(ident: str, kind: str, data_id: str, created_at: float) -> str:
    """The delivery body: `{"id", "object": "event", "created_at", "type", "data": {"id"}}`."""
    return json.dumps({"id": ident, "object": "event", "created_at": int(created_at),
                       "type": kind, "data": {"id": data_id}}, separators=(",", ":"))


def address_allowed(address: str, allow_private: bool) -> bool:
    """True when chatq may connect to this IP: a public unicast address, or any when
    private targets are allowed (then only the unspecified and multicast ones are refused)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_unspecified or ip.is_multicast:
        return False
    # Global means outside every IANA special-purpose block: loopback, link-local (cloud
    # metadata at 169.254.169.254), private, carrier-grade NAT, documentation, reserved.
    return allow_private or ip.is_global


def url_problem(url: str) -> str | None:
    """Why a URL cannot be an endpoint (scheme, host, credentials), or None."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        return f"not a URL ({exc})"
    if parts.scheme not in ("http", "https"):
        return "the URL must be http or https"
    if not parts.hostname:
        return "the URL has no host"
    if parts.username or parts.password:
        return "credentials in the URL are not allowed; authenticate with the signature"
    return None


def next_attempt_delay(attempt: int, cfg: settings_mod.WebhookSettings, jitter: float) -> float:
    """Seconds before attempt `attempt + 1` of a delivery (attempt counts from 1)."""
    return jobs.backoff_delay(attempt, cfg.retry_base_seconds, cfg.retry_max_seconds, None,
                              jitter)


def gives_up(first_at: float, now: float, delay: float,
             cfg: settings_mod.WebhookSettings) -> bool:
    """True when the next attempt would fall past the retry window: dead-letter instead."""
    return now + delay - first_at > cfg.max_age_seconds


# --- what the API and other producers call -----------------------------------------------

async def emit(client: aioredis.Redis, owner: str, kind: str, data_id: str) -> None:
    """Record an event that is not a job's end (e.g. `batch.completed` for batch `data_id`);
    a no-op while no endpoint exists. Delivery then works as for job events."""
    if kind not in EVENT_TYPES:
        raise ValueError(f"unknown webhook event type {kind!r}")
    try:
        if await client.exists(results.WEBHOOK_ON):
            await client.xadd(results.WEBHOOK_EVENTS,
                              {"type": kind, "owner": owner, "object": data_id,
                               "at": str(time.time())},
                              maxlen=results.WEBHOOK_EVENTS_MAXLEN, approximate=True)
    except (OSError, aioredis.ConnectionError, aioredis.TimeoutError) as exc:
        raise errors.StoreUnavailable(f"Redis is unreachable: {exc}") from None


class EndpointStore:
    """Endpoints made through the API (in Redis), plus those set by configuration."""

    def __init__(self, client: aioredis.Redis, configured: list[Endpoint]) -> None:
        self.redis = client
        self.configured = {e.id: e for e in configured}

    @redis_client.translate_errors
    async def list(self, owner: str) -> builtins.list[Endpoint]:
        """The owner's endpoints, configured ones first, then by creation."""
        raw = cast(dict[str, str], await self.redis.hgetall(results.webhook_endpoints_key(owner)))
        made = sorted((Endpoint.model_validate_json(v) for v in raw.values()),
                      key=lambda e: (e.created_at, e.id))
        return [e for e in self.configured.values() if e.owner == owner] + made

    @redis_client.translate_errors
    async def get(self, owner: str, endpoint_id: str) -> Endpoint | None:
        """One endpoint of the owner, or None."""
        found = self.configured.get(endpoint_id)
        if found is not None:
            return found if found.owner == owner else None
        raw = await self.redis.hget(results.webhook_endpoints_key(owner), endpoint_id)
        return Endpoint.model_validate_json(raw) if raw else None

    @redis_client.translate_errors
    async def add(self, endpoint: Endpoint) -> None:
        """Keep a new endpoint; from now on events are recorded."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(results.webhook_endpoints_key(endpoint.owner), endpoint.id,
                      endpoint.model_dump_json())
            pipe.set(results.WEBHOOK_ON, "1")
            await pipe.execute()

    @redis_client.translate_errors
    async def remove(self, owner: str, endpoint_id: str) -> bool:
        """Delete an endpoint; its pending deliveries are dropped when they come due."""
        return bool(await self.redis.hdel(results.webhook_endpoints_key(owner), endpoint_id))

    @redis_client.translate_errors
    async def announce(self) -> None:
        """Turn event recording on when configuration sets endpoints."""
        if self.configured:
            await self.redis.set(results.WEBHOOK_ON, "1")

    @redis_client.translate_errors
    async def dead_letters(self, owner: str, limit: int = 100) -> builtins.list[dict[str, Any]]:
        """The owner's dead-lettered deliveries, newest first."""
        raw = await self.redis.lrange(results.webhook_dead_key(owner), 0, limit - 1)
        return [json.loads(x) for x in raw]


def dead_letter_entry(delivery: Mapping[str, str], reason: str, now: float) -> dict[str, Any]:
    """What the dead-letter list keeps of a delivery."""
    body = json.loads(delivery.get("body") or "{}")
    return {"object": "webhook_delivery", "id": delivery.get("id", ""),
            "endpoint_id": delivery.get("endpoint", ""), "event_id": body.get("id"),
            "event_type": body.get("type"), "data": body.get("data"),
            "attempts": int(delivery.get("attempts", 0)), "last_error": reason,
            "first_attempt_at": int(float(delivery.get("first_at", now))), "dead_at": int(now)}
