"""What a job is: the request a client posts, the record kept in Redis, the queue message.

Pure code only: validation, the job record and its Redis encoding, the idempotency
fingerprint and the message encoding.

To add a field to a job, add it to `JobRecord` (or to `Outcome` when the worker writes it
when the job ends); its Redis encoding follows from its type. Mark it `PRIVATE` unless a
client may see it, and add it to the public view in the routes (a unit test keeps the two in
step).
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
import types
import typing
import uuid
from collections.abc import Collection, Mapping
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from chatq import errors

MAX_MESSAGES = 256


class Status(StrEnum):
    """Where a job stands; the last three are terminal."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        """True once nothing more will happen to the job."""
        return self in (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED)


class Message(BaseModel):
    """One chat turn."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: Annotated[str, Field(min_length=1)]


class ChatRequest(BaseModel):
    """The body of `POST /v1/chat`: `message` or `messages`, plus options."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"message": "Why is the sky blue?"}],
    })

    message: Annotated[str, Field(min_length=1)] | None = None
    """One user question; shorthand for messages=[{"role":"user","content":...}]."""
    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)] | None = None
    """The whole conversation, OpenAI-style."""
    model: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    """Model name; the configured default when absent."""
    system: Annotated[str, Field(min_length=1)] | None = None
    """A system prompt put before the messages."""
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    max_tokens: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    metadata: dict[str, str] | None = None
    """Up to 16 string pairs kept with the job and given back."""

    @model_validator(mode="after")
    def _one_of_message_or_messages(self) -> ChatRequest:
        if (self.message is None) == (self.messages is None):
            raise ValueError("give exactly one of 'message' or 'messages'")
        if self.message is not None and not self.message.strip():
            raise ValueError("'message' is blank")
        if self.metadata is not None and len(self.metadata) > 16:
            raise ValueError("'metadata' holds at most 16 entries")
        return self

    def chat_messages(self) -> list[dict[str, str]]:
        """The conversation as the OpenAI API takes it."""
        turns: list[dict[str, str]] = []
        if self.system:
            turns.append({"role": "system", "content": self.system})
        if self.message is not None:
            turns.append({"role": "user", "content": self.message})
        else:
            assert self.messages is not None
            turns.extend(m.model_dump() for m in self.messages)
        return turns


# --- the job record: one Redis hash ------------------------------------------------------


class JobError(BaseModel):
    """Why a job failed or was cancelled."""

    code: str
    message: str


def _json_encoded(annotation: Any) -> bool:
    """True for the field types that a Redis hash keeps as JSON text (dicts, lists, models)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_json_encoded(a) for a in typing.get_args(annotation) if a is not type(None))
    origin = typing.get_origin(annotation) or annotation
    return origin in (dict, list) or (isinstance(origin, type) and issubclass(origin, BaseModel))


def _hash_value(value: Any) -> str:
    """One field as Redis keeps it: JSON for structures, 1/0 for flags, text otherwise."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))
    if isinstance(value, float):
        return repr(value)
    return str(value)


@functools.cache
def _json_fields(model: type[BaseModel]) -> frozenset[str]:
    return frozenset(name for name, f in model.model_fields.items() if _json_encoded(f.annotation))


class RedisHash(BaseModel):
    """A model stored as one Redis hash: a field per attribute, absent when None.

    Field names with a leading underscore in Redis (the lease, internal figures) are
    spelled through an alias, since Python attributes cannot start with one.
    """

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    @classmethod
    def from_redis(cls, raw: Mapping[str, str]) -> Self:
        """The model from HGETALL's reply (unknown fields ignored; raises ValidationError)."""
        data: dict[str, Any] = {}
        json_fields = _json_fields(cls)
        for name, f in cls.model_fields.items():
            key = f.alias or name
            if key in raw:
                data[key] = json.loads(raw[key]) if name in json_fields else raw[key]
        return cls.model_validate(data)

    def to_redis(self, fields: Collection[str] | None = None) -> dict[str, str]:
        """The HSET mapping (by Redis name) of the set fields, or of `fields` only."""
        dumped = self.model_dump(mode="json", by_alias=True, exclude_none=True,
                                 include=set(fields) if fields is not None else None)
        return {key: _hash_value(value) for key, value in dumped.items()}


class Outcome(RedisHash):
    """What the worker writes, once, when a job ends (`Store.finish`)."""

    status: Status
    answer: str | None = None
    finish_reason: str | None = None
    """Why the model stopped: `stop`, or `length` when the answer was cut at max_tokens."""
    error: JobError | None = None
    usage: dict[str, int] | None = None
    model: str | None = None
    """The model that answered (the requested one until then)."""
    usage_estimated: bool = False
    """True when the server sent no usage and chatq counted the tokens itself."""
    attempt_errors: list[dict[str, Any]] | None = None
    """What each failed model attempt was: attempt, code, message."""
    model_seconds: float | None = Field(None, alias="_model_seconds")
    """Seconds spent in the model, so the overhead of chatq itself can be measured."""

    def done_event(self) -> dict[str, Any]:
        """The data of the stream's final `done` event."""
        return self.model_dump(mode="json", include={"status", "answer", "error", "usage",
                                                    "finish_reason"})


class JobRecord(Outcome):
    """A job as Redis keeps it (`chatq:job:<id>`): the outcome fields plus who asked what,
    when, and which worker holds it. Timestamps are seconds since the epoch."""

    # Fields a client never sees: the routes' public views leave them out.
    PRIVATE: ClassVar[frozenset[str]] = frozenset(
        {"owner", "kind", "view", "request", "lease", "lease_expires_at", "requeues",
         "model_seconds", "batch_id", "custom_id", "url", "line"})

    id: str
    owner: str = ""
    """A digest of the API key that created the job (`open` without keys)."""
    kind: str = "chat"
    """The API that shows the job: `chat` (/v1/chat) or `response` (/v1/responses)."""
    view: dict[str, Any] | None = None
    """What only that API's view needs (a Response's background and store flags)."""
    request: dict[str, Any] | None = None
    """The request as posted (a ChatRequest's JSON); the worker validates it."""
    metadata: dict[str, str] | None = None
    simulated: bool = False
    """True when llmsim, not a real model, answers."""
    attempts: int = 0
    created_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    updated_at: float | None = None
    lease: str | None = Field(None, alias="_lease")
    """The claim token of the worker that holds the job."""
    lease_expires_at: float | None = Field(None, alias="_lease_expires_at")
    """When that lease runs out unless renewed."""
    batch_id: str | None = None
    """The batch a batch line (kind `batch_line`) belongs to."""
    custom_id: str | None = None
    """The batch line's own id, from its input file."""
    url: str | None = None
    """The batch line's endpoint (/v1/chat/completions or /v1/responses)."""
    line: int | None = None
    """The batch line's index in its input file."""
    budget_wait_seconds: float | None = None
    """Seconds the job waited, still queued, for the model's shared rate budget."""
    requeues: int = Field(0, alias="_requeues")
    """How often the stale-job janitor has put the job back on the queue."""

    @classmethod
    def queued(cls, job_id: str, owner: str, request: ChatRequest, default_model: str,
               simulated: bool, *, kind: str = "chat", view: dict[str, Any] | None = None,
               now: float | None = None) -> JobRecord:
        """A new job as the API writes it, before it goes onto the queue."""
        now = time.time() if now is None else now
        return cls(id=job_id, status=Status.QUEUED, owner=owner, kind=kind, view=view or None,
                   model=request.model or default_model, created_at=now, updated_at=now,
                   request=request.model_dump(mode="json", exclude_none=True),
                   metadata=request.metadata or None,
                   simulated=simulated and not request.model)


def iso_time(ts: float | str | None) -> str | None:
    """A timestamp as clients see it: ISO 8601 in UTC, to the millisecond."""
    if ts is None or isinstance(ts, str):
        return ts
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


IsoTime = Annotated[str | None, BeforeValidator(iso_time)]
"""A public view's timestamp: given the record's float, shown as ISO 8601."""


class PublicView(BaseModel):
    """Base of what the routes show of a JobRecord: its own fields, taken from the record."""

    @classmethod
    def of(cls, record: JobRecord) -> Self:
        """This view of the record."""
        return cls.model_validate(record.model_dump(include=set(cls.model_fields)))


def fingerprint(request: ChatRequest) -> str:
    """The idempotency fingerprint: equal for equal requests, whatever the key order."""
    canonical = json.dumps(request.model_dump(exclude_none=True), sort_keys=True,
                           separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def new_job_id() -> str:
    """A job id: time-ordered (uuid7-like) so ids sort by creation, and unguessable."""
    ms = int(time.time() * 1000)
    rand = uuid.uuid4().int & ((1 << 80) - 1)
    value = (ms << 80) | rand
    return uuid.UUID(int=value).hex


# --- the queue message: the one place it is encoded and decoded -------------------------

MESSAGE_VERSION = 1


class QueueMessage(BaseModel):
    """What travels on the queue: just enough to find the job record."""

    model_config = ConfigDict(extra="ignore")

    v: int = MESSAGE_VERSION
    job_id: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[0-9a-f]+$")]
    enqueued_at: float


def encode_message(job_id: str, now: float | None = None) -> str:
    """The queue message body for a job (trace context travels in message attributes)."""
    msg = QueueMessage(job_id=job_id, enqueued_at=time.time() if now is None else now)
    return msg.model_dump_json()


def decode_message(body: str | bytes) -> QueueMessage:
    """Parse a queue message body, or raise MalformedMessage."""
    try:
        return QueueMessage.model_validate_json(body)
    except ValidationError as exc:
        raise errors.MalformedMessage(f"not a chatq message: {exc.errors()[0]['msg']}") from None


def backoff_delay(attempt: int, base: float, cap: float, retry_after: float | None,
                  jitter: float) -> float:
    """Seconds to wait before attempt `attempt + 1` (attempt counts from 1).

    Exponential from `base`, capped at `cap`; `jitter` in [0, 1) spreads retries ("full
    jitter" on the upper half); a server's `retry-after` is honoured as a floor, within cap.
    """
    exp = min(cap, base * (2 ** max(0, attempt - 1)))
    delay = exp / 2 + (exp / 2) * jitter
    if retry_after is not None and retry_after > 0:
        delay = max(delay, retry_after)
    return float(min(cap, delay))

