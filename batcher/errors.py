"""One error tree. Each HTTP error carries its status and a stable machine-readable `type`;
the error middleware renders every one as `{"error": {"type": ..., "message": ...}}`."""

from __future__ import annotations

from typing import ClassVar


class StartupError(Exception):
    """The server cannot start; the message says what to fix. Printed without a traceback."""


class ConfigError(StartupError):
    """A setting is unknown or has a bad value."""


class BundleError(StartupError):
    """The model bundle is missing a file or its files disagree."""


class HTTPError(Exception):
    """Base of every error answered to a client."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "internal_error"
    default_message: ClassVar[str] = "internal server error"

    def __init__(self, message: str | None = None, *, headers: dict[str, str] | None = None) -> None:
        self.message = message or self.default_message
        self.headers = headers or {}
        super().__init__(self.message)

    def body(self) -> dict[str, dict[str, str]]:
        return {"error": {"type": self.type, "message": self.message}}


class InvalidJSON(HTTPError):
    status = 400
    type = "invalid_json"
    default_message = "request body is not valid JSON"


class MalformedHTTP(HTTPError):
    status = 400
    type = "malformed_http"
    default_message = "the request is not valid HTTP/1.1"


class Unauthorized(HTTPError):
    status = 401
    type = "unauthorized"
    default_message = "a valid bearer token is required (Authorization: Bearer <token>)"


class CORSForbidden(HTTPError):
    status = 403
    type = "cors_forbidden"
    default_message = "CORS preflight refused: this origin, method or header is not allowed"


class NotFound(HTTPError):
    status = 404
    type = "not_found"
    default_message = "no such route"


class MethodNotAllowed(HTTPError):
    status = 405
    type = "method_not_allowed"
    default_message = "method not allowed on this route"


class RequestTimeout(HTTPError):
    status = 408
    type = "request_timeout"
    default_message = "the request body did not arrive in time"


class PayloadTooLarge(HTTPError):
    status = 413
    type = "payload_too_large"
    default_message = "request body is too large"


class ValidationFailed(HTTPError):
    status = 422
    type = "validation_error"
    default_message = "request body does not match the schema"


class QueueFull(HTTPError):
    status = 429
    type = "queue_full"
    default_message = "server is at capacity; retry later"


class NotReady(HTTPError):
    status = 503
    type = "not_ready"
    default_message = "model is not ready"


class Draining(HTTPError):
    status = 503
    type = "shutting_down"
    default_message = "server is shutting down"


class DeadlineExceeded(HTTPError):
    status = 504
    type = "deadline_exceeded"
    default_message = "request deadline passed before the model could run it"


class ModelFailed(HTTPError):
    status = 500
    type = "model_error"
    default_message = "model run failed"


class InternalError(HTTPError):
    status = 500
    type = "internal_error"
    default_message = "internal server error"


def snippet(text: str, limit: int = 40) -> str:
    """A short, truncated echo of client input for error messages."""
    return text if len(text) <= limit else text[:limit] + "…"
