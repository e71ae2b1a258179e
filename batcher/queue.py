"""Admitted requests waiting for a model run, and the pure function that picks a batch.

`take_batch` is synchronous and side-effect free apart from removing what it returns from
the pending deque: it drops the dead (client gone, deadline passed), always takes the
oldest live request, stops at the row or padded-token budget, and groups similar lengths
so short utterances are not padded to a long one's length when that padding would cost
more than a second model run.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from batcher.errors import QueueFull
from batcher.model.tokenization import Text


@dataclass(eq=False, slots=True)
class Pending:
    """One admitted request: its text, its times (loop clock) and the future its handler awaits."""

    text: Text
    enqueued_at: float
    deadline: float
    future: asyncio.Future[Any]
    admitted: float
    """perf_counter() at admission, for measuring queue wait."""

    @property
    def length(self) -> int:
        return self.text.length


@dataclass(frozen=True, slots=True)
class BatchLimits:
    max_batch_size: int
    max_batch_tokens: int
    group_window: int = 4
    """Look this many batches deep into the queue for similar lengths."""
    overhead_tokens: int = 16
    """A model run's fixed cost in padded-token equivalents (measured for the bundled model
    on 2 CPU cores: ~0.5 ms a run vs ~0.034 ms a token): what padding must cost before a
    queue is split into two runs by length."""


@dataclass(slots=True)
class Selection:
    batch: list[Pending] = field(default_factory=list)
    expired: list[Pending] = field(default_factory=list)
    """Deadline passed while queued; the future is not yet resolved."""
    dropped: list[Pending] = field(default_factory=list)
    """Future already done: cancelled by a disconnect, or failed at its deadline."""


def padded_tokens(lengths: Sequence[int]) -> int:
    """Positions a batch occupies once padded to its longest row."""
    return len(lengths) * max(lengths, default=0)


def take_batch(pending: deque[Pending], limits: BatchLimits, now: float) -> Selection:
    """Remove and return the next batch (plus the dead found on the way) from `pending`."""
    selection = Selection()
    window = limits.max_batch_size * limits.group_window
    live: list[Pending] = []
    while pending and len(live) < window:
        entry = pending.popleft()
        if entry.future.done():
            selection.dropped.append(entry)
        elif entry.deadline <= now:
            selection.expired.append(entry)
        else:
            live.append(entry)
    if not live:
        return selection
    chosen = _choose(live, limits)
    selection.batch = [live[index] for index in chosen]
    taken = set(chosen)
    pending.extendleft(reversed([entry for index, entry in enumerate(live) if index not in taken]))
    return selection


def _choose(live: list[Pending], limits: BatchLimits) -> list[int]:
    """Indices into `live` (oldest first) forming the batch; always includes index 0.

    A run costs about `overhead_tokens + rows x longest` token-steps. Sorted by length,
    the visible queue is cut into consecutive groups that serve all of it at the least
    total cost (a small dynamic programme, at most rows x max_batch_size steps); the
    group holding the oldest request runs now. So short requests are padded to a long
    one's length only when the run overhead saved pays for the padding.
    """
    lengths = [entry.text.length for entry in live]
    if len(live) <= limits.max_batch_size:
        longest = max(lengths)
        waste = len(live) * longest - sum(lengths)
        if waste <= limits.overhead_tokens and len(live) * longest <= limits.max_batch_tokens:
            return list(range(len(live)))  # the common case: take everything
    order = sorted(range(len(live)), key=lengths.__getitem__)  # stable: ties stay oldest first
    ordered = [lengths[index] for index in order]
    count = len(order)
    budget = limits.max_batch_tokens
    # cost[i]: least cost to serve ordered[i:]; size[i]: rows of the group starting at i.
    # Sorted, a group's longest is its last row. Among the best groups from i the largest
    # is taken, and it ends where a run of equal lengths ends, or at the row or token cap
    # (taking one more of the same length never costs more), so only those ends are tried.
    ends = [end for end in range(1, count) if ordered[end - 1] != ordered[end]]
    ends.append(count)
    cost = [0] * (count + 1)
    size = [1] * (count + 1)
    first_end = len(ends) - 1
    for start in range(count - 1, -1, -1):
        while first_end > 0 and ends[first_end - 1] > start:
            first_end -= 1
        most = min(limits.max_batch_size, count - start)
        while most > 1 and most * ordered[start + most - 1] > budget:
            most -= 1
        best_rows = most
        best = most * ordered[start + most - 1] + cost[start + most]
        for end in ends[first_end:]:
            rows = end - start
            if rows >= most:
                break
            total = rows * ordered[end - 1] + cost[end]
            if total < best or (total == best and rows > best_rows):
                best, best_rows = total, rows
        size[start] = best_rows
        cost[start] = limits.overhead_tokens + best
    anchor = order.index(0)
    start = 0
    while start + size[start] <= anchor:
        start += size[start]
    return sorted(order[start : start + size[start]])


class RequestQueue:
    """Bounded FIFO of admitted requests. Past `max_size` waiting, `push` refuses (429)."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._pending: deque[Pending] = deque()

    def __len__(self) -> int:
        return len(self._pending)

    def check_room(self, rows: int = 1) -> None:
        """429 unless `rows` more requests fit under `max_size`."""
        if len(self._pending) + rows > self.max_size:
            raise QueueFull(
                f"queue holds {self.max_size} requests, its limit; retry later", headers={"Retry-After": "1"}
            )

    def push(self, entry: Pending) -> None:
        self.check_room()
        self._pending.append(entry)

    def take(self, limits: BatchLimits, now: float) -> Selection:
        """The next batch and the dead found on the way (see `take_batch`)."""
        return take_batch(self._pending, limits, now)

    def take_all(self) -> list[Pending]:
        """Remove and return everything queued."""
        everything = list(self._pending)
        self._pending.clear()
        return everything

    def oldest_enqueued_at(self) -> float | None:
        return self._pending[0].enqueued_at if self._pending else None

    def full_batch_waiting(self, limits: BatchLimits) -> bool:
        """Whether enough is queued to fill a batch by rows or by padded tokens."""
        if len(self._pending) >= limits.max_batch_size:
            return True
        longest = max([entry.text.length for entry in self._pending], default=0)
        return len(self._pending) * longest >= limits.max_batch_tokens
