"""The fast lane: POST /predict on a plain keep-alive HTTP/1.1 connection, answered without
aiohttp's request, router, middleware and response objects; anything else is handed, with
the bytes read so far, to aiohttp on the same connection, which keeps it from then on.

Why: at 64 clients, aiohttp's per-request machinery and the coroutines around the handler
cost the event loop more than the prediction's own work (#18: 148 µs of loop CPU per
request against 65 for a bare aiohttp server). Here a request is parsed from the bytes
read, admitted, and answered from its future's callback: no task, no Request or Response.

A request is plain when all of it is in the bytes read so far and it is exactly the line
`POST /predict HTTP/1.1`, at most server.max_header_count headers, each named in
PLAIN_HEADERS, once, in visible ASCII, no line over server.max_header_bytes, a Host (HTTP/1.1
requires one: aiohttp answers 400 without it), a Content-Length under the small-body limit,
and `Connection: keep-alive` if any. So no Origin (CORS), Expect, chunking, content coding,
HTTP/1.0, query string or other route: for those aiohttp and the middleware have the answer.
Nor does the lane take a request while the access log is on (it would be missing from it).

What the lane does with a plain request is the middleware's and the handler's work, in
the same order with the same functions (bearer token, admission, body, model, validation,
tokenization, batcher or cache, prediction log, rendering, errors, request id, metrics),
so it gets the same answer in either lane: tests/test_fastpath.py sends requests through
both and compares. Per connection it answers one request at a time (pipelined ones wait in
its buffer, as aiohttp's do), takes at most ANSWERS_PER_CALLBACK of them in one callback
(a pipelined burst of failing requests, each answered at once, then yields the loop to the
other connections between rounds), stops reading while it holds over BUFFER_LIMIT unread
bytes (a client that sends faster than it is answered, or does not read its answers),
cancels the request of a client that hangs up (handler cancellation), closes a connection
idle for server.keepalive_timeout_s, and, once the server is shutting down, closes each
connection after its answer.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections.abc import Callable
from functools import partial
from http import HTTPStatus
from time import perf_counter
from typing import Any, cast

import orjson
from aiohttp import web, web_protocol
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE
from aiohttp.tcp_helpers import tcp_keepalive

from batcher.auth import authorize
from batcher.errors import HTTPError
from batcher.handlers import (
    ACCESS,
    LARGE_BODY_BYTES,
    METRICS,
    MODELS,
    SETTINGS,
    Query,
    door,
    finish_prediction,
    parsed,
    start_prediction,
)
from batcher.middleware import answer_for, count, request_id_for
from batcher.promises import FRESH_S, Promise, retry_headers
from batcher.runtime import Runtime

log = logging.getLogger(__name__)
ROUTE = "/predict"
REQUEST_LINE = b"POST /predict HTTP/1.1"
_REQUEST_LINE_END = REQUEST_LINE + b"\r\n"
PLAIN_HEADERS = frozenset(
    (
        b"host",
        b"content-type",
        b"content-length",
        b"user-agent",
        b"accept",
        b"accept-encoding",
        b"connection",
        b"x-request-id",
        b"authorization",
        b"x-priority",
        b"x-deadline-ms",
        # What proxies, ingresses and tracers add; neither lane reads them.
        b"accept-language",
        b"cache-control",
        b"forwarded",
        b"via",
        b"x-forwarded-for",
        b"x-forwarded-host",
        b"x-forwarded-port",
        b"x-forwarded-proto",
        b"x-real-ip",
        b"x-scheme",
        b"traceparent",
        b"tracestate",
    )
)
_HEADER_LINES = re.compile(rb"(?:[\t -~]*\r\n)*[\t -~]*")  # visible ASCII, spaces and tabs
BUFFER_LIMIT = 256 * 1024
"""Unread bytes held for a connection before it stops being read (it may then hold one read
more: asyncio and uvloop read up to 256 KiB at a time)."""
ANSWERS_PER_CALLBACK = 64
"""Requests one callback takes from a connection's buffer. Answered at once (400, 401, 413,
422, 429), 64 cost the loop a few milliseconds; the rest of a pipelined burst waits for the
next round (call_soon), after what the other connections have to do."""
_CLOSE = "Connection: close\r\n"
_REASONS = {status.value: status.phrase for status in HTTPStatus}
Plain = tuple[int, bytes, str, str | None, str | None, str | None, bool, bool]
"""A plain request: where it ends in the buffer, its body, its x-request-id, Authorization,
x-priority and x-deadline-ms, whether a proxy says it forwards it (Forwarded,
X-Forwarded-For), and whether it is the connection's last (`Connection: close`)."""
EARLY_RETRY_HOLD_S = 1.0
"""The longest a 429 is held back from a connection that came back before its Retry-After.
Each early return in a row doubles the hold (and the Retry-After it is told), from the
queue's drain time up to this: the queue held short (batching.max_queue_wait_s) drains in
~50 ms, and a storm held that long came back ~6,400 times a second and took the model's
CPU (61 % of the polite rate answered here, against 97 % with a doubling hold)."""
DEMOTED_S = 60.0
"""How long a connection that sent a refused request again before its Retry-After, twice in
a row, has its requests queued one priority lower (high as normal, normal as low), unless
it comes back as told first. In a retry storm (512 connections, bench/promises.py) the connections admitted
go on at once after each answer and are never refused again. Not demoted, they kept
normal's share of the queue full and 70 of 200 new clients were refused. Demoted for a
second only after coming back early, most went on at normal priority (new clients waited
182 ms at p99, before fresh requests were ordered sooner). Demoted until they behave,
they fill only low's share, behind the clients that wait as told: 1 of 200 new clients was
refused, and the storm was still answered 200 at 86-95 % of the polite rate."""


class Lane:
    """What the lane reads from the app, looked up once, and its open connections."""

    def __init__(self, app: web.Application, fallback: Callable[[], web_protocol.RequestHandler]) -> None:
        settings = app[SETTINGS]
        server = settings.server
        self.fallback = fallback
        self.models = app[MODELS]
        self.metrics = app[METRICS]
        self.tokens = app[ACCESS].tokens
        self.server = server
        self.log_settings = settings.log
        self.loop = asyncio.get_running_loop()
        self.max_body = min(server.client_max_size_bytes, LARGE_BODY_BYTES - 1)
        self.max_line = server.max_header_bytes
        self.max_headers = server.max_header_count
        self.keepalive_s = server.keepalive_timeout_s
        self.connections: set[Connection] = set()
        self.answered = 0
        """Requests answered in this lane (the tests check that it is taken)."""
        self.most_per_callback = 0
        """The most requests one callback took from a connection's buffer (the tests check the
        budget: answers written in one callback are at most these)."""
        self.most_buffered = 0
        """The most unread bytes one connection held once over BUFFER_LIMIT (0: none was)."""
        self.stopping = False
        self._sweeper: asyncio.TimerHandle | None = None

    def parse(self, buffer: bytes | bytearray, start: int = 0) -> Plain | None:
        """The plain request at `start` in `buffer`, or None (not plain, or not all here)."""
        head_end = buffer.find(b"\r\n\r\n", start)
        if head_end < 0 or not buffer.startswith(_REQUEST_LINE_END, start):
            return None
        block = bytes(buffer[start + len(_REQUEST_LINE_END) : head_end])
        lines = block.split(b"\r\n") if block else []
        if len(lines) > self.max_headers or not _HEADER_LINES.fullmatch(block):
            return None
        length, request_id, authorization, priority, deadline, forwarded, last = -1, "", None, None, None, False, False
        seen: set[bytes] = set()
        for line in lines:
            name, colon, value = line.partition(b":")
            name = name.lower()
            if not colon or name not in PLAIN_HEADERS or name in seen or len(line) > self.max_line:
                return None
            seen.add(name)
            value = value.strip(b" \t")
            if name == b"content-length":
                if not value.isdigit() or len(value) > 12:  # int() refuses over 4,300 digits
                    return None
                length = int(value)
            elif name == b"x-request-id":
                request_id = value.decode("ascii")
            elif name == b"authorization":
                authorization = value.decode("ascii")
            elif name == b"x-priority":
                priority = value.decode("ascii")
            elif name == b"x-deadline-ms":
                deadline = value.decode("ascii")
            elif name == b"x-forwarded-for" or name == b"forwarded":
                forwarded = True
            elif name == b"connection":
                option = value.lower()
                if option == b"close":
                    last = True
                elif option != b"keep-alive":
                    return None
        end = head_end + 4 + length
        if not 0 <= length <= self.max_body or len(buffer) < end or b"host" not in seen:
            return None
        body = bytes(buffer[head_end + 4 : end])
        return end, body, request_id, authorization, priority, deadline, forwarded, last

    def opened(self, connection: Connection) -> None:
        self.connections.add(connection)
        if self._sweeper is None and self.keepalive_s > 0:
            self._sweeper = self.loop.call_later(self._sweep_every_s, self._sweep)

    @property
    def _sweep_every_s(self) -> float:
        return min(1.0, self.keepalive_s / 4)

    def _sweep(self) -> None:
        """Close the connections idle for keepalive_timeout_s (checked a few times a second)."""
        self._sweeper = None
        idle_since = self.loop.time() - self.keepalive_s
        for connection in list(self.connections):
            if connection.idle and connection.idle_since <= idle_since:
                connection.close()
        if self.connections:
            self._sweeper = self.loop.call_later(self._sweep_every_s, self._sweep)

    def pre_shutdown(self) -> None:
        """From now on each connection closes after its answer; idle ones close now."""
        self.stopping = True
        for connection in list(self.connections):
            if connection.idle:
                connection.close()

    async def shutdown(self, timeout_s: float | None) -> None:
        """Give answers still pending up to `timeout_s`, then close every connection."""
        pending = [c.waiting for c in self.connections if c.waiting is not None]
        if pending and timeout_s:
            await asyncio.wait(pending, timeout=timeout_s)
            await asyncio.sleep(0)  # their answers are written by callbacks scheduled just now
        for connection in list(self.connections):
            connection.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None


class Connection(asyncio.Protocol):
    """One client connection while its requests are plain."""

    __slots__ = (
        "answered_at",
        "buffer",
        "closing",
        "demoted_until",
        "early",
        "forwarded",
        "idle_since",
        "lane",
        "last",
        "offset",
        "read_paused",
        "refused_body",
        "refused_until",
        "resuming",
        "transport",
        "waiting",
        "write_paused",
    )

    def __init__(self, lane: Lane) -> None:
        self.lane = lane
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.offset = 0
        """Where the first request not yet taken starts in `buffer`: taking a request moves it,
        copying nothing; what was taken is dropped once per read."""
        self.waiting: asyncio.Future[Any] | None = None
        """The pending prediction (a batcher future, or the cache's task)."""
        self.resuming: asyncio.Handle | None = None
        """The next round of a buffer that had more requests than one callback takes."""
        self.idle_since = 0.0
        self.answered_at = -math.inf
        """Loop time of its last answer: a request after none for FRESH_S is fresh."""
        self.refused_until = 0.0
        """Loop time before which this connection's client was told not to come back (429)."""
        self.refused_body = b""
        """The body of the last request refused on this connection (a retry sends it again)."""
        self.early = 0
        """Times in a row its client sent that body again before its Retry-After."""
        self.demoted_until = 0.0
        """Loop time before which its requests are queued one priority lower (DEMOTED_S)."""
        self.forwarded = False
        self.last = False
        """Its client sent `Connection: close`: closed after this answer, nothing after it read
        (RFC 9112, 9.6)."""
        self.closing = False
        self.write_paused = False
        self.read_paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's does not subclass it
        tcp_keepalive(transport)
        self.idle_since = self.lane.loop.time()
        self.lane.opened(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lane.connections.discard(self)
        self.transport = None
        if self.waiting is not None:
            self.waiting.cancel()  # the batcher skips it and counts it as disconnected

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.serve()

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        if self.offset:
            del buffer[: self.offset]  # what was taken since the last read (CPython: no copy)
            self.offset = 0
        buffer += data
        if len(buffer) > BUFFER_LIMIT:
            self.lane.most_buffered = max(self.lane.most_buffered, len(buffer))
        if self.waiting is None and not self.write_paused and self.resuming is None:
            self.serve()
        if len(self.buffer) - self.offset > BUFFER_LIMIT and self.transport is not None and not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()  # until serve() has taken it back under the limit

    @property
    def idle(self) -> bool:
        """Nothing pending: no answer being computed, no round of the buffer to come."""
        return self.waiting is None and self.resuming is None

    def close(self) -> None:
        if self.transport is not None and not self.closing:
            self.closing = True
            self.transport.close()

    def serve(self, taken: int = 0) -> None:
        """Answer the requests in the buffer, one at a time, while they are plain, and hand
        the connection to aiohttp at the first that is not; after ANSWERS_PER_CALLBACK in
        this callback (`taken` already were), go on in the next round."""
        lane, buffer = self.lane, self.buffer
        while self.waiting is None and not self.write_paused and not self.closing and self.transport is not None:
            if self.offset == len(buffer):
                buffer.clear()
                self.offset = 0
                self.idle_since = lane.loop.time()
                break
            if taken == ANSWERS_PER_CALLBACK:
                if self.resuming is None:
                    self.resuming = lane.loop.call_soon(self.resume)
                break
            plain = lane.parse(buffer, self.offset)
            if plain is None:
                self.hand_over()
                return
            end, body, request_id, authorization, priority, deadline, forwarded, last = plain
            self.offset = end
            taken += 1
            self.forwarded = forwarded
            self.last = last
            self.handle(body, request_id_for(request_id), authorization, priority, deadline)
        if self.read_paused and self.transport is not None and len(buffer) - self.offset <= BUFFER_LIMIT:
            self.read_paused = False
            self.transport.resume_reading()
        if taken > lane.most_per_callback:
            lane.most_per_callback = taken

    def resume(self) -> None:
        self.resuming = None
        self.serve()

    def hand_over(self) -> None:
        """aiohttp takes the connection, and the bytes read so far, for good."""
        transport, buffer = self.transport, bytes(self.buffer[self.offset :])
        assert transport is not None
        self.lane.connections.discard(self)
        self.transport, self.buffer, self.offset = None, bytearray(), 0
        handler = self.lane.fallback()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self.read_paused:
            transport.resume_reading()
        if self.write_paused:
            handler.pause_writing()
        handler.data_received(buffer)

    def handle(
        self, body: bytes, request_id: str, authorization: str | None, priority: str | None, deadline: str | None
    ) -> None:
        """The middleware's and handlers.predict's work, up to the batcher."""
        lane = self.lane
        started = perf_counter()
        try:
            if lane.tokens:
                authorize(lane.tokens, authorization)
            now = lane.loop.time()
            demoted = self.demoted(body, now)
            level = door(priority, demoted)
            lane.models.get().batcher.check_admission(1, level)  # 429 before any parsing
            data = parsed(body, lane.server, batch=False)
            fresh = now - self.answered_at >= FRESH_S
            runtime, request, promise, waiting = start_prediction(
                lane.models, None, data, priority, deadline, started, demoted=demoted, fresh=fresh, checked_at=level
            )
        except Exception as exc:
            self.fail(exc, request_id, started, body)
            return
        self.waiting = waiting
        waiting.add_done_callback(partial(self.finish, runtime, request, promise, request_id, started))

    def demoted(self, body: bytes, now: float) -> bool:
        """Whether this request is queued one priority lower: its connection sent a refused
        request again before its Retry-After after a 429 held for the same (this one, or one
        in the last DEMOTED_S), and has not since sent it after its Retry-After. Once is not
        enough: an open-loop load sent the same text again by chance on a connection within
        its Retry-After (8 times in 8 s at 2x saturation), and demoting those connections for
        a minute refused 47 high-priority requests as normal ones. Requests a proxy says it
        forwards never are."""
        if self.forwarded or not self.refused_until:
            return False  # never refused here
        if body == self.refused_body:
            if now >= self.refused_until:
                self.demoted_until = 0.0  # back as told
            elif self.early:  # early again after a held 429: a retry loop, not a chance repeat
                self.demoted_until = now + DEMOTED_S
        if now < self.demoted_until:
            self.lane.metrics.for_model(self.lane.models.default).demoted.inc()
            return True
        return False

    def finish(
        self,
        runtime: Runtime,
        request: Query,
        promise: Promise,
        request_id: str,
        started: float,
        waiting: asyncio.Future[Any],
    ) -> None:
        self.waiting = None
        if self.transport is None:
            return  # the client hung up; connection_lost cancelled the request
        try:
            if waiting.cancelled():
                raise RuntimeError("prediction cancelled while its client waited")
            outcome = waiting.result()
            result, headers = finish_prediction(
                self.lane.log_settings, request_id, runtime, request, outcome, started, promise
            )
            payload = orjson.dumps(result)
        except Exception as exc:
            self.fail(exc, request_id, started)
        else:
            self.reply(200, payload, headers, request_id, started)
        self.serve(taken=1)

    def fail(self, exc: Exception, request_id: str, started: float, body: bytes | None = None) -> None:
        lane = self.lane
        error = answer_for(exc, lane.metrics, lane.models.default, "POST", ROUTE)
        if error.status == 429 and body is not None:
            now = lane.loop.time()
            again = body == self.refused_body  # the same request again: the same client, not a neighbour
            self.refused_body = body
            held = max(0.0, self.refused_until - now) if again and not self.forwarded else 0.0
            self.early = self.early + 1 if held else 0
            retry_ms = error.headers.get("x-retry-after-ms")
            retry_s = min((int(retry_ms) / 1000 if retry_ms else 1.0) * 2**self.early, EARLY_RETRY_HOLD_S)
            self.refused_until = now + held + retry_s  # counted from when this 429 is written
            if held:
                error.headers = {**error.headers, **retry_headers(retry_s)}
                self.hold(error, request_id, started, held)
                return
        self.reply(error.status, orjson.dumps(error.body()), error.headers, request_id, started, close=error.close)

    def hold(self, error: HTTPError, request_id: str, started: float, seconds: float) -> None:
        """A client that sends the same request again before its Retry-After gets its 429 only
        then: a retry storm's refusals cost the loop (and the model threads under it) a
        refusal per Retry-After per connection, not as many as the clients can send. Clients
        that wait as told, other requests on the same connection (clients a pool or a proxy
        multiplexes), and requests a proxy says it forwards are answered at once."""
        lane = self.lane
        waiting: asyncio.Future[None] = lane.loop.create_future()
        self.waiting = waiting
        lane.metrics.for_model(lane.models.default).held_refusals.inc()
        timer = lane.loop.call_later(seconds, waiting.set_result, None)

        def release(future: asyncio.Future[None]) -> None:
            timer.cancel()
            self.waiting = None
            if self.transport is None or future.cancelled():
                return  # the client hung up meanwhile
            self.reply(error.status, orjson.dumps(error.body()), error.headers, request_id, started)
            self.serve(taken=1)

        waiting.add_done_callback(release)

    def reply(
        self,
        status: int,
        payload: bytes,
        headers: dict[str, str],
        request_id: str,
        started: float,
        *,
        close: bool = False,
    ) -> None:
        """Write the answer as aiohttp would (same headers), then count it as the middleware does."""
        lane = self.lane
        close = close or self.last or lane.stopping or lane.models.stopping
        extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        head = (
            f"HTTP/1.1 {status} {_REASONS[status]}\r\n{extra}Content-Type: application/json\r\n"
            f"x-request-id: {request_id}\r\nContent-Length: {len(payload)}\r\n"
            f"Date: {rfc822_formatted_time()}\r\nServer: {SERVER_SOFTWARE}\r\n{_CLOSE if close else ''}\r\n"
        )
        assert self.transport is not None
        self.transport.write(head.encode() + payload)
        self.answered_at = lane.loop.time()
        count(lane.metrics, ROUTE, status, started, lane.models.default)
        lane.answered += 1
        if close:
            self.close()


class LaneServer:
    """aiohttp's web.Server, whose connections start in the lane (when it is on)."""

    def __init__(self, server: web.Server, lane: Lane | None) -> None:
        self._server = server
        self.lane = lane

    def __call__(self) -> asyncio.Protocol:
        return Connection(self.lane) if self.lane is not None else self._server()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)

    def pre_shutdown(self) -> None:
        self._server.pre_shutdown()
        if self.lane is not None:
            self.lane.pre_shutdown()

    async def shutdown(self, timeout: float | None = None) -> None:  # noqa: ASYNC109  # aiohttp's signature
        """aiohttp's connections and the lane's wait for their answers at the same time, so
        the two waits do not add up to twice `timeout`."""
        lanes = [self.lane.shutdown(timeout)] if self.lane is not None else []
        await asyncio.gather(self._server.shutdown(timeout), *lanes)


class Runner(web.AppRunner):
    """aiohttp's AppRunner, with plain POST /predict requests taking the fast lane."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        lane = None if self.app[SETTINGS].server.access_log else Lane(self.app, server)
        return LaneServer(server, lane)  # type: ignore[return-value]  # what a site needs of a Server
