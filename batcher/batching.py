"""The batcher: admits requests, forms batches, runs the model off the loop, resolves futures.

Data flow: `submit` (on the loop) pushes a `Pending` onto the bounded queue and returns its
future. The batcher coroutine only decides *when* to form a batch; `take_batch` (pure)
decides *which* requests; padding, the ONNX Runtime call and the softmax run on a worker
thread. When a run finishes the loop first wakes the batcher (so the next batch is handed
over before anything else) and then resolves the run's futures.

Timing policy:
- a free model instance takes a batch at once when a full batch is queued; otherwise it
  waits up to `max_wait_ms` from the oldest request's admission, but only while another
  arrival is expected within that window (an EWMA of inter-arrival gaps) and recent waits
  actually found company (an EWMA of their outcome, probed now and then), so a lone
  client does not wait for company that is not coming;
- while every instance is busy, one extra *full* batch is handed to the worker pool, so
  the model starts it the moment it frees instead of waiting for the loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import numpy as np

from batcher.config import BatchingSettings
from batcher.errors import DeadlineExceeded, Draining, HTTPError, InternalError, ModelFailed, NotReady, QueueFull
from batcher.metrics import Metrics
from batcher.model import Model
from batcher.queue import BatchLimits, Pending, RequestQueue, take_batch
from batcher.tokenization import Encoded

log = logging.getLogger(__name__)

GAP_EWMA_WEIGHT = 0.2
# Waiting for company stops paying when recent waits found none (a lone closed-loop client:
# its next request only comes after this one is answered, however short the gaps look).
# One decision in COMPANY_PROBE_EVERY still waits, to notice when traffic returns.
COMPANY_EWMA_WEIGHT = 0.25
COMPANY_THRESHOLD = 0.3
COMPANY_PROBE_EVERY = 16


@dataclass(frozen=True, slots=True)
class Prediction:
    """One request's share of a model run."""

    probabilities: np.ndarray
    intent_id: int
    confidence: float
    inference_ms: float
    queue_ms: float
    batch_size: int


@dataclass(frozen=True, slots=True)
class RunResult:
    probabilities: np.ndarray
    rows: list[int]
    """Indices into the batch that were computed (the rest died while staged)."""
    started: float
    finished: float
    real_tokens: int
    padded_tokens: int


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


def _lower_priority(sched_idle: bool, nice: int) -> None:
    """Worker-thread initializer (Linux): SCHED_IDLE, or else a niceness. Both apply to the
    calling thread only (Linux schedules threads; a thread id works as a process id)."""
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


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    result: np.ndarray = shifted / shifted.sum(axis=1, keepdims=True)
    return result


class Batcher:
    """Owns the queue, the batch loop and the model worker threads."""

    def __init__(
        self, model: Model, *, settings: BatchingSettings, metrics: Metrics, pad_id: int, num_labels: int
    ) -> None:
        self._model = model
        self._settings = settings
        self._metrics = metrics
        self._pad_id = pad_id
        self._num_labels = num_labels
        self._limits = BatchLimits(settings.max_batch_size, settings.max_batch_tokens)
        self._queue = RequestQueue(settings.max_queue_size)
        self._executor = ThreadPoolExecutor(
            max_workers=settings.instances,
            thread_name_prefix="model",
            initializer=_lower_priority,
            initargs=(settings.worker_sched_idle, settings.worker_nice),
        )
        self._max_wait_s = settings.max_wait_ms / 1000
        self._timeout_s = settings.request_timeout_ms / 1000
        self._inflight = 0
        self._gap_ewma_s = math.inf
        self._company = 1.0  # EWMA: share of recent waits that ended with more than one request
        self._decisions = 0
        self._waited_for: Pending | None = None
        self._last_arrival = -math.inf
        self._waker: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._runs_started: dict[int, float] = {}  # worker thread id -> perf_counter at run start
        self.accepting = False
        self.last_run_failed = False
        self.crashed = False
        metrics.queue_capacity.set(settings.max_queue_size)

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def stalled(self) -> bool:
        """A model run has taken longer than request_timeout_ms: the model hangs (watchdog)."""
        now = time.perf_counter()
        return any(now - started > self._timeout_s for started in list(self._runs_started.values()))

    @property
    def unanswered(self) -> int:
        """Requests queued plus batches in flight (a drain waits for both to reach zero)."""
        return len(self._queue) + self._inflight

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._supervise(), name="batcher")
        self.accepting = True

    def check_admission(self, rows: int = 1) -> None:
        """Refuse (429) before any parsing when the queue cannot take `rows` more: under
        overload the refusal must cost the loop as little as possible."""
        try:
            self._queue.check_room(rows)
        except QueueFull:
            self._metrics.rejected.labels("queue_full").inc()
            raise

    def submit(self, encoded: Encoded) -> asyncio.Future[Prediction]:
        """Admit one request; its future resolves to a Prediction or fails with an HTTPError."""
        if not self.accepting:
            raise Draining()
        if not self.alive:
            self._metrics.rejected.labels("not_ready").inc()
            raise NotReady("the batcher is not running")
        self.check_admission()
        loop = asyncio.get_running_loop()
        now = loop.time()
        entry = Pending(encoded, now, now + self._timeout_s, loop.create_future(), time.perf_counter())
        self._queue.push(entry)  # fits: checked just above, on this same thread
        entry.timer = loop.call_at(entry.deadline, self._expire, entry)
        gap = entry.admitted - self._last_arrival
        self._last_arrival = entry.admitted
        self._gap_ewma_s = (
            gap if math.isinf(self._gap_ewma_s) else (GAP_EWMA_WEIGHT * gap + (1 - GAP_EWMA_WEIGHT) * self._gap_ewma_s)
        )
        self._metrics.queue_depth.set(len(self._queue))
        self._wake()
        return entry.future

    async def close(self, timeout_s: float) -> None:
        """Stop admitting, answer everything admitted (within `timeout_s`), stop the workers."""
        self.accepting = False
        self._closing = True
        self._wake()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
            except TimeoutError:
                log.error("drain timed out after %.1f s with %d requests unanswered", timeout_s, self.unanswered)
                self._task.cancel()
                self._fail_queued(Draining("server shut down before this request could run"))
        self._executor.shutdown(wait=False, cancel_futures=True)

    # The loop ------------------------------------------------------------------

    async def _supervise(self) -> None:
        try:
            await self._run()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("batcher loop crashed; the server reports itself not ready")
            self.crashed = True
            self._fail_queued(InternalError())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            wait_s = self._next_wait(now)
            if wait_s is None:
                self._dispatch(now)
                continue
            if self._closing and not self._queue and self._inflight == 0:
                return
            await self._sleep(wait_s)

    def _next_wait(self, now: float) -> float | None:
        """None: form a batch now. Otherwise how long to sleep (inf: until woken)."""
        if not self._queue:
            return math.inf
        full = self._queue.full_batch_waiting(self._limits)
        if self._inflight >= self._settings.instances:
            staged = self._inflight - self._settings.instances
            return None if full and staged == 0 else math.inf
        if full or self._closing or self._max_wait_s <= 0:
            return None
        oldest = self._queue.oldest_enqueued_at()
        remaining = (oldest if oldest is not None else now) + self._max_wait_s - now
        if remaining <= 0 or self._gap_ewma_s >= remaining:
            return None
        if self._waited_for is None:  # deciding afresh whether this request waits
            self._decisions += 1
            if self._company < COMPANY_THRESHOLD and self._decisions % COMPANY_PROBE_EVERY:
                return None
            self._waited_for = self._queue.pending[0]
        return remaining

    def _dispatch(self, now: float) -> None:
        waited = len(self._queue) > 1 if self._waited_for is not None else None
        self._waited_for = None
        if waited is not None:  # did waiting bring company? (a lone closed-loop client never gets any)
            self._company += COMPANY_EWMA_WEIGHT * (waited - self._company)
        selection = take_batch(self._queue.pending, self._limits, now)
        for entry in selection.dropped:
            self._settle(entry)
            if entry.future.cancelled():
                self._metrics.rejected.labels("disconnected").inc()
        for entry in selection.expired:
            self._metrics.rejected.labels("deadline").inc()
            self._settle(entry, error=DeadlineExceeded())
        self._metrics.queue_depth.set(len(self._queue))
        if not selection.batch:
            return
        self._inflight += 1
        self._metrics.inflight_batches.set(self._inflight)
        future = asyncio.get_running_loop().run_in_executor(self._executor, self._compute, selection.batch)
        future.add_done_callback(partial(self._finish, selection.batch))

    def _compute(self, batch: list[Pending]) -> RunResult:
        """Worker thread: drop rows that died while staged, pad, run the model, softmax."""
        # Reading a future's state from this thread is a single attribute read; a row
        # that dies right after this check is computed and its result discarded.
        rows = [index for index, entry in enumerate(batch) if not entry.future.done()]
        started = time.perf_counter()
        if not rows:
            return RunResult(np.empty((0, self._num_labels), np.float32), rows, started, started, 0, 0)
        ids, mask, types = pad_batch([batch[index].encoded for index in rows], self._pad_id)
        thread = threading.get_ident()
        self._runs_started[thread] = started
        try:
            logits = np.asarray(self._model.run(ids, mask, types), dtype=np.float32)
        finally:
            del self._runs_started[thread]
        if logits.shape != (len(rows), self._num_labels):
            raise ValueError(f"model returned logits of shape {logits.shape}, expected {(len(rows), self._num_labels)}")
        real = int(mask.sum())
        return RunResult(softmax(logits), rows, started, time.perf_counter(), real, mask.size)

    def _finish(self, batch: list[Pending], future: asyncio.Future[RunResult]) -> None:
        self._inflight -= 1
        self._metrics.inflight_batches.set(self._inflight)
        self._wake()
        if future.cancelled():
            return
        error = future.exception()
        if error is not None:
            log.error("model run failed for a batch of %d", len(batch), exc_info=error)
            self.last_run_failed = True
            self._metrics.rejected.labels("model_error").inc(len(batch))
            for entry in batch:
                self._settle(entry, error=ModelFailed())
            return
        self.last_run_failed = False
        self._record(batch, future.result())

    def _record(self, batch: list[Pending], run: RunResult) -> None:
        metrics = self._metrics
        computed = set(run.rows)
        skipped = [entry for index, entry in enumerate(batch) if index not in computed]
        metrics.rejected.labels("disconnected").inc(sum(entry.future.cancelled() for entry in skipped))
        if not run.rows:
            return
        seconds = run.finished - run.started
        metrics.inference.observe(seconds)
        metrics.model_busy.inc(seconds)
        metrics.batch_size.observe(len(run.rows))
        metrics.padding_ratio.observe(1 - run.real_tokens / run.padded_tokens)
        metrics.batch_tokens.labels("real").inc(run.real_tokens)
        metrics.batch_tokens.labels("padding").inc(run.padded_tokens - run.real_tokens)
        best = run.probabilities.argmax(axis=1).tolist()
        inference_ms = seconds * 1000
        for position, index in enumerate(run.rows):
            entry = batch[index]
            queue_s = max(0.0, run.started - entry.admitted)
            metrics.queue_wait.observe(queue_s)
            intent = best[position]
            probabilities = run.probabilities[position]
            prediction = Prediction(
                probabilities, intent, float(probabilities[intent]), inference_ms, queue_s * 1000, len(run.rows)
            )
            self._settle(entry, result=prediction)

    # Helpers -------------------------------------------------------------------

    def _settle(self, entry: Pending, *, result: Prediction | None = None, error: HTTPError | None = None) -> None:
        if entry.timer is not None:
            entry.timer.cancel()
        if entry.future.done():
            return
        if error is not None:
            entry.future.set_exception(error)
        else:
            entry.future.set_result(result)

    def _expire(self, entry: Pending) -> None:
        """Deadline timer: answer 504 now, whether the request is queued or in a run."""
        if not entry.future.done():
            self._metrics.rejected.labels("deadline").inc()
            entry.future.set_exception(DeadlineExceeded())

    def _fail_queued(self, error: HTTPError) -> None:
        while self._queue.pending:
            self._settle(self._queue.pending.popleft(), error=error)
        self._metrics.queue_depth.set(0)

    def _wake(self) -> None:
        if self._waker is not None and not self._waker.done():
            self._waker.set_result(None)

    async def _sleep(self, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        self._waker = loop.create_future()
        timer = None if math.isinf(timeout_s) else loop.call_later(timeout_s, self._wake)
        try:
            await self._waker
        finally:
            if timer is not None:
                timer.cancel()
            self._waker = None
