"""The request middleware: authentication, request ids, per-route metrics, and the one place errors become JSON."""

from __future__ import annotations

import itertools
import logging
import os
import re
import time

from aiohttp import web
from aiohttp.typedefs import Handler

from batcher.auth import authorize
from batcher.errors import (
    CORSForbidden,
    HTTPError,
    InternalError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
    snippet,
)
from batcher.handlers import METRICS, STARTED, TOKENS, json_response
from batcher.metrics import PREDICT_ROUTES, ROUTES

log = logging.getLogger(__name__)
REQUEST_ID = "x-request-id"
_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_INVALID_STATUSES = frozenset({400, 413, 422})
# Generated ids: a random per-process prefix and a counter (uuid4 per request cost ~3 % of
# the event loop's time under load); unique across restarts and replicas in practice.
_ID_PREFIX = os.urandom(6).hex()
_ID_COUNTER = itertools.count(1)


def route_label(request: web.Request) -> str:
    """A bounded set of route labels, so unknown paths cannot blow up metric cardinality."""
    resource = request.match_info.route.resource
    canonical = resource.canonical if resource is not None else ""
    if canonical.startswith("/docs"):
        return "/docs"
    return canonical if canonical in ROUTES else "other"


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The one middleware: stamp the start time, check the bearer token on the predict
    routes, turn every failure into `{"error": {"type", "message"}}` with its status (never
    a traceback), then stamp the request id and count and time the answer."""
    request[STARTED] = started = time.perf_counter()
    route = route_label(request)
    metrics = request.app[METRICS]
    try:
        tokens = request.app[TOKENS]
        if tokens and route in PREDICT_ROUTES:
            authorize(tokens, request.headers.get("Authorization"))
        response = await handler(request)
    except Unauthorized as error:
        metrics.rejected.labels("unauthorized").inc()
        response = json_response(error.body(), status=error.status, headers=error.headers)
    except HTTPError as error:
        response = json_response(error.body(), status=error.status, headers=error.headers)
    except web.HTTPException as exc:
        response = json_response(_from_aiohttp(request, exc), status=exc.status, headers=_allow(exc))
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        response = json_response(InternalError().body(), status=500)
    incoming = request.headers.get(REQUEST_ID, "")
    request_id = incoming if _REQUEST_ID_OK.match(incoming) else f"{_ID_PREFIX}{next(_ID_COUNTER):020d}"
    response.headers[REQUEST_ID] = request_id
    metrics.answered(route, response.status, time.perf_counter() - started)
    if route in PREDICT_ROUTES and response.status in _INVALID_STATUSES:
        metrics.rejected.labels("invalid").inc()
    return response


def _from_aiohttp(request: web.Request, exc: web.HTTPException) -> dict[str, dict[str, str]]:
    """aiohttp's own 404/405/413 (routing, body size) and aiohttp-cors' 403 in our error shape."""
    if exc.status == 403:
        return CORSForbidden().body()
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
