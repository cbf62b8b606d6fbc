"""What a batch input file is: JSONL request lines, checked as the upload streams in.

Pure code, no I/O: `LineChecker.feed()` takes the upload's bytes in whatever chunks they
arrive, checks each complete line (OpenAI's `{"custom_id", "method", "url", "body"}`, a
unique custom_id, a known url, a body chatq can run) and raises `BadFile` naming the line
number and what is wrong. `chat_request()` turns a line's body into the `ChatRequest` a
worker runs, so a batch line is the same kind of job as a `/v1/chat` question.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from chatq import errors, jobs

CHAT_URL = "/v1/chat/completions"
RESPONSES_URL = "/v1/responses"
URLS = (CHAT_URL, RESPONSES_URL)
# One line is held in memory while it is checked; a line this long is no chat request.
MAX_LINE_BYTES = 8 * 1024 * 1024
MAX_CUSTOM_ID = 512


class BadFile(errors.ChatqError):
    """The uploaded file is not a valid batch input; `line` is 1-based (0: the whole file)."""

    def __init__(self, line: int, message: str, code: str = "invalid_batch_file",
                 param: str = "file") -> None:
        super().__init__(f"line {line}: {message}" if line else message)
        self.line = line
        self.code = code
        self.param = param


class TooLarge(BadFile):
    """The upload passed a size or line-count limit."""


def _text(content: Any, where: str) -> str:
    """Message content as plain text: a string, or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in (
                    "text", "input_text", "output_text"):
                raise ValueError(f"{where}: only text content parts are supported")
            parts.append(str(part.get("text", "")))
        return "".join(parts)
    raise ValueError(f"{where}: content must be a string or a list of text parts")


def _role(role: Any, where: str) -> str:
    if role == "developer":  # OpenAI's newer name for the system role
        return "system"
    if role not in ("system", "user", "assistant"):
        raise ValueError(f"{where}: role must be system, developer, user or assistant")
    return str(role)


def _turns(raw: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{where} must be a non-empty list of messages")
    turns = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise ValueError(f"{where}[{i}] must be an object")
        turns.append({"role": _role(m.get("role"), f"{where}[{i}].role"),
                      "content": _text(m.get("content"), f"{where}[{i}].content")})
    return turns


def chat_request(url: str, body: Any) -> jobs.ChatRequest:
    """The request a worker runs for one line (raises ValueError saying what is wrong).

    Of the OpenAI parameters, the model, the messages (or `input` and `instructions`),
    `temperature` and the token limit are kept; the others are accepted and not passed on.
    """
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    options: dict[str, Any] = {"model": body.get("model"), "temperature": body.get("temperature")}
    if url == CHAT_URL:
        turns = _turns(body.get("messages"), "body.messages")
        options["max_tokens"] = body.get("max_completion_tokens", body.get("max_tokens"))
    else:
        raw = body.get("input")
        turns = ([{"role": "user", "content": raw}] if isinstance(raw, str)
                 else _turns(raw, "body.input"))
        if body.get("instructions"):
            turns.insert(0, {"role": "system", "content": str(body["instructions"])})
        options["max_tokens"] = body.get("max_output_tokens")
    try:
        return jobs.ChatRequest(messages=turns,
                                **{k: v for k, v in options.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ())) or "body"
        raise ValueError(f"body.{where}: {first.get('msg', 'invalid')}") from None


def check_line(raw: bytes, number: int) -> tuple[str, str, str]:
    """(custom_id, url, model) of one line, or BadFile saying what is wrong with it."""
    try:
        line = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadFile(number, f"not valid JSON ({exc})") from None
    if not isinstance(line, dict):
        raise BadFile(number, "each line must be a JSON object")
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise BadFile(number, "custom_id must be a non-empty string")
    if len(custom_id) > MAX_CUSTOM_ID:
        raise BadFile(number, f"custom_id is longer than {MAX_CUSTOM_ID} characters")
    if line.get("method") != "POST":
        raise BadFile(number, 'method must be "POST"')
    url = line.get("url")
    if url not in URLS:
        raise BadFile(number, f"url {url!r} is not one of {', '.join(URLS)}")
    try:
        request = chat_request(url, line.get("body"))
    except ValueError as exc:
        raise BadFile(number, str(exc)) from None
    return custom_id, url, request.model or ""


@dataclass
class LineChecker:
    """Checks an upload as it streams in; memory is one line plus 16 bytes per custom_id."""

    max_bytes: int
    max_lines: int
    size: int = 0
    """Bytes seen."""
    lines: int = 0
    """Request lines seen (blank lines are skipped, but counted for line numbers)."""
    urls: set[str] = field(default_factory=set)
    models: set[str] = field(default_factory=set)
    _number: int = 0
    _partial: bytearray = field(default_factory=bytearray)
    _ids: set[bytes] = field(default_factory=set)

    def feed(self, chunk: bytes) -> None:
        """Check every line that `chunk` completes."""
        self.size += len(chunk)
        if self.size > self.max_bytes:
            raise TooLarge(0, f"the file is over {self.max_bytes} bytes", code="file_too_large")
        start = 0
        while (end := chunk.find(b"\n", start)) != -1:
            if self._partial:
                self._partial += chunk[start:end]
                self._line(bytes(self._partial))
                self._partial = bytearray()
            else:
                self._line(chunk[start:end])
            start = end + 1
        if start < len(chunk):
            self._partial += chunk[start:]
            if len(self._partial) > MAX_LINE_BYTES:
                raise BadFile(self._number + 1, f"the line is over {MAX_LINE_BYTES} bytes")

    def finish(self) -> None:
        """The upload ended: check the last line, and that there was one at all."""
        if self._partial:
            self._line(bytes(self._partial))
            self._partial = bytearray()
        if not self.lines:
            raise BadFile(0, "the file holds no request lines", code="empty_file")

    def _line(self, raw: bytes) -> None:
        self._number += 1
        if not raw.strip():
            return
        custom_id, url, model = check_line(raw, self._number)
        digest = hashlib.blake2b(custom_id.encode(), digest_size=16).digest()
        if digest in self._ids:
            raise BadFile(self._number, f"custom_id {custom_id!r} appears more than once",
                          code="duplicate_custom_id")
        self._ids.add(digest)
        self.lines += 1
        if self.lines > self.max_lines:
            raise TooLarge(self._number, f"the file holds over {self.max_lines} requests",
                           code="too_many_lines")
        self.urls.add(url)
        if model:
            self.models.add(model)


def iter_lines(buffer: bytearray, chunk: bytes) -> list[bytes]:
    """Append `chunk` to `buffer` and take the complete lines out (newline kept off)."""
    buffer += chunk
    out: list[bytes] = []
    start = 0
    while (end := buffer.find(b"\n", start)) != -1:
        out.append(bytes(buffer[start:end]))
        start = end + 1
    del buffer[:start]
    return out
