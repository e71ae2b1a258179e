"""A minimal HTTP/1.1 client for the load itself: keep-alive connections in a pool,
pre-built request bytes, and a response parser that reads only the status line and
Content-Length. It costs the generator a fraction of what a general client does, so on a
small machine the generator, not the server, is less likely to be what is measured.
Anything it does not understand (chunked bodies, a closed connection) is an error, never
a guess."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from typing import NamedTuple, cast

HEAD_END = b"\r\n\r\n"


class Reply(NamedTuple):
    """A whole answer, for the load modes that read more than the status (loadtest/modes.py)."""

    status: int
    head: bytes
    """The status line and headers, lower-cased."""
    body: bytes

    def header(self, name: str) -> str | None:
        """A header's value (lower-cased, stripped), or None when absent."""
        key = b"\r\n" + name.lower().encode() + b":"
        start = self.head.find(key)
        if start < 0:
            return None
        start += len(key)
        stop = self.head.find(b"\r\n", start)
        return self.head[start : stop if stop >= 0 else len(self.head)].strip().decode("latin-1")


class ProtocolError(ConnectionError):
    """The server's answer could not be read."""


class Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, bool, bytes, bytes]] | None = None
        self.detail = False
        """Keep the answer's head and body (`HttpClient.exchange`), not only its status."""
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(ConnectionError("connection closed by the server"))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.waiter is None or self.waiter.done():
            return
        end = self.buffer.find(HEAD_END)
        if end < 0:
            return
        head = bytes(self.buffer[:end]).lower()
        try:
            status = int(head[9:12])
            start = head.find(b"\r\ncontent-length:")
            if start < 0 or b"transfer-encoding: chunked" in head:
                raise ValueError("no Content-Length")
            stop = head.find(b"\r\n", start + 2)
            length = int(head[start + 17 : stop if stop > 0 else len(head)])
        except ValueError as exc:
            self._fail(ProtocolError(f"unreadable response: {exc}"))
            return
        total = end + len(HEAD_END) + length
        if len(self.buffer) < total:
            return
        body = bytes(self.buffer[end + len(HEAD_END) : total]) if self.detail else b""
        del self.buffer[:total]
        self.waiter.set_result((status, b"\r\nconnection: close" not in head, head if self.detail else b"", body))

    def _fail(self, error: Exception) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(error)
        if self.transport is not None:
            self.transport.close()


class HttpClient:
    """POSTs over a pool of at most `max_connections` keep-alive connections to host:port;
    with `fresh_connections`, a new connection for every request (`Connection: close`)."""

    def __init__(self, host: str, port: int, *, max_connections: int = 8192, fresh_connections: bool = False) -> None:
        self.host, self.port = host, port
        self.fresh_connections = fresh_connections
        self.max_connections = max_connections
        self.idle: list[Connection] = []
        self.open = 0
        self.waiting: deque[asyncio.Future[Connection]] = deque()
        self.all: set[Connection] = set()
        self._tasks: set[asyncio.Future[None]] = set()

    def request(self, path: str, body: bytes, headers: Sequence[tuple[str, str]] = ()) -> bytes:
        """The bytes of one POST (build once, send many times), with any extra `headers`."""
        close = "Connection: close\r\n" if self.fresh_connections else ""
        extra = "".join(f"{name}: {value}\r\n" for name, value in headers)
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n{close}{extra}"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body

    async def send(self, request: bytes, timeout_s: float) -> int:
        """Send pre-built request bytes; the response status. Raises TimeoutError or ConnectionError."""
        return (await self._round_trip(request, timeout_s, detail=False))[0]

    async def exchange(self, request: bytes, timeout_s: float) -> Reply:
        """Send pre-built request bytes; the whole answer (status, head, body). Raises as `send`."""
        status, head, body = await self._round_trip(request, timeout_s, detail=True)
        return Reply(status, head, body)

    async def _round_trip(self, request: bytes, timeout_s: float, *, detail: bool) -> tuple[int, bytes, bytes]:
        loop = asyncio.get_running_loop()
        connection = await self._acquire()
        waiter: asyncio.Future[tuple[int, bool, bytes, bytes]] = loop.create_future()
        connection.waiter = waiter
        connection.detail = detail
        timer = loop.call_later(timeout_s, _expire, waiter)
        assert connection.transport is not None
        connection.transport.write(request)
        try:
            status, keep_alive, head, body = await waiter
        except BaseException:
            self._discard(connection)
            raise
        finally:
            timer.cancel()
            connection.waiter = None
        if keep_alive and not connection.closed:
            self._release(connection)
        else:
            self._discard(connection)
        return status, head, body

    async def close(self) -> None:
        for connection in list(self.all):
            if connection.transport is not None:
                connection.transport.close()
        self.idle.clear()
        await asyncio.sleep(0)

    async def _acquire(self) -> Connection:
        while self.idle:
            connection = self.idle.pop()
            if not connection.closed:
                return connection
            self._discard(connection)
        if self.open < self.max_connections:
            self.open += 1
            try:
                _, connection = await asyncio.get_running_loop().create_connection(Connection, self.host, self.port)
            except BaseException:
                self.open -= 1
                raise
            self.all.add(connection)
            return connection
        slot: asyncio.Future[Connection] = asyncio.get_running_loop().create_future()
        self.waiting.append(slot)
        return await slot

    def _release(self, connection: Connection) -> None:
        while self.waiting:
            slot = self.waiting.popleft()
            if not slot.done():
                slot.set_result(connection)
                return
        self.idle.append(connection)

    def _discard(self, connection: Connection) -> None:
        if connection.transport is not None:
            connection.transport.close()
        if connection in self.all:
            self.all.discard(connection)
            self.open -= 1
            if self.waiting:  # a freed slot: let one waiter open a new connection
                slot = self.waiting.popleft()
                if not slot.done():
                    task = asyncio.ensure_future(self._hand_over(slot))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)

    async def _hand_over(self, slot: asyncio.Future[Connection]) -> None:
        try:
            connection = await self._acquire()
        except BaseException as exc:
            if not slot.done():
                slot.set_exception(exc)
            return
        if slot.done():
            self._release(connection)
        else:
            slot.set_result(connection)


def _expire(waiter: asyncio.Future[tuple[int, bool, bytes, bytes]]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())
