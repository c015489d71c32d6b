"""Errors a request can cause, rendered in the shape of the API it came through.

OpenAI: `{"error": {"message", "type", "param", "code"}}`; Anthropic: `{"type": "error", "error": {"type",
"message"}}`. Handlers raise `APIError(status, message, param=..., code=...)`; the app picks the shape from the
route (`/v1/messages…` is Anthropic's).
"""

from __future__ import annotations

from dataclasses import dataclass

# https://platform.openai.com/docs/guides/error-codes and https://docs.anthropic.com/en/api/errors
OPENAI_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "invalid_request_error",
                404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
                422: "invalid_request_error", 429: "rate_limit_error", 503: "server_error"}  # fmt: skip
ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                   404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
                   422: "invalid_request_error", 429: "rate_limit_error", 503: "overloaded_error"}  # fmt: skip


@dataclass
class APIError(Exception):
    status: int
    message: str
    param: str | None = None
    code: str | None = None

    def __str__(self) -> str:
        return self.message


def is_anthropic_path(path: str) -> bool:
    return path.startswith("/v1/messages")


def error_body(path: str, status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    if is_anthropic_path(path):
        return {"type": "error", "error": {"type": ANTHROPIC_TYPES.get(status, "api_error"), "message": message}}
    kind = OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
