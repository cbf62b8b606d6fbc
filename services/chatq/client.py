"""A small Python client of the chatq API (httpx), used by `chatq ask`.

    from chatq.client import Client
    with Client("http://127.0.0.1:8000") as chatq:
        job = chatq.submit("Why is the sky blue?")
        for event in chatq.events(job["id"]):
            ...
        print(chatq.wait(job["id"])["answer"])
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from chatq import jobs

# The client's own variables, for `chatq ask`. They live outside the server's
# CHATQ_<GROUP>_<FIELD> names (CHATQ_API_KEY would read as a setting `api.key` and stop
# `chatq api` from starting), so one shell can run the server and ask it.
URL_VAR = "CHATQ_CLIENT_URL"
API_KEY_VAR = "CHATQ_CLIENT_API_KEY"


class ClientError(Exception):
    """The API said no (or could not be reached); `status` 0 means no answer at all."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}" if status else message)
        self.status = status
        self.code = code
        self.message = message


@dataclass
class Event:
    """One Server-Sent Event of a job: `attempt`, `delta` or `done`."""

    id: str
    type: str
    data: dict[str, Any]


class Client:
    """Synchronous client; one HTTP connection pool."""

    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: str = "",
                 timeout: float = 30.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self.http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            resp = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ClientError(0, "unreachable",
                              f"cannot reach chatq at {self.http.base_url}: {exc}") from None
        if resp.status_code >= 400:
            try:
                err = resp.json()["error"]
                raise ClientError(resp.status_code, err["code"], err["message"])
            except (ValueError, KeyError, TypeError):
                raise ClientError(resp.status_code, "http_error", resp.text[:200]) from None
        return resp

    def submit(self, message: str | None = None, *, messages: list[dict[str, str]] | None = None,
               idempotency_key: str | None = None, **options: Any) -> dict[str, Any]:
        """POST /v1/chat; returns {"id", "status", "created_at"}."""
        body: dict[str, Any] = {k: v for k, v in options.items() if v is not None}
        if messages is not None:
            body["messages"] = messages
        else:
            body["message"] = message
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        result: dict[str, Any] = self._call("POST", "/v1/chat", json=body, headers=headers).json()
        return result

    def get(self, job_id: str, wait: float = 0) -> dict[str, Any]:
        """GET /v1/chat/{id}, long-polling up to `wait` seconds."""
        params = {"wait": wait} if wait else {}
        timeout = httpx.Timeout(wait + 30.0)
        result: dict[str, Any] = self._call("GET", f"/v1/chat/{job_id}", params=params,
                                            timeout=timeout).json()
        return result

    def wait(self, job_id: str, timeout: float = 300.0, poll: float = 30.0) -> dict[str, Any]:
        """Long-poll until the job is terminal or `timeout` passes; returns the job."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            job = self.get(job_id, wait=max(0.0, min(poll, left)))
            if jobs.Status(job["status"]).terminal or left <= 0:
                return job

    def cancel(self, job_id: str) -> dict[str, Any]:
        """POST /v1/chat/{id}/cancel."""
        result: dict[str, Any] = self._call("POST", f"/v1/chat/{job_id}/cancel").json()
        return result

    def events(self, job_id: str, last_event_id: str | None = None) -> Iterator[Event]:
        """The job's Server-Sent Events, until `done`; resumes after `last_event_id`."""
        headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        timeout = httpx.Timeout(30.0, read=60.0)
        try:
            with self.http.stream("GET", f"/v1/chat/{job_id}/events", headers=headers,
                                  timeout=timeout) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    self._raise_for(resp)
                yield from _parse_sse(resp.iter_lines())
        except httpx.TransportError as exc:
            raise ClientError(0, "unreachable", f"event stream broke: {exc}") from None

    def _raise_for(self, resp: httpx.Response) -> None:
        try:
            err = resp.json()["error"]
        except (ValueError, KeyError, TypeError):
            raise ClientError(resp.status_code, "http_error", resp.text[:200]) from None
        raise ClientError(resp.status_code, err["code"], err["message"])


def _parse_sse(lines: Iterator[str]) -> Iterator[Event]:
    event_id, kind, data = "", "message", list[str]()
    for line in lines:
        if not line:
            if data:
                yield Event(event_id, kind, json.loads("\n".join(data)))
                if kind == "done":
                    return
            kind, data = "message", []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "id":
            event_id = value
        elif field == "event":
            kind = value
        elif field == "data":
            data.append(value)
