"""What a job is: the request a client posts, the record kept in Redis, the queue message.

Pure code only: validation, the idempotency fingerprint and the message encoding.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

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

