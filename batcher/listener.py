"""The listening socket: opened for one or several worker processes, and closed at the end
of a drain without resetting a connection.

Closing a listening socket resets every connection the kernel has already accepted into
its backlog: their clients, who have connected and sent a request, see it cut. So before
closing, new connections are stopped at the door (Linux: a socket filter drops a bare SYN,
so the client retries and, a second later, finds the port closed or another worker's
socket), the connections already queued are accepted and answered (503, draining), and
only then is the socket closed.

When accept() fails for one connection (its network failed during the handshake, a
firewall refused it, memory was short), libuv under uvloop 0.23 goes on to the next and
the listener keeps serving: tests/test_listener.py injects each such error into a real
server. Running out of descriptors is the one failure that lasts (`watch_open_files`).
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import os
import resource
import socket
import struct

log = logging.getLogger(__name__)

# Classic BPF, run on each TCP segment reaching the listening socket (data offset 0 is the
# TCP header): drop a SYN without ACK (a new connection), keep everything else (the ACK
# that completes a handshake already under way).
_DROP_NEW_CONNECTIONS = (
    (0x30, 0, 0, 13),  # ldb [13]: the flags byte
    (0x54, 0, 0, 0x12),  # and #SYN|ACK
    (0x15, 0, 1, 0x02),  # jeq #SYN: drop, else keep
    (0x06, 0, 0, 0),  # ret #0: drop
    (0x06, 0, 0, 0xFFFFFFFF),  # ret: keep the whole segment
)
SO_ATTACH_FILTER = getattr(socket, "SO_ATTACH_FILTER", 26)
RELIEVED_SHARE = 0.9  # the open-file limit is "no longer reached" below this share of it
_TCP_INFO_BACKLOG = 24  # struct tcp_info: tcpi_unacked, the accept queue's length on a listener


def open_listener(host: str, port: int, *, backlog: int, reuse_port: bool) -> socket.socket:
    """A bound, listening TCP socket; with `reuse_port`, one of several workers' sockets on
    the same port (SO_REUSEPORT: the kernel spreads new connections over them)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def refuse_new_connections(sock: socket.socket) -> bool:
    """Drop new connections' SYNs from now on (Linux); False where the filter is refused."""
    program = b"".join(struct.pack("HBBI", *instruction) for instruction in _DROP_NEW_CONNECTIONS)
    buffer = ctypes.create_string_buffer(program)
    fprog = struct.pack("HL", len(_DROP_NEW_CONNECTIONS), ctypes.addressof(buffer))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
    except OSError as exc:
        log.debug("cannot filter new connections (%s); closing the listener may reset a few", exc)
        return False
    return True


def backlog(sock: socket.socket) -> int:
    """Connections the kernel has accepted that the server has not yet (0 where unknown)."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    except (OSError, AttributeError):
        return 0
    return int(struct.unpack_from("I", info, _TCP_INFO_BACKLOG)[0])


async def empty_backlog(
    sock: socket.socket, *, timeout_s: float = 2.0, poll_s: float = 0.01, settle_s: float = 0.2
) -> int:
    """Stop new connections and wait until the event loop has accepted every queued one and
    had `settle_s` to read and answer their requests (closing a connection whose request is
    still unread resets it just the same); bounded by `timeout_s`. How many were still
    queued at the end (0: safe to close)."""
    filtered = refuse_new_connections(sock)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        if backlog(sock):
            await asyncio.sleep(poll_s)
            continue
        await asyncio.sleep(settle_s)
        if not filtered or not backlog(sock):
            return backlog(sock)
    return backlog(sock)


async def watch_open_files(sock: socket.socket, *, every_s: float = 1.0) -> None:
    """Say in the log, once a spell, when the process has run out of file descriptors. Then
    libuv (under uvloop) accepts each new connection and closes it at once, with a spare
    descriptor it keeps for that: the loop neither spins on a listener it cannot empty nor
    stops, and the connections already open are served, but nothing else would tell an
    operator why new clients see their connection closed. Checked every `every_s`: a dup()
    of the listening socket fails only while every descriptor is in use."""
    reached = False
    while True:
        await asyncio.sleep(every_s)
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if not reached:
            error = _descriptor_error(sock)
            if error is not None:
                reached = True
                log.warning(
                    "out of file descriptors (%s; limit %d): new connections are closed as soon as they "
                    "are accepted until some close; raise the limit (ulimit -n, LimitNOFILE) or add replicas",
                    error,
                    limit,
                )
        elif _descriptor_error(sock) is None and open_files() < RELIEVED_SHARE * limit:
            reached = False
            log.info("file descriptors: %d open of %d, new connections are served again", open_files(), limit)


def _descriptor_error(sock: socket.socket) -> str | None:
    """Why no descriptor can be opened now (EMFILE, ENFILE), or None when one can."""
    try:
        os.close(os.dup(sock.fileno()))
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            return exc.strerror or errno.errorcode[exc.errno]
    return None


def open_files() -> int:
    """Descriptors this process has open (0 where /proc is not)."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less the one listdir itself opened
    except OSError:
        return 0
