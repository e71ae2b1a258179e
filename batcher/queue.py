"""Admitted requests waiting for a model run, and the pure function that picks a batch.

`take_batch` is synchronous and side-effect free apart from removing what it returns from
the pending deque: it drops the dead (client gone, deadline passed), always takes the
oldest live request, stops at the row or padded-token budget, and groups similar lengths
so short utterances are not padded to a long one's length when that padding would cost
more than a second model run.

The queue holds two FIFOs a priority, its fresh requests' (a new or idle client's) and
the others'; "oldest" is by virtual time (arrival plus an offset by priority and
freshness, batcher/promises.py), so a batch is taken from the heads of the FIFOs merged in
that order. While more than one FIFO waits, a batch is grouped by length only within the
next batch's worth in that order (MIXED_WINDOW), with few rows of lower rank than its
head (MIXED_LOWER_ROWS; HIGH_LOWER_ROWS behind high priority): grouping four batches'
worth took the head's neighbours in length, so a queue of mixed priorities served one
high-priority request per batch and high waited as long as normal did (67 vs 72 ms at 2x
saturation here). A batch headed by high priority holds at most HIGH_BATCH_ROWS rows, and
others are halved for a second after a request of higher rank than theirs came
(SHORT_BATCHES_S). None of that holds while high priority's own queue is half a batch deep
or more (`high_backlog`): high then waits behind high, and the model's whole pace is what
shortens that wait.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from batcher.errors import QueueFull
from batcher.model.tokenization import Text
from batcher.promises import HIGH, NORMAL, OFFSETS_S, PRIORITIES, ROOM


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
    fresh: bool = False
    """Its client had no answer in the last second (promises.FRESH_S)."""

    @property
    def virtual(self) -> float:
        """Its place in the queue: arrival plus its priority's offset, less for a fresh one."""
        return self.enqueued_at + OFFSETS_S[self.fresh][self.priority]

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
    """Remove and return the next batch (plus the dead found on the way) from `pending`:
    the group of similar lengths holding the oldest request (the head)."""
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


MIXED_WINDOW = 1
"""While several ranks wait, how many batches' worth of the queue, in virtual-time order, a
batch is grouped by length within (4, as with one rank, served one high-priority request a
batch)."""
MIXED_LOWER_ROWS = 8
"""While several ranks wait, the most rows of lower rank than its head a batch takes: a
higher-priority request (or a newcomer's) waits for a run in progress and then its own,
and its own filled to 32 rows takes ~40 ms a thread here."""
HIGH_LOWER_ROWS = 4
"""The same, behind a high-priority head. At 2x saturation with 20 % high, batches holding
high rows held ~8 rows, 4-6 of them high, in runs of ~9 ms; with 4 rows of lower rank at
most, high's p50 at 2x was lower in 5 of 5 rounds side by side (12.0-15.9 vs 16.8-21.8
ms), at about the same answers a second (2 at most cost ~7 %)."""
HIGH_BATCH_ROWS = 8
"""The most rows of a batch headed by high priority (HIGH_LOWER_ROWS of them of lower rank at
most), unless high has a backlog (`RequestQueue.high_backlog`). Measured from each answer's
own timing at 2x saturation with 20 % high, with halved batches (16 rows): high waited in
the queue 5-7 ms at p50 and 18-30 ms at p99; its own batches held 6 rows at p50 and 13-14
at p99 (high's requests filled them while they waited), runs of 6-8 and 13-22 ms, which the
next high-priority requests waited for when both instances ran one. Side by side with
halved batches (bench/promises.py steps, 2026-12-07, three sets of 4 rounds), high's p99 at
2x, medians: 26.1 vs 30.0 ms, 34.6 vs 91.3 ms (a slower half hour) and 26.4 vs 36.1 ms;
lower in 9 of 12 rounds; answers a second no fewer (1,198-1,388 vs 876-1,274 in the last
set). 4 rows cost 5-29 % of the answers a second at 2x in a clean set (994-1,163 vs
1,116-1,403, lower in 4 of 4 rounds) and did not lower high's p99."""


SHORT_BATCHES_S = 1.0
"""For this long after a request of higher rank (priority, then fresh) than a batch's head
was queued, batches are of half the rows, so that the next such request waits for half a
run in progress, not a full one. At 2x saturation with 20 % high priority, high's p99 was
2.32x its half-load p99 with full batches and 1.89x with halves (one quick run each)."""


def _virtual(entry: Pending) -> float:
    return entry.virtual


def _rank(entry: Pending) -> int:
    """Its FIFO: by priority, fresh first (0 = high and fresh)."""
    return _rank_of(entry.priority, entry.fresh)


def _rank_of(priority: int, fresh: bool = False) -> int:
    return 2 * priority + (not fresh)


class RequestQueue:
    """Bounded queue of admitted requests, two FIFOs a priority. Past its priority's share of
    `max_size` waiting (`promises.ROOM`), a request is refused at the door (429)."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.room = tuple(max(1, max_size - int(max_size * (1 - share))) for share in ROOM)
        """How many may be queued for a request of each priority to be admitted (the rest of
        max_size is kept for higher priorities; a small queue keeps none for normal)."""
        self._fifos: tuple[deque[Pending], ...] = tuple(deque() for _ in range(2 * len(PRIORITIES)))
        """By rank (`_rank`): each priority's fresh requests, then its others; each FIFO is in
        virtual-time order (a constant offset each)."""
        self._pushed = [-math.inf] * len(self._fifos)
        """Loop time a request of each rank was last queued."""
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
        rank = _rank(entry)
        self._fifos[rank].append(entry)
        self._pushed[rank] = entry.enqueued_at
        self._size += 1

    def ahead(self, priority: int) -> int:
        """Requests queued at `priority` or higher: about what a new one waits behind."""
        return sum(len(fifo) for fifo in self._fifos[: _rank_of(priority) + 1])

    def take(self, limits: BatchLimits, now: float) -> Selection:
        """The next batch and the dead found on the way (see `take_batch`), oldest by virtual
        time; of fewer rows behind high priority or while a higher rank came lately (`_limits`)."""
        ranks = [rank for rank, fifo in enumerate(self._fifos) if fifo]
        backlog = self.high_backlog(limits)  # of the configured batch, before `_limits` cuts it
        if len(ranks) <= 1:
            head = ranks[0] if ranks else 2 * NORMAL + 1
            selection = take_batch(self._fifos[head], self._limits(limits, head, now, backlog), now)
        else:
            head = min(ranks, key=lambda rank: self._fifos[rank][0].virtual)
            limits = self._limits(limits, head, now, backlog)
            merged = self._mixed_window(ranks, head, limits, backlog)
            selection = take_batch(merged, limits, now)
            for entry in reversed(merged):  # what was not taken goes back to the front
                self._fifos[_rank(entry)].appendleft(entry)
        self._size -= len(selection.batch) + len(selection.expired) + len(selection.dropped)
        return selection

    def _limits(self, limits: BatchLimits, head: int, now: float, backlog: bool) -> BatchLimits:
        """The limits of a batch headed by `head` (a rank): full behind high's backlog; else
        HIGH_BATCH_ROWS behind high, half the rows while a higher rank came lately."""
        if backlog:
            return limits
        if head <= _rank_of(HIGH):
            return replace(limits, max_batch_size=min(limits.max_batch_size, HIGH_BATCH_ROWS))
        if self._came_lately(head, now):
            return replace(limits, max_batch_size=max(1, limits.max_batch_size // 2))
        return limits

    def _mixed_window(self, ranks: list[int], head: int, limits: BatchLimits, backlog: bool) -> deque[Pending]:
        """Removed from the FIFOs: the next MIXED_WINDOW batches' worth (of `limits`, already
        cut by `_limits`) in virtual-time order, with at most MIXED_LOWER_ROWS (HIGH_LOWER_ROWS
        behind high priority, none behind high's backlog) of lower rank than the first,
        `head`. The window is no larger than the batch, so rows of lower rank come in only
        where those of the head's rank or higher leave room: grouped by length in a window of
        32 cut to 16 rows, they had displaced high-priority rows."""
        window = limits.max_batch_size * MIXED_WINDOW
        ahead = heapq.merge(*(self._fifos[rank] for rank in ranks if rank <= head), key=_virtual)
        behind = heapq.merge(*(self._fifos[rank] for rank in ranks if rank > head), key=_virtual)
        # each side read only as far as it can contribute, however long the queue
        lower = MIXED_LOWER_ROWS
        if head <= _rank_of(HIGH):
            lower = 0 if backlog else HIGH_LOWER_ROWS
        taken = heapq.merge(list(itertools.islice(ahead, window)), itertools.islice(behind, lower), key=_virtual)
        merged = deque(itertools.islice(taken, window))
        for entry in merged:  # a prefix of each FIFO: the merge yields each one's head in turn
            self._fifos[_rank(entry)].popleft()
        return merged

    def urgent(self, now: float, limits: BatchLimits) -> bool:
        """Whether a high-priority request was queued in the last SHORT_BATCHES_S and high
        priority has no backlog (`high_backlog`): then nothing is staged."""
        return self._came_lately(_rank_of(HIGH) + 1, now) and not self.high_backlog(limits)

    def high_backlog(self, limits: BatchLimits) -> bool:
        """Whether half a batch or more of high priority is queued. Small mixed batches (halved,
        few lower rows, none staged) shorten the run a new high-priority request waits for, at
        the cost of the model's pace; with high's own queue that deep it waits behind high, and
        that pace is what it needs: batches are then full and staged as without priorities, and
        one headed by high takes high alone. At 2x saturation with 30 % high (what 20 % is when
        the machine slows by a third), side by side, 5 rounds: high's p99 63 vs 152 ms
        (medians), 21 vs 710 refused; with high alone behind its backlog (against 8 lower
        rows), 4 rounds: p99 30 vs 43 ms, and 24 vs 27 ms with 20 % high."""
        return 2 * self.ahead(HIGH) >= limits.max_batch_size

    def _came_lately(self, ranks: int, now: float) -> bool:
        """Whether a request of rank below `ranks` was queued in the last SHORT_BATCHES_S."""
        since = now - SHORT_BATCHES_S
        return any(pushed > since for pushed in self._pushed[:ranks])

    def take_all(self) -> list[Pending]:
        """Remove and return everything queued."""
        everything = [entry for level in self._fifos for entry in level]
        for level in self._fifos:
            level.clear()
        self._size = 0
        return everything

    def oldest_enqueued_at(self) -> float | None:
        heads = [level[0].enqueued_at for level in self._fifos if level]
        return min(heads) if heads else None

    def full_batch_waiting(self, limits: BatchLimits) -> bool:
        """Whether enough is queued to fill a batch by rows or by padded tokens."""
        if self._size >= limits.max_batch_size:
            return True
        longest = max([entry.text.length for level in self._fifos for entry in level], default=0)
        return self._size * longest >= limits.max_batch_tokens
