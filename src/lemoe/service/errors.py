"""The one error type of the service's API: an HTTP status, a stable code and a message."""

from __future__ import annotations


class ApiError(Exception):
    """An HTTP error with a JSON body ``{"error": {"code", "message"}}``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
