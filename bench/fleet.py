"""A fleet, tested for real: `make fleet` (python -m bench.fleet).

Three batcher replicas on loopback behind HAProxy (Debian's), which health-checks each on
/readyz every 0.5 s. Open-loop load at ~60 % of the fleet's measured capacity goes through
HAProxy the whole time, while:
1. baseline: nothing happens;
2. rolling restart: each replica in turn gets SIGTERM, exits, is started again and waits
   until HAProxy routes to it again (the replicas run with server.drain_delay_s = 1.5, so
   HAProxy has marked a replica down before it refuses anything);
3. kill: one replica gets SIGKILL (its in-flight requests are lost: that is what a crash
   costs), is started again, and rejoins.
Every request's send time, status and latency are kept; the figures are counted per phase
and written to bench/results/fleet.json (SCALING.md renders them).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import uvloop

from bench.servers import ROOT, Server, batcher_server, free_port, provenance
from loadtest.corpus import DEFAULT_CORPUS, Corpus
from loadtest.driver import Driver, Load
from loadtest.http import HttpClient
from loadtest.steps import run_steps

OUT = ROOT / "bench" / "results" / "fleet.json"
DRAIN_DELAY_S = 1.5
HAPROXY_CONFIG = """global
    maxconn 8192
defaults
    mode http
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    retries 2
    option redispatch
    retry-on conn-failure
    option forwardfor
frontend batcher
    bind 127.0.0.1:{port}
    default_backend replicas
backend replicas
    balance leastconn
    option httpchk GET /readyz
    http-check expect status 200
    default-server inter 500ms fall 1 rise 2
{servers}
"""


class HAProxy:
    """HAProxy in front of the replicas, in the foreground (-db), stopped with SIGTERM."""

    def __init__(self, replicas: list[Server]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        servers = "\n".join(f"    server r{i} 127.0.0.1:{r.port} check" for i, r in enumerate(replicas))
        self.config = HAPROXY_CONFIG.format(port=self.port, servers=servers)
        self.process: subprocess.Popen[bytes] | None = None
        self._dir = Path(tempfile.mkdtemp(prefix="batcher-fleet-"))

    def __enter__(self) -> HAProxy:
        binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
        path = self._dir / "haproxy.cfg"
        path.write_text(self.config)
        subprocess.run([binary, "-c", "-q", "-f", str(path)], check=True)
        self.process = subprocess.Popen([binary, "-db", "-f", str(path)], stderr=subprocess.DEVNULL)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
        shutil.rmtree(self._dir, ignore_errors=True)


async def in_rotation(session: aiohttp.ClientSession, url: str, *, timeout_s: float = 60) -> float:
    """Wait until the replica answers /readyz 200 and HAProxy has had time to see it twice
    (rise 2 at 0.5 s); seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        try:
            async with session.get(f"{url}/readyz") as response:
                if response.status == 200:
                    await asyncio.sleep(1.2)
                    return time.monotonic() - started
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise SystemExit(f"fleet: {url} did not come back within {timeout_s:g} s")


async def choreography(replicas: list[Server], marks: dict[str, float], args: argparse.Namespace) -> None:
    """Baseline, then a rolling restart of every replica, a pause, then one kill -9."""
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as session:
        await asyncio.sleep(args.baseline_s)
        marks["rolling_start"] = time.perf_counter()
        for replica in replicas:
            await loop.run_in_executor(None, replica.__exit__)  # SIGTERM, wait for exit
            await loop.run_in_executor(None, replica.__enter__)  # start on the same port
            await in_rotation(session, replica.url)
            print(f"fleet: {replica.name} restarted and back in rotation", file=sys.stderr)
        marks["rolling_end"] = time.perf_counter()
        await asyncio.sleep(args.pause_s)
        victim = replicas[0]
        assert victim.process is not None
        marks["kill"] = time.perf_counter()
        victim.process.kill()
        await loop.run_in_executor(None, victim.process.wait)
        await loop.run_in_executor(None, victim.__exit__)  # collects the log of a dead process
        await loop.run_in_executor(None, victim.__enter__)
        await in_rotation(session, victim.url)
        marks["kill_end"] = time.perf_counter()
        print(f"fleet: {victim.name} killed, restarted and back in rotation", file=sys.stderr)
        await asyncio.sleep(args.pause_s)
        marks["end"] = time.perf_counter()


def phase(events: list[tuple[float, str, float]], start: float, end: float) -> dict[str, Any]:
    inside = [(status, latency) for sent, status, latency in events if start <= sent < end]
    statuses: dict[str, int] = {}
    for status, _ in inside:
        statuses[status] = statuses.get(status, 0) + 1
    latencies = sorted(latency for status, latency in inside if status == "200")
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1000 if latencies else None
    return {
        "seconds": round(end - start, 1),
        "requests": len(inside),
        "failed": sum(count for status, count in statuses.items() if status != "200"),
        "statuses": dict(sorted(statuses.items())),
        "p99_ms": round(p99, 1) if p99 is not None else None,
        "p50_ms": round(statistics.median(latencies) * 1000, 1) if latencies else None,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    overrides = (f"server.drain_delay_s={DRAIN_DELAY_S}", "server.shutdown_timeout_s=10", *args.set)
    replicas = [batcher_server(f"replica {i}", *overrides) for i in range(args.replicas)]
    corpus = Corpus(args.corpus, seed=1)
    for replica in replicas:
        replica.__enter__()
    try:
        with HAProxy(replicas) as proxy:
            async with aiohttp.ClientSession() as session:
                for replica in replicas:
                    await in_rotation(session, replica.url)
            capacity = (
                await run_steps(
                    proxy.url, [Load("closed", 64)], corpus=corpus, duration_s=10, warmup_s=2, progress=False
                )
            )[0]["throughput_rps"]
            rate = round(args.load_share * capacity, 1)
            print(f"fleet: capacity {capacity:.0f} req/s through HAProxy; load {rate:g} req/s", file=sys.stderr)
            marks: dict[str, float] = {}
            client = HttpClient("127.0.0.1", proxy.port)
            driver = Driver(client, "/predict", corpus.bodies("predict"), seed=1, timeout_s=30, progress=False)
            stop = asyncio.Event()
            marks["start"] = time.perf_counter()
            load = asyncio.ensure_future(
                driver.run(Load("open", rate), duration_s=3600, warmup_s=0, events=True, stop=stop)
            )
            await choreography(replicas, marks, args)
            stop.set()
            events = (await load).events or []
            await client.close()
    finally:
        for replica in replicas:
            replica.__exit__()
    return {
        **provenance(),
        "command": "make fleet  # python -m bench.fleet " + " ".join(sys.argv[1:]),
        "replicas": args.replicas,
        "settings": list(overrides),
        "haproxy": "health checks GET /readyz every 0.5 s, fall 1, rise 2; leastconn; retry-on conn-failure",
        "capacity_rps": round(capacity, 1),
        "rate_rps": rate,
        "phases": {
            "before": phase(events, marks["start"], marks["rolling_start"]),
            "rolling_restart": phase(events, marks["rolling_start"], marks["rolling_end"]),
            "kill": phase(events, marks["kill"], marks["kill_end"]),
            "after": phase(events, marks["kill_end"], marks["end"]),
        },
        "tracebacks": sum(replica.log.count("Traceback") for replica in replicas),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=3, help="batcher processes (default: %(default)s)")
    parser.add_argument(
        "--load-share", type=float, default=0.6, help="open-loop rate over capacity (default: %(default)s)"
    )
    parser.add_argument(
        "--baseline-s", type=float, default=15, help="seconds before the restarts (default: %(default)s)"
    )
    parser.add_argument("--pause-s", type=float, default=8, help="seconds between phases (default: %(default)s)")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="JSONL corpus (default: test split)")
    parser.add_argument("--set", action="append", default=[], help="a setting for every replica (repeatable)")
    args = parser.parse_args()
    result = uvloop.run(run(args))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print(json.dumps(result["phases"], indent=1))
    print(f"wrote {OUT.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
