"""loadtest.driver: the histogram and percentile maths, and the open loop's coordinated-omission
accounting against a real HTTP server (in its own thread) that stalls on purpose.

The stalling server is a stand-in, not batcher: the point of these tests is timing."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Iterator

import pytest
from aiohttp import web

from bench.servers import free_port
from loadtest.driver import LATE_S, Driver, Load, StepResult
from loadtest.http import HttpClient

STALL_S = 0.4


def above_ms(result: StepResult, threshold_ms: float) -> int:
    """Recorded latencies above `threshold_ms`, counted from the histogram."""
    return sum(
        item.count_added_in_this_iter_step
        for item in result.latency.get_recorded_iterator()
        if item.value_iterated_to > threshold_ms * 1000
    )


def test_percentiles_throughput_and_goodput_from_known_latencies() -> None:
    result = StepResult(Load("open", 100), duration_s=10.0)
    for ms in range(1, 1001):  # 1, 2, ... 1000 ms, one request each
        result.record("200", scheduled=0.0, sent=0.0, answered=ms / 1000)
    result.record("429", scheduled=0.0, sent=0.0, answered=0.002)
    summary = result.summary(slo_ms=250)
    # HDR keeps 3 significant digits: each value within 0.1 %.
    assert result.percentile_ms(50) == pytest.approx(500, rel=1e-3)
    assert result.percentile_ms(99) == pytest.approx(990, rel=1e-3)
    assert summary["max_ms"] == pytest.approx(1000, rel=1e-3)
    assert summary["mean_ms"] == pytest.approx(sum(range(1, 1001)) / 1001 + 2 / 1001, rel=1e-3)
    assert summary["requests"] == 1001
    assert summary["throughput_rps"] == pytest.approx(100.1)
    assert summary["goodput_rps"] == pytest.approx(25.0)  # only the 200s within 250 ms
    assert summary["p99_ms_by_status"]["429"] == pytest.approx(2, rel=1e-3)


def test_latency_counts_from_the_schedule_and_separately_from_the_send() -> None:
    result = StepResult(Load("open", 1), duration_s=1.0)
    result.record("200", scheduled=10.0, sent=10.3, answered=10.35)  # sent 300 ms late
    assert result.percentile_ms(50) == pytest.approx(350, rel=1e-3)
    assert result.summary()["p99_ms_by_status_from_send"]["200"] == pytest.approx(50, rel=1e-3)


class StallingServer:
    """Answers every POST at once, except that the first request after `stall_at` (monotonic)
    blocks the server's whole event loop for STALL_S, like a long GC pause would."""

    def __init__(self) -> None:
        self.port = free_port()
        self.stall_at = float("inf")
        self.stalled = False
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        if not self.stalled and time.monotonic() >= self.stall_at:
            self.stalled = True
            time.sleep(STALL_S)  # noqa: ASYNC251 - on purpose: nothing else on this loop runs meanwhile
        return web.Response(body=b"{}", content_type="application/json")

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_post("/predict", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        self.loop.run_until_complete(self.runner.setup())
        self.loop.run_until_complete(web.TCPSite(self.runner, "127.0.0.1", self.port).start())
        self.ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self.runner.cleanup())
        self.loop.close()

    def __enter__(self) -> StallingServer:
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def __exit__(self, *_: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def stalling_server() -> Iterator[StallingServer]:
    with StallingServer() as server:
        yield server


async def measure(
    server: StallingServer, load: Load, *, stall: bool = True, bodies: Iterator[bytes] | None = None
) -> StepResult:
    client = HttpClient("127.0.0.1", server.port)
    bodies = bodies or itertools.cycle([b"{}"])
    driver = Driver(client, "/predict", bodies, seed=1, timeout_s=10, progress=False)
    server.stall_at = time.monotonic() + 0.3 if stall else float("inf")
    try:
        return await driver.run(load, duration_s=1.2, warmup_s=0)
    finally:
        await client.close()


async def test_open_loop_counts_every_request_scheduled_during_a_stall(stalling_server: StallingServer) -> None:
    rate = 200
    result = await measure(stalling_server, Load("open", rate, "constant"))
    assert stalling_server.stalled
    # Nothing dropped. Sends may be late (the server's catch-up after the stall competes for
    # the GIL with the generator in this one process, and a busy machine slows both): how
    # many is the machine's speed, not the generator's logic, so no bound is put on it here
    # (test_a_generator_that_falls_behind_counts_late_sends_and_charges_their_wait checks
    # that late sends are counted and charged).
    assert result.answered == pytest.approx(rate * 1.2, abs=2)
    assert result.unsent == 0
    # Requests due in the first STALL_S - 0.1 s of the stall waited over 100 ms each: about
    # 60 at 200/s. A coordinated (closed-loop) client would have recorded one.
    assert above_ms(result, 100) >= 0.75 * rate * (STALL_S - 0.1)
    assert result.percentile_ms(80) >= 100
    assert result.summary()["max_ms"] >= 0.9 * STALL_S * 1000


async def test_closed_loop_client_sees_the_stall_once(stalling_server: StallingServer) -> None:
    """What coordinated omission hides: a lone closed-loop client waits out the stall in one
    request and records a single slow sample, however long the stall."""
    result = await measure(stalling_server, Load("closed", 1))
    assert stalling_server.stalled
    assert above_ms(result, 100) == 1
    assert result.answered > 50


def bodies_that_stall_at(number: int) -> Iterator[bytes]:
    """Request bodies; taking the `number`-th blocks the generator's loop for STALL_S, as a
    busy client machine would, at a point of the schedule rather than of the clock."""
    for taken in itertools.count(1):
        if taken == number:
            time.sleep(STALL_S)
        yield b"{}"


async def test_a_generator_that_falls_behind_counts_late_sends_and_charges_their_wait(
    stalling_server: StallingServer,
) -> None:
    """The generator's own loop blocks while it sends the request due at 0.3 s: the requests
    due meanwhile go out late, are counted as late, and their latency runs from their
    schedule. Bounds only from below, and from the schedule, which a slow moment of the
    machine can only make later: no bound on how fast the server or this loop is."""
    rate = 200
    stalled_at = int(0.3 * rate)
    result = await measure(
        stalling_server, Load("open", rate, "constant"), stall=False, bodies=bodies_that_stall_at(stalled_at)
    )
    assert result.answered == pytest.approx(rate * 1.2, abs=2)  # the schedule's, however late
    # The loop is back STALL_S or more after the 0.3 s slot: the requests due in the stall's
    # first STALL_S - LATE_S went out late, those due in its first STALL_S - 0.1 s over 100 ms late.
    assert result.late >= rate * (STALL_S - LATE_S) - 1
    assert above_ms(result, 100) >= rate * (STALL_S - 0.1) - 1
    # Each request's latency from its schedule is its latency from its send plus its
    # lateness, so the totals differ by at least what the stall owed: the i-th request due
    # after the stalled one waited at least STALL_S - i / rate.
    owed_s = sum(STALL_S - i / rate for i in range(1, int(STALL_S * rate)))
    from_schedule_s = result.latency.get_mean_value() * result.latency.get_total_count() / 1e6
    from_send = result.by_status_from_send["200"]
    from_send_s = from_send.get_mean_value() * from_send.get_total_count() / 1e6
    assert result.statuses == {"200": result.answered}
    precision_s = 0.001 * (from_schedule_s + from_send_s)  # HDR's 3 significant digits
    assert from_schedule_s - from_send_s >= owed_s - precision_s
