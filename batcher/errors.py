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


class StartupCancelled(Exception):
    """A signal asked the server to stop while it was loading or warming the model."""


class HTTPError(Exception):
    """Base of every error answered to a client."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "internal_error"
    default_message: ClassVar[str] = "internal server error"
    close: ClassVar[bool] = False
    """Close the connection after answering (its stream cannot be trusted any more)."""

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


class InvalidBody(HTTPError):
    status = 400
    type = "invalid_body"
    default_message = "request body cannot be read: its Content-Encoding or chunking is broken"
    close = True


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


class Forbidden(HTTPError):
    status = 403
    type = "forbidden"
    default_message = "forbidden"


class NotFound(HTTPError):
    status = 404
    type = "not_found"
    default_message = "no such route"


class ModelNotFound(HTTPError):
    status = 404
    type = "model_not_found"
    default_message = "no such model"


class MethodNotAllowed(HTTPError):
    status = 405
    type = "method_not_allowed"
    default_message = "method not allowed on this route"


class RequestTimeout(HTTPError):
    status = 408
    type = "request_timeout"
    default_message = "the request body did not arrive in time"


class ExpectationFailed(HTTPError):
    status = 417
    type = "expectation_failed"
    default_message = "the only Expect this server knows is 100-continue"


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


class PredictedLate(HTTPError):
    status = 429
    type = "predicted_late"
    default_message = "this request cannot be answered within its deadline; retry later"


class NotReady(HTTPError):
    status = 503
    type = "not_ready"
    default_message = "model is not ready"


class Draining(HTTPError):
    status = 503
    type = "shutting_down"
    default_message = "server is shutting down"


class Unhealthy(HTTPError):
    status = 503
    type = "unhealthy"
    default_message = "a model run has hung or the batcher loop has stopped; restart the process"


class DeadlineExceeded(HTTPError):
    status = 504
    type = "deadline_exceeded"
    default_message = "request deadline passed before the model could run it"


class ModelFailed(HTTPError):
    status = 500
    type = "model_error"
    default_message = "model run failed"


class ReloadFailed(HTTPError):
    status = 500
    type = "reload_failed"
    default_message = "the model's new bundle did not load; the old version keeps serving"


class InternalError(HTTPError):
    status = 500
    type = "internal_error"
    default_message = "internal server error"


def snippet(text: str, limit: int = 40) -> str:
    """A short, truncated echo of client input for error messages, on one printable line."""
    return loggable(text, limit)


def loggable(text: str, limit: int = 200) -> str:
    """Client-controlled text made safe to write into one log line or message: every
    character that is not printable (newlines, escapes, separators) is written as its
    escape sequence, so no input can forge a record or drive a terminal; cut at `limit`."""
    cut = text[:limit]
    if not cut.isprintable():
        cut = "".join(char if char.isprintable() else repr(char)[1:-1] for char in cut)
    return cut if len(text) <= limit else cut + "…"
