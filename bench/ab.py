"""A/B: this checkout's batcher against another commit's, side by side in one run.

    python -m bench.ab --baseline HEAD~1 [--rounds 3] [--duration 15] [--clients 64 | --rate 700]

The baseline is checked out into a temporary git worktree and served with this checkout's
virtual environment. Both servers run the shipped config on the bundled model; the steps
alternate (A B A B ...), so drift of a shared machine hits both alike. Prints each step,
then the medians and the ratios, with the machine, commits and date.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import uvloop

from bench.servers import ROOT, Server, batcher_server, provenance
from loadtest.corpus import DEFAULT_CORPUS, Corpus
from loadtest.driver import Load
from loadtest.steps import run_steps

FIELDS: tuple[tuple[str, Callable[[dict[str, Any]], float]], ...] = (
    ("req/s", lambda row: row["throughput_rps"]),
    ("p99 ms", lambda row: row["p99_ms"]),
    ("loop µs/req", lambda row: row["server"].get("event_loop_cpu_us_per_request") or 0.0),
    ("mean batch", lambda row: row["server"].get("mean_batch_size") or 0.0),
)


async def alternate(
    servers: list[Server],
    load: Load,
    *,
    rounds: int,
    duration_s: float,
    warmup_s: float,
    corpus: Corpus,
    seed: int,
    endpoints: Mapping[str, str] | None = None,
    on_up: Callable[[list[Server]], Awaitable[None]] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Every server up at once, one step each in turn (A B A B ...), `rounds` times: drift of
    a shared machine hits all alike. `endpoints` gives the load generator's --endpoint by
    server name (default predict); `on_up` runs once all are up, before the steps. The step
    rows by server name."""
    steps: dict[str, list[dict[str, Any]]] = {server.name: [] for server in servers}
    started: list[Server] = []
    try:
        for server in servers:
            server.__enter__()
            started.append(server)
        if on_up is not None:
            await on_up(servers)
        for round_ in range(rounds):
            for server in servers:
                assert server.process is not None
                rows = await run_steps(
                    server.url,
                    [load],
                    corpus=corpus,
                    seed=seed,
                    endpoint=(endpoints or {}).get(server.name, "predict"),
                    duration_s=duration_s,
                    warmup_s=warmup_s,
                    pid=server.process.pid,
                    progress=False,
                )
                steps[server.name].append(rows[0])
                cells = ", ".join(f"{label} {get(rows[0]):.1f}" for label, get in FIELDS)
                print(f"round {round_ + 1} {server.name}: {cells}", file=sys.stderr)
    finally:
        for server in started:
            server.__exit__()
    return steps


def summary(steps: dict[str, list[dict[str, Any]]], names: tuple[str, str]) -> str:
    baseline, candidate = names
    lines = [f"| | {baseline} | {candidate} | ratio |", "|---|---|---|---|"]
    for label, get in FIELDS:
        a = statistics.median(get(row) for row in steps[baseline])
        b = statistics.median(get(row) for row in steps[candidate])
        lines.append(f"| {label} (median) | {a:.1f} | {b:.1f} | {b / a if a else float('nan'):.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ab", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--baseline", required=True, help="the commit to compare with (e.g. HEAD~1, a hash)")
    parser.add_argument("--rounds", type=int, default=3, help="steps per server, alternating (default: %(default)s)")
    parser.add_argument("--clients", type=int, default=64, help="closed-loop clients (default: %(default)s)")
    parser.add_argument("--rate", type=float, help="open loop at this many requests/s instead of closed loop")
    parser.add_argument("--duration", type=float, default=15, help="measured seconds a step (default: %(default)s)")
    parser.add_argument("--warmup", type=float, default=3, help="unmeasured seconds a step (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=1, help="corpus order (default: %(default)s)")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="JSONL corpus (default: test split)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="a batcher setting for both (repeatable)"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="batcher-ab-") as scratch:
        tree = Path(scratch) / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), args.baseline], cwd=ROOT, check=True)
        try:
            base = subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True, check=True
            ).stdout.strip()
            here = provenance()
            names = (f"baseline {base}", f"this checkout {here['commit']}")
            servers = [
                batcher_server(names[0], *args.overrides, tree=tree),
                batcher_server(names[1], *args.overrides),
            ]
            load = Load("open", args.rate) if args.rate else Load("closed", args.clients)
            corpus = Corpus(args.corpus, seed=args.seed)
            steps = uvloop.run(
                alternate(
                    servers,
                    load,
                    rounds=args.rounds,
                    duration_s=args.duration,
                    warmup_s=args.warmup,
                    corpus=corpus,
                    seed=args.seed,
                )
            )
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)
    described = f"{args.rate:g} req/s open loop" if args.rate else f"{args.clients} clients"
    print(f"{here['date']}, {here['machine']}; {args.rounds} x {args.duration:g} s at {described} each")
    print(summary(steps, names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
