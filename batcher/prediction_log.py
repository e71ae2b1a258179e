"""The prediction log's file (`log.predictions_file`): one JSON line a record, appended with
one write, and reopened when logrotate moves the file (as logging's WatchedFileHandler).

A line that cannot be written (the disk full, the file or its directory read-only, its
mount gone) is dropped and counted, never raised into the request that logged it: the
answer matters more than its log line. logging's own handlers print a traceback to stderr
for every such line, and WatchedFileHandler lets the error of a failed reopen escape into
the caller. Here the first failure is one warning in the server's log, naming the file and
the error; the next comes only after a line was written again (said at info, with how many
were dropped meanwhile). The count is `batcher_prediction_log_dropped_total`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Callable
from pathlib import Path

LOGGER = "batcher.predictions"
log = logging.getLogger("batcher")
_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC


class PredictionLogHandler(logging.Handler):
    """Appends each record's message as one line to `path`; `on_drop` counts a dropped one."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = os.fspath(path)
        self.dropped = 0
        self.on_drop: Callable[[], None] | None = None
        self._fd: int | None = None
        self._identity = (-1, -1)  # (device, inode) of the open file
        self._failing = False
        self._dropped_in_spell = 0
        self._broken_line = False  # a short write left a line without its end
        self._open()  # at start-up a path that cannot be opened is an error of the settings: raise

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = (self.format(record) + "\n").encode("utf-8")
            self._write(b"\n" + line if self._broken_line else line)
        except Exception as exc:  # an OSError, or a record that does not format: never the caller's problem
            self._drop(exc)
            return
        if self._failing:
            self._failing = False
            log.info("prediction log %s: written again, %d lines dropped meanwhile", self.path, self._dropped_in_spell)

    def close(self) -> None:
        self.acquire()
        try:
            self._close_fd()
        finally:
            self.release()
        super().close()

    def _write(self, line: bytes) -> None:
        fd = self._current()
        written = os.write(fd, line)
        self._broken_line = 0 < written < len(line)
        if written < len(line):
            raise OSError(errno.ENOSPC, f"wrote {written} of {len(line)} bytes")

    def _current(self) -> int:
        """The open file, reopened when the path no longer names it (rotated, or its mount changed)."""
        try:
            found = os.stat(self.path)
            same = (found.st_dev, found.st_ino) == self._identity
        except OSError:
            same = False
        if self._fd is None or not same:
            self._close_fd()
            self._open()
        assert self._fd is not None
        return self._fd

    def _open(self) -> None:
        self._fd = os.open(self.path, _FLAGS, 0o644)
        opened = os.fstat(self._fd)
        self._identity = (opened.st_dev, opened.st_ino)

    def _close_fd(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.close(fd)

    def _drop(self, error: Exception) -> None:
        self.dropped += 1
        self._dropped_in_spell += 1
        if self.on_drop is not None:
            self.on_drop()
        if not self._failing:
            self._failing = True
            self._dropped_in_spell = 1
            reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
            log.warning(
                "prediction log %s: cannot write (%s); its lines are dropped until it can, "
                "counted in batcher_prediction_log_dropped_total",
                self.path,
                reason,
            )


def count_drops(inc: Callable[[float], None]) -> None:
    """Count the prediction log's dropped lines with `inc` (a counter's inc), from now on and
    those already dropped."""
    for handler in logging.getLogger(LOGGER).handlers:
        if isinstance(handler, PredictionLogHandler):
            if handler.dropped:
                inc(handler.dropped)
            handler.on_drop = lambda: inc(1)
