"""When to form a batch: a pure policy, given explicit times (it never reads a clock or sleeps).

- A free model instance takes a batch at once when a full batch is queued; otherwise it
  waits up to `max_wait_s` from the oldest request's admission, but only while another
  arrival is expected within that window (an EWMA of inter-arrival gaps) and recent waits
  actually found company (an EWMA of their outcome, probed now and then), so a lone
  client does not wait for company that is not coming.
- While every instance is busy, one extra *full* batch is handed to the worker, so the
  model starts it the moment an instance frees instead of waiting for the loop; not while
  high priority comes (`urgent`): a staged batch is formed before the high-priority
  requests that arrive while it waits, and they waited for it and then their own.
- While closing, nothing waits for company.
- A request the batcher would run alone goes to the lone session (every core) only while
  recent arrivals found the server empty (`lone`): a lone client. Where arrivals overlap
  (2 or 4 closed-loop clients), the lone session's spinning threads took the cores from the
  SCHED_IDLE instances that ran the rest, and 2 or 4 clients got 14-26 % fewer answers a
  second than with the lone session off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GAP_EWMA_WEIGHT = 0.2
# Waiting for company stops paying when recent waits found none (a lone closed-loop client:
# its next request only comes after this one is answered, however short the gaps look).
# One decision in COMPANY_PROBE_EVERY still waits, to notice when traffic returns, except
# while arrivals find the server empty (`lone`): returning traffic shows there first, as
# arrivals that find others, and a lone client's probes cost it a 2 ms wait in 16.
COMPANY_EWMA_WEIGHT = 0.25
COMPANY_THRESHOLD = 0.3
COMPANY_PROBE_EVERY = 16
# The share of recent arrivals that found other requests queued or running, and the share
# below which a request the batcher runs alone may take every core: a closed-loop lone
# client's arrivals find none; two clients' find each other most of the time.
CROWD_EWMA_WEIGHT = 0.2
LONE_CROWD = 0.5

NOW = None
"""`next_wait`'s answer for "form a batch now"."""


@dataclass(frozen=True, slots=True)
class QueueState:
    """What the policy sees of the queue and the worker at one instant."""

    queued: int
    full: bool
    """Enough is queued to fill a batch, by rows or by padded tokens."""
    oldest: float
    """Admission time of the oldest queued request (loop clock)."""
    inflight: int
    """Batches handed to the worker and not yet finished, staged ones included."""
    closing: bool = False
    urgent: bool = False
    """A high-priority request was queued lately (queue.SHORT_BATCHES_S) and high has no
    backlog (queue.RequestQueue.high_backlog): nothing is staged."""


class WaitPolicy:
    """Decides, from the queue's state and the time, whether to form a batch now or how long to wait."""

    def __init__(self, *, max_wait_s: float, instances: int) -> None:
        self.max_wait_s = max_wait_s
        self.instances = instances
        self.gap_ewma_s = math.inf
        self.company = 1.0
        """EWMA: share of recent waits that ended with more than one request queued."""
        self.crowd = 0.0
        """EWMA: share of recent arrivals that found other requests queued or running."""
        self._last_arrival = -math.inf
        self._decisions = 0
        self._waiting = False
        """The head request was told to wait; its batch's size tells whether waiting paid."""

    def arrived(self, at: float, others: int = 0) -> None:
        """Record one admission at loop time `at`, which found `others` requests queued or running."""
        self.crowd += CROWD_EWMA_WEIGHT * ((others > 0) - self.crowd)
        gap = at - self._last_arrival
        self._last_arrival = at
        if math.isinf(self.gap_ewma_s):
            self.gap_ewma_s = gap
        else:
            self.gap_ewma_s += GAP_EWMA_WEIGHT * (gap - self.gap_ewma_s)

    def next_wait(self, state: QueueState, now: float) -> float | None:
        """None (`NOW`): form a batch now. Otherwise seconds to sleep (inf: until woken)."""
        if not state.queued:
            return math.inf
        if state.inflight >= self.instances:
            staged = state.inflight - self.instances
            return NOW if state.full and staged == 0 and not state.urgent else math.inf
        if state.full or state.closing or self.max_wait_s <= 0:
            return NOW
        remaining = state.oldest + self.max_wait_s - now
        if remaining <= 0 or self.gap_ewma_s >= remaining:
            return NOW
        if not self._waiting:  # deciding afresh whether this head request waits
            self._decisions += 1
            if self.company < COMPANY_THRESHOLD and (self.lone or self._decisions % COMPANY_PROBE_EVERY):
                return NOW
            self._waiting = True
        return remaining

    @property
    def lone(self) -> bool:
        """Recent arrivals mostly found the server empty: one running alone may take every core."""
        return self.crowd < LONE_CROWD

    def formed(self, queued: int) -> None:
        """A batch is being formed from `queued` requests: learn whether the wait found company."""
        if self._waiting:  # a lone closed-loop client never gets any
            self.company += COMPANY_EWMA_WEIGHT * ((queued > 1) - self.company)
        self._waiting = False
