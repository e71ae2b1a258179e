"""Priorities, client deadlines, admission by predicted wait and computed Retry-After
(batcher/promises.py, the queue's priority FIFOs, the batcher's admission), and the fast
lane holding the 429s of clients that retry before their Retry-After. The batcher tests
use the FakeModel: they are about ordering and timing, not answers."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from batcher.batching import STANDING_GRACE_S
from batcher.errors import DeadlineExceeded, PredictedLate, QueueFull, ValidationFailed
from batcher.handlers import METRICS, MODELS, in_time
from batcher.model.tokenization import Text
from batcher.promises import HIGH, LOW, NORMAL, PLAIN, PREDICTION_MARGIN, Pace, Promise, promise_of, retry_headers
from batcher.queue import (
    HIGH_BATCH_ROWS,
    HIGH_LOWER_ROWS,
    MIXED_LOWER_ROWS,
    SHORT_BATCHES_S,
    BatchLimits,
    Pending,
    RequestQueue,
)
from tests.conftest import MODEL, FakeModel, MakeBatcher, MakeClient, row
from tests.test_batching import handed_over, value
from tests.test_fastpath import ONE, raw, read_answer


def test_a_promise_comes_from_the_body_over_the_headers() -> None:
    assert promise_of(None, None) is PLAIN
    assert promise_of("HIGH", "250") == Promise(HIGH, 0.25)
    assert promise_of(None, "100") == Promise(NORMAL, 0.1)
    assert promise_of("high", "250", "low", 1000) == Promise(LOW, 1.0)
    with pytest.raises(ValidationFailed, match="x-deadline-ms"):  # a bad header is refused, body or not
        promise_of(None, "soon", None, 1000)
    for bad in ("urgent", "", "1"):
        with pytest.raises(ValidationFailed, match="x-priority: expected high, normal or low"):
            promise_of(bad, None)
    for bad in ("0", "-5", "99.9", "soon", "nan", "1e9"):
        with pytest.raises(ValidationFailed, match="x-deadline-ms"):
            promise_of(None, bad)


def test_the_pace_is_the_median_of_recent_runs_so_one_hung_run_does_not_skew_it() -> None:
    pace = Pace(instances=2)
    assert not pace.known and pace.wait_s(100) == 0.0
    for seconds in (0.010, 0.010, 5.0, 0.012, 0.010):
        pace.ran(10, seconds)
    assert pace.known and pace.run_s == pytest.approx(0.010)
    assert pace.rows_per_s() == pytest.approx(2 * 10 / 0.010)
    assert pace.wait_s(200) == pytest.approx(PREDICTION_MARGIN * 200 / 2000 + 2 * 0.010)
    assert retry_headers(0.0301) == {"Retry-After": "1", "x-retry-after-ms": "31"}
    assert retry_headers(2.2)["Retry-After"] == "3"


def pending(at: float, priority: int) -> Pending:
    return Pending(row(4), at, at + 10, asyncio.get_running_loop().create_future(), 0.0, priority)


@contextmanager
def full(queue: RequestQueue) -> Iterator[None]:
    """The queue (of max_size 1) is full while this holds: one request sits in it, never run."""
    queue.push(pending(0.0, NORMAL))
    try:
        yield
    finally:
        queue.take_all()


async def test_higher_priority_goes_first_but_ageing_bounds_the_wait() -> None:
    queue = RequestQueue(64)
    queue.push(pending(0.0, LOW))  # ordered at 1.0
    queue.push(pending(0.05, NORMAL))  # 0.95: less than AGING_S[low] - AGING_S[normal] after the low one
    queue.push(pending(0.3, HIGH))
    queue.push(pending(1.2, HIGH))  # arrived more than 1 s after the low one: orders after it
    limits = BatchLimits(max_batch_size=1, max_batch_tokens=1000)
    order = [queue.take(limits, now=0.0).batch[0] for _ in range(4)]
    assert [(entry.enqueued_at, entry.priority) for entry in order] == [(0.3, 0), (0.05, 1), (0.0, 2), (1.2, 0)]
    assert len(queue) == 0


async def test_a_mixed_queue_serves_high_priority_before_the_heads_neighbours_in_length() -> None:
    """Grouping the whole queue by length took one high-priority request a batch (the head)
    and filled the batch with normal ones of its length; mixed, a batch is formed from the
    requests next in line."""
    queue = RequestQueue(64)
    lengths = (5, 15, 25, 35)
    for index in range(16):
        queue.push(Pending(row(lengths[index % 4]), index / 100, 10.0, asyncio.get_running_loop().create_future(), 0.0))
    for length in lengths:
        queue.push(Pending(row(length), 0.1, 10.0, asyncio.get_running_loop().create_future(), 0.0, HIGH))
    limits = BatchLimits(max_batch_size=4, max_batch_tokens=1000)
    taken: list[int] = []
    while queue.ahead(HIGH):
        taken += [entry.priority for entry in queue.take(limits, now=0.0).batch]
    assert taken == [HIGH] * 4  # every high one before any normal one, whatever its length


async def test_each_priority_may_fill_its_share_of_the_queue() -> None:
    queue = RequestQueue(16)
    assert queue.room == (16, 14, 8)
    for at in range(8):
        queue.push(pending(at, LOW))
    with pytest.raises(QueueFull, match="limit for low priority"):
        queue.check_room(1, LOW)
    queue.check_room(6, NORMAL)
    with pytest.raises(QueueFull):
        queue.check_room(7, NORMAL)
    queue.check_room(8, HIGH)
    assert queue.ahead(HIGH) == 0 and queue.ahead(LOW) == 8


async def warm_pace(batcher: object, make_rows: int = 6) -> None:
    """Let the batcher measure its pace on a few real (fake-model) runs."""
    submit = batcher.submit  # type: ignore[attr-defined]
    for _ in range(make_rows):
        await submit(row(3))


async def test_under_load_high_priority_is_taken_before_what_waited_longer(make_batcher: MakeBatcher) -> None:
    batcher, model, metrics = make_batcher(held=True, max_batch_size=1, max_wait_s=0, instances=1)
    running = batcher.submit(row(3))
    await model.started()
    staged = batcher.submit(row(3))
    await handed_over(metrics)
    normal = batcher.submit(row(3))
    high = batcher.submit(row(3), Promise(HIGH))
    finished: list[str] = []
    normal.add_done_callback(lambda _: finished.append("normal"))
    high.add_done_callback(lambda _: finished.append("high"))
    model.gate.set()
    await asyncio.gather(running, staged, normal, high)
    assert finished == ["high", "normal"]
    assert value(metrics, "batcher_priority_requests_total", {"priority": "high", "outcome": "admitted"}) == 1


async def test_while_high_priority_comes_no_batch_is_staged_so_the_next_one_holds_it(
    make_batcher: MakeBatcher,
) -> None:
    """A staged batch is formed before the high-priority requests that arrive while it waits for
    an instance: they waited for it, then for their own run."""
    batcher, model, _ = make_batcher(held=True, max_batch_size=4, max_wait_s=0, instances=1)
    first = batcher.submit(row(3), Promise(HIGH))
    await model.started()
    normals = [batcher.submit(row(3)) for _ in range(4)]  # a full batch, staged were no high about
    for _ in range(10):
        await asyncio.sleep(0)
    high = batcher.submit(row(3), Promise(HIGH))
    finished: list[str] = []

    def note(name: str) -> Callable[[object], None]:
        return lambda _: finished.append(name)

    for name, future in (*(("normal", normal) for normal in normals), ("high", high)):
        future.add_done_callback(note(name))
    model.gate.set()
    await asyncio.gather(first, high, *normals)
    assert finished == ["high", "normal", "normal", "normal", "normal"]
    assert model.batches == [1, 4, 1]  # the high one and three normal ones, then the last


async def test_the_queue_says_whether_high_priority_came_lately() -> None:
    queue = RequestQueue(8)
    limits = BatchLimits(max_batch_size=4, max_batch_tokens=1000)
    queue.push(pending(0.0, NORMAL))
    assert not queue.urgent(0.1, limits)
    queue.push(fresh(0.2, HIGH))
    assert queue.urgent(0.3, limits) and queue.urgent(0.2 + SHORT_BATCHES_S - 0.01, limits)
    assert not queue.urgent(0.2 + SHORT_BATCHES_S + 0.01, limits)
    queue.push(pending(0.25, HIGH))  # half a batch of high priority queued: its backlog
    assert queue.high_backlog(limits) and not queue.urgent(0.3, limits)


async def test_a_batch_headed_by_high_holds_few_rows_unless_high_has_a_backlog() -> None:
    """Below half a batch of high priority queued, a batch headed by high holds HIGH_BATCH_ROWS
    rows, HIGH_LOWER_ROWS of lower rank at most (15 high rows are not a backlog); from there a
    new high request waits behind high anyway, so batches are full and one headed by high
    takes no lower rows."""
    limits = BatchLimits(max_batch_size=32, max_batch_tokens=10_000)
    rows, lower_rows = HIGH_BATCH_ROWS, HIGH_LOWER_ROWS
    for highs, taken, lower in ((1, 1, lower_rows), (rows - 2, rows - 2, 2), (15, rows, 0), (20, 20, 0)):
        queue = RequestQueue(256)
        normals = [pending(index / 1000, NORMAL) for index in range(40)]
        for entry in [*normals, *(pending(0.1 + index / 1000, HIGH) for index in range(highs))]:
            queue.push(entry)
        assert queue.high_backlog(limits) == (highs >= 16)
        batch = queue.take(limits, now=0.2).batch
        assert [entry.priority for entry in batch].count(HIGH) == taken
        assert [entry for entry in batch if entry.priority == NORMAL] == normals[:lower]


async def test_behind_a_backlog_of_high_priority_other_batches_are_full() -> None:
    """A batch headed by normal requests that waited past high's offset is halved while high
    came lately (10 high rows queued are not a backlog); behind 16 or more, it is full."""
    limits = BatchLimits(max_batch_size=32, max_batch_tokens=10_000)
    for highs, rows in ((10, 16), (20, 32)):
        queue = RequestQueue(256)
        for index in range(60):  # ordered at -0.1 s and after: before the high ones
            queue.push(pending(-1.0 + index / 1000, NORMAL))
        for index in range(highs):
            queue.push(pending(0.1 + index / 1000, HIGH))
        assert queue.high_backlog(limits) == (highs >= 16)
        batch = queue.take(limits, now=0.2).batch
        assert len(batch) == rows and {entry.priority for entry in batch} == {NORMAL}


async def test_a_request_that_cannot_be_answered_in_time_is_refused_at_once(make_batcher: MakeBatcher) -> None:
    batcher, model, metrics = make_batcher(
        held=False, max_batch_size=1, max_wait_s=0, instances=1, delay_s=0.02, max_queue_wait_s=0
    )
    await warm_pace(batcher)  # runs of ~20 ms
    model.gate.clear()
    running = batcher.submit(row(3))
    await model.started()
    queued = [batcher.submit(row(3)) for _ in range(5)]  # ~100 ms of work ahead
    started = time.perf_counter()
    with pytest.raises(PredictedLate) as refused:
        batcher.submit(row(3), Promise(NORMAL, 0.05), started)
    assert refused.value.status == 429 and refused.value.type == "predicted_late"
    assert int(refused.value.headers["x-retry-after-ms"]) >= 80 and refused.value.headers["Retry-After"] == "1"
    in_time = batcher.submit(row(3), Promise(NORMAL, 5.0), started)
    assert value(metrics, "batcher_rejected_total", {"reason": "predicted_late"}) == 1
    model.gate.set()
    await asyncio.gather(running, in_time, *queued)


async def test_the_queue_is_held_to_the_work_the_model_drains_in_max_queue_wait_s(make_batcher: MakeBatcher) -> None:
    batcher, model, metrics = make_batcher(
        held=False, max_batch_size=1, max_wait_s=0, instances=1, delay_s=0.02, max_queue_wait_s=0.05
    )
    await warm_pace(batcher)  # 1-row runs of ~20 ms: ~2.5 rows in 50 ms; the floor is 2 (a run and a staged one)
    assert batcher.standing_rows() == pytest.approx(2.5, rel=0.3)
    model.gate.clear()
    running = batcher.submit(row(3))
    await model.started()
    staged = batcher.submit(row(3))
    await handed_over(metrics)
    queued = batcher.submit(row(3))  # the queue ahead is empty: admitted, whatever runs
    burst = batcher.submit(row(3))  # past the bound, but the queue only now stands above it: let in
    await asyncio.sleep(STANDING_GRACE_S)
    with pytest.raises(QueueFull, match=r"batching.max_queue_wait_s") as refused:
        batcher.submit(row(3))
    assert int(refused.value.headers["x-retry-after-ms"]) >= 10  # the queue's drain, not a fixed second
    high = batcher.submit(row(3), Promise(HIGH))  # nothing of its priority ahead of it
    assert len(batcher._queue) == 3 < batcher._queue.max_size
    model.gate.set()
    await asyncio.gather(running, staged, queued, burst, high)


async def test_max_queue_wait_s_0_admits_by_count_alone(make_batcher: MakeBatcher) -> None:
    batcher, model, _ = make_batcher(held=False, max_batch_size=1, max_wait_s=0, instances=1, max_queue_wait_s=0)
    await warm_pace(batcher)
    model.gate.clear()
    futures = [batcher.submit(row(3)) for _ in range(20)]
    model.gate.set()
    await asyncio.gather(*futures)


async def test_an_answer_ready_after_the_clients_deadline_is_a_504(make_client: MakeClient) -> None:
    client = await make_client()
    runtime = client.app[MODELS].get()
    in_time(runtime, Promise(NORMAL, 0.5), time.perf_counter() - 0.2)
    in_time(runtime, PLAIN, time.perf_counter() - 100)  # no deadline of its own: the server's timeout held it
    with pytest.raises(DeadlineExceeded):
        in_time(runtime, Promise(NORMAL, 0.1), time.perf_counter() - 0.2)
    assert value(client.app[METRICS], "batcher_rejected_total", {"reason": "deadline"}) == 1


async def test_a_deadline_that_passes_while_queued_is_never_computed(make_batcher: MakeBatcher) -> None:
    batcher, model, metrics = make_batcher(held=True, max_batch_size=1, max_wait_s=0, instances=1)
    running = batcher.submit(row(3))
    await model.started()
    short = batcher.submit(row(3), Promise(NORMAL, 0.05))  # no pace yet: admitted, then expires
    with pytest.raises(DeadlineExceeded):
        await short
    model.gate.set()
    await running
    await batcher.close(1)
    assert model.rows == 1 and value(metrics, "batcher_rejected_total", {"reason": "deadline"}) == 1


async def test_an_earlier_client_deadline_resets_the_one_timer(make_batcher: MakeBatcher) -> None:
    batcher, model, _ = make_batcher(held=True, max_batch_size=1, max_wait_s=0, instances=1, request_timeout_s=5)
    running = batcher.submit(row(3))
    await model.started()
    patient = batcher.submit(row(3))
    hurried = batcher.submit(row(3), Promise(NORMAL, 0.05))
    started = time.perf_counter()
    with pytest.raises(DeadlineExceeded):
        await hurried
    assert time.perf_counter() - started < 1.0  # its own 50 ms, not the 5 s of the one before it
    model.gate.set()
    await asyncio.gather(running, patient)


async def test_the_queue_full_refusal_says_when_to_come_back(make_batcher: MakeBatcher) -> None:
    batcher, model, _ = make_batcher(
        held=False, max_batch_size=1, max_queue_size=4, max_wait_s=0, instances=1, max_queue_wait_s=0
    )
    model.delay_s = 0.02
    await warm_pace(batcher)
    model.gate.clear()
    running = batcher.submit(row(3))
    await model.started()
    queued = [batcher.submit(row(3)) for _ in range(4)]
    with pytest.raises(QueueFull) as refused:
        batcher.check_admission()
    assert 60 <= int(refused.value.headers["x-retry-after-ms"]) <= 400  # 4 queued runs of ~20 ms
    model.gate.set()
    await asyncio.gather(running, *queued)


async def test_priority_and_deadline_by_header_or_body_in_both_lanes(make_client: MakeClient) -> None:
    client = await make_client()
    for headers, body in (({"x-priority": "high", "x-deadline-ms": "5000"}, ONE), ({}, {**ONE, "priority": "low"})):
        answer = await client.post("/predict", json=body, headers=headers)
        assert answer.status == 200
    bad = await client.post("/predict", json=ONE, headers={"x-priority": "urgent"})
    assert bad.status == 422 and (await bad.json())["error"]["message"].startswith("x-priority")
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(raw(ONE).replace(b"\r\n\r\n", b"\r\nx-priority: low\r\nx-deadline-ms: 3000\r\n\r\n", 1))
    assert (await read_answer(reader))[0] == 200
    writer.write(raw(ONE).replace(b"\r\n\r\n", b"\r\nx-deadline-ms: never\r\n\r\n", 1))
    status, _, body_bytes = await read_answer(reader)
    assert status == 422 and b"x-deadline-ms" in body_bytes
    writer.close()
    spec = await (await client.get("/openapi.json")).json()
    assert "priority" in spec["components"]["schemas"]["PredictRequest"]["properties"]


async def test_a_client_that_retries_before_its_retry_after_waits_for_its_429(make_client: MakeClient) -> None:
    """A retry storm's connection gets one refusal per Retry-After; a polite one is answered at once."""
    client = await make_client("batching.max_queue_size=1", "batching.max_batch_size=1", "batching.instances=1")
    with full(client.app[MODELS].get().batcher._queue):
        reader, writer = await asyncio.open_connection(client.host, client.port)
        answers, started = 0, time.perf_counter()
        while time.perf_counter() - started < 1.3:  # a storm: back at once after every 429
            writer.write(raw(ONE))
            status, headers, _ = await read_answer(reader)
            assert status == 429
            answers += 1
        assert answers <= 3  # one refusal per Retry-After (1 s while the pace is unknown), not thousands
        assert value(client.app[METRICS], "batcher_held_refusals_total") == answers - 1 >= 1
        started = time.perf_counter()
        writer.write(raw({"turns": [{"text": "明天天气怎么样"}]}))  # another client on the same connection
        assert (await read_answer(reader))[0] == 429 and time.perf_counter() - started < 0.2  # at once
        await asyncio.sleep(int(headers["x-retry-after-ms"]) / 1000)
        started = time.perf_counter()
        writer.write(raw(ONE))
        assert (await read_answer(reader))[0] == 429 and time.perf_counter() - started < 0.2  # polite: at once
        writer.close()


async def test_identical_waiting_inputs_share_one_row_and_each_gets_its_answer(make_batcher: MakeBatcher) -> None:
    batcher, model, metrics = make_batcher(held=True, max_batch_size=4, max_wait_s=0, instances=1, coalesce=True)
    running = batcher.submit(row(3))
    await model.started()
    twins = [batcher.submit(row(5)) for _ in range(4)]  # one row, four clients
    other = batcher.submit(row(6))
    urgent = batcher.submit(row(5), Promise(HIGH))  # does not wait behind a normal-priority row
    gone = batcher.submit(row(5))
    gone.cancel()  # one client leaves: the others are still answered
    model.gate.set()
    answers = await asyncio.gather(running, *twins, other, urgent)
    assert all(answer.intent_id == 1 for answer in answers)
    assert model.batches[-1] == 3 and model.rows == 4  # the running row, then row(5), row(6), the urgent row(5)
    assert value(metrics, "batcher_coalesced_rows_total") == 4


async def test_a_shared_row_whose_clients_all_left_is_not_computed(make_batcher: MakeBatcher) -> None:
    batcher, model, metrics = make_batcher(held=True, max_batch_size=4, max_wait_s=0, instances=1, coalesce=True)
    running = batcher.submit(row(3))
    await model.started()
    twins = [batcher.submit(row(5)) for _ in range(3)]
    for twin in twins:
        twin.cancel()
    model.gate.set()
    await running
    await batcher.close(1)
    assert model.rows == 1 and value(metrics, "batcher_rejected_total", {"reason": "disconnected"}) == 1


@pytest.mark.parametrize("coalesce", ["true", "false"])
async def test_coalesced_answers_equal_answers_computed_alone(make_client: MakeClient, coalesce: str) -> None:
    client = await make_client(f"batching.coalesce={coalesce}", "batching.instances=1")
    bodies = [
        {"turns": [{"text": text}], "return_all_probs": True} for text in ("播放周杰伦的歌", "后天上海会不会刮大风") * 6
    ]
    answers = await asyncio.gather(*(client.post("/predict", json=body) for body in bodies))
    results = [await answer.json() for answer in answers]
    alone = [await (await client.post("/predict", json=body)).json() for body in bodies[:2]]
    for index, result in enumerate(results):
        assert result["probabilities"] == alone[index % 2]["probabilities"]


async def test_a_client_that_keeps_retrying_early_is_held_longer_each_time(make_client: MakeClient) -> None:
    """Retry-After is the queue's drain (milliseconds here); a connection that keeps coming
    back before it is held twice as long each time, up to 1 s."""
    client = await make_client(
        "batching.max_queue_size=1", "batching.max_batch_size=1", "batching.instances=1", "batching.lone_threads=0"
    )
    for _ in range(6):  # the pace measured on the instance: Retry-After is the drain, not 1 s
        assert (await client.post("/predict", json=ONE)).status == 200
    with full(client.app[MODELS].get().batcher._queue):
        reader, writer = await asyncio.open_connection(client.host, client.port)
        told: list[int] = []
        started = time.perf_counter()
        while time.perf_counter() - started < 0.6:
            writer.write(raw(ONE))
            status, headers, _ = await read_answer(reader)
            assert status == 429
            told.append(int(headers["x-retry-after-ms"]))
        writer.close()
    assert told[0] < 100 and len(told) <= 14  # not one refusal per drain time: ~600 of them
    assert all(later >= earlier for earlier, later in itertools.pairwise(told[1:])) and told[-1] > 4 * told[1]


async def test_a_lone_request_runs_on_the_lone_model_and_load_on_the_instances(make_batcher: MakeBatcher) -> None:
    lone = FakeModel(num_labels=4)
    lone.armed = True
    batcher, model, _ = make_batcher(lone=lone, held=False, max_batch_size=1, max_wait_s=0, instances=1)
    await batcher.submit(row(3))
    assert lone.batches == [1] and model.batches == []  # idle model, one request: every core
    model.gate.clear()
    lone.gate.clear()
    first = batcher.submit(row(3))
    await lone.started()
    rest = [batcher.submit(row(3)) for _ in range(3)]  # arriving while it runs: the instances take them
    lone.gate.set()
    model.gate.set()
    await asyncio.gather(first, *rest)
    # the instance took what arrived during the lone run; the last may find the model idle again
    assert lone.batches[:2] == [1, 1] and len(model.batches) >= 2 and lone.rows + model.rows == 5


async def test_rows_run_alone_stay_on_the_instances_while_arrivals_find_company(make_batcher: MakeBatcher) -> None:
    """Three clients: each round one request finds the model idle and two more arrive while it
    runs. Once arrivals have been seen to find company, the one finding the model idle runs
    on an instance too (the lone session's spinning threads would take the cores from the
    instances running the others'); once arrivals find the server empty again, a lone client,
    the lone session takes them."""
    lone = FakeModel(num_labels=4)
    lone.armed = True
    batcher, model, metrics = make_batcher(lone=lone, max_batch_size=1, max_wait_s=0, instances=3)
    firsts = []
    for _ in range(10):
        model.gate.clear()
        lone.gate.clear()
        before = len(lone.batches), len(model.batches)
        rows = [batcher.submit(row(3))]  # finds the model idle
        await handed_over(metrics)
        rows += [batcher.submit(row(3)) for _ in range(2)]  # arrive while it runs
        await handed_over(metrics)
        model.gate.set()
        lone.gate.set()
        await asyncio.gather(*rows)
        firsts.append("lone" if len(lone.batches) > before[0] else "instance")
    assert firsts[0] == "lone" and firsts[-5:] == ["instance"] * 5
    crowded = len(lone.batches)
    for _ in range(8):  # one client again: a few arrivals, then every core
        await batcher.submit(row(3))
    assert len(lone.batches) - crowded >= 4 and lone.rows + model.rows == 30 + 8
    assert value(metrics, "batcher_lone_runs_total") == len(lone.batches)


async def test_lone_threads_loads_a_second_session(make_client: MakeClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="batcher.runtime")
    client = await make_client("batching.lone_threads=2")
    assert (await client.post("/predict", json=ONE)).status == 200
    assert any("a lone request runs on a second session of 2 threads" in r.getMessage() for r in caplog.records)
    assert value(client.app[METRICS], "batcher_lone_runs_total") == 1
    caplog.clear()
    off = await make_client("batching.lone_threads=0")
    assert not any("second session" in r.getMessage() for r in caplog.records)
    assert (await off.post("/predict", json=ONE)).status == 200
    registry = off.app[METRICS].registry
    assert registry.get_sample_value("batcher_lone_runs_total", {"model": MODEL}) == 0  # there, at 0


def fresh(at: float, priority: int) -> Pending:
    return Pending(row(4), at, at + 10, asyncio.get_running_loop().create_future(), 0.0, priority, True)


async def test_a_fresh_request_is_ordered_sooner_within_its_priority_never_before_high() -> None:
    """A new or idle client's request goes FRESH_AHEAD_S ahead of others of its priority."""
    queue = RequestQueue(64)
    queue.push(pending(0.0, NORMAL))  # ordered at 0.9
    queue.push(fresh(0.2, NORMAL))  # 0.85
    queue.push(fresh(0.3, NORMAL))  # 0.95: arrived 0.3 s after the first, more than FRESH_AHEAD_S
    queue.push(pending(0.4, HIGH))  # 0.4
    queue.push(fresh(0.4, HIGH))  # 0.4 too: high is not ordered sooner than high
    assert queue.ahead(HIGH) == 2 and queue.ahead(NORMAL) == 5
    limits = BatchLimits(max_batch_size=1, max_batch_tokens=1000)
    order = [queue.take(limits, now=0.0).batch[0] for _ in range(5)]
    assert [(entry.enqueued_at, entry.priority, entry.fresh) for entry in order] == [
        (0.4, HIGH, True),
        (0.4, HIGH, False),
        (0.2, NORMAL, True),
        (0.0, NORMAL, False),
        (0.3, NORMAL, True),
    ]
    assert len(queue) == 0


async def test_a_batch_takes_few_rows_of_lower_rank_than_its_head() -> None:
    """A high-priority request is not padded out with a full batch of normal ones: it runs
    with at most HIGH_LOWER_ROWS of them, and the high one queued after them comes too."""
    queue = RequestQueue(64)
    queue.push(pending(0.3, HIGH))
    normals = [pending(index / 1000, NORMAL) for index in range(HIGH_LOWER_ROWS + 4)]
    for entry in normals:
        queue.push(entry)
    queue.push(pending(1.0, HIGH))  # ordered after every normal one (0.9 and a little)
    limits = BatchLimits(max_batch_size=32, max_batch_tokens=1000)
    batch = queue.take(limits, now=0.0).batch
    assert [entry.priority for entry in batch].count(HIGH) == 2
    assert [entry for entry in batch if entry.priority == NORMAL] == normals[:HIGH_LOWER_ROWS]
    assert len(queue) == 4 and queue.take(limits, now=0.0).batch == normals[HIGH_LOWER_ROWS:]


async def test_batches_are_halved_for_a_while_after_a_higher_rank_came() -> None:
    """So that the next high-priority (or fresh) request waits for half a run, not a full one."""
    queue = RequestQueue(256)
    for index in range(100):
        queue.push(pending(index / 1000, NORMAL))
    limits = BatchLimits(max_batch_size=32, max_batch_tokens=10_000)
    assert len(queue.take(limits, now=0.2).batch) == 32  # no other rank seen: full batches
    queue.push(fresh(0.2, NORMAL))
    first = queue.take(limits, now=0.2).batch
    assert first[0].fresh and len(first) == 1 + MIXED_LOWER_ROWS
    assert len(queue.take(limits, now=0.3).batch) == 16  # a fresh one came 0.1 s ago
    assert len(queue.take(limits, now=0.2 + SHORT_BATCHES_S + 0.01).batch) == 32
    assert len(queue) == 100 - 32 - MIXED_LOWER_ROWS - 16 - 32


async def test_a_connection_that_retried_early_is_queued_lower_until_it_comes_back_as_told(
    make_client: MakeClient,
) -> None:
    """A retry storm's admitted connections would keep normal's share of the queue full;
    demoted, they fill low's. A polite return lifts it; a proxy's connection never has it."""
    client = await make_client(
        "batching.max_queue_size=1", "batching.max_batch_size=1", "batching.instances=1", "batching.lone_threads=0"
    )
    for _ in range(6):  # the pace measured: Retry-After is the drain (ms), not 1 s
        assert (await client.post("/predict", json=ONE)).status == 200
    metrics, queue = client.app[METRICS], client.app[MODELS].get().batcher._queue

    def admitted(priority: str) -> float:
        return value(metrics, "batcher_priority_requests_total", {"priority": priority, "outcome": "admitted"})

    other = raw({"turns": [{"text": "明天天气怎么样"}]})
    for forwarded in (False, True):
        extra = ("X-Forwarded-For: 10.0.0.1",) if forwarded else ()
        reader, writer = await asyncio.open_connection(client.host, client.port)
        with full(queue):
            writer.write(raw(ONE, *extra))
            status, headers, _ = await read_answer(reader)
            assert status == 429
            for _ in range(2):  # at once, twice: a chance repeat is once
                writer.write(raw(ONE, *extra))
                status, headers, _ = await read_answer(reader)
                assert status == 429
        low, normal = admitted("low"), admitted("normal")
        writer.write(other.replace(b"\r\n\r\n", ("\r\n" + "".join(extra) + "\r\n\r\n").encode(), 1) if extra else other)
        assert (await read_answer(reader))[0] == 200
        assert (admitted("low"), admitted("normal")) == ((low, normal + 1) if forwarded else (low + 1, normal))
        await asyncio.sleep(int(headers["x-retry-after-ms"]) / 1000 + 0.05)  # what the last 429 told
        writer.write(raw(ONE, *extra))  # the refused request again, after its Retry-After
        assert (await read_answer(reader))[0] == 200
        assert admitted("normal") == normal + 1 + (1 if forwarded else 0)
        writer.close()
    assert value(metrics, "batcher_demoted_requests_total") == 2  # the second early retry, then the next request


async def test_a_new_or_idle_clients_request_is_fresh(make_client: MakeClient, monkeypatch: pytest.MonkeyPatch) -> None:
    client = await make_client()
    batcher = client.app[MODELS].get().batcher
    seen: list[bool] = []
    submit = batcher.submit

    def recording(
        text: Text, promise: Promise = PLAIN, started: float | None = None, *, checked_at: int | None = None
    ) -> asyncio.Future[Any]:
        seen.append(promise.fresh)
        return submit(text, promise, started, checked_at=checked_at)

    monkeypatch.setattr(batcher, "submit", recording)
    reader, writer = await asyncio.open_connection(client.host, client.port)
    for _ in range(2):
        writer.write(raw(ONE))
        assert (await read_answer(reader))[0] == 200
    writer.close()
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(raw(ONE, "Connection: close"))
    assert (await read_answer(reader))[0] == 200
    writer.close()
    assert seen == [True, False, True]  # a new connection's first, then one answered just now


async def test_the_fast_lane_checks_admission_once_unless_the_body_asks_for_less(
    make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check at the door is not repeated at submission in the same callback, unless the
    body asks for a lower priority than the header (less room): then it is, and refuses."""
    client = await make_client("batching.max_queue_size=2")  # room: 2 for high, 1 for low
    batcher = client.app[MODELS].get().batcher
    checked: list[int] = []
    check = batcher.check_admission

    def recording(rows: int = 1, priority: int = NORMAL) -> None:
        checked.append(priority)
        check(rows, priority)

    monkeypatch.setattr(batcher, "check_admission", recording)
    reader, writer = await asyncio.open_connection(client.host, client.port)
    for body, headers, expected in (
        (ONE, (), [NORMAL]),
        ({**ONE, "priority": "high"}, ("x-priority: low",), [LOW]),
        ({**ONE, "priority": "low"}, ("x-priority: high",), [HIGH, LOW]),
    ):
        checked.clear()
        writer.write(raw(body, *headers))
        assert (await read_answer(reader))[0] == 200
        assert checked == expected
    with full(batcher._queue):  # one queued: room for high at the door, none for the body's low
        writer.write(raw({**ONE, "priority": "low"}, "x-priority: high"))
        assert (await read_answer(reader))[0] == 429
        assert checked[-2:] == [HIGH, LOW]
    writer.close()


async def test_rows_of_lower_rank_never_displace_higher_ones_from_a_short_batch() -> None:
    """Halved batches (a fresh high one came) are formed from a window no larger than the
    batch: grouped by length over a full batch's window, normal rows of the head's length
    had taken the places of high-priority rows of another length."""
    loop = asyncio.get_running_loop()
    queue = RequestQueue(256)
    queue.push(fresh(0.0, HIGH))
    limits = BatchLimits(max_batch_size=32, max_batch_tokens=10_000)
    assert queue.take(limits, now=0.3).batch[0].fresh
    queue.push(Pending(row(4), 0.3, 10.0, loop.create_future(), 0.0, HIGH))
    for index in range(19):
        queue.push(Pending(row(30), 0.3 + index / 1000, 10.0, loop.create_future(), 0.0, HIGH))
    for index in range(10):
        queue.push(Pending(row(4), index / 1000, 10.0, loop.create_future(), 0.0, NORMAL))
    batch = queue.take(limits, now=0.35).batch
    assert len(batch) <= 16 and {entry.priority for entry in batch} == {HIGH}
