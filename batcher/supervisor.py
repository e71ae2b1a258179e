"""Several worker processes on one port (server.workers > 1): start them, restart one that
dies, pass signals on, and exit once every worker has drained.

The parent serves nothing. It makes the directory the workers share their metrics through
(prometheus-client's multiprocess mode, switched on by PROMETHEUS_MULTIPROC_DIR before a
worker imports it: workers are spawned, fresh interpreters) and starts the workers, each
listening on the port with SO_REUSEPORT. A worker that exits unasked is restarted after a
backoff (1 s, doubling up to 30 s; back to 1 s once a worker has run for a minute), logged,
and counted by the new worker in batcher_worker_restarts_total. A worker that cannot start
at all (exit 2: a bad bundle, a port in use) stops the whole server with exit 2. SIGTERM
and SIGINT go to every worker, which drain as one process would; the parent exits 0 once
all have exited 0, and kills what is left after drain_delay_s + shutdown_timeout_s + 10 s.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess

from prometheus_client.multiprocess import mark_process_dead

from batcher.config import Settings
from batcher.metrics import MULTIPROCESS_DIR

log = logging.getLogger("batcher.supervisor")
BACKOFF_S = (1.0, 30.0)
STABLE_AFTER_S = 60.0
EXIT_MARGIN_S = 10.0
CANNOT_START = 2
Target = Callable[[Settings, int, bool], int]


@dataclass
class Slot:
    """One worker's place: its process, when it started, and when to restart it."""

    index: int
    process: BaseProcess | None = None
    started: float = 0.0
    backoff_s: float = BACKOFF_S[0]
    restart_at: float | None = None
    restarts: int = 0


def supervise(settings: Settings, target: Target) -> int:
    """Run `target(settings, index, restarted)` in `server.workers` processes; the exit code."""
    directory = tempfile.mkdtemp(prefix="batcher-metrics-")
    os.environ[MULTIPROCESS_DIR] = directory
    context = multiprocessing.get_context("spawn")
    slots = [Slot(index) for index in range(settings.server.workers)]
    stopping: list[signal.Signals] = []

    def on_signal(signum: int, frame: object) -> None:
        if signum == signal.SIGHUP:
            for slot in slots:
                _send(slot, signal.SIGHUP)
        elif not stopping:
            stopping.append(signal.Signals(signum))

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_signal)

    def start(slot: Slot) -> None:
        slot.process = context.Process(
            target=_worker, args=(target, settings, slot.index, slot.restarts > 0), name=f"batcher-worker-{slot.index}"
        )
        slot.process.start()
        slot.started, slot.restart_at = time.monotonic(), None
        log.info("worker %d started (pid %d)", slot.index, slot.process.pid)

    try:
        for slot in slots:
            start(slot)
        code = _watch(slots, start, stopping)
        if stopping:
            code = max(code, _stop(slots, stopping[0], settings))
        return code
    finally:
        for slot in slots:
            _send(slot, signal.SIGKILL)
        shutil.rmtree(directory, ignore_errors=True)


def _watch(slots: list[Slot], start: Callable[[Slot], None], stopping: list[signal.Signals]) -> int:
    """Restart workers that die until a signal asks to stop (0), or one cannot start (2)."""
    while not stopping:
        alive = [slot.process.sentinel for slot in slots if slot.process is not None and slot.process.is_alive()]
        wait(alive, timeout=0.2)
        now = time.monotonic()
        for slot in slots:
            if slot.process is not None and not slot.process.is_alive() and not stopping:
                code = _reap(slot)
                if code == CANNOT_START and slot.restarts == 0:
                    log.error("worker %d could not start (exit %d): stopping the server", slot.index, code)
                    stopping.append(signal.SIGTERM)
                    return CANNOT_START
                if now - slot.started > STABLE_AFTER_S:
                    slot.backoff_s = BACKOFF_S[0]
                slot.restart_at = now + slot.backoff_s
                log.warning(
                    "worker %d exited unasked (code %s); restarting in %.0f s", slot.index, code, slot.backoff_s
                )
                slot.backoff_s = min(2 * slot.backoff_s, BACKOFF_S[1])
            if slot.restart_at is not None and now >= slot.restart_at and not stopping:
                slot.restarts += 1
                start(slot)
    return 0


def _stop(slots: list[Slot], signum: signal.Signals, settings: Settings) -> int:
    """Pass the signal on, wait for every worker to drain; 0 when all exited 0."""
    log.info("%s: stopping %d workers", signum.name, sum(slot.process is not None for slot in slots))
    for slot in slots:
        _send(slot, signal.SIGTERM)
    server = settings.server
    deadline = time.monotonic() + server.drain_delay_s + server.shutdown_timeout_s + EXIT_MARGIN_S
    code = 0
    for slot in slots:
        if slot.process is None:
            continue
        slot.process.join(max(0.0, deadline - time.monotonic()))
        if slot.process.is_alive():
            log.error("worker %d did not exit in time; killing it", slot.index)
            slot.process.kill()
            slot.process.join()
        exit_code = _reap(slot)
        code = code if exit_code == 0 else 1
    return code


def _reap(slot: Slot) -> int | None:
    """The exit code of a worker that has exited; its live gauges leave the metrics."""
    assert slot.process is not None
    code = slot.process.exitcode
    if slot.process.pid is not None:
        mark_process_dead(slot.process.pid)  # type: ignore[no-untyped-call]
    slot.process.close()
    slot.process = None
    return code


def _send(slot: Slot, signum: signal.Signals) -> None:
    if slot.process is not None and slot.process.pid is not None and slot.process.is_alive():
        with contextlib.suppress(ProcessLookupError):
            os.kill(slot.process.pid, signum)


def _worker(target: Target, settings: Settings, index: int, restarted: bool) -> None:
    """A worker's first steps: die with the parent (Linux), then run the server."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: a killed parent stops its workers
    sys.exit(target(settings, index, restarted))
