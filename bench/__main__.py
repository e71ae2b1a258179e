"""The benchmark behind BENCHMARKS.md: `make bench` (or `python -m bench`).

One run, one machine, one corpus, one client, servers one at a time:
1. the ceiling: the bundled model called in-process through ONNX Runtime on pre-tokenized
   corpus batches, best over batch sizes and thread layouts;
2. batcher with its defaults; 3. batcher with batching.max_batch_size=1;
4. the old design (bench/baselines/naive_server.py) padded to 128, and padded to each
   request's own length;
5. a tuning sweep over max_batch_size x max_wait_s;
6. where the time goes: py-spy attached to batcher (defaults) through a 64-client step;
7. side by side: batcher (defaults) and, in turn, mosec, PyTriton, Infinity and the bare
   aiohttp floor, two servers up at a time and their 64-client steps alternating (A B A B
   ...), so that the ratios the targets read are not moved by the machine's drift between
   steps; with Infinity, first its answers against batcher's on the whole test split;
8. promises kept under load (bench/promises.py): priorities, deadlines, coalescing, a retry
   storm and a lone client, each against its bound.
Each server gets a closed-loop step at 64 clients and an open-loop sweep; batcher also a
closed-loop step at 1 client. Figures are written with the machine, command and date.

`--only promises` runs phase 8 alone, `--only peers` batcher (defaults) and the peers (their
steps, and the side by side); they write <out>/bench/results/PHASE.json and
<out>/BENCHMARKS-PHASE.md, never BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson
import uvloop

from batcher.config import load_settings
from batcher.model.bundle import choose_graph
from bench import profile, promises
from bench.ab import alternate
from bench.benchmarks_md import INFINITY
from bench.servers import MODEL, PEER_SETTINGS, ROOT, Server, batcher_server, naive_server, peer_server, provenance
from loadtest.corpus import DEFAULT_CORPUS, Corpus, classify_request
from loadtest.driver import Load
from loadtest.steps import highest_within_slo, run_steps

SLO_P99_MS = 50.0
# (bench/peers/ module, name in BENCHMARKS.md, the load generator's --endpoint for it)
PEERS = (
    ("mosec", "mosec 0.9.8", "predict"),
    ("pytriton", "PyTriton 0.7.0 (Triton 2.51)", "oip"),
    ("infinity", INFINITY, "classify"),
)
ZIPF = 1.1
LAYOUTS = (("1 session x 2 threads", 1, 2), ("2 sessions x 1 thread", 2, 1), ("1 session x 1 thread", 1, 1))
CEILING_BATCH_SIZES = (1, 8, 32, 64)
SWEEP_FRACTIONS = (0.25, 0.5, 0.75, 0.9, 1.0, 1.15)
SIDE_BY_SIDE_ROUNDS = 3
A_B_ROUNDS = 11
"""Rounds of the lone-client and 64-client A/B steps (bench/promises.py), judged on the
median of each round's ratio: on this shared machine one server's 1-client steps moved by
~40 % between rounds, so 3 rounds let one slow minute decide the bound. Not 7 either: two
copies of one server side by side at 64 clients (2026-12-07, 20 rounds of 3 s) had the
rounds' ratios spread 0.85-1.31 (sd 0.10), and the median of 7 consecutive rounds read
0.94-1.04, of 11 1.00-1.03: with 7, a server no slower than its baseline could miss a 5 %
bound by chance alone."""
PRIORITY_ROUNDS = 5
"""Rounds of the priorities scenario: its bound is judged on the medians per load, and in
runs of 3 one slow round (7.4x, 5.2x) was a third of the rounds a median is taken over."""
BATCHER = "batcher (defaults)"
TUNING_BATCH_SIZES = (8, 16, 32, 64)
TUNING_WAITS_MS = (0, 2, 5)
# Thread layouts on 2 cores: (label, overrides), compared at the default batching settings.
TUNING_LAYOUTS = (
    ("1 instance x 2 threads", ("batching.instances=1", "model.intra_op_threads=2")),
    (
        "1 instance x 2 threads, spinning",
        ("batching.instances=1", "model.intra_op_threads=2", "model.allow_spinning=true"),
    ),
    ("2 instances x 1 thread", ("batching.instances=2", "model.intra_op_threads=1")),
    (
        "2 instances x 1 thread, spinning",
        ("batching.instances=2", "model.intra_op_threads=1", "model.allow_spinning=true"),
    ),
)


def served_graph() -> str:
    """The graph batcher serves with the shipped config on this CPU: every server in the
    benchmark, and the in-process ceiling, run that same file."""
    return choose_graph(MODEL, load_settings(ROOT / "config.toml", env={}).model.file, on_gpu=False)


def ceiling(corpus: Corpus, seconds: float) -> dict[str, Any]:
    """Best in-process sequences/s over batch sizes and thread layouts."""
    import onnxruntime as ort

    from batcher.model.formats import TextEncoder
    from batcher.worker import pad_batch

    encoder = TextEncoder.from_bundle(MODEL, 128)
    rows = [encoder.encode_dialogue((t["speaker"], t["text"]) for t in d["turns"]) for d in corpus.dialogues]

    def session(threads: int) -> Any:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(str(MODEL / served_graph()), options, providers=["CPUExecutionProvider"])

    def worker(sess: Any, batches: Sequence[tuple[np.ndarray, ...]], stop: float, counts: list[int]) -> None:
        done = 0
        while time.perf_counter() < stop:
            for ids, mask, types in batches:
                sess.run(["logits"], {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
                done += len(ids)
        counts.append(done)

    results: list[dict[str, Any]] = []
    orderings = {"corpus order": rows, "sorted by length": sorted(rows, key=len)}
    for (layout, sessions, threads), (ordering, ordered) in itertools.product(LAYOUTS, orderings.items()):
        pool = [session(threads) for _ in range(sessions)]
        for batch_size in CEILING_BATCH_SIZES:
            batches = [
                pad_batch(ordered[i : i + batch_size], encoder.pad_id) for i in range(0, len(ordered), batch_size)
            ]
            for sess in pool:
                worker(sess, batches[:2], 0, [])  # warm-up
            counts: list[int] = []
            started = time.perf_counter()
            threads_ = [threading.Thread(target=worker, args=(s, batches, started + seconds, counts)) for s in pool]
            for t in threads_:
                t.start()
            for t in threads_:
                t.join()
            rate = sum(counts) / (time.perf_counter() - started)
            results.append(
                {"layout": layout, "ordering": ordering, "batch_size": batch_size, "sequences_per_s": round(rate, 1)}
            )
            print(f"ceiling: {layout}, {ordering}, batch {batch_size}: {rate:.0f} seq/s", file=sys.stderr)
    best = max(results, key=lambda r: r["sequences_per_s"])
    return {"best": best, "all": results, "mean_tokens": round(float(np.mean([len(r) for r in rows])), 1)}


async def lone_client(corpus: Corpus, args: argparse.Namespace, rounds: int = 4) -> dict[str, Any]:
    """One closed-loop client against batcher with and without batching, both servers up and
    the steps interleaved (A B A B ...), so drift on a shared machine hits both alike."""
    servers = [
        batcher_server(BATCHER),
        batcher_server("batcher max_batch_size=1", "batching.max_batch_size=1"),
    ]
    steps: dict[str, list[dict[str, Any]]] = {server.name: [] for server in servers}
    for server in servers:
        server.__enter__()
    try:
        for _ in range(rounds):
            for server in servers:
                row = await run_steps(
                    server.url,
                    [Load("closed", 1)],
                    corpus=corpus,
                    seed=args.seed,
                    duration_s=args.step_duration / 2,
                    warmup_s=0.5,
                    progress=False,
                )
                steps[server.name].append(row[0])
    finally:
        for server in servers:
            server.__exit__()
    return {
        name: {
            "median_ms": float(np.median([r["p50_ms"] for r in rows])),
            "p99_ms": float(np.median([r["p99_ms"] for r in rows])),
            "throughput_rps": float(np.median([r["throughput_rps"] for r in rows])),
            "step_medians_ms": [r["p50_ms"] for r in rows],
        }
        for name, rows in steps.items()
    }


async def measure_server(
    server: Server, corpus: Corpus, args: argparse.Namespace, endpoint: str = "predict"
) -> dict[str, Any]:
    """A 64-client closed-loop step, a lone client's step, and an open-loop sweep from 25 %
    to 115 % of the 64-client rate; CPU per request over the server's whole process tree."""
    assert server.process is not None
    common = {"corpus": corpus, "seed": args.seed, "progress": not args.quiet, "endpoint": endpoint}
    pid = server.process.pid
    closed = await run_steps(
        server.url, [Load("closed", 64)], duration_s=args.duration, warmup_s=args.warmup, pid=pid, **common
    )
    result: dict[str, Any] = {"closed64": closed[0]}
    lone = await run_steps(server.url, [Load("closed", 1)], duration_s=args.step_duration, warmup_s=1, **common)
    result["closed1"] = lone[0]
    peak = closed[0]["throughput_rps"]
    loads = [Load("open", round(peak * f, 1)) for f in SWEEP_FRACTIONS]
    result["sweep"] = await run_steps(
        server.url, loads, duration_s=args.step_duration, warmup_s=1, slo_p99_ms=SLO_P99_MS * 4, **common
    )
    best = highest_within_slo(result["sweep"], SLO_P99_MS)
    result["max_within_slo"] = best
    return result


async def floor(corpus: Corpus, args: argparse.Namespace, rate: float) -> dict[str, Any]:
    """What the event loop costs beyond the minimum, at the same 64 clients: a bare aiohttp
    server (parse the body, answer a small JSON) held to batcher's request rate; and the
    overhead ceilings: batcher and mosec with an instant model (no ONNX Runtime)."""
    bare = bare_server(rate)
    instant = Server(
        "batcher, instant model",
        [sys.executable, "-m", "bench.instant_server", "--port", "{port}", "--set", 'server.log_level="warning"'],
    )
    mosec = peer_server("mosec, instant model", "mosec", served_graph(), instant=True)
    common: dict[str, Any] = {"corpus": corpus, "seed": args.seed, "progress": not args.quiet}
    steps = {}
    for server in (bare, instant, mosec):
        if server is None:
            continue
        with server:
            assert server.process is not None
            load = [Load("closed", 64)]
            steps[server.name] = (
                await run_steps(
                    server.url, load, duration_s=args.duration, warmup_s=2, pid=server.process.pid, **common
                )
            )[0]
    return {
        "bare_delay_ms": round(hold_ms(rate), 2),
        "bare": steps[bare.name],
        "instant": steps[instant.name],
        "instant_peers": {name: step for name, step in steps.items() if name not in (bare.name, instant.name)},
    }


def hold_ms(rate: float) -> float:
    """How long the floor holds each answer so that 64 closed-loop clients drive it at `rate`."""
    return 64 / rate * 1000


def bare_server(rate: float) -> Server:
    """The floor (bench/baselines/bare_server.py), held to `rate` (`hold_ms`)."""
    args = [
        sys.executable,
        "-m",
        "bench.baselines.bare_server",
        "--port",
        "{port}",
        "--delay-ms",
        f"{hold_ms(rate):.3f}",
    ]
    return Server("bare aiohttp + uvloop", args)


async def side_by_side(
    corpus: Corpus, args: argparse.Namespace, rate: float | None, parity: dict[str, Any] | None = None
) -> dict[str, Any]:
    """batcher (defaults) against each of mosec, PyTriton, Infinity and the floor (held to
    `rate`; none without one), both up at once and their 64-client steps alternating,
    `args.rounds` times: the step rows by pair. Infinity's answers are first compared with
    batcher's (`infinity_parity`, into `parity`)."""
    others: list[tuple[Server | None, str]] = [
        (peer_server(name, peer, served_graph()), endpoint) for peer, name, endpoint in PEERS
    ]
    if rate is not None:
        others.append((bare_server(rate), "predict"))
    pairs: dict[str, Any] = {}
    for other, endpoint in others:
        if other is None:
            continue
        print(f"== side by side: {BATCHER} and {other.name}", file=sys.stderr)
        on_up = None
        if other.name == INFINITY and parity is not None:

            async def on_up(up: list[Server], found: dict[str, Any] = parity) -> None:
                found[INFINITY] = await infinity_parity(up[0].url, up[1].url, corpus)
                print(f"{INFINITY}: answers against batcher's: {found[INFINITY]}", file=sys.stderr)

        steps = await alternate(
            [batcher_server(BATCHER), other],
            Load("closed", 64),
            rounds=args.rounds,
            duration_s=args.step_duration,
            warmup_s=1,
            corpus=corpus,
            seed=args.seed,
            endpoints={other.name: endpoint},
            on_up=on_up,
        )
        pairs[other.name] = {"batcher": steps[BATCHER], "other": steps[other.name]}
    return pairs


async def infinity_parity(batcher_url: str, infinity_url: str, corpus: Corpus) -> dict[str, Any]:
    """Every dialogue of the corpus to both, one at a time: batcher through the Open
    Inference Protocol (its float32 probabilities, the dialogue as JSON turns), Infinity's
    /classify with the text batcher builds (loadtest.corpus.classify_request). The largest
    difference of any label's probability, and how many got the same intent."""
    worst, same, multi = 0.0, 0, 0
    labels: list[str] = json.loads((MODEL / "labels.json").read_text(encoding="utf-8"))
    async with aiohttp.ClientSession() as session:
        for dialogue in corpus.dialogues:
            text = orjson.dumps({"turns": dialogue["turns"]}).decode()
            oip = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [text]}]}
            async with session.post(f"{batcher_url}/v2/models/intent-zh/infer", json=oip) as response:
                outputs = {o["name"]: o["data"] for o in (await response.json())["outputs"]}
            async with session.post(f"{infinity_url}/classify", json=classify_request(dialogue)) as response:
                scores = {item["label"]: item["score"] for item in (await response.json())["data"][0]}
            probabilities = zip(labels, outputs["probabilities"], strict=True)
            worst = max(worst, *(abs(scores[label] - p) for label, p in probabilities))
            same += max(scores, key=lambda label: scores[label]) == outputs["intent_name"][0]
            turns = dialogue["turns"]
            multi += isinstance(turns, list) and len(turns) > 1
    return {
        "dialogues": len(corpus.dialogues),
        "multi_turn": multi,
        "max_abs_diff": worst,
        "same_intent": same,
    }


async def cache_replay(args: argparse.Namespace) -> dict[str, Any]:
    """Repeated traffic: the test split replayed Zipf-distributed (exponent ZIPF, a common fit
    for query logs), 64 clients, batcher with the cache off and on."""
    corpus = Corpus(args.corpus, seed=args.seed, zipf=ZIPF)
    common: dict[str, Any] = {"corpus": corpus, "seed": args.seed, "progress": not args.quiet}
    steps = {}
    for name, overrides in (("cache off", ()), ("cache on (max_entries=10000)", ("cache.max_entries=10000",))):
        with batcher_server(f"batcher, {name}", *overrides) as server:
            load = [Load("closed", 64)]
            steps[name] = (await run_steps(server.url, load, duration_s=args.duration, warmup_s=2, **common))[0]
    return {"zipf": ZIPF, "steps": steps}


async def profile_batcher(corpus: Corpus, args: argparse.Namespace) -> dict[str, Any]:
    """A separate 64-client step against batcher (defaults) with py-spy attached: where the
    event loop's time goes. Its throughput is not used elsewhere (sampling costs a little)."""
    common: dict[str, Any] = {"corpus": corpus, "seed": args.seed, "progress": not args.quiet}
    with batcher_server("batcher (defaults), profiled") as server:
        assert server.process is not None
        await run_steps(server.url, [Load("closed", 64)], duration_s=args.warmup, warmup_s=0, **common)
        with tempfile.TemporaryDirectory() as scratch:
            raw = Path(scratch) / "py-spy.txt"
            try:
                spy = profile.start(server.process.pid, args.duration, raw)
            except FileNotFoundError as exc:
                return {"skipped": str(exc)}
            load = [Load("closed", 64)]
            step = (await run_steps(server.url, load, duration_s=args.duration, warmup_s=0, **common))[0]
            _, error = spy.communicate(timeout=60)
            if spy.returncode != 0 or not raw.exists():
                return {"skipped": f"py-spy failed: {error.decode(errors='replace').strip()[-300:]}"}
            summary = profile.summarize(raw.read_text(), args.duration)
    return {"step": step, **summary}


async def tuning(corpus: Corpus, args: argparse.Namespace, rate: float) -> list[dict[str, Any]]:
    """Thread layouts at the default batching settings, then max_batch_size x max_wait_s at the
    default layout; each config a fresh server, a 64-client step and an open-loop step at `rate`."""
    configs: list[tuple[str, str, tuple[str, ...]]] = [("layout", label, o) for label, o in TUNING_LAYOUTS]
    configs += [
        (
            "batching",
            f"max_batch_size={size} max_wait_s={wait / 1000:g}",
            (f"batching.max_batch_size={size}", f"batching.max_wait_s={wait / 1000}"),
        )
        for size in TUNING_BATCH_SIZES
        for wait in TUNING_WAITS_MS
    ]
    rows = []
    common: dict[str, Any] = {"corpus": corpus, "seed": args.seed, "progress": not args.quiet}
    for kind, name, overrides in configs:
        with batcher_server(name, *overrides) as server:
            closed = (
                await run_steps(server.url, [Load("closed", 64)], duration_s=args.step_duration, warmup_s=1, **common)
            )[0]
            opened = (
                await run_steps(server.url, [Load("open", rate)], duration_s=args.step_duration, warmup_s=1, **common)
            )[0]
        rows.append({"kind": kind, "config": name, "closed64": closed, "open": opened})
        print(
            f"tuning {name}: {closed['throughput_rps']:.0f} req/s at 64 clients, open {rate:g}/s p99 "
            f"{opened['p99_ms']:.1f} ms",
            file=sys.stderr,
        )
    return rows


def header(args: argparse.Namespace, corpus: Corpus) -> dict[str, Any]:
    return {
        **provenance(),
        "cores": os.cpu_count() or 1,
        "graph": served_graph(),
        "command": "make bench  # python -m bench " + shlex.join(sys.argv[1:]),
        "defaults": {
            key: value
            for key, value in load_settings(ROOT / "config.toml", env={}).describe().items()
            if key.startswith(("batching.", "model.intra", "model.inter", "model.allow", "model.file"))
        },
        "corpus": {
            "path": str(args.corpus.relative_to(ROOT)) if args.corpus.is_relative_to(ROOT) else str(args.corpus),
            "dialogues": len(corpus.dialogues),
            "multi_turn_share": round(corpus.multi_turn_share, 3),
        },
    }


async def peers(corpus: Corpus, args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Each peer measured as batcher is (`measure_server`), one at a time."""
    results["peers"] = {"settings": PEER_SETTINGS, "missing": [], "servers": {}, "parity": {}}
    for peer, name, endpoint in PEERS:
        found = peer_server(name, peer, served_graph())
        if found is None:
            print(f"== {name}: skipped (no .venv-peers/{peer}; make bench-peers-setup)", file=sys.stderr)
            results["peers"]["missing"].append(peer)
            continue
        print(f"== {name}", file=sys.stderr)
        with found:
            results["peers"]["servers"][name] = await measure_server(found, corpus, args, endpoint)


async def bench(args: argparse.Namespace, results: dict[str, Any]) -> dict[str, Any]:
    corpus = Corpus(args.corpus, seed=args.seed)
    if args.only == "promises":
        results["promises"] = await promises.run(args, served_graph())
        return results
    if args.only == "peers":
        with batcher_server(BATCHER) as server:
            print(f"== {BATCHER}", file=sys.stderr)
            results["servers"] = {BATCHER: await measure_server(server, corpus, args)}
        await peers(corpus, args, results)
        results["side_by_side"] = await side_by_side(corpus, args, None, results["peers"]["parity"])
        return results
    results["ceiling"] = ceiling(corpus, args.ceiling_seconds)
    print("== one client, batched vs not, interleaved", file=sys.stderr)
    results["lone_client"] = await lone_client(corpus, args)
    servers = {}
    for server in (
        batcher_server(BATCHER),
        batcher_server("batcher max_batch_size=1", "batching.max_batch_size=1"),
        batcher_server("batcher, fp32 graph (model.file=model.onnx)", 'model.file="model.onnx"'),
        naive_server("naive, padded to 128", "max", served_graph()),
        naive_server("naive, dynamic padding", "dynamic", served_graph()),
    ):
        print(f"== {server.name}", file=sys.stderr)
        with server:
            servers[server.name] = await measure_server(server, corpus, args)
    results["servers"] = servers
    await peers(corpus, args, results)
    rate = servers[BATCHER]["closed64"]["throughput_rps"]
    print("== the floor: a bare aiohttp server held to batcher's rate; batcher with an instant model", file=sys.stderr)
    results["floor"] = await floor(corpus, args, rate)
    print("== the response cache on a Zipf replay", file=sys.stderr)
    results["cache"] = await cache_replay(args)
    print("== batcher (defaults) under py-spy", file=sys.stderr)
    results["profile"] = await profile_batcher(corpus, args)
    results["side_by_side"] = await side_by_side(corpus, args, rate, results["peers"]["parity"])
    print("== promises kept under load (bench/promises.py)", file=sys.stderr)
    results["promises"] = await promises.run(args, served_graph())
    if not args.skip_tuning:
        rate = round(servers[BATCHER]["closed64"]["throughput_rps"] / 2, 1)
        results["tuning_rate"] = rate
        results["tuning"] = await tuning(corpus, args, rate)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=15, help="seconds of the 64-client steps")
    parser.add_argument("--warmup", type=float, default=3, help="warm-up seconds before the 64-client steps")
    parser.add_argument("--step-duration", type=float, default=8, help="seconds of each other step")
    parser.add_argument("--ceiling-seconds", type=float, default=1.5, help="seconds per in-process measurement")
    parser.add_argument("--seed", type=int, default=1, help="corpus order and arrivals")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="JSONL corpus (default: test split)")
    parser.add_argument("--skip-tuning", action="store_true", help="skip the max_batch_size x max_wait_s sweep")
    parser.add_argument(
        "--rounds", type=int, default=SIDE_BY_SIDE_ROUNDS, help="steps per server where two alternate (default: 3)"
    )
    parser.add_argument(
        "--ab-rounds",
        type=int,
        default=A_B_ROUNDS,
        help="rounds of the lone-client and 64-client A/B steps (default: %(default)s)",
    )
    parser.add_argument(
        "--priority-rounds",
        type=int,
        default=PRIORITY_ROUNDS,
        help="rounds of the priorities scenario (default: %(default)s)",
    )
    parser.add_argument(
        "--storm-duration", type=float, default=10, help="seconds of each retry-storm step (default: %(default)s)"
    )
    parser.add_argument(
        "--only",
        choices=["promises", "peers"],
        help="run one phase alone, into <out>/BENCHMARKS-PHASE.md and <out>/bench/results/PHASE.json",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--out", type=Path, default=ROOT, help="where BENCHMARKS.md and bench/results/ go")
    args = parser.parse_args()
    results = header(args, Corpus(args.corpus, seed=args.seed))
    if args.only:
        results["only"] = args.only
    results = uvloop.run(bench(args, results))
    out_dir = args.out / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    name = args.only or "results"
    (out_dir / f"{name}.json").write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    from bench.benchmarks_md import render

    document = args.out / (f"BENCHMARKS-{args.only}.md" if args.only else "BENCHMARKS.md")
    document.write_text(render(results, out_dir), encoding="utf-8")
    print(f"wrote {document} and {out_dir / f'{name}.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
