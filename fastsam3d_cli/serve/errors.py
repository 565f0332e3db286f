"""HTTP errors of the server: a status code and a one-line message (the JSON body `{"error": ..., "status": ...}`)."""
from __future__ import annotations


class ApiError(Exception):
    """A request the server refuses; `status` is the HTTP status (4xx for anything a client can cause)."""

    def __init__(self, status: int, message: str) -> None:
        self.status = int(status)
        self.message = " ".join(str(message).split())
        super().__init__(self.message)
