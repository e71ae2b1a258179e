"""What a request may ask of the batcher: its priority and its own deadline; and the model's
measured pace, from which a request's wait is predicted and `Retry-After` computed.

A client sets them per request, by header (`x-priority: high|normal|low`, `x-deadline-ms:
N`) or body field (`priority`, `deadline_ms`; the body wins). Priority orders the queue by
a virtual time: a request is ordered as if it had arrived `AGING_S[priority]` later, so
higher priority goes first, yet no request waits more than AGING_S[low] - AGING_S[high]
= 1 s longer than it would have without priorities; a fresh request (its client had no
answer in the last FRESH_S: a new or idle client) is ordered FRESH_AHEAD_S sooner within
its priority. At the door, each priority may fill its share of the queue (`ROOM`): under
overload low priority is refused first. A deadline
is capped by `batching.request_timeout_s`; a request that cannot be answered in time,
judged from the rows queued ahead of it and the model's measured pace, is refused at
admission (429 `predicted_late`), and one whose deadline would pass during its run is
never computed.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from batcher.errors import ValidationFailed

PRIORITIES = ("high", "normal", "low")
HIGH, NORMAL, LOW = 0, 1, 2
AGING_S = (0.0, 0.9, 1.0)
"""Virtual-time offset by priority: how much later than its arrival a request is ordered.
Normal's is close to low's, not halfway: under overload the normal requests queued (up to
`ROOM[normal]` of the queue) wait what the model has left after high priority takes its
share, here ~0.5 s at 2x saturation. With an offset of 0.5 s they came due whenever the
model slowed a little, and high priority then queued behind them in arrival order (its p99
2.2-2.4x its half-load p99 in two of three steps, 1.3-1.6x with 0.9 s, side by side)."""
FRESH_AHEAD_S = 0.25
"""How much sooner a fresh request (its client had no answer in the last FRESH_S: a new or
idle client) is ordered than others of its priority, never before high's offset (so the
spread stays AGING_S[low] - AGING_S[high])."""
FRESH_S = 1.0
OFFSETS_S = (AGING_S, tuple(max(AGING_S[0], offset - FRESH_AHEAD_S) for offset in AGING_S))
"""Virtual-time offset by freshness (0 no, 1 yes) and priority."""
ROOM = (1.0, 0.875, 0.5)
"""Share of batching.max_queue_size each priority may fill at the door."""
MIN_DEADLINE_MS = 100.0
"""Shorter is no deadline an HTTP round trip, a queue and a model run on a shared machine can
be held to: refused (422)."""
MAX_DEADLINE_MS = 3_600_000.0
PACE_RUNS = 32
"""Runs the pace is the median of: a hung or stopped run is one outlier among them."""
PREDICTION_MARGIN = 2.0
"""The drain a wait is predicted with is doubled: at 2x saturation with 100 ms deadlines, a
margin of 1.25 still admitted ~10 % of the refused as 504s after waiting; 2.0 refused 98 %
at the door and answered more within their deadlines (bench/promises.py)."""
PACE_MIN_RUNS = 4
"""Runs measured before the pace predicts anything."""


@dataclass(frozen=True, slots=True)
class Promise:
    """A request's priority and its own deadline (seconds from its arrival; None: the server's)."""

    priority: int = NORMAL
    deadline_s: float | None = None
    fresh: bool = False
    """Its client had no answer in the last FRESH_S: ordered FRESH_AHEAD_S sooner."""


PLAIN = Promise()


def lowered(priority: int) -> int:
    """One priority lower (low stays low)."""
    return min(priority + 1, LOW)


def adjusted(promise: Promise, demoted: bool, fresh: bool) -> Promise:
    """The promise one priority lower when `demoted`, marked `fresh`."""
    if not demoted and not fresh:
        return promise
    return Promise(lowered(promise.priority) if demoted else promise.priority, promise.deadline_s, fresh)


def priority_of(value: object, where: str = "x-priority") -> int:
    """A priority's index from its name (422 for anything else)."""
    if isinstance(value, str):
        name = value.strip().lower()
        if name in PRIORITIES:
            return PRIORITIES.index(name)
    raise ValidationFailed(f"{where}: expected high, normal or low")


def deadline_of(value: object, where: str = "x-deadline-ms") -> float:
    """A deadline in seconds from milliseconds (a number, or a header's text); 422 unless positive."""
    number: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = None
    if number is None or not MIN_DEADLINE_MS <= number <= MAX_DEADLINE_MS:  # NaN fails too
        raise ValidationFailed(
            f"{where}: expected milliseconds, at least {MIN_DEADLINE_MS:.0f} and at most {MAX_DEADLINE_MS:.0f}"
        )
    return number / 1000


def promise_of(
    priority_header: str | None,
    deadline_header: str | None,
    body_priority: str | None = None,
    body_deadline_ms: float | None = None,
) -> Promise:
    """The request's promise: the body's fields over the headers; PLAIN when none is given."""
    if priority_header is None and deadline_header is None and body_priority is None and body_deadline_ms is None:
        return PLAIN
    priority = NORMAL if priority_header is None else priority_of(priority_header)  # checked even when
    deadline = None if deadline_header is None else deadline_of(deadline_header)  # the body overrides it
    if body_priority is not None:
        priority = priority_of(body_priority, "priority")
    if body_deadline_ms is not None:
        deadline = deadline_of(body_deadline_ms, "deadline_ms")
    return Promise(priority, deadline)


class Pace:
    """The model's measured pace: the medians of the last PACE_RUNS runs' rows and seconds
    (medians, so one hung or stopped run does not make every request look late). Pure: the
    batcher feeds it each run; it predicts waits and drain times."""

    def __init__(self, instances: int) -> None:
        self.instances = instances
        self.rows = 0.0
        self.run_s = 0.0
        self.known = False
        """PACE_MIN_RUNS runs measured: the pace predicts."""
        self._rate = 0.0
        self._runs: deque[tuple[int, float]] = deque(maxlen=PACE_RUNS)

    def ran(self, rows: int, seconds: float) -> None:
        runs = self._runs
        runs.append((rows, seconds))
        if len(runs) >= PACE_MIN_RUNS:
            middle = len(runs) // 2
            self.rows = float(sorted(run[0] for run in runs)[middle])
            self.run_s = sorted(run[1] for run in runs)[middle]
            self.known = True
            self._rate = self.instances * self.rows / self.run_s if self.run_s else 0.0

    def rows_per_s(self) -> float:
        """Rows the model answers a second with every instance busy (0 while unknown); read
        at every admission, so worked out once a run."""
        return self._rate

    def drain_s(self, rows: int) -> float:
        """Seconds until `rows` queued now have been run (0 while unknown)."""
        rate = self.rows_per_s()
        return rows / rate if rate else 0.0

    def wait_s(self, ahead: int) -> float:
        """Predicted seconds from admission to answer for a request with `ahead` rows queued
        before it: a run in progress ending, the queue ahead drained, then its own run; the
        drain with a margin (PREDICTION_MARGIN): a pace varies run to run, and a request
        predicted in time but answered late costs its client the whole wait and a 504, where
        a refusal costs it nothing."""
        return PREDICTION_MARGIN * self.drain_s(ahead) + 2 * self.run_s if self.known else 0.0


def retry_headers(seconds: float) -> dict[str, str]:
    """`Retry-After` (whole seconds, at least 1, as HTTP has it) and `x-retry-after-ms`."""
    return {"Retry-After": str(max(1, math.ceil(seconds))), "x-retry-after-ms": str(max(1, math.ceil(seconds * 1000)))}
