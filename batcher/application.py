"""The aiohttp application: routes, middleware, and the lifecycle.

Start-up (a cleanup context) loads, checks and warms the model and starts its batcher
(`batcher.runtime`); shutdown drains it (`drain`, on the app's shutdown signal: before
aiohttp waits for the handlers, so every admitted request is answered first).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import aiohttp_cors
from aiohttp import HttpVersion11, web, web_protocol, web_urldispatcher
from aiohttp.http_exceptions import HttpProcessingError

from batcher import __version__, docs, handlers, oip
from batcher.auth import Access, load_tokens
from batcher.config import Settings
from batcher.errors import ExpectationFailed, HTTPError, InternalError, MalformedHTTP, loggable, snippet
from batcher.handlers import ACCESS, METRICS, MODELS, OPENAPI, SERVICE_TITLE, SETTINGS, TIMING_HEADERS
from batcher.metrics import Metrics
from batcher.middleware import REQUEST_ID, observe
from batcher.openapi import build_openapi
from batcher.runtime import Models
from batcher.worker import Model

log = logging.getLogger(__name__)


def create_app(settings: Settings, *, metrics: Metrics | None = None, model: Model | None = None) -> web.Application:
    """The app; `model` replaces the bundle's ONNX session (tests of timing use a fake)."""
    install_protocol_errors()
    app = web.Application(client_max_size=settings.server.client_max_size_bytes, middlewares=[observe])
    app[SETTINGS] = settings
    app[METRICS] = metrics = metrics or Metrics()
    app[MODELS] = Models(settings, metrics)
    server = settings.server
    tokens = load_tokens(server.auth_tokens_file, server.auth_tokens_env, settings.base_dir)
    if tokens:
        log.info("bearer-token auth on the predict routes: %d token(s)", len(tokens))
    app[ACCESS] = Access(tokens, frozenset(server.cors_origins))
    app[OPENAPI] = build_openapi(SERVICE_TITLE, __version__, settings)
    app.router.add_get("/", handlers.index)
    app.router.add_get("/healthz", handlers.healthz)
    app.router.add_get("/readyz", handlers.readyz)
    app.router.add_get("/intents", handlers.intents)
    app.router.add_post("/predict", handlers.predict)
    app.router.add_post("/predict/batch", handlers.predict_batch)
    app.router.add_get("/models", handlers.models)
    app.router.add_post("/models/{name}/predict", handlers.predict)
    app.router.add_post("/models/{name}/predict/batch", handlers.predict_batch)
    app.router.add_get("/models/{name}/intents", handlers.intents)
    if server.admin_enabled:
        app.router.add_post("/models/{name}/reload", handlers.reload)
    oip.add_routes(app)
    if server.expose_metrics and not server.metrics_port:
        app.router.add_get("/metrics", handlers.metrics)
    if server.expose_docs:
        app.router.add_get("/openapi.json", handlers.openapi)
        app.router.add_get("/docs", docs.page)
        app.router.add_get("/docs/static/{name}", docs.asset)
    if server.cors_origins:
        enable_cors(app, server.cors_origins, max_age_s=server.cors_max_age_s)
    app.cleanup_ctx.append(partial(lifecycle, model=model))
    app.on_shutdown.append(drain)
    return app


async def expect_continue(request: web.Request) -> web.Response | None:
    """`Expect: 100-continue` gets its interim answer; any other Expect value gets 417 in
    our error shape. aiohttp's own handler answered those in plain text, with a 500 and a
    traceback when the value was not ASCII, and logged one when the client had gone.
    Installed as aiohttp's default for every route, unknown paths included (404/405 get a
    route of aiohttp's own, made per request, that takes no option)."""
    if request.headers.get("Expect", "").lower() != "100-continue":
        error = ExpectationFailed()
        response = handlers.json_response(error.body(), status=error.status)
        response.force_close()  # the body it announced may follow: do not read it as a request
        return response
    if request.version >= HttpVersion11:
        with contextlib.suppress(ConnectionError):  # the client went away: the handler finds out
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0
    return None


def enable_cors(app: web.Application, origins: tuple[str, ...], *, max_age_s: int) -> None:
    """CORS on every API route for `origins` (aiohttp-cors answers the preflights): browsers
    may send the JSON and bearer-token headers and read the request id and timing headers."""
    options = aiohttp_cors.ResourceOptions(  # type: ignore[no-untyped-call]  # its __init__ is unannotated
        allow_headers=("Content-Type", "Authorization", REQUEST_ID),
        expose_headers=(REQUEST_ID, *TIMING_HEADERS, "Retry-After"),
        max_age=max_age_s,
    )
    cors = aiohttp_cors.setup(app, defaults=dict.fromkeys(origins, options))
    for route in list(app.router.routes()):
        if not isinstance(route.resource, web.StaticResource):
            cors.add(route)


def server_options(settings: Settings) -> dict[str, Any]:
    """aiohttp's connection-level options from the settings, for app.py's runner and the tests'."""
    server = settings.server
    return {
        "handler_cancellation": True,  # a client that hangs up cancels its handler, so its request is skipped
        "keepalive_timeout": server.keepalive_timeout_s,
        "max_line_size": server.max_header_bytes,
        "max_field_size": server.max_header_bytes,
        "max_headers": server.max_header_count,
    }


class MalformedRequestFilter(logging.Filter):
    """aiohttp logs a full traceback at ERROR for every malformed HTTP message a client sends
    (answered 400 by aiohttp itself), and for a body it could not decode; make that one
    warning line, so a fuzzer or attacker cannot fill the log with tracebacks."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError | web_protocol.RequestPayloadError):
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg = "malformed HTTP request answered 400: %s"
            record.args = (loggable(" ".join(str(error).split())),)
        return True


_AIOHTTP_HANDLE_ERROR = web_protocol.RequestHandler.handle_error
# where aiohttp's reason starts quoting the input: "Got more than 8190 bytes when reading: b'aaa…"
_ECHOED_INPUT = re.compile(r":\s*(?:b['\"]|bytearray\()")


def _protocol_error(
    handler: web_protocol.RequestHandler,
    request: web.BaseRequest,
    status: int = 500,
    exc: BaseException | None = None,
    message: str | None = None,
) -> web.StreamResponse:
    """What aiohttp answers itself, before any route or middleware runs (a malformed request
    line or header, a header over the limits), in our error shape. aiohttp's own page is
    plain text and echoes the whole offending line, up to server.max_header_bytes of it;
    this keeps only the parser's reason, truncated. aiohttp has no hook for it
    (aio-libs/aiohttp#3287), hence the override of RequestHandler.handle_error."""
    if isinstance(exc, ConnectionError):
        # The client went away while aiohttp wrote to it (its "100 Continue" to a client
        # that had already half-closed, say): nobody is left to answer, nothing to log.
        handler.log_debug("client gone before it could be answered: %s", exc)
        response = web.Response(status=status)
        response.force_close()
        return response
    # aiohttp's version logs, and raises when part of a response was already sent
    _AIOHTTP_HANDLE_ERROR(handler, request, status, exc, message)
    if status >= 500:
        error: HTTPError = InternalError()
    else:
        reason = _ECHOED_INPUT.split((message or "").split("\n", 1)[0], 1)[0].strip().rstrip(":")
        error = MalformedHTTP(f"malformed HTTP request: {snippet(reason, 80)}" if reason else None)
    response = handlers.json_response(error.body(), status=status)
    response.force_close()
    return response


def install_protocol_errors() -> None:
    """Answer what aiohttp answers itself (protocol errors, Expect headers) our way
    (idempotent; every listener in the process)."""
    web_protocol.RequestHandler.handle_error = _protocol_error  # type: ignore[method-assign,assignment]
    web_urldispatcher._default_expect_handler = expect_continue  # type: ignore[assignment]


def install_log_filters() -> None:
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, MalformedRequestFilter) for f in server_log.filters):
        server_log.addFilter(MalformedRequestFilter())


def create_metrics_app(main: web.Application) -> web.Application:
    """/metrics alone, for server.metrics_port: keeps it off the public listener."""
    app = web.Application(middlewares=[observe])
    app[SETTINGS] = main[SETTINGS]
    app[METRICS] = main[METRICS]
    app[MODELS] = main[MODELS]
    app[ACCESS] = Access()
    app.router.add_get("/metrics", handlers.metrics)
    return app


async def lifecycle(app: web.Application, *, model: Model | None) -> AsyncIterator[None]:
    """Load and warm the model before the server listens; stop its workers at the very end."""
    models = app[MODELS]
    metrics = app[METRICS]
    await models.load_all(model=model)
    refresher = asyncio.get_running_loop().create_task(refresh(metrics)) if metrics.multiprocess else None
    try:
        yield
    finally:
        await drain(app)  # a no-op when the shutdown signal already drained
        if refresher is not None:
            refresher.cancel()


async def refresh(metrics: Metrics, every_s: float = 1.0) -> None:
    """With several workers: what a scrape answered by another worker cannot read from this
    one (its readiness, CPU and memory), written every second."""
    while True:
        metrics.refresh()
        await asyncio.sleep(every_s)


async def drain(app: web.Application) -> None:
    """The drain, in one place: readiness drops, new predictions get 503, everything
    admitted is answered within server.shutdown_timeout_s (503 for what is left then)."""
    await app[MODELS].drain(app[SETTINGS].server.shutdown_timeout_s)
