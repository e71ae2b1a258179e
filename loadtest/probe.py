"""A probe: one request every INTERVAL ms, each from a new client (a new connection,
`Connection: close`), open loop, for DURATION seconds; how long each took to be answered,
whatever the status. It runs in its own process, so that the load beside it (hundreds of
connections resending at once, loadtest.modes) does not delay it on the same event loop.

    python -m loadtest.probe --url http://127.0.0.1:8000 --path /predict --body '{...}' \\
        --interval-ms 50 --duration 10

It prints `ready` once set up, waits for a line on stdin (`go`), probes, and prints one line
of JSON: requests, statuses, p50/p99/max ms (from each request's schedule), p99 by status.
`Probe` drives it from a load step (loadtest/steps.py)."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
from typing import Any
from urllib.parse import urlsplit

import uvloop

from loadtest.driver import Driver, Load
from loadtest.http import HttpClient


async def probe(
    url: str, path: str, body: bytes, interval_ms: float, duration_s: float, timeout_s: float
) -> dict[str, Any]:
    address = urlsplit(url)
    client = HttpClient(address.hostname or "127.0.0.1", address.port or 80, fresh_connections=True)
    driver = Driver(client, path, itertools.repeat(body), seed=0, timeout_s=timeout_s, progress=False)
    result = await driver.run(Load("open", 1000 / interval_ms, "constant"), duration_s=duration_s, warmup_s=0)
    await client.close()
    row = result.summary()
    keys = ("requests", "statuses", "p50_ms", "p99_ms", "max_ms", "p99_ms_by_status", "late", "unsent")
    return {"interval_ms": interval_ms, "new_connection_each": True} | {key: row[key] for key in keys}


class Probe:
    """The probe process beside a load step: `start` (before the warm-up: it takes a moment
    to import), `go` when measuring starts, `result` when the step has ended."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def start(
        cls, url: str, path: str, body: bytes, interval_ms: float, duration_s: float, timeout_s: float
    ) -> Probe:
        args = ["--url", url, "--path", path, "--body", body.decode(), "--interval-ms", f"{interval_ms:g}"]
        args += ["--duration", f"{duration_s:g}", "--timeout", f"{timeout_s:g}"]
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "loadtest.probe",
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert process.stdout is not None
        line = await process.stdout.readline()
        if line.strip() != b"ready":
            await process.wait()
            raise RuntimeError(f"loadtest: the probe did not start (exit {process.returncode})")
        return cls(process)

    def go(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(b"go\n")

    async def result(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = await self.process.stdout.readline()
        await self.process.wait()
        found: dict[str, Any] = json.loads(line)
        return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.probe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", required=True, help="server base URL")
    parser.add_argument("--path", default="/predict", help="the path POSTed to (default: %(default)s)")
    parser.add_argument("--body", required=True, help="the request body (JSON)")
    parser.add_argument("--interval-ms", type=float, default=50, help="ms between requests (default: %(default)s)")
    parser.add_argument("--duration", type=float, required=True, help="seconds to probe")
    parser.add_argument("--timeout", type=float, default=30, help="per-request timeout, s (default: %(default)s)")
    args = parser.parse_args(argv)
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 1
    found = uvloop.run(probe(args.url, args.path, args.body.encode(), args.interval_ms, args.duration, args.timeout))
    print(json.dumps(found), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
