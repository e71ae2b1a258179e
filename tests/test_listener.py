"""batcher.listener: running out of file descriptors is said once in the log, and again only
after the process had room again; a real server at its limit neither spins nor stops; and
one whose accept() fails (injected) keeps serving."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from batcher.listener import open_listener, watch_open_files
from bench.servers import free_port
from tests.processes import finish, start, wait_ready


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = open_listener("127.0.0.1", 0, backlog=8, reuse_port=False)
    yield sock
    sock.close()


async def test_running_out_of_descriptors_is_one_warning_until_there_is_room_again(
    listener: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="batcher.listener")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    watch = asyncio.ensure_future(watch_open_files(listener, every_s=0.01))
    lowest_free = os.dup(0)
    os.close(lowest_free)
    try:
        # No descriptor left: the lowest free one is at the limit (restored before anything else runs).
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
        await asyncio.sleep(0.1)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    await asyncio.sleep(0.1)
    watch.cancel()
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    reached = [m for level, m in messages if level == logging.WARNING]
    assert len(reached) == 1 and f"limit {lowest_free}" in reached[0] and "Too many open files" in reached[0]
    assert any(level == logging.INFO and "new connections are served again" in m for level, m in messages)


def loop_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


LIMIT = 64


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the loop's CPU from /proc")
def test_a_server_at_its_descriptor_limit_serves_what_it_accepted_and_recovers(tiny_bundle: Path) -> None:
    port = free_port()
    limit = f"import os, resource as r, sys; r.setrlimit(r.RLIMIT_NOFILE, ({LIMIT}, {LIMIT}))"
    args = [sys.executable, "-c", f"{limit}; os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"]
    args += ["app.py", "--host", "127.0.0.1", "--port", str(port), "--set", f'model.path="{tiny_bundle}"']
    process = subprocess.Popen(
        [*args, "--set", "model.warmup_runs=1"],
        cwd=Path(__file__).resolve().parent.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    clients: list[socket.socket] = []
    try:
        wait_ready(process, f"http://127.0.0.1:{port}")
        answered = 0
        for _ in range(LIMIT + 20):  # more than it may hold
            client = socket.create_connection(("127.0.0.1", port), timeout=2)
            clients.append(client)
            try:
                client.sendall(request)
                answered += client.recv(64).startswith(b"HTTP/1.1 200")
            except OSError:
                pass  # closed at once: one it could not accept
        assert 0 < answered < LIMIT
        spent = loop_cpu_s(process.pid)
        time.sleep(1.5)  # the queue of connections it cannot take must not keep the loop busy
        assert loop_cpu_s(process.pid) - spent < 0.3
        for client in clients:
            client.close()
        time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", port), timeout=2) as fresh:
            fresh.sendall(request)
            assert fresh.recv(64).startswith(b"HTTP/1.1 200")
    finally:
        for client in clients:
            client.close()
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    assert process.returncode == 0 and "Traceback" not in output, output
    assert output.count("out of file descriptors") == 1, output


FAULTS = Path(__file__).resolve().parent / "faults"
ACCEPT_ERRORS = (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EPROTO, errno.EPERM, errno.ENOBUFS, errno.ENOMEM)
"""What accept() may return on Linux besides running out of descriptors (accept(2)): a
connection whose network failed during its handshake, a firewall's refusal, short memory."""


@pytest.fixture
def fail_accept(tmp_path: Path) -> Path:
    """tests/faults/fail_accept.c built into a library for LD_PRELOAD."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("needs a C compiler to build the accept() fault injector (.ci/run installs gcc)")
    library = tmp_path / "fail_accept.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-o", library, FAULTS / "fail_accept.c", "-ldl"], check=True)
    return library


def test_a_failed_accept_leaves_the_listener_serving(tiny_bundle: Path, fail_accept: Path, tmp_path: Path) -> None:
    """A real server whose accept() fails once with each error the kernel may give (injected
    with LD_PRELOAD) still answers the connection that was waiting and every one after: the
    listener is neither closed nor left unread, and nothing is logged as a crash."""
    trigger = tmp_path / "fail-next-accept"
    process, url = start(tiny_bundle, env={"LD_PRELOAD": str(fail_accept), "FAULT_ACCEPT_FILE": str(trigger)})
    port = int(url.rsplit(":", 1)[1])
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"

    def answered() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as client:
            client.sendall(request)
            return client.recv(64).startswith(b"HTTP/1.1 200")

    try:
        wait_ready(process, url)
        for code in ACCEPT_ERRORS:
            trigger.write_text(str(code))
            assert answered(), errno.errorcode[code]  # the connection whose accept failed
            assert not trigger.exists(), f"{errno.errorcode[code]} was not injected"
            assert answered(), errno.errorcode[code]  # and the next
    finally:
        process.send_signal(signal.SIGTERM)
        returncode, output = finish(process, 30)
    assert returncode == 0 and "Traceback" not in output, output
    assert [f"fault: accept4 fails with errno {code}" in output for code in ACCEPT_ERRORS] == [True] * len(
        ACCEPT_ERRORS
    )
