"""The promises phase of `make bench` (issue 30): what batcher keeps under load, each
scenario against its bound, all in one run; `python -m bench --only promises` runs it alone.

1. Priorities: open loop (Poisson) at 2x the saturation rate, 20 % of requests
   `x-priority: high`, 60 % normal, 20 % low; the same mix at half the saturation rate; the
   same 2x load without priorities (what low priority's wait is compared with). The three
   steps in turn, `--priority-rounds` times, the saturation rate measured again before each round
   after the first: in a run where it was measured once, the machine then slowed by a
   quarter for two rounds (the same 2x without priorities answered 1,258 and 1,417 a second
   against 1,639 in the third), so "2x" was 2.5x there, and high priority's p99 was 7.4x
   its half-load p99. High priority's p99 is judged on its median per load, so that one
   step in a slow minute does not decide the bound alone; every round is reported.
2. Deadlines: 2x saturation, every request with `x-deadline-ms: 100`, against the same load
   without deadlines on a server admitting by count alone (`batching.max_queue_wait_s=0`:
   `max_queue_size` and the 10 s timeout, as before issue 30), judged against the same 100 ms.
3. Coalescing: the test split replayed Zipf-distributed, cache off, 64 clients, one server
   with `batching.coalesce=true` and one with `false`, both up, steps alternating; before
   them, every dialogue of the split sent as a burst of identical requests to both, and the
   answers compared.
4. Retry storm: 512 closed-loop connections resending at once on every 429, against 64
   clients that honour `x-retry-after-ms`; beside each, a probe process opening a new
   connection every 50 ms (loadtest/probe.py): how long a new client waits for any answer.
5. A lone client: batcher (defaults: a lone request runs on a session of one thread per
   core), and with `batching.lone_threads=0` (that session off), against the naive
   inline server (bench/baselines/naive_server.py: FastAPI + uvicorn, one ONNX Runtime
   session on every core, each request run alone, padded to its own length) at 1 client,
   steps alternating; and 64 clients, the commit before issue 30 against this checkout with
   each of the two settings (A/B, alternating).

The saturation rate is batcher's 64-client closed-loop rate, measured at the phase's start
on the server that then takes scenarios 1, 2 and 4 (and again before each priorities
round). A scenario the server cannot run yet is recorded as not run, with the reason: a
malformed `x-priority` or `x-deadline-ms` answered other than 422 (the server ignores the
header), or `batching.coalesce` refused by the settings (as `batcher serve --set` would at
start-up; `batching.lone_threads` likewise, whose rows are then left out).
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from batcher.config import load_settings
from batcher.errors import ConfigError
from bench.ab import alternate
from bench.servers import ROOT, Server, batcher_server, naive_server
from loadtest.corpus import Corpus
from loadtest.driver import Load
from loadtest.modes import Modes
from loadtest.server_metrics import grown, scrape
from loadtest.steps import run_steps

BATCHER = "batcher (defaults)"
LONE = "batcher, batching.lone_threads=0"
LONE_SETTING = "batching.lone_threads=0"
COUNT_ONLY = "batching.max_queue_wait_s=0"
NAIVE = "naive, dynamic padding"
PRIORITY_MIX = (("high", 0.2), ("normal", 0.6), ("low", 0.2))
NO_PRIORITY = (("high", 0.0),)
"""A mix of nothing: no header sent, every request counted under `none` and read whole, like
the mixed steps (so both cost the load generator alike)."""
OVERLOAD = 2.0
HALF = 0.5
DEADLINE_MS = 100.0
STORM_CONNECTIONS = 512
POLITE_CLIENTS = 64
PROBE_MS = 50.0
COALESCE_COPIES = 4
ZIPF = 1.1
BASELINE = "48bc94a"
"""The last commit before issue 30's server side: "today" for the 64-client A/B."""


async def features(url: str) -> dict[str, str | None]:
    """None for each feature the server takes; else why its scenario cannot run. A malformed
    header is refused (422) by a server that reads it, answered 200 by one that ignores it."""
    body = {"turns": [{"speaker": "user", "text": "你好"}]}
    found: dict[str, str | None] = {}
    async with aiohttp.ClientSession() as session:
        for feature, header, bad in (("priorities", "x-priority", "bogus"), ("deadlines", "x-deadline-ms", "-1")):
            async with session.post(url + "/predict", json=body, headers={header: bad}) as response:
                status = response.status
            found[feature] = (
                None
                if status == 422
                else f"the server does not support {header} yet (`{header}: {bad}` was answered {status}, not 422)"
            )
    for feature, setting in (("coalescing", "batching.coalesce=true"), ("lone_threads", LONE_SETTING)):
        try:
            load_settings(ROOT / "config.toml", env={}, overrides=[setting])
            found[feature] = None
        except ConfigError as exc:
            found[feature] = f"the server does not support {setting.partition('=')[0]} yet ({exc})"
    return found


async def _step(
    server: Server,
    load: Load,
    corpus: Corpus,
    args: argparse.Namespace,
    *,
    modes: Modes | None = None,
    duration_s: float | None = None,
) -> dict[str, Any]:
    assert server.process is not None
    rows = await run_steps(
        server.url,
        [load],
        corpus=corpus,
        seed=args.seed,
        duration_s=duration_s or args.step_duration,
        warmup_s=1,
        progress=False,
        pid=server.process.pid,
        modes=modes,
    )
    row = rows[0]
    _say(f"{load.label}{' ' + _describe(modes) if modes else ''}: {_brief(row)}")
    return row


def _describe(modes: Modes) -> str:
    parts = []
    if modes.priority_mix and modes.priority_mix != NO_PRIORITY:
        parts.append("mix " + ",".join(f"{k}={v:g}" for k, v in modes.priority_mix))
    if modes.deadline_ms is not None:
        parts.append(f"deadline {modes.deadline_ms:g} ms")
    elif modes.judge_ms is not None:
        parts.append(f"judged at {modes.judge_ms:g} ms, no deadline sent")
    if modes.retry is not None:
        parts.append(f"retry {modes.retry}")
    return "(" + "; ".join(parts) + ")" if parts else ""


def _brief(row: dict[str, Any]) -> str:
    statuses = ", ".join(f"{k} {v}" for k, v in row["statuses"].items())
    return f"{row['throughput_rps']:.0f} answers/s, p99 {row['p99_ms']:.1f} ms, statuses {statuses}"


def _say(line: str) -> None:
    print(f"promises: {line}", file=sys.stderr, flush=True)


async def priorities(server: Server, corpus: Corpus, args: argparse.Namespace, saturation: float) -> dict[str, Any]:
    """The rounds; each after the saturation rate was measured again (the first takes the
    phase's, measured just before), so that 2x is 2x of the machine's pace that minute."""
    mixed = Modes(priority_mix=PRIORITY_MIX)
    rounds = []
    for number in range(args.priority_rounds):
        if number:
            saturation = (await _step(server, Load("closed", 64), corpus, args))["throughput_rps"]
        over, half = round(saturation * OVERLOAD, 1), round(saturation * HALF, 1)
        rounds.append(
            {
                "saturation": saturation,
                "rate_over": over,
                "rate_half": half,
                "half": await _step(server, Load("open", half), corpus, args, modes=mixed),
                "over": await _step(server, Load("open", over), corpus, args, modes=mixed),
                "plain": await _step(server, Load("open", over), corpus, args, modes=Modes(priority_mix=NO_PRIORITY)),
            }
        )
    return {"mix": dict(PRIORITY_MIX), "rounds": rounds}


async def deadlines(server: Server, corpus: Corpus, args: argparse.Namespace, saturation: float) -> dict[str, Any]:
    over = round(saturation * OVERLOAD, 1)
    return {
        "deadline_ms": DEADLINE_MS,
        "rate": over,
        "with": await _step(server, Load("open", over), corpus, args, modes=Modes(deadline_ms=DEADLINE_MS)),
        "without": await _count_based(corpus, args, over),
        "without_settings": COUNT_ONLY,
    }


async def _count_based(corpus: Corpus, args: argparse.Namespace, rate: float) -> dict[str, Any]:
    """The deadlines' load without deadlines, on a server that admits by count alone."""
    with batcher_server("batcher, count-based admission", COUNT_ONLY) as server:
        await _step(server, Load("closed", 64), corpus, args, duration_s=3)  # its pace measured, warm
        return await _step(server, Load("open", rate), corpus, args, modes=Modes(judge_ms=DEADLINE_MS))


async def storm(server: Server, corpus: Corpus, args: argparse.Namespace) -> dict[str, Any]:
    duration = args.storm_duration
    polite = Modes(retry="polite", probe_interval_ms=PROBE_MS)
    storming = Modes(retry="storm", probe_interval_ms=PROBE_MS)
    return {
        "duration_s": duration,
        "polite": await _step(server, Load("closed", POLITE_CLIENTS), corpus, args, modes=polite, duration_s=duration),
        "storm": await _step(
            server, Load("closed", STORM_CONNECTIONS), corpus, args, modes=storming, duration_s=duration
        ),
    }


def _answer(body: bytes) -> Any:
    """An answer without what differs between identical requests (timings)."""
    found = orjson.loads(body)
    if isinstance(found, dict):
        for key in ("inference_time_ms", "timing"):
            found.pop(key, None)
    return found


async def same_answers(on: Server, off: Server, corpus: Corpus) -> dict[str, Any]:
    """Every dialogue of the split as a burst of COALESCE_COPIES identical requests at once,
    one dialogue at a time, to both servers: a batch of identical rows answers as one row
    does, so coalescing must not change a single digit. The model rows the coalescing
    server computed per request, from its /metrics."""
    differing, compared = 0, 0
    async with aiohttp.ClientSession() as session:
        before = await scrape(session, on.url + "/metrics")

        async def burst(url: str, body: bytes) -> list[Any]:
            async def one() -> Any:
                headers = {"content-type": "application/json"}
                async with session.post(url + "/predict", data=body, headers=headers) as response:
                    return (response.status, _answer(await response.read()))

            return list(await asyncio.gather(*(one() for _ in range(COALESCE_COPIES))))

        for dialogue in corpus.dialogues:
            body = orjson.dumps({**dialogue, "return_all_probs": True})
            ours, theirs = await burst(on.url, body), await burst(off.url, body)
            compared += len(ours)
            reference = theirs[0]
            differing += sum(answer != reference for answer in [*ours, *theirs])
        after = await scrape(session, on.url + "/metrics")
    rows = grown(before, after, "batcher_batch_size_sum")
    return {
        "dialogues": len(corpus.dialogues),
        "copies": COALESCE_COPIES,
        "requests": compared,
        "differing": differing,
        "rows_per_request": round(rows / compared, 3) if compared else None,
    }


async def coalescing(args: argparse.Namespace) -> dict[str, Any]:
    corpus = Corpus(args.corpus, seed=args.seed, zipf=ZIPF)
    on = batcher_server("batcher, coalesce on", "batching.coalesce=true")
    off = batcher_server("batcher, coalesce off", "batching.coalesce=false")
    check: dict[str, Any] = {}

    async def compare(_servers: list[Server]) -> None:
        check.update(await same_answers(on, off, Corpus(args.corpus, seed=args.seed)))
        _say(f"coalescing, bursts of identical requests: {check}")

    steps = await alternate(
        [on, off],
        Load("closed", 64),
        rounds=args.rounds,
        duration_s=args.step_duration,
        warmup_s=1,
        corpus=corpus,
        seed=args.seed,
        on_up=compare,
    )
    return {"zipf": ZIPF, "clients": 64, "answers": check, "on": steps[on.name], "off": steps[off.name]}


async def lone_client(args: argparse.Namespace, graph: str, lone: bool) -> dict[str, Any]:
    """1 client: batcher (defaults), with `batching.lone_threads=0` when `lone`, and the
    naive inline server, steps alternating."""
    corpus = Corpus(args.corpus, seed=args.seed)
    servers = [batcher_server(BATCHER)]
    if lone:
        servers.append(batcher_server(LONE, LONE_SETTING))
    servers.append(naive_server(NAIVE, "dynamic", graph))
    steps = await alternate(
        servers,
        Load("closed", 1),
        rounds=args.ab_rounds,
        duration_s=args.step_duration,
        warmup_s=1,
        corpus=corpus,
        seed=args.seed,
    )
    return {"batcher": steps[BATCHER], "lone": steps.get(LONE), "naive": steps[NAIVE]}


async def ab64(args: argparse.Namespace, lone: bool) -> dict[str, Any]:
    """64 clients, BASELINE (checked out in a temporary worktree) against this checkout, and
    this checkout with `batching.lone_threads=-1` when `lone`; steps alternating (bench.ab)."""
    corpus = Corpus(args.corpus, seed=args.seed)
    with tempfile.TemporaryDirectory(prefix="batcher-ab-") as scratch:
        tree = Path(scratch) / "baseline"
        failed = _worktree("add", "--detach", str(tree), BASELINE)
        if failed:
            return {"not_run": f"the baseline commit {BASELINE} could not be checked out: {failed}"}
        try:
            names = (f"baseline {BASELINE}", "this checkout", f"this checkout, {LONE_SETTING}")
            servers = [batcher_server(names[0], tree=tree), batcher_server(names[1])]
            if lone:
                servers.append(batcher_server(names[2], LONE_SETTING))
            steps = await alternate(
                servers,
                Load("closed", 64),
                rounds=args.ab_rounds,
                duration_s=args.step_duration,
                warmup_s=1,
                corpus=corpus,
                seed=args.seed,
            )
        finally:
            _worktree("remove", "--force", str(tree))
    return {"baseline": BASELINE, "before": steps[names[0]], "after": steps[names[1]], "lone": steps.get(names[2])}


def _worktree(*args: str) -> str:
    """`git worktree ARGS` in the checkout: "" when it worked, else what git said."""
    done = subprocess.run(["git", "worktree", *args], cwd=ROOT, capture_output=True, text=True)
    return "" if done.returncode == 0 else (done.stderr.strip()[-300:] or f"exit {done.returncode}")


async def run(args: argparse.Namespace, graph: str) -> dict[str, Any]:
    """The whole phase: results by scenario (each a dict of step rows, or {"not_run": why})."""
    corpus = Corpus(args.corpus, seed=args.seed)
    results: dict[str, Any] = {}
    with batcher_server(BATCHER) as server:
        found = await features(server.url)
        results["features"] = found
        _say(f"features: {found}")
        saturation_row = await _step(server, Load("closed", 64), corpus, args)
        saturation = saturation_row["throughput_rps"]
        results["saturation"] = {"rps": saturation, "step": saturation_row}
        for name, scenario in (("priorities", priorities), ("deadlines", deadlines)):
            reason = found[name]
            results[name] = {"not_run": reason} if reason else await scenario(server, corpus, args, saturation)
        results["storm"] = await storm(server, corpus, args)
    results["coalescing"] = {"not_run": found["coalescing"]} if found["coalescing"] else await coalescing(args)
    lone = found["lone_threads"] is None
    results["lone"] = await lone_client(args, graph, lone)
    results["ab64"] = await ab64(args, lone)
    from bench.benchmarks_md import promise_rows

    for kind, bound, measured, verdict in promise_rows(results):
        _say(f"{kind}: {bound}: {measured}: {verdict}")
    return results
