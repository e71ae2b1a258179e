"""The fault matrix of `make reliability`: each fault injected into a real batcher (app.py on
loopback, the bundled model) while the load generator drives it, and the figures that show
whether the server survived it (bench/reliability_md.py judges them against their bounds):

- the prediction log on a full device (`/dev/full`: every write fails with ENOSPC);
- the prediction log unwritable: a read-only tmpfs mounted over its directory (EROFS) as
  root, or (as another user) its directory made read-only after the file is rotated (EACCES);
- the file-descriptor limit reached: a limit of 256, more clients than it allows;
- the process stopped (SIGSTOP) for 5 s and resumed, with request_timeout_s = 1 s;
- one of two workers killed (SIGKILL) while its model runs a batch;
- the model bundle truncated, then removed, each followed by SIGHUP;
- a pipelined burst of thousands of failing requests on one connection (the fast lane),
  with /healthz asked on another meanwhile.

Each takes 10-20 s. `python -m bench.faults [--only NAME]` runs them alone and prints the
figures as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import uvloop
from hdrh.histogram import HdrHistogram

from bench.servers import MODEL, Server, batcher_server
from loadtest.corpus import DEFAULT_CORPUS, Corpus
from loadtest.driver import Driver, Load, StepResult
from loadtest.http import HttpClient
from loadtest.server_metrics import Samples, grown, scrape

DEFAULT_RATE = 600.0
"""req/s of the open-loop load when no maximum was measured (the matrix alone)."""
RATE_SHARE = 0.3
"""Share of the measured maximum throughput the open-loop loads run at."""
NOFILE = 256
STOP_S = 5.0
STOP_TIMEOUT_S = 1.0
STOP_FILLERS = 200
BURSTS = 4
BURST_REQUESTS = 5000
"""Failing requests in one pipelined burst: bad JSON, ~100 bytes each, ~500 KiB a burst."""
BAD_REQUEST = b"HTTP/1.1 400 "
CONTENT_LENGTH = re.compile(rb"(?i)\r\ncontent-length: *(\d+)")
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ", re.M)


def start_load(server: Server, corpus: Corpus, load: Load, seconds: float) -> asyncio.Future[StepResult]:
    """The load generator against `server` for `seconds`, in the background, every answer
    recorded with its send time (perf_counter) for the figures after the fault."""
    client = HttpClient("127.0.0.1", server.port)
    driver = Driver(client, "/predict", corpus.bodies("predict"), seed=1, timeout_s=30, progress=False)

    async def run() -> StepResult:
        try:
            return await driver.run(load, duration_s=seconds, warmup_s=0, events=True)
        finally:
            await client.close()

    return asyncio.ensure_future(run())


def answers(result: StepResult) -> dict[str, Any]:
    """Answered, lost (sent, no answer: timeouts and cut connections), 5xx, and the statuses."""
    statuses = dict(sorted(result.statuses.items()))
    return {
        "statuses": statuses,
        "answered": sum(count for status, count in statuses.items() if status.isdigit()),
        "lost": sum(count for status, count in statuses.items() if status in ("timeout", "connection_error")),
        "server_errors": sum(count for status, count in statuses.items() if status.startswith("5")),
        "p99_ms": round(result.percentile_ms(99), 1),
    }


def windows(
    events: list[tuple[float, str, float]], start: float, end: float, *, width_s: float = 1.0, step_s: float = 1.0
) -> list[list[Any]]:
    """[offset from start, requests, p99 ms] of the requests sent in each window of `width_s`
    from start to end, a window every `step_s`."""
    rows = []
    at = start
    while at + width_s <= end + 1e-9:
        rows.append([round(at - start, 3), *_p99([e for e in events if at <= e[0] < at + width_s])])
        at += step_s
    return rows


def _p99(events: list[tuple[float, str, float]]) -> tuple[int, float | None]:
    """How many requests, and their p99 latency in ms (from their scheduled send time)."""
    histogram = HdrHistogram(1, 120_000_000, 3)
    for _, _, latency_s in events:
        histogram.record_value(max(1, int(latency_s * 1e6)))
    count = histogram.get_total_count()
    return count, (histogram.get_value_at_percentile(99) / 1000 if count else None)


def log_lines(log: str, *needles: str) -> int:
    return sum(1 for line in log.splitlines() if all(needle in line for needle in needles))


def log_times(log: str, needle: str) -> list[float]:
    """The wall-clock times of the server's log lines that hold `needle` (asctime: local time, ms)."""
    times = []
    for line in log.splitlines():
        match = LOG_TIME.match(line)
        if match and needle in line:
            times.append(datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp())
    return times


def loop_cpu_s(pid: int) -> float:
    """CPU seconds of a process's main thread: its event loop."""
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def metrics(server: Server) -> Samples:
    async with aiohttp.ClientSession() as session:
        return await scrape(session, server.url + "/metrics")


def request_bytes(body: bytes, path: str = "/predict") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def exchange(port: int, request: bytes, *, timeout_s: float = 5.0) -> tuple[str, asyncio.StreamWriter | None]:
    """One request on a new connection: its status ("cut" when the server closed it
    unanswered), and the connection, left open, when there is one."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout_s)
    except (OSError, TimeoutError):
        return "refused", None
    writer.write(request)
    status = await read_answer(reader, timeout_s)
    if status == "cut":
        writer.close()
        return status, None
    return status, writer


async def read_answer(reader: asyncio.StreamReader, timeout_s: float = 30) -> str:
    """The status of the answer `reader` gets ("cut" when the connection closes without one)."""
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout_s)
        length = CONTENT_LENGTH.search(head)
        await asyncio.wait_for(reader.readexactly(int(length.group(1)) if length else 0), timeout_s)
    except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        return "cut"
    return head[9:12].decode()


async def prediction_log_full(corpus: Corpus, rate: float) -> dict[str, Any]:
    """Every prediction logged to /dev/full: each write fails with ENOSPC."""
    name = "prediction log on /dev/full"
    with batcher_server(name, "log.predictions=1.0", 'log.predictions_file="/dev/full"') as server:
        before = await metrics(server)
        result = await start_load(server, corpus, Load("open", rate), 12)
        after = await metrics(server)
    return {
        **answers(result),
        "rate": rate,
        "predictions": grown(before, after, "batcher_requests_total", route="/predict", status="200"),
        "dropped": grown(before, after, "batcher_prediction_log_dropped_total"),
        "warnings": log_lines(server.log, "WARNING", "prediction log"),
        "tracebacks": server.log.count("Traceback"),
    }


def make_unwritable(directory: Path, path: Path) -> tuple[str, Callable[[], None]] | None:
    """Make `path` unwritable to the server, for real: as root a read-only tmpfs mounted over
    its directory (the path then names a file on a read-only filesystem: EROFS); as another
    user the file rotated away and its directory made read-only (EACCES). How, and how to
    undo it; None where neither can be done."""
    if os.geteuid() == 0:
        mount = ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "batcher-fault", str(directory)]
        if shutil.which("mount") and subprocess.run(mount, capture_output=True).returncode == 0:
            return "a read-only tmpfs mounted over the file's directory (EROFS)", lambda: _umount(directory)
        return None
    path.rename(path.with_name(path.name + ".1"))
    directory.chmod(0o555)
    return "the file rotated away and its directory made read-only (EACCES)", lambda: directory.chmod(0o755)


def _umount(directory: Path) -> None:
    for _ in range(50):
        if subprocess.run(["umount", str(directory)], capture_output=True).returncode == 0:
            return
        time.sleep(0.1)
    raise SystemExit(f"bench: cannot unmount {directory}")


async def prediction_log_unwritable(corpus: Corpus, rate: float) -> dict[str, Any]:
    """The prediction log's file unwritable for 5 s of a 14 s load, then writable again."""
    directory = Path(tempfile.mkdtemp(prefix="batcher-predictions-"))
    path = directory / "predictions.jsonl"
    try:
        name = "prediction log unwritable"
        overrides = ("log.predictions=1.0", f'log.predictions_file="{path}"', 'server.log_level="info"')
        with batcher_server(name, *overrides) as server:
            before = await metrics(server)
            load = start_load(server, corpus, Load("open", rate), 14)
            await asyncio.sleep(4)
            made = make_unwritable(directory, path)
            if made is None:
                load.cancel()
                return {"skipped": "neither a mount nor file permissions can make the file unwritable here"}
            how, undo = made
            await asyncio.sleep(5)
            undo()
            restored = time.time()
            result = await load
            after = await metrics(server)
        written = line_times(directory)
        again = [at for at in written if at >= restored]
        return {
            **answers(result),
            "rate": rate,
            "how": how,
            "predictions": grown(before, after, "batcher_requests_total", route="/predict", status="200"),
            "written": len(written),
            "dropped": grown(before, after, "batcher_prediction_log_dropped_total"),
            "warnings": log_lines(server.log, "WARNING", "prediction log"),
            "written_again_logged": log_lines(server.log, "prediction log", "written again"),
            "tracebacks": server.log.count("Traceback"),
            "recovery_s": round(min(again) - restored, 3) if again else None,
        }
    finally:
        remove(directory)


def line_times(directory: Path) -> list[float]:
    """The `time` of every prediction line written in `directory` (the file, and any rotated one)."""
    return [
        json.loads(line)["time"]
        for path in sorted(directory.glob("predictions.jsonl*"))
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]


def remove(directory: Path) -> None:
    with contextlib.suppress(OSError):
        directory.chmod(0o755)
    shutil.rmtree(directory, ignore_errors=True)


def with_file_limit(server: Server, limit: int) -> Server:
    """`server` started with RLIMIT_NOFILE (soft and hard) at `limit`."""
    code = "import os, resource, sys; n = int(sys.argv[1]); resource.setrlimit(resource.RLIMIT_NOFILE, (n, n)); "
    code += "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])"
    server.args = [sys.executable, "-c", code, str(limit), *server.args[1:]]
    return server


async def descriptor_limit(corpus: Corpus) -> dict[str, Any]:
    """A descriptor limit of 256 and more clients than it allows: 356 connections at once,
    each sending a request and staying open, then a new one every 20 ms for 3 s, beside 2
    closed-loop clients whose connections were open before; then all of them closed."""
    body = next(corpus.bodies("predict"))
    request = request_bytes(body)
    server = with_file_limit(batcher_server("descriptor limit"), NOFILE)
    with server:
        assert server.process is not None
        pid = server.process.pid
        load = start_load(server, corpus, Load("closed", 2), 14)
        await asyncio.sleep(1)
        cpu, at = loop_cpu_s(pid), time.perf_counter()
        await asyncio.sleep(2)
        baseline_share = (loop_cpu_s(pid) - cpu) / (time.perf_counter() - at)
        open_before = open_files(pid)
        flood = await asyncio.gather(*(exchange(server.port, request) for _ in range(NOFILE + 100)))
        held = [writer for _, writer in flood if writer is not None]
        cpu, at = loop_cpu_s(pid), time.perf_counter()
        knocks: Counter[str] = Counter()
        while time.perf_counter() - at < 3:
            status, writer = await exchange(server.port, request, timeout_s=1)
            knocks[status] += 1
            if writer is not None:
                held.append(writer)
            await asyncio.sleep(0.02)
        limit_share = (loop_cpu_s(pid) - cpu) / (time.perf_counter() - at)
        for writer in held:
            writer.close()
        closed = time.perf_counter()
        recovery_s = None
        while time.perf_counter() - closed < 5:
            status, writer = await exchange(server.port, request, timeout_s=1)
            if writer is not None:
                writer.close()
            if status == "200":
                recovery_s = time.perf_counter() - closed
                break
            await asyncio.sleep(0.01)
        after: Counter[str] = Counter()
        for _ in range(20):
            status, writer = await exchange(server.port, request, timeout_s=1)
            after[status] += 1
            if writer is not None:
                writer.close()
        result = await load
    return {
        **answers(result),
        "limit": NOFILE,
        "open_before": open_before,
        "flood": dict(Counter(status for status, _ in flood)),
        "knocks": dict(knocks),
        "after": dict(after),
        "loop_share_before": round(baseline_share, 3),
        "loop_share_at_limit": round(limit_share, 3),
        "recovery_s": round(recovery_s, 3) if recovery_s is not None else None,
        "warnings": log_lines(server.log, "WARNING", "out of file descriptors"),
        "tracebacks": server.log.count("Traceback"),
    }


async def stopped(corpus: Corpus, rate: float) -> dict[str, Any]:
    """SIGSTOP 4 s into a 16 s open-loop load, SIGCONT 5 s later, with request_timeout_s = 1 s.
    Just before the stop 200 more requests arrive at once, so the queue is full of requests
    that expire while the process is stopped."""
    name = "stopped and resumed"
    with batcher_server(name, f"batching.request_timeout_s={STOP_TIMEOUT_S}") as server:
        assert server.process is not None
        before = await metrics(server)
        began = time.perf_counter()
        load = start_load(server, corpus, Load("open", rate), 16)
        await asyncio.sleep(3)
        fillers = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(STOP_FILLERS)]
        await asyncio.sleep(1)
        filled_at = time.perf_counter()
        body = next(corpus.bodies("predict"))
        for _, writer in fillers:
            writer.write(request_bytes(body))
        await asyncio.sleep(0.02)  # read and admitted (or refused) before the stop
        stopped_at = time.perf_counter()
        server.process.send_signal(signal.SIGSTOP)
        await asyncio.sleep(STOP_S)
        server.process.send_signal(signal.SIGCONT)
        resumed = time.perf_counter()
        filled = Counter(await asyncio.gather(*(read_answer(reader) for reader, _ in fillers)))
        for _, writer in fillers:
            writer.close()
        result = await load
        after = await metrics(server)
    events = result.events or []
    before_windows = windows(events, began + 1, filled_at)
    # Like with like: a 1-s window's p99 after the fault against the 1-s windows' before it
    # (their highest), not against the p99 of the whole 3 s before, which a 1-s window's
    # noisier p99 exceeds half the time on a quiet machine too (before: 9.2, 11.3 and 13.4 ms
    # a window, 11.5 ms over the three; after: 12.2-17.1 ms, for 5 s).
    level = max((p99 for _, count, p99 in before_windows if count), default=None)
    after_windows = windows(events, resumed, began + 16, step_s=0.25)
    back = [offset for offset, count, p99 in after_windows if count and level is not None and p99 <= level]

    def grew(name: str, **labels: str) -> float:
        return grown(before, after, name, **labels)

    return {
        **answers(result),
        "rate": rate,
        "stop_s": STOP_S,
        "stopped_after_filling_ms": round((stopped_at - filled_at) * 1000, 1),
        "request_timeout_s": STOP_TIMEOUT_S,
        "fillers": dict(sorted(filled.items())),
        "p99_before_ms": _p99([e for e in events if began + 1 <= e[0] < filled_at])[1],
        "p99_before_worst_window_ms": level,
        "before_windows": before_windows,
        "after_windows": after_windows,
        "recovery_s": back[0] if back else None,
        "rows_computed": grew("batcher_batch_size_sum"),
        # A row computed late waited longer than its deadline for its run to start.
        "rows_started_late": grew("batcher_queue_wait_seconds_count")
        - grew("batcher_queue_wait_seconds_bucket", le=str(STOP_TIMEOUT_S)),
        "answered_200_by_server": grew("batcher_requests_total", route="/predict", status="200"),
        "expired_by_server": grew("batcher_rejected_total", reason="deadline"),
        "answered_504": result.statuses.get("504", 0) + filled.get("504", 0),
        "tracebacks": server.log.count("Traceback"),
    }


def workers_of(parent: int) -> list[int]:
    """The worker processes of a supervisor (multiprocessing's spawned children; not its resource tracker)."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return [int(pid) for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]


def running_model_thread(pid: int) -> bool:
    """Whether a thread of `pid` other than its event loop is on a CPU: a model run."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        if task.name != str(pid):
            with contextlib.suppress(OSError):
                if (task / "stat").read_text().rsplit(")", 1)[1].split()[0] == "R":
                    return True
    return False


async def scrape_often(server: Server, samples: list[Samples], stop: asyncio.Event) -> None:
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            found = await scrape(session, server.url + "/metrics")
            if found:
                samples.append(found)
            await asyncio.sleep(0.2)


def counters_backwards(samples: list[Samples]) -> list[str]:
    """Counter series (totals, histogram buckets, counts and sums) that fell, or vanished,
    from one scrape to the next."""
    fell = []
    for earlier, later in itertools.pairwise(samples):
        for key, value in earlier.items():
            if key[0].endswith(("_total", "_bucket", "_count", "_sum")):
                now = later.get(key)
                if now is None or now < value - 1e-9:
                    fell.append(f"{key[0]}{dict(key[1])}: {value} -> {now}")
    return fell


async def worker_killed(corpus: Corpus) -> dict[str, Any]:
    """server.workers = 2 under 32 closed-loop clients; 4 s in, one worker is killed with
    SIGKILL while its model thread runs; /metrics scraped every 0.2 s throughout."""
    clients = 32
    server = batcher_server("worker killed", "server.workers=2", 'server.log_level="info"')
    with server:
        assert server.process is not None
        began = time.perf_counter()
        load = start_load(server, corpus, Load("closed", clients), 16)
        samples: list[Samples] = []
        stop = asyncio.Event()
        scraper = asyncio.ensure_future(scrape_often(server, samples, stop))
        await asyncio.sleep(4)
        pids = workers_of(server.process.pid)
        victim, mid_batch = pids[0], False
        deadline = time.perf_counter() + 1
        while time.perf_counter() < deadline and not mid_batch:
            for pid in pids:
                if running_model_thread(pid):
                    victim, mid_batch = pid, True
                    break
            else:
                await asyncio.sleep(0.002)
        killed_at, killed_wall = time.perf_counter(), time.time()
        os.kill(victim, signal.SIGKILL)
        result = await load
        stop.set()
        await scraper
    log = server.log
    index = re.search(rf"worker (\d+) started \(pid {victim}\)", log)
    worker = index.group(1) if index else "?"
    started = log_times(log, f"worker {worker} started (pid")
    serving = log_times(log, f"[worker {worker}] batcher: serving on")
    exited = log_times(log, f"worker {worker} exited unasked")
    backoff = re.search(rf"worker {worker} exited unasked \(code [^)]*\); restarting in ([0-9.]+) s", log)
    events = result.events or []
    return {
        **answers(result),
        "clients": clients,
        "mid_batch": mid_batch,
        "backoff_s": float(backoff.group(1)) if backoff else None,
        "noticed_s": round(exited[0] - killed_wall, 3) if exited else None,
        "respawned_s": round(started[1] - killed_wall, 3) if len(started) > 1 else None,
        "back_s": round(serving[1] - killed_wall, 3) if len(serving) > 1 else None,
        "startup_s": round(serving[0] - started[0], 3) if serving and started else None,
        "restart_startup_s": round(serving[1] - started[1], 3) if len(serving) > 1 and len(started) > 1 else None,
        "windows_after_kill": windows(events, killed_at, began + 16),
        "lost_after_1s": sum(1 for sent, status, _ in events if sent > killed_at + 1 and not status.isdigit()),
        "scrapes": len(samples),
        "counters_backwards": counters_backwards(samples)[:10],
        "tracebacks": log.count("Traceback"),
    }


async def bundle_removed(corpus: Corpus, rate: float) -> dict[str, Any]:
    """A copy of the bundle served under load: its graph truncated on disk, SIGHUP; then the
    whole directory removed, SIGHUP; each time the old version must keep serving."""
    directory = Path(tempfile.mkdtemp(prefix="batcher-bundle-"))
    bundle = Path(shutil.copytree(MODEL, directory / "intent-zh"))
    try:
        with batcher_server("bundle removed", f'model.path="{bundle}"') as server:
            assert server.process is not None
            version_before = await served_version(server)
            load = start_load(server, corpus, Load("open", rate), 14)
            failures = []
            await asyncio.sleep(3)
            graph = bundle / "model.int8.onnx"
            with graph.open("r+b") as handle:
                handle.truncate(graph.stat().st_size // 2)
            failures.append(await reload_failed(server, 1))
            await asyncio.sleep(2)
            shutil.rmtree(bundle)
            failures.append(await reload_failed(server, 2))
            result = await load
            version_after = await served_version(server)
            after = await metrics(server)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return {
        **answers(result),
        "rate": rate,
        "version_before": version_before,
        "version_after": version_after,
        "reload_seconds": failures,
        "reloads_failed": grown({}, after, "batcher_model_reloads_total", result="failed"),
        "errors_logged": log_lines(server.log, "ERROR", "reloading model intent-zh failed"),
        "tracebacks": server.log.count("Traceback"),
    }


async def served_version(server: Server) -> str:
    async with aiohttp.ClientSession() as session, session.get(server.url + "/models") as response:
        return str((await response.json())["models"][0]["version"])


async def reload_failed(server: Server, count: int) -> float | None:
    """SIGHUP, then how long until the reload metric counts the `count`-th failure (None: never)."""
    assert server.process is not None
    server.process.send_signal(signal.SIGHUP)
    sent = time.perf_counter()
    while time.perf_counter() - sent < 30:
        samples = await metrics(server)
        if grown({}, samples, "batcher_model_reloads_total", result="failed") >= count:
            return round(time.perf_counter() - sent, 3)
        await asyncio.sleep(0.05)
    return None


async def fast_lane_burst() -> dict[str, Any]:
    """Four pipelined bursts of 5,000 requests with bad JSON on one connection (each answered
    400 by the fast lane, at most ANSWERS_PER_CALLBACK in one callback), while another
    connection asks GET /healthz every 10 ms."""
    one = request_bytes(b"{bad json")
    with batcher_server("fast-lane burst") as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        probe_reader, probe_writer = await asyncio.open_connection("127.0.0.1", server.port)
        healthz: list[float] = []
        quiet: list[float] = []
        answered: list[int] = []
        burst_ms: list[float] = []

        async def probe(into: list[float], until: asyncio.Event) -> None:
            while not until.is_set():
                sent = time.perf_counter()
                probe_writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                if await read_answer(probe_reader, 10) != "200":
                    raise SystemExit("bench: /healthz did not answer 200 during the fast-lane bursts")
                into.append((time.perf_counter() - sent) * 1000)
                await asyncio.sleep(0.01)

        done = asyncio.Event()
        asyncio.get_running_loop().call_later(1, done.set)
        await probe(quiet, done)
        for _ in range(BURSTS):
            done = asyncio.Event()
            probing = asyncio.ensure_future(probe(healthz, done))
            started = time.perf_counter()
            writer.write(one * BURST_REQUESTS)
            count, tail = 0, b""
            while count < BURST_REQUESTS:
                try:
                    chunk = await asyncio.wait_for(reader.read(1 << 16), 10)
                except TimeoutError:
                    break
                if not chunk:
                    break
                seen = tail + chunk  # a status line may straddle two reads
                count += seen.count(BAD_REQUEST)
                tail = seen[-(len(BAD_REQUEST) - 1) :]
            burst_ms.append((time.perf_counter() - started) * 1000)
            answered.append(count)
            done.set()
            await probing
        writer.close()
        probe_writer.close()
    return {
        "bursts": BURSTS,
        "requests_per_burst": BURST_REQUESTS,
        "burst_bytes": len(one) * BURST_REQUESTS,
        "answered_400": answered,
        "burst_ms": [round(ms, 1) for ms in burst_ms],
        "healthz_during": len(healthz),
        "healthz_max_ms": round(max(healthz), 2) if healthz else None,
        "healthz_quiet_max_ms": round(max(quiet), 2) if quiet else None,
        "tracebacks": server.log.count("Traceback"),
    }


FAULTS: dict[str, Callable[[Corpus, float], Awaitable[dict[str, Any]]]] = {
    "prediction_log_full": prediction_log_full,
    "prediction_log_unwritable": prediction_log_unwritable,
    "descriptor_limit": lambda corpus, rate: descriptor_limit(corpus),
    "stopped": lambda corpus, rate: stopped(corpus, min(rate, 400.0)),
    "worker_killed": lambda corpus, rate: worker_killed(corpus),
    "bundle_removed": bundle_removed,
    "fast_lane_burst": lambda corpus, rate: fast_lane_burst(),
}


async def run_faults(corpus: Corpus, peak_rps: float | None, only: list[str] | None = None) -> dict[str, Any]:
    """Every fault in turn (or those in `only`), the open-loop loads at 30 % of `peak_rps`:
    the rate, and each fault's figures by name (`matrix`)."""
    rate = round(RATE_SHARE * peak_rps) if peak_rps else DEFAULT_RATE
    matrix: dict[str, Any] = {}
    for name, fault in FAULTS.items():
        if only and name not in only:
            continue
        print(f"fault: {name}…", file=sys.stderr)
        started = time.monotonic()
        matrix[name] = await fault(corpus, rate)
        matrix[name]["seconds"] = round(time.monotonic() - started, 1)
    return {"rate": rate, "matrix": matrix}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", choices=list(FAULTS), help="run this fault (repeatable)")
    parser.add_argument("--peak-rps", type=float, help="maximum throughput the loads are a share of")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="JSONL corpus")
    args = parser.parse_args()
    results = uvloop.run(run_faults(Corpus(args.corpus, seed=1), args.peak_rps, args.only))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
