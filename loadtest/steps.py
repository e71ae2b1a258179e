"""Load steps: drive a server through a list of loads and summarise each with the
server's own breakdown from /metrics. The load generator's API for the CLI and for the
benchmark and reliability runners."""

from __future__ import annotations

import sys
import time
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from loadtest.corpus import Corpus
from loadtest.driver import Driver, Load
from loadtest.http import HttpClient
from loadtest.modes import Modes
from loadtest.probe import Probe
from loadtest.server_metrics import Samples, breakdown, scrape, tree_cpu_seconds

CPU_WARNING_SHARE = 0.85


async def run_steps(
    base_url: str,
    loads: list[Load],
    *,
    corpus: Corpus,
    endpoint: str = "predict",
    model: str = "intent-zh",
    duration_s: float = 10,
    warmup_s: float = 2,
    seed: int = 1,
    timeout_s: float = 30,
    slo_p99_ms: float | None = None,
    progress: bool = True,
    pid: int | None = None,
    modes: Modes | None = None,
) -> list[dict[str, Any]]:
    """Run each load step in turn; with an SLO, stop after the first step whose p99 breaks it.
    With the server's `pid` (on this machine), each row also gets the CPU its whole process
    tree spent per request (`process_cpu_us_per_request`), for servers without batcher's
    /metrics. With `modes` (loadtest/modes.py), requests carry priorities or a deadline, or
    clients retry on 429 with a probe beside them; each row then has a `modes` breakdown."""
    path = {
        "predict": "/predict",
        "batch": "/predict/batch",
        "oip": f"/v2/models/{model}/infer",
        "classify": "/classify",
    }[endpoint]
    rows: list[dict[str, Any]] = []
    address = urlsplit(base_url)
    client = HttpClient(address.hostname or "127.0.0.1", address.port or 80)
    async with aiohttp.ClientSession() as session:
        driver = Driver(
            client, path, corpus.bodies(endpoint), seed=seed, timeout_s=timeout_s, progress=progress, modes=modes
        )
        probing = modes is not None and modes.retry is not None and modes.probe_interval_ms > 0
        for load in loads:
            before: Samples = {}
            scraped_at: list[float] = []
            cpu_at_start: list[float] = []
            snapshot = partial(_scrape_into, before, scraped_at, session, base_url + "/metrics", pid, cpu_at_start)
            probe: Probe | None = None
            if probing:
                assert modes is not None
                body = next(corpus.bodies(endpoint))
                probe = await Probe.start(base_url, path, body, modes.probe_interval_ms, duration_s, timeout_s)
                snapshot = partial(_then_go, snapshot, probe)
            try:
                result = await driver.run(load, duration_s=duration_s, warmup_s=warmup_s, on_measure_start=snapshot)
            except BaseException:
                if probe is not None and probe.process.returncode is None:
                    probe.process.kill()
                raise
            if probe is not None and result.modes is not None:
                result.modes.probe = await probe.result()
            after = await scrape(session, base_url + "/metrics")
            cpu_spent = tree_cpu_seconds(pid) - cpu_at_start[0] if pid and cpu_at_start else None
            # Server rates over the time between the two scrapes: the step plus the drain of
            # requests still in flight at its end (long under overload).
            wall_s = time.perf_counter() - scraped_at[0] if scraped_at else duration_s
            result.server = breakdown(before, after, max(wall_s, duration_s))
            row = result.summary(slo_p99_ms)
            if cpu_spent is not None and row["throughput_rps"]:
                row["process_cpu_us_per_request"] = round(cpu_spent / wall_s / row["throughput_rps"] * 1e6, 1)
            rows.append(row)
            if row["client_cpu_share"] > CPU_WARNING_SHARE:
                print(
                    f"warning: the load generator used {row['client_cpu_share']:.0%} of a core during "
                    f"{load.label}; it may be the bottleneck, not the server",
                    file=sys.stderr,
                )
            if slo_p99_ms is not None and row["p99_ms"] > slo_p99_ms:
                print(
                    f"{load.label}: p99 {row['p99_ms']:.1f} ms breaks the {slo_p99_ms:g} ms SLO; stopping the sweep",
                    file=sys.stderr,
                )
                break
    await client.close()
    return rows


async def _scrape_into(
    samples: Samples,
    at: list[float],
    session: aiohttp.ClientSession,
    url: str,
    pid: int | None,
    cpu: list[float],
) -> None:
    samples.update(await scrape(session, url))
    if pid:
        cpu.append(tree_cpu_seconds(pid))
    at.append(time.perf_counter())


async def _then_go(snapshot: partial[Any], probe: Probe) -> None:
    await snapshot()
    probe.go()


def highest_within_slo(rows: list[dict[str, Any]], slo_p99_ms: float) -> dict[str, Any] | None:
    held = [row for row in rows if row["p99_ms"] <= slo_p99_ms and not row["unsent"]]
    return max(held, key=lambda row: row["throughput_rps"]) if held else None
