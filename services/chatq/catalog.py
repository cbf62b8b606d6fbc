"""Files and batches in Redis: typed records, per-key listings and atomic status changes.

Only metadata lives here; file bodies are in the file store. Key names are in
`chatq.results`. A batch's status moves only through `transition()`, a compare-and-set
script, so the API's cancel and the feeder's finalizing can never both win.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, cast

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict

from chatq import redis_client, results


def new_file_id() -> str:
    """OpenAI-style file id."""
    return f"file-{uuid.uuid4().hex}"


def new_batch_id() -> str:
    """OpenAI-style batch id; its hex part prefixes the job ids of its lines."""
    return f"batch_{uuid.uuid4().hex}"


def line_job_id(batch_id: str, index: int) -> str:
    """The job id of a batch's line `index` (0-based): fixed, so feeding it twice (after a
    crash) finds the same job instead of making a second one."""
    return f"{batch_id.removeprefix('batch_')}{index:08x}"


class FileRecord(BaseModel):
    """A file's metadata, as kept in Redis."""

    model_config = ConfigDict(extra="ignore")

    id: str
    owner: str
    filename: str
    purpose: str
    bytes: int
    created_at: int
    lines: int = 0
    urls: list[str] = []
    """The request urls of a batch input file (its lines were checked at upload)."""
    status: str = "processed"

    def to_redis(self) -> dict[str, str]:
        """The hash fields."""
        out = {k: str(v) for k, v in self.model_dump(exclude={"urls"}).items()}
        out["urls"] = json.dumps(self.urls)
        return out

    @classmethod
    def from_redis(cls, raw: dict[str, str]) -> FileRecord:
        """Parse the hash fields."""
        data: dict[str, Any] = dict(raw)
        data["urls"] = json.loads(raw.get("urls", "[]"))
        return cls.model_validate(data)

    def public(self) -> dict[str, Any]:
        """OpenAI's FileObject."""
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": self.status,
                "expires_at": None, "status_details": None}


# The batch's fields that are Unix times (seconds), shown as such in the Batch object.
TIMES = ("created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at",
         "failed_at", "expired_at", "cancelling_at", "cancelled_at")


class BatchRecord(BaseModel):
    """A batch as kept in Redis; `completed`/`failed` are counted by the workers' finish."""

    model_config = ConfigDict(extra="ignore")

    id: str
    owner: str
    endpoint: str
    input_file_id: str
    completion_window: str = "24h"
    status: str = "validating"
    outcome: str | None = None
    """The final status a finalizing or cancelling batch ends in (completed, expired, cancelled)."""
    metadata: dict[str, str] | None = None
    model: str | None = None
    total: int = 0
    completed: int = 0
    failed: int = 0
    fed: int = 0
    """Lines handed to the queue so far (the feed cursor, with `cursor`)."""
    cursor: int = 0
    """Byte offset in the input file of the next line to feed."""
    line_no: int = 0
    """Physical lines of the input file read so far (blank ones included)."""
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[dict[str, Any]] | None = None
    created_at: int = 0
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None

    def to_redis(self) -> dict[str, str]:
        """The hash fields (None fields are left out)."""
        out: dict[str, str] = {}
        for name, value in self.model_dump(exclude_none=True).items():
            out[name] = json.dumps(value) if name in ("metadata", "errors") else str(value)
        return out

    @classmethod
    def from_redis(cls, raw: dict[str, str]) -> BatchRecord:
        """Parse the hash fields."""
        data: dict[str, Any] = dict(raw)
        for name in ("metadata", "errors"):
            if name in data:
                data[name] = json.loads(data[name])
        return cls.model_validate(data)

    @property
    def done(self) -> int:
        """Lines that reached an outcome."""
        return self.completed + self.failed

    def public(self) -> dict[str, Any]:
        """OpenAI's Batch object."""
        out: dict[str, Any] = {
            "id": self.id, "object": "batch", "endpoint": self.endpoint,
            "input_file_id": self.input_file_id, "completion_window": self.completion_window,
            "status": self.status, "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id, "metadata": self.metadata, "model": self.model,
            "request_counts": {"total": self.total, "completed": self.completed,
                               "failed": self.failed},
            "errors": ({"object": "list", "data": self.errors} if self.errors else None),
        }
        out.update({name: getattr(self, name) for name in TIMES})
        return out


# Lua: set the status (and fields) only while it is one of ARGV[1] (comma-separated).
_TRANSITION = """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 'missing' end
local allowed = false
for s in string.gmatch(ARGV[1], '[^,]+') do if s == st then allowed = true end end
if not allowed then return st end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return 'ok'
"""


class Catalog:
    """Files' and batches' metadata in Redis."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.redis = client
        self._transition = client.register_script(_TRANSITION)

    # --- files ----------------------------------------------------------------------

    @redis_client.translate_errors
    async def put_file(self, record: FileRecord) -> None:
        """Store a file's metadata and list it under its owner."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(results.file_key(record.id), mapping=record.to_redis())  # type: ignore[arg-type]
            # Scored to the microsecond: ids made in the same second still list in order.
            pipe.zadd(results.files_index_key(record.owner), {record.id: time.time()})
            await pipe.execute()

    @redis_client.translate_errors
    async def get_file(self, file_id: str) -> FileRecord | None:
        """A file's metadata, or None."""
        raw = cast(dict[str, str], await self.redis.hgetall(results.file_key(file_id)))
        return FileRecord.from_redis(raw) if raw else None

    @redis_client.translate_errors
    async def delete_file(self, record: FileRecord) -> None:
        """Forget a file's metadata."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(results.file_key(record.id))
            pipe.zrem(results.files_index_key(record.owner), record.id)
            await pipe.execute()

    async def _page(self, index: str, after: str | None, limit: int, newest_first: bool
                    ) -> tuple[list[str], bool]:
        """Ids of one page of a sorted-set index, after the id `after`, and whether more follow."""
        start = 0
        if after:
            rank = (await self.redis.zrevrank(index, after) if newest_first
                    else await self.redis.zrank(index, after))
            if rank is None:
                return [], False
            start = cast(int, rank) + 1
        read = self.redis.zrevrange if newest_first else self.redis.zrange
        ids = cast(list[str], await read(index, start, start + limit))
        return ids[:limit], len(ids) > limit

    @redis_client.translate_errors
    async def list_files(self, owner: str, after: str | None, limit: int, newest_first: bool,
                         purpose: str | None) -> tuple[list[FileRecord], bool]:
        """One page of an owner's files (filtered by purpose: a short page may follow)."""
        ids, more = await self._page(results.files_index_key(owner), after, limit, newest_first)
        out = []
        for file_id in ids:
            record = await self.get_file(file_id)
            if record is not None and (purpose is None or record.purpose == purpose):
                out.append(record)
        return out, more

    # --- batches --------------------------------------------------------------------

    @redis_client.translate_errors
    async def create_batch(self, record: BatchRecord) -> None:
        """Store a new batch, list it under its owner and hand it to the feeder."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(results.batch_key(record.id), mapping=record.to_redis())  # type: ignore[arg-type]
            pipe.zadd(results.batches_index_key(record.owner), {record.id: time.time()})
            pipe.zadd(results.ACTIVE_BATCHES, {record.id: time.time()})
            await pipe.execute()

    @redis_client.translate_errors
    async def get_batch(self, batch_id: str) -> BatchRecord | None:
        """A batch, or None."""
        raw = cast(dict[str, str], await self.redis.hgetall(results.batch_key(batch_id)))
        return BatchRecord.from_redis(raw) if raw else None

    @redis_client.translate_errors
    async def list_batches(self, owner: str, after: str | None, limit: int
                           ) -> tuple[list[BatchRecord], bool]:
        """One page of an owner's batches, newest first."""
        ids, more = await self._page(results.batches_index_key(owner), after, limit, True)
        found = [await self.get_batch(b) for b in ids]
        return [b for b in found if b is not None], more

    @redis_client.translate_errors
    async def transition(self, batch_id: str, allowed: tuple[str, ...], **fields: Any) -> str:
        """Set fields (a new status among them) if the status is one of `allowed`;
        'ok', else the status it had ('missing' when none)."""
        flat = [str(x) for pair in fields.items() for x in pair]
        return str(await self._transition(keys=[results.batch_key(batch_id)],
                                          args=[",".join(allowed), *flat]))

    @redis_client.translate_errors
    async def save_progress(self, batch_id: str, **fields: Any) -> None:
        """Fields the feeder alone writes (cursor, fed, total...)."""
        await self.redis.hset(results.batch_key(batch_id),
                              mapping={k: str(v) for k, v in fields.items()})

    @redis_client.translate_errors
    async def active_batches(self) -> list[str]:
        """Batches the feeder still has work for, oldest first."""
        return cast(list[str], await self.redis.zrange(results.ACTIVE_BATCHES, 0, -1))

    @redis_client.translate_errors
    async def retire(self, batch_id: str) -> None:
        """The batch reached a final status: the feeder can forget it."""
        await self.redis.zrem(results.ACTIVE_BATCHES, batch_id)

    @redis_client.translate_errors
    async def take_feeder_lease(self, holder: str, seconds: float) -> bool:
        """Be (or stay) the one process feeding batches; False when another holds it."""
        ms = int(seconds * 1000)
        if await self.redis.set(results.FEEDER_LEASE, holder, nx=True, px=ms):
            return True
        if await self.redis.get(results.FEEDER_LEASE) == holder:
            await self.redis.pexpire(results.FEEDER_LEASE, ms)
            return True
        return False


def now() -> int:
    """Unix time in whole seconds, as OpenAI's objects give it."""
    return int(time.time())
