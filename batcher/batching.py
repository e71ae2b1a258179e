"""The batcher: admits requests, forms batches when the policy says so, settles their futures.

Data flow: `submit` (on the loop) pushes a `Pending` onto the bounded queue and returns its
future. The batcher coroutine asks the `WaitPolicy` *when* to form a batch; the queue's
`take` (pure `take_batch`) decides *which* requests; the `Worker` runs it off the loop.
When a run finishes the loop first wakes the batcher (so the next batch is handed over
before anything else) and then settles the run's futures: each is resolved with its
`Prediction` or failed with an `HTTPError`.

Deadlines: a request's deadline is the server's timeout, or the client's own when sooner
(batcher/promises.py). One timer serves them all, over a heap of deadlines: it fires at the
earliest unanswered request's deadline, answers 504 to every request whose deadline has
passed, and is set again for the next (no timer per request to make and cancel). A request
that the model's measured pace says cannot be answered in time is refused at admission
(429 `predicted_late`); one whose deadline would pass during its run is not computed.
Refusals carry `Retry-After` computed from the time the queue takes to drain.

After a failed run the batcher reports itself unready (a load balancer stops sending) and
probes the model with a warm-up row until a run succeeds again, so readiness comes back
without traffic.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import time
from dataclasses import dataclass

import numpy as np

from batcher.config import BatchingSettings
from batcher.errors import (
    DeadlineExceeded,
    Draining,
    HTTPError,
    InternalError,
    ModelFailed,
    NotReady,
    PayloadTooLarge,
    PredictedLate,
    QueueFull,
    ValidationFailed,
)
from batcher.metrics import ModelMetrics
from batcher.model.tokenization import UNREADABLE, Text
from batcher.policy import NOW, QueueState, WaitPolicy
from batcher.promises import PLAIN, Pace, Promise, retry_headers
from batcher.queue import BatchLimits, Pending, RequestQueue
from batcher.worker import Model, RunResult, Worker

log = logging.getLogger(__name__)
PROBE_DELAY_S = 0.5
"""After a failed run, the first probe of the model; each failed probe doubles the delay."""
PROBE_MAX_DELAY_S = 30.0
STANDING_GRACE_S = 0.5
"""How long the queue may stand above `batching.max_queue_wait_s` of work before requests
past it are refused: at 70 % load a slow moment of the shared machine refused 65 requests
in a 10-minute soak when the bound applied at once."""
STANDING_RELEASE_S = 1.0
"""How long the queue must stay below that bound before it is let stand again: a retry
storm's queue dips between waves, and a bound released at each dip let new clients wait
~0.25 s at p99 where ~0.17 s when it held."""


@dataclass(frozen=True, slots=True)
class Prediction:
    """One request's share of a model run."""

    probabilities: np.ndarray
    """The model's output function applied to its logits."""
    intent_id: int
    confidence: float
    inference_ms: float
    queue_ms: float
    batch_size: int
    cached: bool = False
    """Answered from the response cache: no queue, no model run (times and batch size 0)."""
    logits: np.ndarray | None = None
    """What the graph gave for the row (for a request's own output function)."""


class Twins:
    """One waiting row and the clients that share it (batching.coalesce). The row's own future
    belongs to no client: it settles every client's, and is cancelled (skipped when a batch
    is formed) only when every client has gone."""

    __slots__ = ("clients", "entry", "key", "table")

    def __init__(self, entry: Pending, key: object, table: dict[object, Twins]) -> None:
        self.entry = entry
        self.key = key
        self.table = table
        self.clients: list[asyncio.Future[Prediction]] = []
        entry.future.add_done_callback(self._settle)

    def join(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[Prediction]:
        client: asyncio.Future[Prediction] = loop.create_future()
        self.clients.append(client)
        client.add_done_callback(self._left)
        return client

    def _left(self, client: asyncio.Future[Prediction]) -> None:
        if client.cancelled() and all(other.cancelled() for other in self.clients):
            self.entry.future.cancel()

    def _settle(self, row: asyncio.Future[Prediction]) -> None:
        if self.table.get(self.key) is self:
            del self.table[self.key]
        for client in self.clients:
            if client.done():
                continue
            if row.cancelled():
                client.cancel()
            elif (error := row.exception()) is not None:
                client.set_exception(error)
            else:
                client.set_result(row.result())


class Batcher:
    """Owns the queue and the batch loop; hands batches to a `Worker`."""

    def __init__(
        self, worker: Worker, *, settings: BatchingSettings, metrics: ModelMetrics, probe: Text | None = None
    ) -> None:
        """`probe`: what a readiness probe runs after a failed run (a short input in the
        model's own format)."""
        self._worker = worker
        self._probe_row = probe
        self._metrics = metrics
        self._limits = BatchLimits(settings.max_batch_size, settings.max_batch_tokens)
        self._queue = RequestQueue(settings.max_queue_size)
        self._policy = WaitPolicy(max_wait_s=settings.max_wait_s, instances=worker.instances)
        self._timeout_s = settings.request_timeout_s
        self._max_wait_s = settings.max_queue_wait_s
        self._floor_rows = (worker.instances + 1) * settings.max_batch_size  # every instance's batch and a staged one
        self._inflight_rows = 0  # rows in the batches handed to the worker
        self._above_since: float | None = None  # since when admissions found more than standing_rows
        self._below_since: float | None = None  # since when they found no more
        self._engaged = False  # whether standing_rows refuses (Batcher._standing)
        self._coalesce = settings.coalesce
        self._twins: dict[object, Twins] = {}  # the model input -> its waiting row and clients (coalesce)
        self._pace = Pace(worker.instances)
        self._running: dict[int, list[Pending]] = {}  # id(batch) -> batch handed to the worker
        self._deadlines: list[tuple[float, int, Pending]] = []  # heap: admitted, earliest deadline first
        self._admissions = itertools.count()  # tie-breaks equal deadlines in the heap
        self._deadline_timer: asyncio.Handle | None = None
        self._deadline_timer_at = math.inf  # when it fires (uvloop's call_at may return a plain Handle)
        self._waker: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop  # set by start(), before anything is admitted
        self._closing = False
        self._closed = False
        self._probe_delay_s = PROBE_DELAY_S
        self._probing = False
        self.accepting = False
        self.last_run_failed = False
        metrics.queue_capacity.set(settings.max_queue_size)
        metrics.model_instances.set(worker.instances)

    @property
    def model(self) -> Model:
        """The model its worker runs (an OnnxModel, or a test's stand-in)."""
        return self._worker.model

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def stalled(self) -> bool:
        """A model run has taken longer than the request deadline: the model hangs (watchdog)."""
        return self._worker.longest_run_s() > self._timeout_s

    @property
    def longest_run_s(self) -> float:
        """How long the oldest model run still in progress has lasted (0 when none is)."""
        return self._worker.longest_run_s()

    @property
    def unanswered(self) -> int:
        """Requests queued plus batches in flight (a drain waits for both to reach zero)."""
        return len(self._queue) + len(self._running)

    def start(self) -> None:
        self._worker.start()
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._supervise(), name="batcher")
        self.accepting = True

    def check_admission(self, rows: int = 1, priority: int = 1) -> None:
        """Refuse (429) before any parsing when the queue cannot take `rows` more of
        `priority`: past its share of `max_queue_size`, or behind more work than the model
        drains in `max_queue_wait_s` (`standing_rows`). Under overload the refusal must cost
        the loop as little as possible."""
        try:
            self._queue.check_room(rows, priority)
            limit = self.standing_rows()
            if not math.isinf(limit):  # the setting on and the pace known: else nothing to track
                self._check_standing(rows, priority, limit)
        except QueueFull as refused:
            self._metrics.rejected["queue_full"].inc()
            self._metrics.refused_by_priority[priority].inc(rows)
            refused.headers = self.retry_after()
            raise

    def _check_standing(self, rows: int, priority: int, limit: float) -> None:
        """QueueFull when the bound is engaged (`_standing`) and more than `limit` rows of
        `priority` or higher are queued and running ahead (a large batch may start an empty queue)."""
        ahead = self._queue.ahead(priority)
        standing = self._standing(len(self._queue) + self._inflight_rows + rows > limit)
        if standing and ahead and ahead + self._inflight_rows + rows > limit:
            raise QueueFull(
                f"{ahead} requests of this priority or higher wait and {self._inflight_rows} run, more "
                f"than the model runs in {self._max_wait_s * 1000:.0f} ms (batching.max_queue_wait_s); retry later"
            )

    def _standing(self, above: bool) -> bool:
        """Whether the bound of `standing_rows` is engaged: once the queue (all priorities)
        has been found above it at every admission for STANDING_GRACE_S, until it has been
        found below it for STANDING_RELEASE_S. A burst that a slow moment of the machine
        causes is let in (up to `max_queue_size`); a sustained overload, whose queue dips
        between waves of retries, stays held short."""
        now = self._loop.time()
        if above:
            self._below_since = None
            if self._above_since is None:
                self._above_since = now
            elif now - self._above_since >= STANDING_GRACE_S:
                self._engaged = True
        else:
            self._above_since = None
            if self._below_since is None:
                self._below_since = now
            elif now - self._below_since >= STANDING_RELEASE_S:
                self._engaged = False
        return self._engaged

    def standing_rows(self) -> float:
        """The most rows that may be queued or running: what the model drains in
        `max_queue_wait_s` at its measured pace, at least a full batch for every instance
        and a staged one (so 64 closed-loop clients are never refused with the defaults);
        unbounded while the pace is unknown or the setting is 0 (`max_queue_size` bounds
        the count regardless)."""
        rate = self._pace.rows_per_s()
        if not rate or not self._max_wait_s:
            return math.inf
        return max(self._floor_rows, rate * self._max_wait_s)

    def retry_after(self) -> dict[str, str]:
        """When a refused client may come back: the time the queue takes to drain at the
        model's measured pace (1 s while it is unknown)."""
        drain = self._pace.drain_s(len(self._queue)) if self._pace.known else 1.0
        return retry_headers(drain)

    @property
    def pace(self) -> Pace:
        return self._pace

    def submit(
        self, text: Text, promise: Promise = PLAIN, started: float | None = None, *, checked_at: int | None = None
    ) -> asyncio.Future[Prediction]:
        """Admit one request; its future resolves to a Prediction or fails with an HTTPError.
        `started`: perf_counter() when the request arrived, where a client deadline counts from.
        `checked_at`: the priority `check_admission` passed it at in this same loop callback (nothing
        else ran since: the fast lane); the check is then not repeated unless the request
        asks for a lower priority, which has less room."""
        self._check_open()
        if checked_at is None or promise.priority > checked_at:
            self.check_admission(1, promise.priority)
        return self._admit(text, promise, started)

    def submit_all(
        self, rows: list[Text], promise: Promise = PLAIN, started: float | None = None
    ) -> list[asyncio.Future[Prediction]]:
        """Admit every row or none: 413 when they could never fit in the queue, 429 when
        they do not fit now (or, with a deadline, cannot be answered in time)."""
        limit = self._queue.max_size
        if len(rows) > limit:
            raise PayloadTooLarge(f"items: {len(rows)} items can never fit in the queue (max_queue_size {limit})")
        self._check_open()
        self.check_admission(len(rows), promise.priority)
        if promise.deadline_s is not None:
            self._check_in_time(promise, started, len(rows))
        return [self._admit(row, promise, started, checked=True) for row in rows]

    def _check_open(self) -> None:
        if not self.accepting:
            raise Draining()
        if not self.alive:
            self._metrics.rejected["not_ready"].inc()
            raise NotReady("the batcher is not running")

    def _deadline(self, promise: Promise, started: float | None, now: float) -> float:
        """The loop time by which the request must be answered: the server's timeout from
        admission, or the client's own from its arrival when sooner."""
        deadline = now + self._timeout_s
        if promise.deadline_s is not None:
            arrived = now - (time.perf_counter() - started) if started is not None else now
            deadline = min(deadline, arrived + promise.deadline_s)
        return deadline

    def _check_in_time(self, promise: Promise, started: float | None, rows: int = 1) -> None:
        """429 predicted_late when the rows queued ahead and the model's pace say the
        request's own deadline cannot be met."""
        now = self._loop.time()
        wait = self._pace.wait_s(self._queue.ahead(promise.priority) + rows - 1)  # 0 until measured
        deadline = self._deadline(promise, started, now)
        if deadline <= now or now + wait > deadline:
            self._metrics.rejected["predicted_late"].inc(rows)
            self._metrics.refused_by_priority[promise.priority].inc(rows)
            raise PredictedLate(
                f"predicted wait {wait * 1000:.0f} ms is past the request's deadline "
                f"({promise.deadline_s * 1000 if promise.deadline_s else 0:.0f} ms); retry later",
                headers=self.retry_after(),
            )

    def _admit(
        self, text: Text, promise: Promise = PLAIN, started: float | None = None, *, checked: bool = False
    ) -> asyncio.Future[Prediction]:
        loop = self._loop
        now = loop.time()
        twins = None
        if self._coalesce:
            key = text.key
            twins = self._twins.get(key)
            if twins is not None and twins.entry.priority <= promise.priority and not twins.entry.future.done():
                self._metrics.coalesced.inc()
                self._metrics.admitted_by_priority[promise.priority].inc()
                return twins.join(loop)
        if promise.deadline_s is not None and not checked:
            self._check_in_time(promise, started)
        deadline = self._deadline(promise, started, now) if promise is not PLAIN else now + self._timeout_s
        others = len(self._queue) + self._inflight_rows
        entry = Pending(text, now, deadline, loop.create_future(), time.perf_counter(), promise.priority, promise.fresh)
        self._queue.push(entry)  # fits: checked just above, on this same thread
        if self._coalesce:
            twins = self._twins[key] = Twins(entry, key, self._twins)
        self._metrics.admitted_by_priority[promise.priority].inc()
        deadlines = self._deadlines
        while deadlines and deadlines[0][2].future.done():
            heapq.heappop(deadlines)
        heapq.heappush(deadlines, (deadline, next(self._admissions), entry))
        timer = self._deadline_timer
        if timer is None or self._deadline_timer_at > deadlines[0][0]:
            if timer is not None:
                timer.cancel()
            self._deadline_timer_at = deadlines[0][0]
            self._deadline_timer = loop.call_at(deadlines[0][0], self._expire_due)
        self._policy.arrived(now, others)
        self._metrics.queue_depth.set(len(self._queue))
        self._wake()
        return entry.future if twins is None else twins.join(loop)

    def begin_drain(self) -> None:
        """Admit nothing more and stop waiting for company: run what is queued at once."""
        self.accepting = False
        self._closing = True
        self._wake()

    async def close(self, timeout_s: float) -> None:
        """Drain: answer everything admitted within `timeout_s`; what is still unanswered
        then gets 503. Then stop the worker (a hung model run is left behind, not waited for)."""
        if self._closed:
            return
        self._closed = True
        self.begin_drain()
        if self._task is not None and not self._task.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
            except TimeoutError:
                log.error("drain timed out after %.1f s with %d requests unanswered", timeout_s, self.unanswered)
                self._task.cancel()
        late = Draining("server shut down before this request could be answered")
        self._fail_queued(late)
        for batch in self._running.values():
            for entry in batch:
                self._fail(entry, late)
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        self._deadline_timer_at = math.inf
        self._deadlines.clear()
        self._worker.close()

    # The loop ------------------------------------------------------------------

    async def _supervise(self) -> None:
        try:
            await self._run()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("batcher loop crashed; the server reports itself not ready")
            self._fail_queued(InternalError())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            wait_s = self._policy.next_wait(self._state(now), now)
            if wait_s is NOW:
                self._dispatch(now)
                continue
            if self._closing and not self._queue and not self._running:
                return
            await self._sleep(wait_s)

    def _state(self, now: float) -> QueueState:
        oldest = self._queue.oldest_enqueued_at()
        return QueueState(
            queued=len(self._queue),
            full=self._queue.full_batch_waiting(self._limits),
            oldest=oldest if oldest is not None else math.inf,
            inflight=len(self._running),
            closing=self._closing,
            urgent=self._queue.urgent(now, self._limits),
        )

    def _dispatch(self, now: float) -> None:
        self._policy.formed(len(self._queue))
        # A request whose deadline would pass during the run is not computed (504 now); an
        # idle model runs what it has, whatever a stale pace says.
        selection = self._queue.take(self._limits, now + (self._pace.run_s if self._running else 0.0))
        for entry in selection.dropped:
            if entry.future.cancelled():
                self._metrics.rejected["disconnected"].inc()
        for entry in selection.expired:
            self._metrics.rejected["deadline"].inc()
            self._fail(entry, DeadlineExceeded())
        self._metrics.queue_depth.set(len(self._queue))
        if not selection.batch:
            return
        lone = len(selection.batch) == 1 and not self._running and not self._queue and self._policy.lone
        self._running[id(selection.batch)] = selection.batch
        self._inflight_rows += len(selection.batch)
        self._metrics.inflight_batches.set(len(self._running))
        if self._worker.run(selection.batch, self._finish, lone=lone):
            self._metrics.lone_runs.inc()

    def _finish(self, batch: list[Pending], outcome: RunResult | BaseException) -> None:
        """A run came back (a loop callback: an error here would be lost, so none escapes)."""
        del self._running[id(batch)]
        self._inflight_rows -= len(batch)
        self._metrics.inflight_batches.set(len(self._running))
        self._wake()
        try:
            if isinstance(outcome, BaseException):
                log.error("model run failed for a batch of %d", len(batch), exc_info=outcome)
                self._model_failed(batch)
            else:
                self._resolve(batch, outcome)
        except Exception:
            log.exception("settling a batch of %d failed", len(batch))
            for entry in batch:
                self._fail(entry, InternalError())

    def _model_failed(self, entries: list[Pending]) -> None:
        self.last_run_failed = True
        self._metrics.rejected["model_error"].inc(len(entries))
        for entry in entries:
            self._fail(entry, ModelFailed())
        self._schedule_probe()

    def _resolve(self, batch: list[Pending], run: RunResult) -> None:
        """Settle a run's futures. The lone model's runs feed the pace too: without them a
        server serving one request at a time never knew it, and a batch with a 100 ms
        deadline was admitted and answered 504 instead of 429 (the fuzz test, under load)."""
        metrics = self._metrics
        if run.tokenize_s:  # tokenized on the worker (batching.tokenize_on)
            metrics.tokenize.observe(run.tokenize_s)
        if run.unreadable:  # counted as invalid by the middleware, from the 422
            for index in run.unreadable:
                self._fail(batch[index], ValidationFailed(UNREADABLE))
        if run.failed:
            log.error("%d of %d rows failed on their own; the rest were answered", len(run.failed), len(batch))
            self._model_failed([batch[index] for index in run.failed])
        done = set(run.rows) | set(run.failed) | set(run.unreadable)
        skipped = [entry for index, entry in enumerate(batch) if index not in done]
        metrics.rejected["disconnected"].inc(sum(entry.future.cancelled() for entry in skipped))
        if not run.rows:
            return
        self.last_run_failed = False
        seconds = run.finished - run.started
        metrics.inference.observe(seconds)
        metrics.model_busy.inc(seconds)
        metrics.batch_size.observe(len(run.rows))
        self._pace.ran(len(run.rows), seconds)
        metrics.padding_ratio.observe(1 - run.real_tokens / run.padded_tokens)
        metrics.real_tokens.inc(run.real_tokens)
        metrics.padding_tokens.inc(run.padded_tokens - run.real_tokens)
        best = run.probabilities.argmax(axis=1).tolist()
        inference_ms = seconds * 1000
        now = self._loop.time()
        for position, index in enumerate(run.rows):
            entry = batch[index]
            queue_s = max(0.0, run.started - entry.admitted)
            metrics.queue_wait.observe(queue_s)
            metrics.queue_wait_by_priority[entry.priority].observe(queue_s)
            if entry.future.done():
                continue
            if entry.deadline <= now:  # its run ended after its deadline: never a late answer
                metrics.rejected["deadline"].inc()
                entry.future.set_exception(DeadlineExceeded())
                continue
            intent = best[position]
            probabilities = run.probabilities[position]
            entry.future.set_result(
                Prediction(
                    probabilities,
                    intent,
                    float(probabilities[intent]),
                    inference_ms,
                    queue_s * 1000,
                    len(run.rows),
                    False,
                    run.logits[position],
                )
            )

    # Readiness after a failure ------------------------------------------------

    def _schedule_probe(self) -> None:
        if not self._probing and not self._closing:
            self._probing = True
            asyncio.get_running_loop().call_later(self._probe_delay_s, self._probe)

    def _probe(self) -> None:
        """Run one warm-up row; its success makes the batcher ready again."""
        if not self.last_run_failed or self._closing:
            self._probing = False
            return
        loop = asyncio.get_running_loop()
        row = self._probe_row or Text("hello", 7)  # untokenized: the worker tokenizes it
        self._worker.run([Pending(row, loop.time(), math.inf, loop.create_future(), time.perf_counter())], self._probed)

    def _probed(self, batch: list[Pending], outcome: RunResult | BaseException) -> None:
        self._probing = False
        if isinstance(outcome, RunResult) and outcome.rows:
            log.info("the model answered a probe run: ready again")
            self.last_run_failed = False
            self._probe_delay_s = PROBE_DELAY_S
        elif self.last_run_failed:
            self._probe_delay_s = min(2 * self._probe_delay_s, PROBE_MAX_DELAY_S)
            self._schedule_probe()

    # Settling ------------------------------------------------------------------

    def _fail(self, entry: Pending, error: HTTPError) -> None:
        if not entry.future.done():
            entry.future.set_exception(error)

    def _expire_due(self) -> None:
        """The deadline timer: answer 504 now to every request past its deadline, whether
        queued or in a run; then wait for the next unanswered one's."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        deadlines = self._deadlines
        while deadlines and (deadlines[0][2].future.done() or deadlines[0][0] <= now):
            entry = heapq.heappop(deadlines)[2]
            if not entry.future.done():
                self._metrics.rejected["deadline"].inc()
                entry.future.set_exception(DeadlineExceeded())
        self._deadline_timer_at = deadlines[0][0] if deadlines else math.inf
        self._deadline_timer = loop.call_at(deadlines[0][0], self._expire_due) if deadlines else None

    def _fail_queued(self, error: HTTPError) -> None:
        for entry in self._queue.take_all():
            self._fail(entry, error)
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
