"""Admitted requests waiting for a model run, and the pure function that picks a batch.

`take_batch` is synchronous and side-effect free apart from removing what it returns from
the pending deque: it drops the dead (client gone, deadline passed), always takes the
oldest live request, stops at the row or padded-token budget, and, when more is waiting
than one batch can hold, groups similar lengths so short utterances are not padded to a
long one's length.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from batcher.errors import QueueFull
from batcher.tokenization import Encoded


@dataclass(eq=False, slots=True)
class Pending:
    """One admitted request: its tokens, its times (loop clock) and the future its handler awaits."""

    encoded: Encoded
    enqueued_at: float
    deadline: float
    future: asyncio.Future[Any]
    admitted: float
    """perf_counter() at admission, for measuring queue wait."""
    timer: asyncio.TimerHandle | None = None

    @property
    def length(self) -> int:
        return len(self.encoded)


@dataclass(frozen=True, slots=True)
class BatchLimits:
    max_batch_size: int
    max_batch_tokens: int
    group_window: int = 4
    """Look this many batches deep into the queue for similar lengths."""


@dataclass(slots=True)
class Selection:
    batch: list[Pending] = field(default_factory=list)
    expired: list[Pending] = field(default_factory=list)
    """Deadline passed while queued; the future is not yet resolved."""
    dropped: list[Pending] = field(default_factory=list)
    """Future already done: cancelled by a disconnect, or failed by its deadline timer."""


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
    """Indices into `live` (oldest first) forming the batch; always includes index 0."""
    lengths = [entry.length for entry in live]
    if len(live) <= limits.max_batch_size and padded_tokens(lengths) <= limits.max_batch_tokens:
        return list(range(len(live)))
    # Sort by length; among the runs of neighbours that include the oldest request and
    # fit both budgets, take the one with most rows, then the least padding per row.
    order = sorted(range(len(live)), key=lambda index: (lengths[index], index))
    ordered = [lengths[index] for index in order]
    anchor = order.index(0)
    best = (anchor, anchor + 1)
    best_key = (1, 0.0)
    for start in range(max(0, anchor - limits.max_batch_size + 1), anchor + 1):
        end = start
        while (
            end < len(order)
            and end - start < limits.max_batch_size
            and (end - start + 1) * ordered[end] <= limits.max_batch_tokens
        ):
            end += 1
        rows = end - start
        if end <= anchor:
            continue
        waste = (rows * ordered[end - 1] - sum(ordered[start:end])) / rows
        if (rows, -waste) > (best_key[0], -best_key[1]):
            best, best_key = (start, end), (rows, waste)
    return sorted(order[best[0] : best[1]])


class RequestQueue:
    """Bounded FIFO of admitted requests. Past `max_size` waiting, `push` refuses (429)."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.pending: deque[Pending] = deque()

    def __len__(self) -> int:
        return len(self.pending)

    def push(self, entry: Pending) -> None:
        if len(self.pending) >= self.max_size:
            raise QueueFull(
                f"queue holds {self.max_size} requests, its limit; retry later", headers={"Retry-After": "1"}
            )
        self.pending.append(entry)

    def oldest_enqueued_at(self) -> float | None:
        return self.pending[0].enqueued_at if self.pending else None

    def full_batch_waiting(self, limits: BatchLimits) -> bool:
        """Whether enough is queued to fill a batch by rows or by padded tokens."""
        if len(self.pending) >= limits.max_batch_size:
            return True
        longest = max((entry.length for entry in self.pending), default=0)
        return len(self.pending) * longest >= limits.max_batch_tokens
