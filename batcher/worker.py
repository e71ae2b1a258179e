"""How a batch runs: the `Model` protocol, padding, the worker threads and their watchdog.

The batcher hands a formed batch to `Worker.run`; a worker thread drops the rows that died
while the batch was staged, tokenizes the rest in one call (the GIL released), pads them
to the batch's longest row, calls the model once, applies the model's output function
(`heads.Head.apply`) and posts a `RunResult` (or the exception) back to the loop.
The worker knows nothing about when batches form; the batcher nothing about how they run.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from batcher.model.heads import activate
from batcher.model.tokenization import Encoded, Text
from batcher.queue import Pending

Encode = Callable[[Sequence[Text]], list[Encoded]]
"""Rows to token ids, one call per batch (`TextEncoder.encode_batch`)."""
Activate = Callable[[np.ndarray], np.ndarray]
"""A batch's scores from its logits (`Head.apply`: softmax, sigmoid or none)."""

log = logging.getLogger(__name__)


class Model(Protocol):
    """What the worker needs from a model: one call per padded batch."""

    provider: str

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray) -> np.ndarray:
        """Logits of shape (rows, labels) for int64 inputs of shape (rows, longest)."""
        ...


@dataclass(frozen=True, slots=True)
class RunResult:
    """One model run's outcome, for the rows of its batch that were still alive."""

    probabilities: np.ndarray
    """The model's output function applied to `logits`."""
    logits: np.ndarray
    """What the graph gave, one row per computed row."""
    rows: list[int]
    """Indices into the batch that were computed (the rest died while staged or failed)."""
    failed: list[int]
    """Indices whose rows failed on their own when a failed batch was retried row by row."""
    unreadable: list[int]
    """Indices whose text the tokenizer dropped whole (no ids): the client's to fix (422)."""
    tokenize_s: float
    """Seconds spent tokenizing rows the loop left untokenized, before the model call (0: none)."""
    started: float
    finished: float
    """perf_counter() at the start and end of the model call."""
    real_tokens: int
    padded_tokens: int


Done = Callable[[list[Pending], "RunResult | BaseException"], None]


def pad_batch(rows: Sequence[Encoded], pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pad rows to the batch's longest: input_ids, attention_mask, token_type_ids (int64)."""
    longest = max(len(row) for row in rows)
    ids = np.full((len(rows), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), longest), dtype=np.int64)
    types = np.zeros((len(rows), longest), dtype=np.int64)
    for index, row in enumerate(rows):
        ids[index, : len(row)] = row.ids
        mask[index, : len(row)] = 1
        types[index, : len(row)] = row.type_ids
    return ids, mask, types


def softmax(logits: np.ndarray) -> np.ndarray:
    return activate(logits, "softmax")


def lower_priority(sched_idle: bool, nice: int) -> None:
    """Put the calling thread under SCHED_IDLE, or else give it a niceness (Linux schedules
    threads: both apply to the calling thread only, and a thread id works as a process id)."""
    if sched_idle and hasattr(os, "sched_setscheduler"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            return
        except OSError:
            log.warning("cannot put the model threads under SCHED_IDLE; falling back to niceness %d", nice)
    if nice and hasattr(os, "setpriority"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        except OSError:
            log.warning("cannot lower the model threads' priority; the event loop may be starved under load")


class Worker:
    """`instances` threads sharing one model, fed from one job queue.

    The threads are daemons: a model run that never returns cannot keep the process from
    exiting (a ThreadPoolExecutor's threads are joined at interpreter exit)."""

    def __init__(
        self,
        model: Model,
        *,
        encode: Encode,
        instances: int,
        pad_id: int,
        num_labels: int,
        activate: Activate = softmax,
        sched_idle: bool = True,
        nice: int = 0,
        lone: Model | None = None,
    ) -> None:
        """`lone`: a model using every core, for a row the batcher says runs alone (the
        model otherwise idle); it runs on a thread of its own at normal priority (its
        intra-op threads spin, and a SCHED_IDLE caller starved behind them: 5 req/s)."""
        self.model = model
        self.lone = lone
        self.encode = encode
        self.activate = activate
        self.instances = instances
        self.pad_id = pad_id
        self._num_labels = num_labels
        self._jobs: queue.SimpleQueue[tuple[list[Pending], Done] | None] = queue.SimpleQueue()
        self._runs_started: dict[int, float] = {}  # thread id -> perf_counter() at run start
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lone_jobs: queue.SimpleQueue[tuple[list[Pending], Done] | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(
                target=self._serve, args=(self._jobs, model, sched_idle, nice), name=f"model-{index}", daemon=True
            )
            for index in range(instances)
        ]
        if lone is not None:
            self._threads.append(
                threading.Thread(
                    target=self._serve, args=(self._lone_jobs, lone, False, 0), name="model-lone", daemon=True
                )
            )
        self._closed = False

    def start(self) -> None:
        """Start the threads; results are posted to the running loop."""
        self._loop = asyncio.get_running_loop()
        for thread in self._threads:
            thread.start()

    def run(self, batch: list[Pending], done: Done, *, lone: bool = False) -> bool:
        """Queue `batch` for the next free thread; `done(batch, result or error)` is called on
        the loop. `lone`: nothing else runs or waits, so the row may run on the lone model.
        Whether it went to the lone model."""
        alone = lone and self.lone is not None
        (self._lone_jobs if alone else self._jobs).put((batch, done))
        return alone

    def longest_run_s(self) -> float:
        """How long the oldest model call still in progress has run (0 when none is)."""
        started = list(self._runs_started.values())
        return time.perf_counter() - min(started) if started else 0.0

    def close(self) -> None:
        """Threads finish the run they are in and exit; queued jobs are dropped. Does not wait."""
        self._closed = True
        for _ in range(self.instances):
            self._jobs.put(None)
        self._lone_jobs.put(None)

    def _serve(
        self, jobs: queue.SimpleQueue[tuple[list[Pending], Done] | None], model: Model, sched_idle: bool, nice: int
    ) -> None:
        lower_priority(sched_idle, nice)
        while (job := jobs.get()) is not None:
            if self._closed:
                continue
            batch, done = job
            outcome: RunResult | BaseException
            try:
                outcome = self.compute(batch, model)
            except Exception as error:
                outcome = error
            assert self._loop is not None
            try:
                self._loop.call_soon_threadsafe(done, batch, outcome)
            except RuntimeError:  # the loop closed while this run was in progress
                return

    def compute(self, batch: list[Pending], model: Model | None = None) -> RunResult:
        """Drop rows that died while staged, tokenize, pad, run the model, activate (on a
        worker thread). A batch whose run fails is retried row by row, so one bad row fails
        alone; when every row fails on its own too, the batch's error is raised."""
        # Reading a future's state from this thread is a single attribute read; a row
        # that dies right after this check is computed and its result discarded.
        alive = [index for index, entry in enumerate(batch) if not entry.future.done()]
        tokenizing = time.perf_counter()
        if not alive:
            return RunResult(self._no_rows(), self._no_rows(), [], [], [], 0.0, tokenizing, tokenizing, 0, 0)
        encoded = {index: row for index in alive if (row := batch[index].text.encoded) is not None}
        pending = [index for index in alive if index not in encoded]  # tokenize_on = "worker"
        if pending:
            encoded.update(zip(pending, self.encode([batch[index].text for index in pending]), strict=True))
        unreadable = [index for index in alive if not encoded[index].ids]
        rows = [index for index in alive if encoded[index].ids]
        started = time.perf_counter()
        tokenize_s = started - tokenizing if pending else 0.0
        if not rows:
            return RunResult(self._no_rows(), self._no_rows(), [], [], unreadable, tokenize_s, started, started, 0, 0)
        try:
            logits, real, padded = self._run([encoded[index] for index in rows], model)
        except Exception:
            if len(rows) == 1:
                raise
            log.warning("model run failed for a batch of %d; retrying its rows one at a time", len(rows))
            result = self._row_by_row(encoded, rows, unreadable, tokenize_s, started)
            if not result.rows:
                raise
            return result
        finished = time.perf_counter()
        probabilities = self.activate(logits)
        return RunResult(probabilities, logits, rows, [], unreadable, tokenize_s, started, finished, real, padded)

    def _no_rows(self) -> np.ndarray:
        return np.empty((0, self._num_labels), np.float32)

    def _row_by_row(
        self, encoded: dict[int, Encoded], rows: list[int], unreadable: list[int], tokenize_s: float, started: float
    ) -> RunResult:
        done: list[int] = []
        failed: list[int] = []
        logits: list[np.ndarray] = []
        real = padded = 0
        for index in rows:
            try:
                row_logits, row_real, row_padded = self._run([encoded[index]])
            except Exception:
                failed.append(index)
                continue
            done.append(index)
            logits.append(row_logits[0])
            real, padded = real + row_real, padded + row_padded
        stacked = np.stack(logits) if logits else self._no_rows()
        finished = time.perf_counter()
        probabilities = self.activate(stacked)
        return RunResult(probabilities, stacked, done, failed, unreadable, tokenize_s, started, finished, real, padded)

    def _run(self, rows: Sequence[Encoded], model: Model | None = None) -> tuple[np.ndarray, int, int]:
        """Logits for `rows` padded to their longest, and the real and padded token counts."""
        ids, mask, types = pad_batch(rows, self.pad_id)
        thread = threading.get_ident()
        self._runs_started[thread] = time.perf_counter()
        try:
            logits = np.asarray((model or self.model).run(ids, mask, types), dtype=np.float32)
        finally:
            del self._runs_started[thread]
        if logits.shape != (len(rows), self._num_labels):
            raise ValueError(f"model returned logits of shape {logits.shape}, expected {(len(rows), self._num_labels)}")
        return logits, int(mask.sum()), mask.size
