"""Admitted requests waiting for a model run, and the pure function that picks a batch.

`take_batch` is synchronous and side-effect free apart from removing what it returns from
the pending deque: it drops the dead (client gone, deadline passed), always takes the
oldest live request, stops at the row or padded-token budget, and groups similar lengths
so short utterances are not padded to a long one's length when that padding would cost
more than a second model run.

The queue holds one FIFO a priority; "oldest" is by virtual time (arrival plus the
priority's offset, batcher/promises.py), so a batch is taken from the heads of the FIFOs
merged in that order. While more than one priority waits, a batch is the next requests in
that order, not grouped by length: grouping takes the head's neighbours in length, so a
queue of mixed priorities served one high-priority head per batch and high waited as long
as normal did (67 vs 72 ms at 2x saturation here).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from batcher.errors import QueueFull
from batcher.model.tokenization import Text
from batcher.promises import AGING_S, NORMAL, PRIORITIES, ROOM


@dataclass(eq=False, slots=True)
class Pending:
    """One admitted request: its text, its times (loop clock) and the future its handler awaits."""

    text: Text
    enqueued_at: float
    deadline: float
    future: asyncio.Future[Any]
    admitted: float
    """perf_counter() at admission, for measuring queue wait."""
    priority: int = NORMAL
    """Index into promises.PRIORITIES (0 = high)."""

    @property
    def virtual(self) -> float:
        """Its place in the queue: arrival plus its priority's offset."""
        return self.enqueued_at + AGING_S[self.priority]

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


def take_batch(pending: deque[Pending], limits: BatchLimits, now: float, *, grouped: bool = True) -> Selection:
    """Remove and return the next batch (plus the dead found on the way) from `pending`.
    `grouped`: the batch is the group of similar lengths holding the oldest request (the
    head); otherwise (mixed priorities) the group is formed among requests of the head's
    priority or higher only, and filled with lower ones no longer than its longest."""
    selection = Selection()
    window = limits.max_batch_size * limits.group_window if grouped else len(pending)
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
    chosen = _choose(live, limits) if grouped else _by_priority(live, limits)
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


def _by_priority(live: list[Pending], limits: BatchLimits) -> list[int]:
    """Indices into `live` (in queue order, index 0 the head) forming the batch when several
    priorities wait: the length group holding the head among requests of its priority or
    higher, then lower-priority requests that fit it without more padding, oldest first.
    Grouping the whole window by length would serve one high-priority request a batch (the
    head) and fill the rest with its neighbours in length: at 2x saturation high waited as
    long as normal (67 vs 72 ms); taking the queue in order instead padded every batch to
    its longest row and cut throughput by half."""
    head = live[0].priority
    first = [index for index, entry in enumerate(live) if entry.priority <= head]
    chosen = [first[index] for index in _choose([live[index] for index in first], limits)]
    longest = max(live[index].text.length for index in chosen)
    taken = set(chosen)
    for index, entry in enumerate(live):
        if len(chosen) >= limits.max_batch_size or (len(chosen) + 1) * longest > limits.max_batch_tokens:
            break
        if index not in taken and entry.text.length <= longest:
            chosen.append(index)
    return sorted(chosen)


MIXED_WINDOW = 1


def _virtual(entry: Pending) -> float:
    return entry.virtual


class RequestQueue:
    """Bounded queue of admitted requests, a FIFO a priority. Past its priority's share of
    `max_size` waiting (`promises.ROOM`), a request is refused at the door (429)."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.room = tuple(max(1, max_size - int(max_size * (1 - share))) for share in ROOM)
        """How many may be queued for a request of each priority to be admitted (the rest of
        max_size is kept for higher priorities; a small queue keeps none for normal)."""
        self._levels: tuple[deque[Pending], ...] = tuple(deque() for _ in PRIORITIES)
        self._pending = self._levels[NORMAL]
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def check_room(self, rows: int = 1, priority: int = NORMAL) -> None:
        """429 unless `rows` more requests of `priority` fit under its share of `max_size`."""
        room = self.room[priority]
        if self._size + rows > room:
            held = "its limit" if room == self.max_size else f"the limit for {PRIORITIES[priority]} priority"
            raise QueueFull(f"queue holds {self._size} requests, {held}; retry later", headers={"Retry-After": "1"})

    def push(self, entry: Pending) -> None:
        self.check_room(1, entry.priority)
        self._levels[entry.priority].append(entry)
        self._size += 1

    def ahead(self, priority: int) -> int:
        """Requests queued at `priority` or higher: about what a new one waits behind."""
        return sum(len(level) for level in self._levels[: priority + 1])

    def take(self, limits: BatchLimits, now: float) -> Selection:
        """The next batch and the dead found on the way (see `take_batch`), oldest by virtual time."""
        levels = [level for level in self._levels if level]
        if len(levels) <= 1:
            selection = take_batch(levels[0] if levels else self._pending, limits, now)
        else:
            window = limits.max_batch_size * MIXED_WINDOW
            merged = deque(itertools.islice(heapq.merge(*levels, key=_virtual), window))
            for entry in merged:
                self._levels[entry.priority].popleft()  # the merge yields each level's head in turn
            selection = take_batch(merged, limits, now, grouped=True)
            for entry in reversed(merged):  # what was not taken goes back to the front
                self._levels[entry.priority].appendleft(entry)
        self._size -= len(selection.batch) + len(selection.expired) + len(selection.dropped)
        return selection

    def take_all(self) -> list[Pending]:
        """Remove and return everything queued."""
        everything = [entry for level in self._levels for entry in level]
        for level in self._levels:
            level.clear()
        self._size = 0
        return everything

    def oldest_enqueued_at(self) -> float | None:
        heads = [level[0].enqueued_at for level in self._levels if level]
        return min(heads) if heads else None

    def full_batch_waiting(self, limits: BatchLimits) -> bool:
        """Whether enough is queued to fill a batch by rows or by padded tokens."""
        if self._size >= limits.max_batch_size:
            return True
        longest = max([entry.text.length for level in self._levels for entry in level], default=0)
        return self._size * longest >= limits.max_batch_tokens
