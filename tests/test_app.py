"""End to end: `app.py` as a real process on loopback, talked to over HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import gc
import hashlib
import itertools
import json
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from batcher import server as process
from bench.reliability import DRAIN_LOG
from bench.servers import free_port, rss_bytes
from loadtest.driver import Driver, Load
from loadtest.http import HttpClient
from tests.processes import ROOT, finish, start, wait_ready
from tests.tiny_model import build_bundle

LONG = {"turns": [{"speaker": "user", "text": "我们有空一起去看风景好不好" * 40}]}


@pytest.fixture(scope="module")
def slow_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny real model made wide enough that 100 long requests take a noticeable time."""
    return build_bundle(tmp_path_factory.mktemp("slow"), hidden=512)


@pytest.fixture
def server(tiny_bundle: Path) -> Iterator[str]:
    process, url = start(tiny_bundle)
    wait_ready(process, url)
    yield url
    process.send_signal(signal.SIGTERM)
    assert finish(process, 20)[0] == 0


async def test_serves_over_http(server: str) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{server}/predict", json={"turns": [{"speaker": "user", "text": "播放周杰伦的歌"}]}
        ) as r:
            assert r.status == 200
            body = await r.json()
        assert set(body) >= {"intent_id", "intent_name", "confidence", "inference_time_ms", "timing"}
        async with session.get(f"{server}/readyz") as r:
            assert r.status == 200


async def test_sigterm_with_100_in_flight_answers_all_and_exits_0(slow_bundle: Path) -> None:
    process, url = start(
        slow_bundle,
        "batching.max_batch_size=1",
        "model.max_seq_len=512",
        "model.intra_op_threads=1",
        "server.shutdown_timeout_s=20",
    )
    wait_ready(process, url)
    done_before_signal = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=200)) as session:

        async def one() -> int:
            async with session.post(f"{url}/predict", json=LONG) as response:
                await response.read()
                return response.status

        tasks = [asyncio.ensure_future(one()) for _ in range(100)]
        await asyncio.sleep(0.15)
        done_before_signal = sum(task.done() for task in tasks)
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.05)
        try:
            async with session.post(f"{url}/predict", json=LONG) as late:
                late_status = late.status
                late_body = await late.json()
        except aiohttp.ClientConnectionError:
            late_status, late_body = 0, {}
        statuses = await asyncio.gather(*tasks)
    assert done_before_signal < 100, "the test needs requests in flight when SIGTERM arrives"
    assert statuses == [200] * 100
    if late_status:  # draining: the listener is still open, predictions are refused
        assert late_status == 503 and late_body["error"]["type"] == "shutting_down"
    code, output = finish(process, 25)
    assert code == 0
    assert "Traceback" not in output
    drain = DRAIN_LOG.search(output)  # the instant bench.reliability splits "before" from "after" at
    assert drain is not None, output
    assert signalled < float(drain.group(1)) < signalled + 5


def test_tune_gc_freezes_start_up_objects_and_raises_the_young_threshold() -> None:
    before = gc.get_threshold()
    try:
        process.tune_gc()
        assert gc.get_threshold() == (process.GC_GEN0_THRESHOLD, before[1], before[2])
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["batching.max_batch_sise=3"], "unknown key batching.max_batch_sise"),
        (['model.path="/nonexistent/bundle"'], "is not a directory"),
    ],
)
def test_startup_errors_are_one_clear_line(tiny_bundle: Path, overrides: list[str], message: str) -> None:
    process, _ = start(tiny_bundle, *overrides)
    code, output = finish(process, 30)
    assert code == 2, output
    assert message in output
    assert "Traceback" not in output


def test_help_text() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "app.py"), "--help"], capture_output=True, text=True, check=True
    )
    assert "--set" in result.stdout and "BATCHER_" in result.stdout


@pytest.mark.parametrize(
    ("file", "graph"),
    [("auto", "model.int8.onnx"), ("model.onnx", "model.onnx"), ("model.int8.onnx", "model.int8.onnx")],
)
async def test_bundled_model_answers_the_guide_examples(file: str, graph: str) -> None:
    """`make run` serves models/intent-zh: the old guide's two examples get their intents,
    from the graph "auto" picks on this CPU (the quantized copy), and from each named one."""
    process, url = start(ROOT / "models" / "intent-zh", f'model.file="{file}"', config=ROOT / "config.toml")
    wait_ready(process, url, timeout_s=60)
    try:
        async with aiohttp.ClientSession() as session:
            for text, intent in (("我们有空一起去看风景好不好", "闲聊"), ("播放周杰伦的歌", "音乐播放")):
                body = {"turns": [{"speaker": "user", "text": text}]}
                async with session.post(f"{url}/predict", json=body) as response:
                    assert response.status == 200
                    assert (await response.json())["intent_name"] == intent
            async with session.get(f"{url}/intents") as response:
                names = [item["name"] for item in (await response.json())["intents"]]
            assert names[:3] == ["问题求助/技术支持", "闲聊", "天气查询"] and len(names) == 12
            async with session.get(f"{url}/metrics") as response:
                served = hashlib.sha256((ROOT / "models" / "intent-zh" / graph).read_bytes()).hexdigest()[:12]
                assert f'sha256="{served}"' in await response.text()  # this graph, not the default one
    finally:
        process.send_signal(signal.SIGTERM)
        assert finish(process, 30)[0] == 0


async def test_metrics_on_a_separate_listener(tiny_bundle: Path) -> None:
    metrics_port = free_port()
    process, url = start(tiny_bundle, f"server.metrics_port={metrics_port}")
    wait_ready(process, url)
    try:
        wait_ready(process, f"http://127.0.0.1:{metrics_port}")
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{url}/metrics") as response:
                assert response.status == 404
            async with session.get(f"http://127.0.0.1:{metrics_port}/metrics") as response:
                assert response.status == 200
                assert "batcher_requests_total" in await response.text()
    finally:
        process.send_signal(signal.SIGTERM)
        assert finish(process, 20)[0] == 0


def test_malformed_http_is_one_warning_line() -> None:
    from aiohttp.http_exceptions import BadHttpMessage

    from batcher.application import MalformedRequestFilter

    try:
        raise BadHttpMessage("Invalid header value char:\n\n  b'X: \\x00'")
    except BadHttpMessage:
        record = logging.LogRecord("aiohttp.server", logging.ERROR, "", 0, "Error handling request", (), sys.exc_info())
    assert MalformedRequestFilter().filter(record)
    assert record.levelname == "WARNING" and record.exc_info is None
    assert record.getMessage().startswith(
        "malformed HTTP request answered 400: 400, message: Invalid header value char:"
    )


@pytest.fixture
def open_files(request: pytest.FixtureRequest) -> Iterator[int]:
    """Raise this process's soft open-file limit for a test that holds many sockets."""
    wanted = int(request.param)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"the hard open-file limit ({hard}) is below the {wanted} this test needs")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    yield wanted
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize("open_files", [2500], indirect=True)
def test_thousands_of_idle_connections_are_served_around_then_closed(tiny_bundle: Path, open_files: int) -> None:
    process, url = start(tiny_bundle, "server.keepalive_timeout_s=2")
    wait_ready(process, url)
    port = int(url.rsplit(":", 1)[1])
    rss_before = rss_bytes(process.pid) / 2**20
    assert rss_before > 0  # VmRSS was read
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2000)]
    try:
        for sock in idle[:1000]:  # half make one keep-alive request first, half never send a byte
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        for sock in idle[:1000]:
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        # With 2,000 idle connections open, a new client is served at once.
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            body = '{"turns": [{"text": "播放周杰伦的歌"}]}'.encode()
            client.sendall(
                b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            assert client.recv(4096).startswith(b"HTTP/1.1 200")
        assert time.monotonic() - started < 1.0
        assert rss_bytes(process.pid) / 2**20 - rss_before < 150  # buffers per idle connection stay small
        # Past keepalive_timeout_s the server closes every one of them, used or not.
        deadline = time.monotonic() + 10
        for sock in idle:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ConnectionResetError):  # a reset is a close too
                assert sock.recv(4096) == b""
    finally:
        for sock in idle:
            sock.close()
    process.send_signal(signal.SIGTERM)
    assert finish(process, 20)[0] == 0


async def test_sigterm_while_requests_wait_for_company_and_no_drain_time_is_left(tiny_bundle: Path) -> None:
    """The audit's repro: a 10 s wait for company, shutdown_timeout_s = 0; request A, B half a
    second later, SIGTERM at one second. Both get an answer (their result, or 503 since no
    time is left), the process exits 0 at once, and nothing is logged as a traceback."""
    process, url = start(
        tiny_bundle, "batching.max_wait_s=10", "batching.max_batch_size=4", "server.shutdown_timeout_s=0"
    )
    wait_ready(process, url)
    async with aiohttp.ClientSession() as session:
        warm = [session.post(f"{url}/predict", json=LONG) for _ in range(4)]  # a full batch: company is expected
        for response in await asyncio.gather(*warm):
            response.release()

        async def one() -> tuple[int, dict[str, object]]:
            async with session.post(f"{url}/predict", json=LONG) as response:
                return response.status, await response.json()

        first = asyncio.ensure_future(one())
        await asyncio.sleep(0.5)
        second = asyncio.ensure_future(one())
        await asyncio.sleep(0.5)
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        answers = await asyncio.gather(first, second)
    code, output = finish(process, 10)
    assert time.monotonic() - signalled < 5
    for status, body in answers:
        assert status == 200 or (status == 503 and body["error"]["type"] == "shutting_down"), body  # type: ignore[index]
    assert code == 0 and "Traceback" not in output, output


def test_sighup_does_not_kill_the_server(tiny_bundle: Path) -> None:
    process, url = start(tiny_bundle)
    wait_ready(process, url)
    process.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    assert process.poll() is None
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=5) as sock:
        sock.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    process.send_signal(signal.SIGTERM)
    code, output = finish(process, 20)
    assert code == 0 and "SIGHUP" in output


def test_sigterm_during_warm_up_stops_cleanly(slow_bundle: Path) -> None:
    """Start-up can take a while (a large model, many warm-up runs): a signal then stops it
    between two warm-up runs, exit 0, instead of killing the process halfway."""
    process, _ = start(slow_bundle, "model.warmup_runs=100", "model.max_seq_len=512")
    assert process.stdout is not None
    lines = []
    for line in process.stdout:  # the model is loaded; warm-up begins
        lines.append(line)
        if "runs on CPUExecutionProvider" in line:
            break
    process.send_signal(signal.SIGTERM)
    code, output = finish(process, 20)
    assert code == 0, "".join(lines) + output
    assert "stopped during start-up" in output and "Traceback" not in output


def scrape_value(url: str, name: str, **labels: str) -> float:
    """One sample of /metrics over a new connection (so workers take turns answering)."""
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=5) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        text = b""
        while chunk := sock.recv(65536):
            text += chunk
    body = text.partition(b"\r\n\r\n")[2].decode()
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


async def test_two_workers_serve_one_port_and_every_scrape_counts_every_request(tiny_bundle: Path) -> None:
    process, url = start(tiny_bundle, "server.workers=2")
    wait_ready(process, url)
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            for _ in range(30):  # new connections: the kernel spreads them over both workers
                statuses = await asyncio.gather(
                    *(session.post(f"{url}/predict", json={"turns": [{"text": "播放周杰伦的歌"}]}) for _ in range(10))
                )
                assert [r.status for r in statuses] == [200] * 10
        await asyncio.sleep(1.5)  # each worker refreshes its own CPU and memory gauges every second
        served = {"route": "/predict", "status": "200", "model": "intent-zh"}
        assert [scrape_value(url, "batcher_requests_total", **served) for _ in range(10)] == [300.0] * 10
        workers = [scrape_value(url, "batcher_worker_resident_memory_bytes", worker=str(i)) for i in (0, 1)]
        assert all(memory > 0 for memory in workers)
        assert scrape_value(url, "batcher_ready", model="intent-zh") == 1
    finally:
        process.send_signal(signal.SIGTERM)
        code, output = finish(process, 30)
    assert code == 0 and "Traceback" not in output, output
    assert output.count("stopped") >= 2  # both workers drained


def test_a_worker_that_dies_is_restarted_and_counted(tiny_bundle: Path) -> None:
    process, url = start(tiny_bundle, "server.workers=2")
    wait_ready(process, url)
    try:
        children = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
        workers = [int(pid) for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(workers) == 2, children  # (multiprocessing's resource tracker is a child too)
        os.kill(workers[0], signal.SIGKILL)
        deadline = time.monotonic() + 20
        restarts = 0.0
        while restarts < 1:
            assert time.monotonic() < deadline, "the worker was not restarted"
            time.sleep(0.2)
            # queued on, or hashed to, the killed worker's socket while the kernel closes it
            with contextlib.suppress(ConnectionResetError, ConnectionRefusedError):
                restarts = scrape_value(url, "batcher_worker_restarts_total")
        wait_ready(process, url)
    finally:
        process.send_signal(signal.SIGTERM)
        code, output = finish(process, 30)
    assert code == 0, output
    assert "exited unasked (code -9); restarting in 1 s" in output


async def test_drain_delay_keeps_admitting_while_not_ready_then_refuses(tiny_bundle: Path) -> None:
    process, url = start(tiny_bundle, "server.drain_delay_s=1.5", "server.shutdown_timeout_s=5")
    wait_ready(process, url)
    body = {"turns": [{"text": "播放周杰伦的歌"}]}
    async with aiohttp.ClientSession() as session:
        process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        async with session.get(f"{url}/readyz") as response:
            assert response.status == 503
        async with session.post(f"{url}/predict", json=body) as response:
            assert response.status == 200  # still admitted: load balancers are still catching up
            assert response.headers["Connection"].lower() == "close"
    code, output = finish(process, 20)
    assert code == 0 and "Traceback" not in output, output
    # Refusals began 1.5 s after the signal (nothing was left to answer, so it exited then).
    stamps = {
        event: datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
        for line in output.splitlines()
        for event in ("not ready", "draining")
        if f"SIGTERM: {event}" in line
    }
    assert (stamps["draining"] - stamps["not ready"]).total_seconds() == pytest.approx(1.5, abs=0.3)


async def test_128_clients_on_new_connections_are_never_cut_at_sigterm(tiny_bundle: Path) -> None:
    """Every request is answered (200 or 503) or refused at connect; none is cut after it
    connected, which closing a listener with a full accept queue used to do."""
    process, url = start(tiny_bundle, "server.shutdown_timeout_s=5")
    wait_ready(process, url)
    client = HttpClient("127.0.0.1", int(url.rsplit(":", 1)[1]), fresh_connections=True)
    bodies = itertools.cycle([json.dumps({"turns": [{"text": "播放周杰伦的歌"}]}).encode()])
    driver = Driver(client, "/predict", bodies, seed=1, timeout_s=10, progress=False)
    load = asyncio.ensure_future(driver.run(Load("closed", 128), duration_s=4, warmup_s=0))
    await asyncio.sleep(2)
    process.send_signal(signal.SIGTERM)
    result = await load
    await client.close()
    code, output = finish(process, 20)
    assert code == 0 and "Traceback" not in output, output
    assert result.statuses["200"] > 100 and result.statuses["503"] + result.statuses["refused"] > 0
    assert set(result.statuses) <= {"200", "503", "refused"}, result.statuses
