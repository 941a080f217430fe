"""The one error type of the service's API: an HTTP status, a stable code and a message."""

from __future__ import annotations

# OpenAI's error ``type`` for a status, so an OpenAI client reads lemoe's errors as its own.
_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "server_busy_error",
}


def openai_type(status: int) -> str:
    return _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


class ApiError(Exception):
    """An HTTP error with a JSON body ``{"error": {"code", "message", "type", "param"}}``.

    ``code`` and ``message`` are lemoe's; ``type`` and ``param`` (the offending field, or null)
    complete OpenAI's error shape, so every route, OpenAI-compatible or not, answers one shape.
    """

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param
