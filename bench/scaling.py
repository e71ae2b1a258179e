"""SCALING.md from one run: `make scaling` (~6 minutes).

1. One process or two, side by side at 64 clients, threads = cores in both: 1 worker x 2
   model instances against 2 workers x 1 instance (alternating steps, as bench.ab does);
2. the per-process overhead ceiling: batcher serving an instant model (fixed logits, no
   ONNX Runtime; bench/instant_server.py) at 64 clients: what one process can feed when
   the model costs nothing, as on a fast GPU;
3. the fleet: three replicas behind HAProxy through a rolling restart and a kill -9 under
   load (bench/fleet.py);
4. a capacity-planning table derived from the CPU per request measured in step 1.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import uvloop

from bench import fleet
from bench.ab import alternate
from bench.servers import ROOT, Server, batcher_server, provenance
from loadtest.corpus import DEFAULT_CORPUS, Corpus
from loadtest.driver import Load
from loadtest.steps import run_steps

OUT = ROOT / "bench" / "results" / "scaling.json"
LAYOUTS = {
    "1 worker x 2 instances": ("server.workers=1", "batching.instances=2"),
    "2 workers x 1 instance": ("server.workers=2", "batching.instances=1"),
}
LOOP_BUSY_TARGET = 0.7
"""Plan for each event loop to be at most this busy: past it, queueing on the loop grows."""
CORES = (2, 4, 8, 16, 32, 64)


def instant_server() -> Server:
    args = [sys.executable, "-m", "bench.instant_server", "--port", "{port}", "--set", 'server.log_level="warning"']
    return Server("batcher, instant model (1 process)", args)


def median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The step with the median throughput (its other figures kept together)."""
    ordered = sorted(rows, key=lambda row: row["throughput_rps"])
    return ordered[len(ordered) // 2]


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    corpus = Corpus(args.corpus, seed=1)
    servers = [batcher_server(name, *overrides) for name, overrides in LAYOUTS.items()]
    steps = await alternate(
        servers, Load("closed", 64), rounds=args.rounds, duration_s=args.duration, warmup_s=3, corpus=corpus, seed=1
    )
    with instant_server() as server:
        ceiling = (
            await run_steps(server.url, [Load("closed", 64)], corpus=corpus, duration_s=args.duration, progress=False)
        )[0]
    return {"layouts": steps, "instant": ceiling}


def capacity_table(row: dict[str, Any], instant: dict[str, Any]) -> list[dict[str, Any]]:
    """Per core count: the throughput the measured CPU per request allows, and the workers
    and instances that spend it (each loop at most LOOP_BUSY_TARGET busy)."""
    server = row["server"]
    total_cpu_s = server["server_cpu_share"] / row["throughput_rps"]
    loop_cpu_s = server["event_loop_cpu_us_per_request"] / 1e6
    table = []
    for cores in CORES:
        rate = cores / total_cpu_s
        workers = max(1, math.ceil(rate * loop_cpu_s / LOOP_BUSY_TARGET))
        model_cores = cores - rate * loop_cpu_s
        table.append(
            {
                "cores": cores,
                "req_per_s": round(rate, -1),
                "workers": workers,
                "instances_per_worker": max(1, round(model_cores / workers)),
            }
        )
    return table


def render(results: dict[str, Any]) -> str:
    layouts = {name: median_row(rows) for name, rows in results["layouts"].items()}
    one, two = layouts.values()
    instant = results["instant"]
    phases = results["fleet"]["phases"]
    table = capacity_table(one, instant)
    loop_us = one["server"]["event_loop_cpu_us_per_request"]
    instant_loop = instant["server"]["event_loop_cpu_us_per_request"]
    instant_cpu_us = instant["server"]["server_cpu_share"] / instant["throughput_rps"] * 1e6
    lines = [
        "# Scaling",
        "",
        f"Measured on {results['date']}, commit `{results['commit']}`, on {results['machine']}, by one run of "
        f"`{results['command']}`. The load generator shares the same cores.",
        "",
        "## One process or two, threads = cores in both",
        "",
        f"64 closed-loop clients, {len(results['layouts'][next(iter(LAYOUTS))])} alternating steps of "
        f"{results['duration_s']:g} s per layout (the step with the median throughput shown).",
        "",
        "| layout | req/s | p99 ms | mean batch | event-loop CPU µs/req | server CPU (cores) |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in layouts.items():
        lines.append(
            f"| {name} | {row['throughput_rps']:.0f} | {row['p99_ms']:.1f} | {row['server']['mean_batch_size']} | "
            f"{row['server']['event_loop_cpu_us_per_request']:.0f} | {row['server']['server_cpu_share']:.2f} |"
        )
    all_steps = {name: [round(r["throughput_rps"]) for r in rows] for name, rows in results["layouts"].items()}
    lines += [
        "",
        f"Every step's req/s: {'; '.join(f'{n}: {v}' for n, v in all_steps.items())}. Two workers over one: "
        f"{two['throughput_rps'] / one['throughput_rps']:.2f}x. On 2 cores the model, not the event loop, is the "
        "limit, so a second loop buys little and costs a second copy of the model in memory; workers pay once one "
        "event loop is busy, on larger machines or a GPU.",
        "",
        "## What one process can feed: the overhead ceiling",
        "",
        f"batcher with an instant model (fixed logits, no ONNX Runtime), one process, 64 clients: "
        f"**{instant['throughput_rps']:.0f} req/s**, p99 {instant['p99_ms']:.1f} ms, "
        f"{instant_cpu_us:.0f} µs of CPU per request in all, {instant_loop:.0f} µs of it on the event loop "
        f"(which was {instant['server']['event_loop_cpu_share']:.0%} busy). That is the most one worker can hand a "
        "model, whatever the device: a GPU that runs more sequences per second than this needs more workers "
        f"(about one per {instant['throughput_rps']:.0f} seq/s), until a GPU is measured.",
        "",
        "## A fleet behind HAProxy: rolling restart and kill -9 under load",
        "",
        f"{results['fleet']['replicas']} replicas (`{' '.join(results['fleet']['settings'])}`) behind HAProxy "
        f"({results['fleet']['haproxy']}); capacity through HAProxy {results['fleet']['capacity_rps']:.0f} req/s, "
        f"open-loop load {results['fleet']['rate_rps']:.0f} req/s (60 %) the whole time.",
        "",
        "| phase | seconds | requests | failed | statuses | p50 ms | p99 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    labels = {
        "before": "before",
        "rolling_restart": "rolling restart of every replica",
        "kill": "kill -9 of one replica, until it is back",
        "after": "after",
    }
    for key, label in labels.items():
        p = phases[key]
        statuses = ", ".join(f"{k}: {v}" for k, v in p["statuses"].items())
        figures = f"{p['seconds']} | {p['requests']} | **{p['failed']}** | {statuses} | {p['p50_ms']} | {p['p99_ms']}"
        lines.append(f"| {label} | {figures} |")
    lines += [
        "",
        "During the rolling restart each replica got SIGTERM, stopped being ready at once, kept admitting for "
        "`drain_delay_s` while HAProxy's health check took it out, answered what it had, and exited; it was "
        "started again and rejoined once ready. The restarted replica loads and warms its model on the same "
        "2 cores as the two serving, which is what lifts the p99 meanwhile. A `kill -9` loses what that replica "
        "had in flight (HAProxy cannot retry a request that reached a server); that is what a crash costs. "
        f"Tracebacks in the replicas' logs: {results['fleet']['tracebacks']}.",
        "",
        "## Capacity planning",
        "",
        f"From step 1's one-process layout: {one['server']['server_cpu_share'] / one['throughput_rps'] * 1e6:.0f} µs "
        f"of CPU per request in all, {loop_us:.0f} µs of it on the event loop. A machine with N cores serves about "
        f"N / that; each event loop is planned at most {LOOP_BUSY_TARGET:.0%} busy, which gives the workers; the "
        "model threads take the rest of the cores (model.intra_op_threads = 1). Past one machine, replicas behind "
        "a load balancer, each sized the same way.",
        "",
        "| cores | req/s (bound) | server.workers | batching.instances per worker |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['cores']} | {r['req_per_s']:.0f} | {r['workers']} | {r['instances_per_worker']} |" for r in table]
    lines += [
        "",
        "These are bounds from one small machine's CPU per request; the model's cost per request falls a little "
        "with bigger batches and the loop's rises a little with load, so measure your own shape with "
        "`python -m bench.ab` and the dashboard's per-worker event-loop CPU.",
        "",
        "Raw figures: `bench/results/scaling.json`.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="steps per layout (default: %(default)s)")
    parser.add_argument("--duration", type=float, default=15, help="seconds a step (default: %(default)s)")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="JSONL corpus (default: test split)")
    args = parser.parse_args()
    results: dict[str, Any] = {
        **provenance(),
        "command": "make scaling  # python -m bench.scaling " + " ".join(sys.argv[1:]),
        "duration_s": args.duration,
    }
    results.update(uvloop.run(measure(args)))
    fleet_args = argparse.Namespace(replicas=3, load_share=0.6, baseline_s=15, pause_s=8, corpus=args.corpus, set=[])
    results["fleet"] = uvloop.run(fleet.run(fleet_args))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    (ROOT / "SCALING.md").write_text(render(results), encoding="utf-8")
    print("wrote SCALING.md and bench/results/scaling.json", file=sys.stderr)


if __name__ == "__main__":
    main()
