from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batcher.errors import QueueFull
from batcher.model.tokenization import Text
from batcher.queue import BatchLimits, Pending, RequestQueue, padded_tokens, take_batch


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def entry(loop: asyncio.AbstractEventLoop, length: int, *, at: float = 0.0, deadline: float = 100.0) -> Pending:
    return Pending(Text("字" * length, length), at, deadline, loop.create_future(), at)


def lengths(batch: list[Pending]) -> list[int]:
    return [item.length for item in batch]


def test_takes_everything_that_fits_in_arrival_order(loop: asyncio.AbstractEventLoop) -> None:
    pending = deque(entry(loop, n) for n in (5, 3, 9))
    selection = take_batch(pending, BatchLimits(8, 1000), now=1.0)
    assert lengths(selection.batch) == [5, 3, 9]
    assert not pending


def test_stops_at_max_batch_size(loop: asyncio.AbstractEventLoop) -> None:
    pending = deque(entry(loop, 4) for _ in range(10))
    first = list(pending)
    selection = take_batch(pending, BatchLimits(4, 1000), now=1.0)
    assert selection.batch == first[:4]
    assert list(pending) == first[4:]


def test_stops_at_token_budget(loop: asyncio.AbstractEventLoop) -> None:
    pending = deque(entry(loop, 10) for _ in range(10))
    selection = take_batch(pending, BatchLimits(32, 35), now=1.0)
    assert len(selection.batch) == 3
    assert len(pending) == 7


def test_a_request_longer_than_the_budget_still_runs_alone(loop: asyncio.AbstractEventLoop) -> None:
    pending = deque([entry(loop, 100), entry(loop, 5)])
    selection = take_batch(pending, BatchLimits(32, 50), now=1.0)
    assert lengths(selection.batch) == [100]
    assert lengths(list(pending)) == [5]


def test_skips_cancelled_and_expired(loop: asyncio.AbstractEventLoop) -> None:
    gone, late, ok = entry(loop, 3), entry(loop, 3, deadline=0.5), entry(loop, 3)
    gone.future.cancel()
    selection = take_batch(deque([gone, late, ok]), BatchLimits(8, 1000), now=1.0)
    assert selection.batch == [ok]
    assert selection.dropped == [gone]
    assert selection.expired == [late]


def test_groups_similar_lengths_when_more_than_a_batch_waits(loop: asyncio.AbstractEventLoop) -> None:
    mixed = [8, 120, 9, 118, 10, 119, 8, 121]
    pending = deque(entry(loop, n, at=i) for i, n in enumerate(mixed))
    selection = take_batch(pending, BatchLimits(4, 10_000), now=50.0)
    assert lengths(selection.batch) == [8, 9, 10, 8]  # the oldest plus its short neighbours
    assert lengths(list(pending)) == [120, 118, 119, 121]  # the rest keep arrival order
    assert padded_tokens(lengths(selection.batch)) == 40


def test_oldest_request_is_always_taken(loop: asyncio.AbstractEventLoop) -> None:
    pending = deque([entry(loop, 120), *(entry(loop, 8) for _ in range(8))])
    selection = take_batch(pending, BatchLimits(4, 10_000), now=1.0)
    assert selection.batch[0].length == 120


def test_queue_refuses_past_its_bound(loop: asyncio.AbstractEventLoop) -> None:
    queue = RequestQueue(2)
    queue.push(entry(loop, 1))
    queue.push(entry(loop, 1))
    with pytest.raises(QueueFull) as info:
        queue.push(entry(loop, 1))
    assert info.value.headers["Retry-After"] == "1"
    assert len(queue) == 2


def test_full_batch_waiting_by_rows_or_tokens(loop: asyncio.AbstractEventLoop) -> None:
    queue = RequestQueue(100)
    limits = BatchLimits(3, 100)
    queue.push(entry(loop, 10))
    assert not queue.full_batch_waiting(limits)
    queue.push(entry(loop, 60))
    assert queue.full_batch_waiting(limits)  # 2 rows x 60 > 100 tokens


@given(
    st.lists(st.tuples(st.integers(1, 130), st.sampled_from(["live", "gone", "late"])), max_size=80),
    st.integers(1, 16),
    st.integers(1, 2000),
)
def test_selection_respects_limits_and_loses_nothing(items: list[tuple[int, str]], rows: int, tokens: int) -> None:
    loop = asyncio.new_event_loop()
    try:
        pending = deque(
            entry(loop, n, at=i, deadline=0.5 if kind == "late" else 9.0) for i, (n, kind) in enumerate(items)
        )
        for item, (_, kind) in zip(pending, items, strict=True):
            if kind == "gone":
                item.future.cancel()
        everything = list(pending)
        limits = BatchLimits(rows, tokens)
        seen: list[Pending] = []
        while pending:
            selection = take_batch(pending, limits, now=1.0)
            batch = selection.batch
            assert len(batch) <= rows
            assert len(batch) == 1 or padded_tokens(lengths(batch)) <= tokens
            assert all(not item.future.done() and item.deadline > 1.0 for item in batch)
            assert all(item.future.cancelled() for item in selection.dropped)
            assert all(item.deadline <= 1.0 for item in selection.expired)
            if batch:  # the oldest live request is in every batch
                oldest_live = next(i for i in everything if i not in seen and not i.future.done() and i.deadline > 1)
                assert oldest_live in batch
            seen += batch + selection.dropped + selection.expired
        assert sorted(map(id, seen)) == sorted(map(id, everything))  # each exactly once
    finally:
        loop.close()


def test_splits_by_length_when_padding_costs_more_than_a_run(loop: asyncio.AbstractEventLoop) -> None:
    mixed = [12, 50, 12, 12, 50, 12, 12, 12] * 4  # 32 requests: one batch by size, but half padding
    short_first = take_batch(deque(entry(loop, n, at=i) for i, n in enumerate(mixed)), BatchLimits(32, 10_000), 1.0)
    assert lengths(short_first.batch) == [12] * 24
    long_first = take_batch(deque(entry(loop, n, at=i) for i, n in enumerate(mixed[1:])), BatchLimits(32, 10_000), 1.0)
    assert lengths(long_first.batch) == [50] * 8


def test_small_padding_is_cheaper_than_a_second_run(loop: asyncio.AbstractEventLoop) -> None:
    pending = deque(entry(loop, n) for n in (12, 13, 12, 14))
    assert lengths(take_batch(pending, BatchLimits(32, 10_000, overhead_tokens=16), 1.0).batch) == [12, 13, 12, 14]
