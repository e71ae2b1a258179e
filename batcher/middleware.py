"""The request middleware: access to the predict routes, request ids, per-route metrics,
and the one place errors become JSON."""

from __future__ import annotations

import logging
import re
import time
from random import getrandbits

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from batcher.errors import (
    CORSForbidden,
    Forbidden,
    HTTPError,
    InternalError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
    loggable,
    snippet,
)
from batcher.handlers import ACCESS, METRICS, MODELS, STARTED, json_response
from batcher.handlers import REQUEST_ID as REQUEST_ID_KEY
from batcher.metrics import ADMIN_ROUTES, PREDICT_ROUTES, ROUTES, Metrics
from batcher.runtime import Models
from batcher.schemas import REQUEST_ID_PATTERN

log = logging.getLogger(__name__)
REQUEST_ID = "x-request-id"
_REQUEST_ID_OK = re.compile(REQUEST_ID_PATTERN)
_INVALID_STATUSES = frozenset({400, 413, 422})
GUARDED_ROUTES = frozenset((*PREDICT_ROUTES, *ADMIN_ROUTES))
"""Routes behind the bearer tokens and the origin check."""
_OIP_KEPT_HEADERS = frozenset(("retry-after", "allow", "www-authenticate"))
DEFAULT_MODEL_ROUTES = frozenset(("/predict", "/predict/batch", "/intents"))
_ROUTES = frozenset(ROUTES)
_PREDICT_ROUTES = frozenset(PREDICT_ROUTES)


def route_label(request: web.Request) -> str:
    """A bounded set of route labels, so unknown paths cannot blow up metric cardinality."""
    resource = request.match_info.route.resource
    canonical = resource.canonical if resource is not None else ""
    if canonical.startswith("/docs"):
        return "/docs"
    return canonical if canonical in _ROUTES else "other"


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The one middleware: stamp the start time, check who may call the predict routes
    (bearer token, origin), turn every failure into `{"error": {"type", "message"}}` with its
    status (never a traceback), then stamp the request id and count and time the answer."""
    request[STARTED] = started = time.perf_counter()
    request[REQUEST_ID_KEY] = request_id = request_id_for(request.headers.get(REQUEST_ID, ""))
    app = request.app
    route = route_label(request)
    model = model_label(request, route, app[MODELS])
    metrics = app[METRICS]
    try:
        if route in GUARDED_ROUTES:
            headers = request.headers
            access = app[ACCESS]
            origin = headers.get("Origin")
            if access.tokens or origin is not None:  # else there is nothing to check
                access.check(authorization=headers.get("Authorization"), origin=origin, host=request.host)
        response = await handler(request)
    except web.HTTPException as exc:
        response = json_response(_from_aiohttp(request, exc), status=exc.status, headers=_allow(exc))
    except Exception as exc:
        error = answer_for(exc, metrics, model, request.method, request.path)
        response = json_response(error.body(), status=error.status, headers=error.headers)
        if error.close:
            response.force_close()
    response.headers[REQUEST_ID] = request_id
    if app[MODELS].stopping:  # shutting down: clients reconnect, to another replica
        response.force_close()
    status = response.status
    if status >= 400 and route.startswith("/v2") and isinstance(response, web.Response):
        response = oip_error(response)
        status = response.status
    count(metrics, route, status, started, model)
    return response


def answer_for(exc: Exception, metrics: Metrics, model: str, method: str, path: str) -> HTTPError:
    """The error to answer for what a handler raised (called in its `except` block): its
    own HTTPError (401s also counted as `unauthorized`), else a logged 500."""
    if isinstance(exc, HTTPError):
        if isinstance(exc, Unauthorized) and model:
            metrics.for_model(model).rejected["unauthorized"].inc()
        return exc
    log.exception("unhandled error on %s %s", loggable(method), loggable(path))
    return InternalError()


def request_id_for(incoming: str) -> str:
    """The client's `x-request-id` when it is a sane one, else a new one. Generated ids are
    random (sequential ones would tell a client the request volume); not secrets, so
    Python's generator, not a getrandom() system call per request."""
    return incoming if _REQUEST_ID_OK.match(incoming) else f"{getrandbits(128):032x}"


def count(metrics: Metrics, route: str, status: int, started: float, model: str) -> None:
    """Count and time one answer; a refused body on a predict route is also `invalid`."""
    metrics.answered(route, status, time.perf_counter() - started, model)
    if status in _INVALID_STATUSES and model and route in _PREDICT_ROUTES:
        metrics.for_model(model).rejected["invalid"].inc()


def oip_error(response: web.Response) -> web.Response:
    """An error on an Open Inference Protocol route in that protocol's shape, `{"error":
    "..."}`; its invalid requests are 400 (ours are 422)."""
    try:
        error = orjson.loads(response.body)["error"]  # type: ignore[arg-type]
        message = f"{error['type']}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        message = "error"
    status = 400 if response.status == 422 else response.status
    answer = json_response(
        {"error": message},
        status=status,
        headers={k: v for k, v in response.headers.items() if k.lower() in _OIP_KEPT_HEADERS},
    )
    if not response.keep_alive:
        answer.force_close()
    return answer


def model_label(request: web.Request, route: str, models: Models) -> str:
    """The configured model a request asked for, for the `model` label: the default one on
    the unnamed routes, "" where none (or a name that is not configured: arbitrary names
    would make unbounded label values)."""
    name = request.match_info.get("name")
    if name is None:
        return models.default if route in DEFAULT_MODEL_ROUTES else ""
    return name if name in models.names else ""


def _from_aiohttp(request: web.Request, exc: web.HTTPException) -> dict[str, dict[str, str]]:
    """aiohttp's own 404/405/413 (routing, body size) and aiohttp-cors' 403 in our error shape."""
    if exc.status == 403:
        preflight = request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers
        return (CORSForbidden() if preflight else Forbidden()).body()
    if exc.status == 404:
        return NotFound(f"no route for {request.method} {snippet(request.path)}").body()
    if exc.status == 405:
        return MethodNotAllowed(f"{request.method} is not allowed on {snippet(request.path)}").body()
    if exc.status == 413:
        return PayloadTooLarge().body()
    return {"error": {"type": "http_error", "message": exc.reason}}


def _allow(exc: web.HTTPException) -> dict[str, str]:
    allow = exc.headers.get("Allow")
    return {"Allow": allow} if allow else {}
