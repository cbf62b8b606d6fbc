"""The Responses API view of a chatq job: requests in, Response objects and events out.

A Response is a `/v1/chat` job with another view: `POST /v1/responses` becomes a
`jobs.ChatRequest` on the same queue, and the job record (kind `response`) is rendered as
OpenAI's Response object. Its stream events are derived from the job's own event stream in
Redis (`attempt`, `delta`, `done`), replayed from the start by `EventMapper`, so a sequence
number always names the same event and `starting_after=N` resumes exactly.

A model retry after text was streamed cannot take that text back in OpenAI's protocol, so
the abandoned message item is closed (`response.output_item.done`, status `incomplete`,
no content) and the answer starts again in a new item at the next `output_index`; a retry
before any text (a 429, say) is invisible. Pure code only; the routes do the I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from chatq import jobs

KIND = "response"
ID_PREFIX = "resp_"

#: Request fields chatq accepts and ignores: they change nothing a text answer needs.
IGNORED = frozenset({"user", "safety_identifier", "prompt_cache_key", "service_tier",
                     "truncation", "parallel_tool_calls", "include", "stream_options",
                     "top_p", "prompt_cache_retention"})
#: What the README lists as not implemented; asking for it is a 400 naming the parameter.
UNSUPPORTED = ("tools", "previous_response_id", "conversation", "reasoning", "prompt",
               "max_tool_calls", "top_logprobs", "text")

_STATUS = {jobs.Status.QUEUED: "queued", jobs.Status.RUNNING: "in_progress",
           jobs.Status.SUCCEEDED: "completed", jobs.Status.FAILED: "failed",
           jobs.Status.CANCELLED: "cancelled"}
_TERMINAL_EVENT = {"completed": "response.completed", "incomplete": "response.incomplete",
                   "failed": "response.failed", "cancelled": "response.cancelled"}


class ResponseCreate(BaseModel):
    """The body of `POST /v1/responses` (the part chatq implements; see UNSUPPORTED)."""

    model_config = ConfigDict(extra="allow", json_schema_extra={
        "examples": [{"model": "chatq-sim-1", "input": "Why is the sky blue?",
                      "background": True}],
    })

    model: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    """Model name; the configured default when absent."""
    input: str | Annotated[list[dict[str, Any]], Field(min_length=1, max_length=jobs.MAX_MESSAGES)]
    """A question, or a list of input messages (`role` + text `content`)."""
    instructions: str | None = None
    """A system message put before the input."""
    max_output_tokens: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    metadata: dict[str, str] | None = None
    background: bool = False
    """Answer at once with status `queued`; the job runs on the workers."""
    stream: bool = False
    """Answer with Server-Sent Events."""
    store: bool = True
    """Keep the response for GET; false deletes it once answered (not with background)."""
    tool_choice: Any = None
    """Accepted when it asks for no tool (`none`, `auto`): chatq has no tools."""


def job_id_of(response_id: str) -> str | None:
    """The job id inside a response id, or None when it is not one of ours."""
    rest = response_id.removeprefix(ID_PREFIX)
    if rest == response_id or not rest or len(rest) > 64:
        return None
    return rest if all(c in "0123456789abcdef" for c in rest) else None


def response_id(job_id: str) -> str:
    """The response id of a job."""
    return f"{ID_PREFIX}{job_id}"


def unsupported_param(body: ResponseCreate) -> str | None:
    """The first parameter chatq cannot honour, if the request names one."""
    extra = body.model_extra or {}
    for name in UNSUPPORTED:
        value = extra.get(name)
        if name == "tools" and value in (None, []):
            continue
        if name == "text" and _plain_text_format(value):
            continue
        if value is not None:
            return name
    for name in extra:
        if name not in IGNORED and name not in UNSUPPORTED:
            return name
    if body.tool_choice not in (None, "none", "auto"):
        return "tool_choice"
    if body.metadata is not None and len(body.metadata) > 16:
        return "metadata"
    return None


def _plain_text_format(value: Any) -> bool:
    if value is None:
        return True
    if not isinstance(value, dict):
        return False
    fmt = value.get("format")
    return fmt is None or (isinstance(fmt, dict) and fmt.get("type") == "text")


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in (
                    "input_text", "output_text", "text"):
                raise ValueError("content parts other than text (images, files, audio) "
                                 "are not implemented")
            parts.append(str(part.get("text", "")))
        return "".join(parts)
    raise ValueError("content must be a string or a list of text parts")


def to_chat_request(body: ResponseCreate) -> jobs.ChatRequest:
    """The job request of a Responses create; ValueError says what is wrong with `input`."""
    if isinstance(body.input, str):
        if not body.input.strip():
            raise ValueError("input is blank")
        messages = [jobs.Message(role="user", content=body.input)]
    else:
        messages = []
        for index, item in enumerate(body.input):
            kind = item.get("type", "message")
            role = item.get("role")
            if kind != "message" or role not in ("user", "system", "developer", "assistant"):
                raise ValueError(f"input[{index}]: only messages with a role of user, system, "
                                 "developer or assistant are implemented")
            try:
                text = _content_text(item.get("content"))
            except ValueError as exc:
                raise ValueError(f"input[{index}]: {exc}") from None
            if not text:
                raise ValueError(f"input[{index}]: content is empty")
            messages.append(jobs.Message(role="system" if role == "developer" else role,
                                         content=text))
    return jobs.ChatRequest(messages=messages, model=body.model, system=body.instructions or None,
                            temperature=body.temperature, max_tokens=body.max_output_tokens,
                            metadata=body.metadata)


# --- the Response object ----------------------------------------------------------------

def status_of(record: Mapping[str, Any]) -> str:
    """The Response status of a job record."""
    status = _STATUS[jobs.Status(record["status"])]
    if status == "completed" and record.get("finish_reason") == "length":
        return "incomplete"
    return status


def item_id(job_id: str, index: int = 0) -> str:
    """The message item id of output `index` (more than one only after retries)."""
    return f"msg_{job_id}" if index == 0 else f"msg_{job_id}_{index}"


def message_item(ident: str, text: str | None, status: str) -> dict[str, Any]:
    """An assistant message output item; `text` None means no content part yet."""
    content = [] if text is None else [{"type": "output_text", "text": text, "annotations": [],
                                        "logprobs": []}]
    return {"type": "message", "id": ident, "status": status, "role": "assistant",
            "content": content}


def usage_of(usage: Mapping[str, int] | None) -> dict[str, Any] | None:
    """chat usage (prompt/completion tokens) as Responses usage (input/output tokens)."""
    if not usage:
        return None
    given = usage.get("prompt_tokens", 0)
    produced = usage.get("completion_tokens", 0)
    return {"input_tokens": given,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": produced, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage.get("total_tokens", given + produced)}


def error_of(error: Mapping[str, str] | None, status: str) -> dict[str, Any] | None:
    """A job's error as a Response error (only a failed response has one)."""
    if status != "failed" or not error:
        return None
    code = "rate_limit_exceeded" if error.get("code") == "model_rate_limited" else "server_error"
    return {"code": code, "message": f"{error.get('message', 'failed')} ({error.get('code')})"}


def view(record: Mapping[str, Any], *, status: str | None = None,
         output: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The Response object of a job record; `status`/`output` override for stream snapshots."""
    job_id = str(record["id"])
    request: Mapping[str, Any] = record.get("request") or {}
    options: Mapping[str, Any] = record.get("view") or {}
    actual = status_of(record)
    shown = status or actual
    if output is None:
        output = []
        if actual in ("completed", "incomplete"):
            output = [message_item(item_id(job_id), str(record.get("answer") or ""), actual)]
    finished = record.get("finished_at")
    return {
        "id": response_id(job_id), "object": "response",
        "created_at": int(record.get("created_at") or 0),
        "status": shown,
        "completed_at": int(finished) if shown == "completed" and finished else None,
        "background": bool(options.get("background", False)),
        "error": error_of(record.get("error"), shown),
        "incomplete_details": ({"reason": "max_output_tokens"} if shown == "incomplete"
                               else None),
        "instructions": request.get("system"),
        "max_output_tokens": request.get("max_tokens"),
        "metadata": record.get("metadata") or {},
        "model": record.get("model") or request.get("model") or "",
        "output": output,
        "parallel_tool_calls": True,
        "temperature": request.get("temperature"),
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": None,
        "truncation": "disabled",
        "store": bool(options.get("store", True)),
        "usage": usage_of(record.get("usage")) if shown in _TERMINAL_EVENT else None,
        "user": None,
    }


def deleted(job_id: str) -> dict[str, Any]:
    """The answer to DELETE /v1/responses/{id}."""
    return {"id": response_id(job_id), "object": "response.deleted", "deleted": True}


# --- events -------------------------------------------------------------------------------

class EventMapper:
    """Turns a job's Redis events, read from the start, into numbered Responses events.

    Feed it `opening()` first, then every Redis event in order; equal input gives equal
    output, which is what makes `starting_after` exact.
    """

    def __init__(self, record: Mapping[str, Any]) -> None:
        self.record = record
        self.job_id = str(record["id"])
        self.seq = -1
        self.started = False
        self.index = -1
        self.open = False
        self.text: list[str] = []
        self.abandoned: list[dict[str, Any]] = []
        self.finished = False

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        self.seq += 1
        return {"type": kind, "sequence_number": self.seq, **fields}

    def _snapshot(self, status: str) -> dict[str, Any]:
        return view(self.record, status=status, output=[])

    def opening(self) -> list[dict[str, Any]]:
        """What every stream starts with: the response exists and waits in the queue."""
        snap = self._snapshot("queued")
        return [self._event("response.created", response=snap),
                self._event("response.queued", response=snap)]

    def feed(self, kind: str, data: Mapping[str, Any],
             final: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """The events for one Redis event; `final` is the terminal record, for `done`."""
        if self.finished:
            return []
        if kind == "attempt":
            return self._attempt()
        if kind == "delta":
            return self._delta(str(data.get("text", "")))
        if kind == "done":
            return self._done(data, final or self.record)
        return []

    def _attempt(self) -> list[dict[str, Any]]:
        if not self.started:
            self.started = True
            return [self._event("response.in_progress", response=self._snapshot("in_progress"))]
        if self.open and self.text:
            return self._abandon()
        return []

    def _abandon(self) -> list[dict[str, Any]]:
        item = message_item(item_id(self.job_id, self.index), None, "incomplete")
        self.abandoned.append(item)
        self.open, self.text = False, []
        return [self._event("response.output_item.done", output_index=self.index, item=item)]

    def _open_item(self) -> list[dict[str, Any]]:
        self.index += 1
        self.open = True
        ident = item_id(self.job_id, self.index)
        return [
            self._event("response.output_item.added", output_index=self.index,
                        item=message_item(ident, None, "in_progress")),
            self._event("response.content_part.added", item_id=ident, output_index=self.index,
                        content_index=0,
                        part={"type": "output_text", "text": "", "annotations": []}),
        ]

    def _delta(self, text: str) -> list[dict[str, Any]]:
        if not text:
            return []
        out = [] if self.open else self._open_item()
        if not self.started:  # a stream that lost its attempt event: still well-formed
            self.started = True
        self.text.append(text)
        out.append(self._event("response.output_text.delta", item_id=item_id(self.job_id, self.index),
                               output_index=self.index, content_index=0, delta=text,
                               logprobs=[]))
        return out

    def _done(self, data: Mapping[str, Any], final: Mapping[str, Any]) -> list[dict[str, Any]]:
        self.finished = True
        out: list[dict[str, Any]] = []
        if "status" not in final or not jobs.Status(final["status"]).terminal:
            final = {**final, "status": data.get("status", "failed")}
        status = status_of(final)
        if status in ("completed", "incomplete"):
            answer = str(final.get("answer") or data.get("answer") or "".join(self.text))
            if not self.open:
                out += self._open_item()
            ident = item_id(self.job_id, self.index)
            part = {"type": "output_text", "text": answer, "annotations": [], "logprobs": []}
            item = message_item(ident, answer, status)
            out += [
                self._event("response.output_text.done", item_id=ident, output_index=self.index,
                            content_index=0, text=answer, logprobs=[]),
                self._event("response.content_part.done", item_id=ident, output_index=self.index,
                            content_index=0, part=part),
                self._event("response.output_item.done", output_index=self.index, item=item),
            ]
            snapshot = view(final, output=[*self.abandoned, item])
        else:
            if self.open:
                out += self._abandon()
            snapshot = view(final, output=list(self.abandoned))
        out.append(self._event(_TERMINAL_EVENT[status], response=snapshot))
        return out
