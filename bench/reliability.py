"""Reliability under abuse, with figures: `make reliability` (about 20 minutes, soak
included). Writes RELIABILITY.md and reliability/ from that one run.

Every step drives a real batcher (app.py, bundled model, defaults) over loopback:
- overload: open loop at 3 x the measured maximum throughput; then recovery;
- disconnect storm: clients that send and hang up, beside normal clients;
- shutdown under load: SIGTERM during a 3 x overload;
- the fault matrix (bench/faults.py): the prediction log's device full or its file
  unwritable, the descriptor limit reached, SIGSTOP/SIGCONT, a worker killed, the bundle
  truncated and removed, a pipelined burst of failing requests beside /healthz;
- the model threads' scheduling policy (SCHED_IDLE vs nice 5) side by side under that overload;
- soak: 70 % of the maximum for 10 minutes, RSS, p99 and CPU per request minute by minute;
- the fault, hostile-input and shutdown tests through pytest, and a long schemathesis run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import uvloop

from bench.faults import FAULTS, run_faults
from bench.servers import ROOT, batcher_server, provenance, rss_bytes
from loadtest.corpus import DEFAULT_CORPUS, Corpus
from loadtest.driver import Driver, Load
from loadtest.http import HttpClient
from loadtest.server_metrics import grown, scrape
from loadtest.steps import run_steps

OUT = ROOT / "reliability"
DRAIN_LOG = re.compile(r"SIGTERM: draining \d+ unanswered requests \(monotonic ([0-9.]+)\)")


async def sample_rss(pid: int, samples: list[tuple[float, int]], stop: asyncio.Event) -> None:
    started = time.monotonic()
    while not stop.is_set():
        try:
            samples.append((time.monotonic() - started, rss_bytes(pid)))
        except OSError:
            return
        await asyncio.sleep(1)


async def closed_loop(url: str, corpus: Corpus, clients: int, seconds: float, *, warmup_s: float = 2) -> dict[str, Any]:
    """One closed-loop step. With 64 clients its throughput is "the maximum" the other steps
    scale (and, without warm-up, what the overload step recovers to)."""
    rows = await run_steps(
        url, [Load("closed", clients)], corpus=corpus, duration_s=seconds, warmup_s=warmup_s, progress=False
    )
    return rows[0]


async def open_loop(
    url: str, corpus: Corpus, rate: float, seconds: float, *, warmup_s: float = 0, seed: int = 1
) -> dict[str, Any]:
    """One open-loop step at `rate` req/s; answers may take up to 30 s (queued under overload)."""
    return (
        await run_steps(
            url,
            [Load("open", rate)],
            corpus=corpus,
            duration_s=seconds,
            warmup_s=warmup_s,
            seed=seed,
            timeout_s=30,
            progress=False,
        )
    )[0]


async def overload(corpus: Corpus, args: argparse.Namespace) -> dict[str, Any]:
    with batcher_server("batcher (defaults)") as server:
        assert server.process is not None
        peak_row = await closed_loop(server.url, corpus, 64, 8)
        peak = float(peak_row["throughput_rps"])
        samples: list[tuple[float, int]] = []
        stop = asyncio.Event()
        sampler = asyncio.ensure_future(sample_rss(server.process.pid, samples, stop))
        spike = await open_loop(server.url, corpus, round(3 * peak), args.overload_s)
        stop.set()
        await sampler
        after = await closed_loop(server.url, corpus, 64, 5, warmup_s=0)
    rss = [value for _, value in samples]
    return {
        "peak_rps": peak,
        "peak_server": peak_row["server"],
        "spike": spike,
        "after": after,
        "rss_start": rss[0],
        "rss_max": max(rss),
        "rss_end": rss[-1],
    }


async def hang_up(host: str, port: int, body: bytes) -> None:
    """Send one request and close the connection without reading the answer."""
    try:
        _, writer = await asyncio.open_connection(host, port)
    except OSError:
        return
    writer.write(
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    await asyncio.sleep(0.005)
    writer.close()


async def disconnect_storm(corpus: Corpus, args: argparse.Namespace) -> dict[str, Any]:
    body = json.dumps({"turns": [{"speaker": "user", "text": "播放周杰伦的歌，然后把客厅的灯调暗一点" * 3}]}).encode()
    with batcher_server("batcher (defaults)") as server:
        baseline = await closed_loop(server.url, corpus, 16, args.storm_s)
        async with aiohttp.ClientSession() as session:
            before = await scrape(session, server.url + "/metrics")
            storm_sent = 0
            stop_at = time.monotonic() + args.storm_s

            async def storm() -> None:
                nonlocal storm_sent
                while time.monotonic() < stop_at:
                    await asyncio.gather(*(hang_up("127.0.0.1", server.port, body) for _ in range(20)))
                    storm_sent += 20
                    await asyncio.sleep(0.01)

            storm_task = asyncio.ensure_future(storm())
            during = await closed_loop(server.url, corpus, 16, args.storm_s, warmup_s=0)
            await storm_task
            await asyncio.sleep(1)
            after = await scrape(session, server.url + "/metrics")

    return {
        "storm_sent": storm_sent,
        "normal_sent": during["requests"],
        "rows_computed": grown(before, after, "batcher_batch_size_sum"),
        "disconnected": grown(before, after, "batcher_rejected_total", reason="disconnected"),
        "baseline": baseline,
        "during": during,
    }


async def shutdown_under_load(corpus: Corpus, peak: float) -> dict[str, Any]:
    """SIGTERM 4 s into an open-loop 3x overload: every request sent before the signal must get
    an HTTP answer; after it, 503 or a refused connection; exit 0 within shutdown_timeout_s."""
    # info: the drain's log line gives its instant (the benchmark servers log warnings only)
    server = batcher_server("batcher (defaults)", "server.shutdown_timeout_s=20", 'server.log_level="info"')
    server.__enter__()
    assert server.process is not None
    rate = round(3 * peak)
    client = HttpClient("127.0.0.1", server.port)
    driver = Driver(client, "/predict", corpus.bodies("predict"), seed=1, timeout_s=30, progress=False)
    load = asyncio.ensure_future(driver.run(Load("open", rate), duration_s=8, warmup_s=0, events=True))
    await asyncio.sleep(4)
    signalled = time.perf_counter()
    server.process.send_signal(signal.SIGTERM)
    code = await asyncio.get_running_loop().run_in_executor(None, server.process.wait, 60)
    exited_after = time.perf_counter() - signalled
    result = await load
    await client.close()
    server.__exit__()  # it has exited: this only collects its log
    stderr = server.log
    events = result.events or []
    # Split at the instant the server began draining (its log gives it on the monotonic
    # clock, which perf_counter shares on Linux); requests written between our kill() and
    # the server's signal callback were read before the drain and answered like any other.
    match = DRAIN_LOG.search(stderr)
    drain_at = float(match.group(1)) if match else signalled
    before = Counter(status for sent, status, _ in events if sent < drain_at)
    after = Counter(status for sent, status, _ in events if sent >= drain_at)
    return {
        "rate": rate,
        "before": dict(before),
        "after": dict(after),
        "drain_delay_ms": round((drain_at - signalled) * 1000, 2) if match else None,
        "exit_code": code,
        "exit_s": round(exited_after, 2),
        "tracebacks": stderr.count("Traceback"),
    }


async def soak(corpus: Corpus, args: argparse.Namespace, peak: float) -> dict[str, Any]:
    rate = round(0.7 * peak)
    minutes = []
    with batcher_server("batcher (defaults)") as server:
        assert server.process is not None
        async with aiohttp.ClientSession() as session:
            for minute in range(args.soak_minutes):
                row = await open_loop(server.url, corpus, rate, 60, seed=minute + 1)
                samples = await scrape(session, server.url + "/metrics")
                row["rss_bytes"] = samples.get(("process_resident_memory_bytes", ()), rss_bytes(server.process.pid))
                minutes.append(row)
                print(
                    f"soak minute {minute + 1}: p99 {row['p99_ms']:.1f} ms, rss {row['rss_bytes'] / 2**20:.1f} MiB",
                    file=sys.stderr,
                )
    return {"rate": rate, "minutes": minutes}


def run_queue_wait_s(pid: int) -> float:
    """Seconds the process's main thread (the event loop) has spent runnable but not running."""
    return int(Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()[1]) / 1e9


async def scheduling(corpus: Corpus, args: argparse.Namespace, peak: float) -> list[dict[str, Any]]:
    """The model threads' scheduling policy side by side: the same 3x overload and the same
    64 clients against SCHED_IDLE (the default) and niceness 5 (the fallback)."""
    rows = []
    variants = [("SCHED_IDLE (default)", ()), ("nice 5", ("batching.worker_sched_idle=false",))]
    for name, overrides in variants:
        with batcher_server(name, *overrides) as server:
            assert server.process is not None
            throughput = float((await closed_loop(server.url, corpus, 64, 8))["throughput_rps"])
            waited, started = run_queue_wait_s(server.process.pid), time.monotonic()
            # steady state: 2 s at the rate first (the spike's onset is in the overload step)
            spike = await open_loop(server.url, corpus, round(3 * peak), args.scheduling_s, warmup_s=2)
            # over the whole step, warm-up included: the same rate throughout
            waited_share = (run_queue_wait_s(server.process.pid) - waited) / (time.monotonic() - started)
        rows.append(
            {
                "variant": name,
                "closed_64_rps": throughput,
                "spike": spike,
                "loop_run_queue_wait_ms_per_s": round(waited_share * 1000, 1),
            }
        )
    return rows


def pytest_outcome(selection: list[str]) -> dict[str, Any]:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *selection],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    summary = [line for line in result.stdout.splitlines() if re.search(r"\d+ (passed|failed)", line)]
    return {
        "selection": selection,
        "exit_code": result.returncode,
        "summary": summary[-1] if summary else "",
        "seconds": round(time.monotonic() - started, 1),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    corpus = Corpus(args.corpus, seed=1)
    results: dict[str, Any] = {
        **provenance(),
        "command": "python -m bench.reliability " + " ".join(sys.argv[1:]),
    }
    print("overload…", file=sys.stderr)
    results["overload"] = await overload(corpus, args)
    peak = results["overload"]["peak_rps"]
    print("disconnect storm…", file=sys.stderr)
    results["disconnect"] = await disconnect_storm(corpus, args)
    print("shutdown under load…", file=sys.stderr)
    results["shutdown"] = await shutdown_under_load(corpus, peak)
    if args.faults != "none":
        print("fault matrix…", file=sys.stderr)
        only = None if args.faults == "all" else args.faults.split(",")
        results["faults"] = await run_faults(corpus, peak, only)
    if args.scheduling_s:
        print("scheduling policy side by side…", file=sys.stderr)
        results["scheduling"] = await scheduling(corpus, args, peak)
    if args.soak_minutes:
        print(f"soak ({args.soak_minutes} min)…", file=sys.stderr)
        results["soak"] = await soak(corpus, args, peak)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--overload-s", type=float, default=60, help="seconds of the 3x overload")
    parser.add_argument("--storm-s", type=float, default=10, help="seconds of the disconnect storm")
    parser.add_argument(
        "--scheduling-s", type=float, default=20, help="seconds of each overload in the scheduling comparison (0: skip)"
    )
    parser.add_argument(
        "--faults",
        default="all",
        help=f"faults to inject, comma-separated, or all or none ({', '.join(FAULTS)})",
    )
    parser.add_argument("--soak-minutes", type=int, default=10, help="minutes of soak at 70 %% of the maximum")
    parser.add_argument("--fuzz-examples", type=int, default=3000, help="schemathesis examples per operation")
    parser.add_argument(
        "--http-fuzz-examples", type=int, default=3000, help="raw requests of the HTTP-layer fuzz (0: skip)"
    )
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="JSONL corpus")
    args = parser.parse_args()
    unknown = set(args.faults.split(",")) - {"all", "none", *FAULTS}
    if unknown:
        parser.error(f"--faults: no fault named {', '.join(sorted(unknown))}")
    results = uvloop.run(run(args))
    print("fault, hostile-input and shutdown tests…", file=sys.stderr)
    results["tests"] = [
        pytest_outcome(
            [
                "tests/test_handlers.py",
                "-k",
                "fault or hung or hostile or slow_body or oversized or malformed or bad_ or cors",
            ]
        ),
        pytest_outcome(["tests/test_hardening.py"]),
        pytest_outcome(["tests/test_app.py", "-k", "sigterm or idle_connections"]),
        pytest_outcome(["tests/test_batching.py", "tests/test_queue.py", "tests/test_dialogue.py"]),
        pytest_outcome(["tests/test_prediction_log.py", "tests/test_server.py", "tests/test_listener.py"]),
    ]
    if args.fuzz_examples:
        print("fuzzing…", file=sys.stderr)
        from bench.fuzz import fuzz

        results["fuzz"] = fuzz(args.fuzz_examples)
    if args.http_fuzz_examples:
        print("fuzzing the HTTP layer…", file=sys.stderr)
        from bench import http_fuzz

        results["http_fuzz"] = http_fuzz.fuzz(args.http_fuzz_examples, http_fuzz.SEED)
    OUT.mkdir(exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    from bench.reliability_md import render

    (ROOT / "RELIABILITY.md").write_text(render(results, OUT), encoding="utf-8")
    print("wrote RELIABILITY.md and reliability/", file=sys.stderr)


if __name__ == "__main__":
    main()
