"""Batcher timing and ordering. These use FakeModel (a stand-in that can block, sleep or
fail) because the point is when batches form, not what the model says."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import numpy as np
import pytest

from batcher import batching
from batcher.batching import Batcher, pad_batch, softmax
from batcher.config import BatchingSettings
from batcher.errors import DeadlineExceeded, Draining, InternalError, ModelFailed, NotReady, QueueFull
from batcher.metrics import Metrics
from batcher.tokenization import Encoded
from tests.conftest import FakeModel


def row(length: int) -> Encoded:
    return Encoded(list(range(1, length + 1)), [0] * length)


def make_batcher(model: FakeModel, **settings: float) -> tuple[Batcher, Metrics]:
    metrics = Metrics(process=False)
    batcher = Batcher(model, settings=BatchingSettings(**settings), metrics=metrics, pad_id=0, num_labels=4)  # type: ignore[arg-type]
    batcher.start()
    return batcher, metrics


def value(metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float:
    result = metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if result is None else result


def test_pad_batch_pads_to_the_longest_row() -> None:
    ids, mask, types = pad_batch([row(2), row(4)], pad_id=0)
    assert ids.tolist() == [[1, 2, 0, 0], [1, 2, 3, 4]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert types.shape == (2, 4)


def test_softmax_rows_sum_to_one() -> None:
    probs = softmax(np.array([[1000.0, 1000.0], [0.0, np.log(3)]], dtype=np.float32))
    np.testing.assert_allclose(probs, [[0.5, 0.5], [0.25, 0.75]], rtol=1e-6)


async def test_requests_queued_while_the_model_is_busy_share_one_batch() -> None:
    model = FakeModel()
    model.armed = True
    model.gate.clear()
    batcher, metrics = make_batcher(model, max_batch_size=16, max_wait_ms=0, instances=1)
    first = batcher.submit(row(3))
    await asyncio.sleep(0.05)  # first is now running (blocked on the gate)
    rest = [batcher.submit(row(3)) for _ in range(10)]
    model.gate.set()
    results = await asyncio.gather(first, *rest)
    assert model.batches == [1, 10]
    assert [r.batch_size for r in results] == [1] + [10] * 10
    assert all(r.intent_id == 1 for r in results)
    assert value(metrics, "batcher_batch_size_sum") == 11
    await batcher.close(1)


async def test_a_lone_client_does_not_wait_for_company() -> None:
    model = FakeModel()
    batcher, _ = make_batcher(model, max_wait_ms=200)
    latencies = []
    for _ in range(5):
        started = time.perf_counter()
        await batcher.submit(row(5))
        latencies.append(time.perf_counter() - started)
        await asyncio.sleep(0.3)  # sparse arrivals: the gap is longer than max_wait
    assert sorted(latencies)[2] < 0.1  # median far below the 200 ms window
    await batcher.close(1)


async def test_dense_arrivals_wait_for_company() -> None:
    model = FakeModel()
    model.armed = True
    batcher, _ = make_batcher(model, max_wait_ms=100, max_batch_size=64)
    futures = []
    for _ in range(20):
        futures.append(batcher.submit(row(5)))
        await asyncio.sleep(0.002)  # 2 ms gaps, well inside the 100 ms window
    await asyncio.gather(*futures)
    assert len(model.batches) < 10 and max(model.batches) > 2
    await batcher.close(1)


async def test_full_queue_answers_429_at_once() -> None:
    model = FakeModel()
    model.armed = True
    model.gate.clear()
    batcher, metrics = make_batcher(model, max_batch_size=1, max_queue_size=2, max_wait_ms=0, instances=1)
    running = batcher.submit(row(3))
    await asyncio.sleep(0.05)
    queued = [batcher.submit(row(3)), batcher.submit(row(3))]
    with pytest.raises(QueueFull):
        batcher.submit(row(3))
    assert value(metrics, "batcher_rejected_total", {"reason": "queue_full"}) == 1
    model.gate.set()
    await asyncio.gather(running, *queued)
    await batcher.close(1)


async def test_deadline_passes_while_queued_and_is_never_computed() -> None:
    model = FakeModel()
    model.armed = True
    model.gate.clear()
    batcher, metrics = make_batcher(model, max_batch_size=1, request_timeout_ms=100, max_wait_ms=0, instances=1)
    running = batcher.submit(row(3))
    await asyncio.sleep(0.02)
    late = batcher.submit(row(3))
    with pytest.raises(DeadlineExceeded):
        await late
    assert value(metrics, "batcher_rejected_total", {"reason": "deadline"}) >= 1
    model.gate.set()
    with pytest.raises(DeadlineExceeded):  # the running one also passed its deadline
        await running
    await asyncio.sleep(0.05)
    assert model.rows == 1  # only the request that was already running was computed
    await batcher.close(1)


async def test_disconnected_requests_are_skipped_and_counted() -> None:
    model = FakeModel()
    model.armed = True
    model.gate.clear()
    batcher, metrics = make_batcher(model, max_wait_ms=0)
    running = batcher.submit(row(3))
    await asyncio.sleep(0.02)
    gone = [batcher.submit(row(3)) for _ in range(5)]
    stays = batcher.submit(row(3))
    for future in gone:
        future.cancel()  # what aiohttp does to the handler's await when its client hangs up
    model.gate.set()
    await asyncio.gather(running, stays)
    assert model.batches == [1, 1]
    assert value(metrics, "batcher_rejected_total", {"reason": "disconnected"}) == 5
    await batcher.close(1)


async def test_model_failure_fails_that_batch_only() -> None:
    model = FakeModel()
    model.armed = True
    model.fail_next = 1
    batcher, metrics = make_batcher(model, max_wait_ms=0)
    with pytest.raises(ModelFailed):
        await batcher.submit(row(3))
    assert batcher.last_run_failed
    result = await batcher.submit(row(3))
    assert result.intent_id == 1 and not batcher.last_run_failed
    assert value(metrics, "batcher_rejected_total", {"reason": "model_error"}) == 1
    await batcher.close(1)


async def test_a_crashed_loop_answers_500_and_reports_not_ready(monkeypatch: pytest.MonkeyPatch) -> None:
    model = FakeModel()
    batcher, _ = make_batcher(model)

    def broken(*args: object, **kwargs: object) -> object:
        raise RuntimeError("bug in batch selection")

    monkeypatch.setattr(batching, "take_batch", broken)
    with pytest.raises(InternalError):
        await batcher.submit(row(3))
    await asyncio.sleep(0)
    assert batcher.crashed and not batcher.alive
    with pytest.raises(NotReady):
        batcher.submit(row(3))
    await batcher.close(1)


async def test_close_answers_everything_admitted_then_refuses() -> None:
    model = FakeModel(delay_s=0.01)
    batcher, _ = make_batcher(model, max_batch_size=4, max_wait_ms=0)
    futures = [batcher.submit(row(3)) for _ in range(40)]
    await batcher.close(5)
    assert all(f.done() and f.exception() is None for f in futures)
    with pytest.raises(Draining):
        batcher.submit(row(3))


async def test_instances_run_batches_concurrently() -> None:
    model = FakeModel(delay_s=0.3)
    batcher, metrics = make_batcher(model, max_wait_ms=0, instances=2)
    started = time.perf_counter()
    first = batcher.submit(row(3))
    await asyncio.sleep(0.02)  # the first run has started; the second goes to the other instance
    second = batcher.submit(row(3))
    await asyncio.gather(first, second)
    assert time.perf_counter() - started < 0.55  # not 0.6 s one after the other
    assert value(metrics, "batcher_batch_size_count") == 2
    await batcher.close(1)


async def test_admission_is_refused_before_parsing_when_full() -> None:
    model = FakeModel()
    model.armed = True
    model.gate.clear()
    batcher, metrics = make_batcher(model, max_batch_size=1, max_queue_size=2, max_wait_ms=0, instances=1)
    batcher.check_admission()
    running = batcher.submit(row(3))
    await asyncio.sleep(0.05)
    staged = batcher.submit(row(3))
    await asyncio.sleep(0.05)
    queued = [batcher.submit(row(3)), batcher.submit(row(3))]
    with pytest.raises(QueueFull):
        batcher.check_admission()
    assert value(metrics, "batcher_rejected_total", {"reason": "queue_full"}) == 1
    model.gate.set()
    await asyncio.gather(running, staged, *queued)
    batcher.check_admission()
    await batcher.close(1)


async def test_a_fast_lone_client_stops_paying_for_waits() -> None:
    """Closed loop, one client, gaps far shorter than max_wait_ms: the gap estimate alone would
    make it wait every time; the outcome of recent waits (no company came) stops that."""
    batcher, _ = make_batcher(FakeModel(), max_wait_ms=40)
    latencies = []
    for _ in range(40):
        started = time.perf_counter()
        await batcher.submit(row(5))
        latencies.append(time.perf_counter() - started)
        await asyncio.sleep(0.001)
    assert sorted(latencies)[20] < 0.01  # median: no 40 ms wait
    assert sum(latency > 0.03 for latency in latencies) <= 10  # a few waits early, and rare probes
    await batcher.close(1)


class PolicyProbe(FakeModel):
    """Records the scheduling policy and niceness of the thread each run executes on."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, int]] = []

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray) -> np.ndarray:
        self.seen.append((os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
        return super().run(input_ids, attention_mask, token_type_ids)


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux-only")
async def test_model_threads_run_under_sched_idle_and_the_loop_does_not() -> None:
    model = PolicyProbe()
    batcher, _ = make_batcher(model)
    await batcher.submit(row(3))
    await batcher.close(1)
    assert model.seen and all(policy == os.SCHED_IDLE for policy, _ in model.seen)
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the loop's thread is left alone


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="niceness per thread is Linux-only")
async def test_without_sched_idle_the_model_threads_are_niced() -> None:
    model = PolicyProbe()
    batcher, _ = make_batcher(model, worker_sched_idle=False, worker_nice=7)
    await batcher.submit(row(3))
    await batcher.close(1)
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert model.seen and all(policy == os.SCHED_OTHER and nice == min(19, base + 7) for policy, nice in model.seen)
