"""Batcher timing and ordering. These use FakeModel (a stand-in that can hold runs on a gate,
take time, or fail) because the point is when batches form, not what the model says.
Tests wait for the model's threads with events, never with sleeps."""

from __future__ import annotations

import asyncio
import time

import pytest

from batcher.errors import DeadlineExceeded, Draining, InternalError, ModelFailed, NotReady, QueueFull
from batcher.metrics import Metrics
from batcher.queue import RequestQueue
from tests.conftest import MakeBatcher, metric, row


def value(metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float:
    return metric(metrics, name, **(labels or {}))


async def handed_over(metrics: Metrics) -> None:
    """Yield to the loop until the batcher has handed every queued request to the worker."""
    for _ in range(100):
        if not value(metrics, "batcher_queue_depth"):
            return
        await asyncio.sleep(0)
    raise AssertionError("the batcher did not take the queued requests")


async def test_requests_queued_while_the_model_is_busy_share_one_batch(make_batcher: MakeBatcher) -> None:
    batcher, model, metrics = make_batcher(held=True, max_batch_size=16, max_wait_s=0, instances=1)
    first = batcher.submit(row(3))
    await model.started()
    rest = [batcher.submit(row(3)) for _ in range(10)]
    model.gate.set()
    results = await asyncio.gather(first, *rest)
    assert model.batches == [1, 10]
    assert [r.batch_size for r in results] == [1] + [10] * 10
    assert all(r.intent_id == 1 for r in results)
    assert value(metrics, "batcher_batch_size_sum") == 11


async def test_a_lone_client_does_not_wait_for_company(make_batcher: MakeBatcher) -> None:
    """With nobody else sending, a 1 s max_wait never delays the answer: the first request
    finds no expected company (no gap estimate yet), so it runs at once."""
    batcher, _, _ = make_batcher(max_wait_s=1.0)
    started = time.perf_counter()
    await batcher.submit(row(5))
    assert time.perf_counter() - started < 0.5


async def test_requests_arriving_together_wait_for_each_other(make_batcher: MakeBatcher) -> None:
    batcher, model, _ = make_batcher(max_wait_s=5.0, max_batch_size=8)
    # A full batch runs at once, and teaches the policy that arrivals come close together.
    await asyncio.gather(*(batcher.submit(row(5)) for _ in range(8)))
    started = time.perf_counter()
    futures = []
    for _ in range(8):  # the batcher runs between arrivals, and waits for the next one each time
        futures.append(batcher.submit(row(5)))
        for _ in range(3):
            await asyncio.sleep(0)
    await asyncio.gather(*futures)
    assert model.batches == [8, 8]  # one batch, formed when full, not the 5 s window later
    assert time.perf_counter() - started < 2.5


async def test_full_queue_answers_429_at_once(make_batcher: MakeBatcher) -> None:
    batcher, model, metrics = make_batcher(held=True, max_batch_size=1, max_queue_size=2, max_wait_s=0, instances=1)
    running = batcher.submit(row(3))
    await model.started()
    staged = batcher.submit(row(3))
    await handed_over(metrics)
    queued = [batcher.submit(row(3)), batcher.submit(row(3))]
    with pytest.raises(QueueFull):
        batcher.check_admission()
    with pytest.raises(QueueFull):
        batcher.submit(row(3))
    assert value(metrics, "batcher_rejected_total", {"reason": "queue_full"}) == 2
    model.gate.set()
    await asyncio.gather(running, staged, *queued)
    batcher.check_admission()


async def test_deadline_passes_while_queued_and_is_never_computed(make_batcher: MakeBatcher) -> None:
    batcher, model, metrics = make_batcher(
        held=True, max_batch_size=1, request_timeout_s=0.1, max_wait_s=0, instances=1
    )
    running = batcher.submit(row(3))
    await model.started()
    late = batcher.submit(row(3))
    with pytest.raises(DeadlineExceeded):
        await late
    with pytest.raises(DeadlineExceeded):  # the running one passed its deadline too
        await running
    assert value(metrics, "batcher_rejected_total", {"reason": "deadline"}) == 2
    model.gate.set()
    await batcher.close(1)
    assert model.rows == 1  # only the request that was already running was computed


async def test_disconnected_requests_are_skipped_and_counted(make_batcher: MakeBatcher) -> None:
    batcher, model, metrics = make_batcher(held=True, max_wait_s=0, instances=1)
    running = batcher.submit(row(3))
    await model.started()
    gone = [batcher.submit(row(3)) for _ in range(5)]
    stays = batcher.submit(row(3))
    for future in gone:
        future.cancel()  # what aiohttp does to the handler's await when its client hangs up
    model.gate.set()
    await asyncio.gather(running, stays)
    assert model.batches == [1, 1]
    assert value(metrics, "batcher_rejected_total", {"reason": "disconnected"}) == 5


async def test_model_failure_fails_that_batch_only(make_batcher: MakeBatcher) -> None:
    batcher, model, metrics = make_batcher(max_wait_s=0)
    model.fail_next = 1
    with pytest.raises(ModelFailed):
        await batcher.submit(row(3))
    assert batcher.last_run_failed
    result = await batcher.submit(row(3))
    assert result.intent_id == 1 and not batcher.last_run_failed
    assert value(metrics, "batcher_rejected_total", {"reason": "model_error"}) == 1


async def test_a_crashed_loop_answers_500_and_reports_not_ready(
    make_batcher: MakeBatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    batcher, _, _ = make_batcher()

    def broken(*args: object, **kwargs: object) -> object:
        raise RuntimeError("bug in batch selection")

    monkeypatch.setattr(RequestQueue, "take", broken)
    with pytest.raises(InternalError):
        await batcher.submit(row(3))
    await asyncio.sleep(0)  # the loop task finishes after failing the queue
    assert not batcher.alive
    with pytest.raises(NotReady):
        batcher.submit(row(3))


async def test_close_answers_everything_admitted_then_refuses(make_batcher: MakeBatcher) -> None:
    batcher, _, _ = make_batcher(delay_s=0.01, max_batch_size=4, max_wait_s=0)
    futures = [batcher.submit(row(3)) for _ in range(40)]
    await batcher.close(5)
    assert all(f.done() and f.exception() is None for f in futures)
    with pytest.raises(Draining):
        batcher.submit(row(3))


async def test_close_does_not_wait_for_company(make_batcher: MakeBatcher) -> None:
    batcher, _, _ = make_batcher(max_wait_s=10.0, max_batch_size=2)
    await asyncio.gather(batcher.submit(row(3)), batcher.submit(row(3)))  # company is expected from now on
    waiting = batcher.submit(row(3))
    started = time.perf_counter()
    await batcher.close(5)
    assert (await waiting).batch_size == 1
    assert time.perf_counter() - started < 2


async def test_close_past_its_timeout_answers_503_to_what_is_left(make_batcher: MakeBatcher) -> None:
    batcher, model, _ = make_batcher(held=True, max_batch_size=1, max_wait_s=0, instances=1)
    running = batcher.submit(row(3))
    await model.started()
    queued = batcher.submit(row(3))
    await batcher.close(0.1)  # the held run never finishes in time
    for future in (running, queued):
        with pytest.raises(Draining):
            await future


async def test_instances_run_batches_concurrently(make_batcher: MakeBatcher) -> None:
    batcher, model, metrics = make_batcher(held=True, max_wait_s=0, instances=2)
    first = batcher.submit(row(3))
    await model.started()
    second = batcher.submit(row(3))
    await model.started()  # both runs are in progress at once, one on each instance
    model.gate.set()
    await asyncio.gather(first, second)
    assert value(metrics, "batcher_batch_size_count") == 2
