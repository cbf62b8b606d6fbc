"""FastAPI dependencies of the routes: settings, the store, the queue, the caller's identity."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from chatq import catalog, filestore, results
from chatq import fair as fair_mod
from chatq import quotas as quotas_mod
from chatq import settings as settings_mod
from chatq import wakeups as wakeups_mod
from chatq.api import auth, held
from chatq.queues import Queue

OPEN_OWNER = "open"


def hash_key(key: str) -> str:
    """How an API key is kept: its SHA-256, hex."""
    return hashlib.sha256(key.encode()).hexdigest()


def owner_of_entry(entry: str) -> str:
    """The owner id (see get_owner) of a configured key entry, plain or `sha256:<hex>`."""
    entry = entry.strip()
    digest = (entry.removeprefix("sha256:").lower() if entry.startswith("sha256:")
              else hash_key(entry))
    return digest[:32]


def parse_keys(raw: str) -> frozenset[str]:
    """CHATQ_API_KEYS as hashes: each entry plain (hashed here) or `sha256:<hex>`."""
    hashes = set()
    for entry in (e.strip() for e in raw.split(",")):
        if not entry:
            continue
        if entry.startswith("sha256:"):
            hashes.add(entry.removeprefix("sha256:").lower())
        else:
            hashes.add(hash_key(entry))
    return frozenset(hashes)


def api_error(status: int, code: str, message: str, headers: dict[str, str] | None = None
              ) -> HTTPException:
    """An HTTPException that the app renders as {"error": {"code", "message"}}."""
    return HTTPException(status, detail={"code": code, "message": message}, headers=headers)


@dataclass
class Services:
    """What the routes work with, built once by the app's lifespan (one dependency, since
    each dependency costs every request)."""

    settings: settings_mod.Settings
    store: results.Store
    queue: Queue
    wakeups: wakeups_mod.Wakeups
    """The one subscription that wakes this process's long-polls and SSE streams."""
    holds: held.Holds
    """Long-polls and SSE streams held open per key (CHATQ_API_MAX_HELD_PER_KEY)."""
    catalog: catalog.Catalog
    file_store: filestore.FileStore
    quotas: quotas_mod.Quotas | None = None
    """Per-key quotas; None when no key has any."""
    fair: fair_mod.Fair | None = None
    """The fair window of interactive jobs (chatq.fair); None when CHATQ_FAIR_ENABLED=false."""
    queue_ready: bool = False
    _setup_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def ensure_queue(self) -> None:
        """Create or check the queue once; a failure is retried by the next request."""
        if not self.queue_ready:
            async with self._setup_lock:
                if not self.queue_ready:
                    await self.queue.setup()
                    self.queue_ready = True


async def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


async def get_settings(request: Request) -> settings_mod.Settings:
    settings: settings_mod.Settings = request.app.state.settings
    return settings


async def get_store(request: Request) -> results.Store:
    store: results.Store = request.app.state.services.store
    return store


async def get_queue(request: Request) -> Queue:
    queue: Queue = request.app.state.services.queue
    return queue


# Sync dependencies would run in a thread pool: every one here is async on purpose.
_bearer = HTTPBearer(auto_error=False, description="An API key from CHATQ_API_KEYS.")


async def get_owner(request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None,
                                                        Depends(_bearer)]) -> str:
    """Who is calling: a digest of their API key, or `open` when no keys are configured."""
    keys: frozenset[str] = request.app.state.key_hashes
    if not keys:
        return OPEN_OWNER
    if credentials is None:
        raise api_error(401, "unauthorized", "send your API key as 'Authorization: Bearer <key>'",
                        {"WWW-Authenticate": "Bearer"})
    digest = hash_key(credentials.credentials)
    guard: auth.AuthGuard = request.app.state.auth_guard
    source = request.client.host if request.client else ""
    wait = guard.refused(source, digest)
    if wait:
        raise api_error(429, "too_many_failed_keys",
                        "too many wrong API keys from this address; retry later",
                        {"Retry-After": auth.retry_after(wait)})
    # Every key compared, in constant time each: the time taken says nothing of which matched.
    valid = False
    for k in keys:
        valid |= hmac.compare_digest(digest, k)
    if not valid:
        guard.failed(source)
        raise api_error(401, "unauthorized", "this API key is not valid",
                        {"WWW-Authenticate": "Bearer"})
    guard.succeeded(source, digest)
    return digest[:32]


ServicesDep = Annotated[Services, Depends(get_services)]
SettingsDep = Annotated[settings_mod.Settings, Depends(get_settings)]
StoreDep = Annotated[results.Store, Depends(get_store)]
QueueDep = Annotated[Queue, Depends(get_queue)]
OwnerDep = Annotated[str, Depends(get_owner)]
