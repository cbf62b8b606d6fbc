"""Errors in OpenAI's shape, for the routes that speak OpenAI's protocol.

The official SDKs turn a status code into an exception class (400 BadRequestError, 401
AuthenticationError, 403 PermissionDeniedError, 404 NotFoundError, 409 ConflictError, 422
UnprocessableEntityError, 429 RateLimitError, 5xx InternalServerError) and read
`{"error": {"message", "type", "param", "code"}}` from the body. chatq's own routes keep
their `{"error": {"code", "message"}}`; which shape a request gets depends only on its path
(`is_openai_path`), so auth, validation and size errors on these routes match too.

Routes raise `OpenAIError`; the app's handlers render it (and translate the rest).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi.responses import JSONResponse

#: Path prefixes that speak OpenAI's protocol (files and batches join when they land).
OPENAI_PREFIXES = ("/v1/responses", "/v1/webhook_endpoints", "/v1/files", "/v1/batches")

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error",
          403: "invalid_request_error", 404: "invalid_request_error",
          405: "invalid_request_error", 409: "invalid_request_error",
          413: "invalid_request_error", 422: "invalid_request_error",
          429: "rate_limit_error"}


def is_openai_path(path: str) -> bool:
    """True when errors on this path take OpenAI's shape."""
    return any(path == p or path.startswith(p + "/") for p in OPENAI_PREFIXES)


def error_type(status: int) -> str:
    """OpenAI's `type` for a status: invalid_request_error, rate_limit_error, server_error."""
    return _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


class OpenAIError(Exception):
    """An error a route answers in OpenAI's shape; `param` names the offending field."""

    def __init__(self, status: int, message: str, *, code: str | None = None,
                 param: str | None = None, type_: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type_ or error_type(status)
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        """The JSON body."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        """The HTTP response."""
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers or None)


def not_found(what: str, ident: str) -> OpenAIError:
    """404 as OpenAI words it; the same whether the object is missing or another key's."""
    return OpenAIError(404, f"No {what} found with id '{ident}'.", code="not_found")


def from_chatq(status: int, code: str, message: str,
               headers: Mapping[str, str] | None = None) -> JSONResponse:
    """A chatq-shaped error (code, message) re-spoken in OpenAI's shape."""
    param = None
    if code == "invalid_request" and ":" in message:
        param = message.split(":", 1)[0].strip() or None
    return OpenAIError(status, message, code=code, param=param, headers=headers).response()
