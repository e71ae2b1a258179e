"""The load itself: closed loop (N clients, each sends when its last answer arrives) or
open loop (requests scheduled at a fixed or Poisson arrival rate, whatever the server does).

Open-loop latency is measured from each request's *scheduled* send time, so a generator
or server stall shows up in the percentiles instead of being hidden (coordinated
omission). Requests sent more than LATE_S after their schedule are counted as late;
requests that could not be sent at all (too many in flight) are counted as unsent.

With `Modes` (loadtest/modes.py) requests also carry a priority or a deadline, answers are
read whole and counted by priority, deadline and error type, and closed-loop clients may
resend on 429 (a retry storm, or politely after Retry-After).
"""

from __future__ import annotations

import asyncio
import random
import resource
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

from loadtest.http import HttpClient, Reply
from loadtest.modes import Modes, ModeStats, retry_after_s

LATE_S = 0.010
MAX_LATENCY_US = 120_000_000
MAX_IN_FLIGHT = 20_000


def new_histogram() -> HdrHistogram:
    return HdrHistogram(1, MAX_LATENCY_US, 3)


@dataclass
class Load:
    mode: str  # "closed" or "open"
    value: float  # clients (closed) or requests/s (open)
    arrival: str = "poisson"

    @property
    def label(self) -> str:
        if self.mode == "closed":
            return f"concurrency={self.value:g}"
        return f"rate={self.value:g}/s ({self.arrival})"


@dataclass
class StepResult:
    load: Load
    duration_s: float
    statuses: Counter[str] = field(default_factory=Counter)
    latency: HdrHistogram = field(default_factory=new_histogram)
    ok_latency: HdrHistogram = field(default_factory=new_histogram)
    by_status: dict[str, HdrHistogram] = field(default_factory=dict)
    by_status_from_send: dict[str, HdrHistogram] = field(default_factory=dict)
    """The same, measured from the moment the generator began sending the request (taking a
    connection, opening one if none is idle, writing) rather than from its schedule: the
    server's share of the latency, without the generator's own lateness."""
    events: list[tuple[float, str, float]] | None = None
    """(time the request was written, on the perf_counter clock; status; latency in seconds
    from its schedule) per request, when asked for."""
    late: int = 0
    unsent: int = 0
    client_cpu_s: float = 0.0
    server: dict[str, object] = field(default_factory=dict)
    modes: ModeStats | None = None
    """What the step counted for its modes (priorities, deadline, retries), when it had any."""

    def record(self, status: str, *, scheduled: float, sent: float, answered: float) -> None:
        """One answer (or failure). Times on the perf_counter clock; `scheduled` is when the
        request was due (open loop) or sent (closed loop), so latency counts any lateness."""
        latency_us = _micros(answered - scheduled)
        self.statuses[status] += 1
        self.latency.record_value(latency_us)
        if self.events is not None:
            self.events.append((sent, status, answered - scheduled))
        if status not in self.by_status:
            self.by_status[status] = new_histogram()
            self.by_status_from_send[status] = new_histogram()
        self.by_status[status].record_value(latency_us)
        self.by_status_from_send[status].record_value(_micros(answered - sent))
        if status == "200":
            self.ok_latency.record_value(latency_us)

    @property
    def answered(self) -> int:
        return sum(count for status, count in self.statuses.items() if status.isdigit())

    @property
    def ok(self) -> int:
        return self.statuses.get("200", 0)

    def percentile_ms(self, percentile: float, *, ok_only: bool = False) -> float:
        histogram = self.ok_latency if ok_only else self.latency
        return histogram.get_value_at_percentile(percentile) / 1000 if histogram.get_total_count() else float("nan")

    def summary(self, slo_ms: float | None = None) -> dict[str, Any]:
        ok_within_slo = self.ok
        if slo_ms is not None and self.ok:
            ok_within_slo = sum(
                item.count_added_in_this_iter_step
                for item in self.ok_latency.get_recorded_iterator()
                # a bucket holds values equivalent within HDR's precision: within the SLO if its lowest is
                if self.ok_latency.get_lowest_equivalent_value(item.value_iterated_to) <= slo_ms * 1000
            )
        return {
            "load": self.load.label,
            "mode": self.load.mode,
            "target": self.load.value,
            "duration_s": round(self.duration_s, 3),
            "requests": sum(self.statuses.values()),
            "throughput_rps": round(self.answered / self.duration_s, 2),
            "goodput_rps": round(ok_within_slo / self.duration_s, 2),
            "p50_ms": round(self.percentile_ms(50), 3),
            "p90_ms": round(self.percentile_ms(90), 3),
            "p99_ms": round(self.percentile_ms(99), 3),
            "p999_ms": round(self.percentile_ms(99.9), 3),
            "max_ms": round(self.latency.get_max_value() / 1000, 3) if self.latency.get_total_count() else None,
            "mean_ms": round(self.latency.get_mean_value() / 1000, 3) if self.latency.get_total_count() else None,
            "statuses": dict(sorted(self.statuses.items())),
            "p99_ms_by_status": _p99_ms(self.by_status),
            "p99_ms_by_status_from_send": _p99_ms(self.by_status_from_send),
            "late": self.late,
            "unsent": self.unsent,
            "client_cpu_share": round(self.client_cpu_s / self.duration_s, 3),
            "server": self.server,
        } | ({"modes": self.modes.summary(self.duration_s, self.ok)} if self.modes is not None else {})


def _status_bucket(status: int) -> str:
    return str(status) if status in (200, 400, 413, 422, 429, 503, 504) else ("5xx" if status >= 500 else str(status))


class Driver:
    """Runs load steps: POSTs of `bodies` to `path` through `client`."""

    def __init__(
        self,
        client: HttpClient,
        path: str,
        bodies: Iterator[bytes],
        *,
        seed: int,
        timeout_s: float,
        progress: bool = True,
        modes: Modes | None = None,
    ) -> None:
        self.client = client
        self.path = path
        self.bodies = bodies
        self.seed = seed
        self.timeout_s = timeout_s
        self.progress = progress
        self.modes = modes
        self._requests: dict[bytes, bytes] = {}
        self._requests_by_priority: dict[tuple[bytes, str | None], bytes] = {}
        self._priorities = random.Random(f"priorities {seed}")
        self._stop: asyncio.Event | None = None

    async def run(
        self,
        load: Load,
        *,
        duration_s: float,
        warmup_s: float,
        on_measure_start: object = None,
        events: bool = False,
        stop: asyncio.Event | None = None,
    ) -> StepResult:
        """Warm up (results discarded), then measure for `duration_s`, or until `stop` is set."""
        self._stop = stop
        loop = asyncio.get_running_loop()
        if warmup_s > 0:
            await self._drive(load, StepResult(load, warmup_s), loop.time() + warmup_s, record=False)
        if on_measure_start is not None:
            await on_measure_start()  # type: ignore[operator]
        result = StepResult(load, duration_s, events=[] if events else None)
        if self.modes is not None:
            result.modes = ModeStats(self.modes)
        cpu_before = _cpu_seconds()
        ticker = asyncio.ensure_future(self._tick(result, loop.time(), duration_s)) if self.progress else None
        await self._drive(load, result, loop.time() + duration_s, record=True)
        if ticker is not None:
            ticker.cancel()
            print(file=sys.stderr)
        result.client_cpu_s = _cpu_seconds() - cpu_before
        return result

    async def _drive(self, load: Load, result: StepResult, end: float, *, record: bool) -> None:
        if load.mode == "closed":
            await asyncio.gather(*(self._client(result, end, record) for _ in range(int(load.value))))
        else:
            await self._schedule(load, result, end, record)

    def _stopped(self) -> bool:
        return self._stop is not None and self._stop.is_set()

    async def _client(self, result: StepResult, end: float, record: bool) -> None:
        loop = asyncio.get_running_loop()
        if self.modes is not None and self.modes.retry is not None:
            await self._retrying_client(self.modes.retry, result, end, record)
            return
        while loop.time() < end and not self._stopped():
            await self._send(result, time.perf_counter(), record)

    async def _retrying_client(self, retry: str, result: StepResult, end: float, record: bool) -> None:
        """A closed-loop client that resends the same request on 429: at once (`storm`) or
        after the wait the server asked for (`polite`)."""
        loop = asyncio.get_running_loop()
        again: tuple[bytes, str | None] | None = None
        while loop.time() < end and not self._stopped():
            reply, again = await self._send_with_modes(result, time.perf_counter(), record, again)
            if reply is None or reply.status != 429:
                again = None
            elif retry == "polite":
                wait = retry_after_s(reply)
                if record and result.modes is not None:
                    result.modes.waited(wait)
                if wait > 0:
                    await asyncio.sleep(min(wait, max(0.0, end - loop.time())))

    async def _schedule(self, load: Load, result: StepResult, end: float, record: bool) -> None:
        loop = asyncio.get_running_loop()
        rng = random.Random(self.seed)
        in_flight: set[asyncio.Future[None]] = set()
        scheduled = loop.time()
        offset = time.perf_counter() - scheduled  # loop clock -> perf_counter clock
        while True:
            scheduled += rng.expovariate(load.value) if load.arrival == "poisson" else 1 / load.value
            if scheduled >= end or self._stopped():
                break
            delay = scheduled - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if len(in_flight) >= MAX_IN_FLIGHT:
                result.unsent += record
                continue
            if loop.time() - scheduled > LATE_S:
                result.late += record
            task = asyncio.ensure_future(self._send(result, scheduled + offset, record))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        if in_flight:
            await asyncio.wait(in_flight)

    async def _send(self, result: StepResult, started: float, record: bool) -> None:
        if self.modes is not None:
            await self._send_with_modes(result, started, record)
            return
        body = next(self.bodies)
        request = self._requests.get(body)
        if request is None:
            request = self._requests[body] = self.client.request(self.path, body)
        sent = time.perf_counter()
        try:
            status = _status_bucket(await self.client.send(request, self.timeout_s))
        except TimeoutError:
            status = "timeout"
        except ConnectionRefusedError:
            status = "refused"  # at connect: nothing was sent, the client may try elsewhere
        except (ConnectionError, OSError):
            status = "connection_error"  # cut: the request was (perhaps) sent, no answer came
        if record:
            result.record(status, scheduled=started, sent=sent, answered=time.perf_counter())

    async def _send_with_modes(
        self,
        result: StepResult,
        started: float,
        record: bool,
        again: tuple[bytes, str | None] | None = None,
    ) -> tuple[Reply | None, tuple[bytes, str | None]]:
        """One request with the modes' headers (or `again`: a request to resend, with its
        priority), its answer read whole; the answer (None on a failure) and what was sent."""
        assert self.modes is not None
        if again is None:
            body = next(self.bodies)
            priority = self.modes.pick(self._priorities)
            request = self._requests_by_priority.get((body, priority))
            if request is None:
                request = self.client.request(self.path, body, self.modes.headers(priority))
                self._requests_by_priority[(body, priority)] = request
            again = (request, priority)
        request, priority = again
        reply: Reply | None = None
        sent = time.perf_counter()
        try:
            reply = await self.client.exchange(request, self.timeout_s)
            status = _status_bucket(reply.status)
        except TimeoutError:
            status = "timeout"
        except ConnectionRefusedError:
            status = "refused"
        except (ConnectionError, OSError):
            status = "connection_error"
        if record:
            answered = time.perf_counter()
            result.record(status, scheduled=started, sent=sent, answered=answered)
            if result.modes is not None:
                result.modes.record(priority, status, reply, answered - started, answered - sent)
        return reply, again

    async def _tick(self, result: StepResult, started: float, duration_s: float) -> None:
        loop = asyncio.get_running_loop()
        interactive = sys.stderr.isatty()
        while True:
            await asyncio.sleep(0.5 if interactive else 5)
            elapsed = loop.time() - started
            done = min(1.0, elapsed / duration_s)
            errors = (
                result.answered
                - result.ok
                + sum(result.statuses[s] for s in ("timeout", "refused", "connection_error"))
            )
            line = (
                f"[{'#' * int(done * 24):<24}] {result.load.label} {elapsed:5.1f}/{duration_s:.0f}s "
                f"{result.answered / max(elapsed, 1e-9):7.1f} req/s ok={result.ok} errors={errors} "
                f"p99={result.percentile_ms(99):.1f}ms"
            )
            print(("\r" if interactive else "") + line, end="" if interactive else "\n", file=sys.stderr, flush=True)


def _p99_ms(histograms: dict[str, HdrHistogram]) -> dict[str, float]:
    return {status: round(h.get_value_at_percentile(99) / 1000, 3) for status, h in sorted(histograms.items())}


def _micros(seconds: float) -> int:
    """A latency for the histograms: whole microseconds, clamped to their range."""
    return min(max(1, int(seconds * 1_000_000)), MAX_LATENCY_US)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
