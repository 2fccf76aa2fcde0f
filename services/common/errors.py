"""One error base with a status code; every handler answers `{"error": Name, "detail": ...}`."""

from __future__ import annotations

from typing import Any


class SelarasError(Exception):
    """An expected failure with an HTTP status. Never a 500."""

    status_code = 400

    def __init__(self, detail: str, *, headers: dict[str, str] | None = None, extra: dict[str, Any] | None = None):
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra or {}

    @property
    def name(self) -> str:
        return type(self).__name__

    def body(self) -> dict[str, Any]:
        return {"error": self.name, "detail": self.detail, **self.extra}


class NotFound(SelarasError):
    status_code = 404


class Unauthorized(SelarasError):
    status_code = 401


class Forbidden(SelarasError):
    status_code = 403


class Conflict(SelarasError):
    """The change contradicts the stored state (e.g. it would move visitors between arms of a running test)."""

    status_code = 409


class PayloadTooLarge(SelarasError):
    status_code = 413


class InvalidPayload(SelarasError):
    status_code = 422


class RateLimited(SelarasError):
    status_code = 429


class StorageUnavailable(SelarasError):
    """The durable store cannot take the write: the client must retry (nothing was acknowledged)."""

    status_code = 503
