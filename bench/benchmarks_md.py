"""Render BENCHMARKS.md (and its plots) from bench/results.json: every figure comes from one run."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, cast

from loadtest import report

BATCHER = "batcher (defaults)"
FP32 = "batcher, fp32 graph (model.file=model.onnx)"
UNBATCHED = "batcher max_batch_size=1"
NAIVE_MAX = "naive, padded to 128"
NAIVE_DYNAMIC = "naive, dynamic padding"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}×" if b else "n/a"


def _check(ok: bool) -> str:
    return "met" if ok else "**not met**"


def render(results: dict[str, Any], out_dir: Path) -> str:
    if results.get("only"):
        return _partial(results)
    servers = results["servers"]
    report.plot_latency(
        {name: s["sweep"] for name, s in servers.items()},
        out_dir / "latency_vs_throughput.png",
        "open loop (Poisson): latency vs achieved throughput",
    )
    report.plot_batch_sizes(
        servers[BATCHER]["sweep"], out_dir / "batch_sizes.png", "batcher (defaults): batch sizes per open-loop step"
    )
    best = results["ceiling"]["best"]
    sizes = sorted({r["batch_size"] for r in results["ceiling"]["all"]})
    batcher64 = servers[BATCHER]["closed64"]
    rps = {name: s["closed64"]["throughput_rps"] for name, s in servers.items()}
    server_b = batcher64["server"]
    half = min(servers[BATCHER]["sweep"], key=lambda r: abs(r["target"] - rps[BATCHER] / 2))
    lone_delta = results["lone_client"][BATCHER]["median_ms"] - results["lone_client"][UNBATCHED]["median_ms"]
    instances = int(results.get("defaults", {}).get("batching.instances", 1))
    busy_per_instance = (server_b.get("model_busy_share") or 0) / instances
    lines = [
        "# Benchmarks",
        "",
        f"Measured on {results['date']}, commit `{results['commit']}`, on {results['machine']}.",
        f"Command: `{results['command']}`. Corpus: `{results['corpus']['path']}` "
        f"({results['corpus']['dialogues']} dialogues, {results['corpus']['multi_turn_share']:.0%} multi-turn, "
        f"mean {results['ceiling']['mean_tokens']} tokens), bundled model `models/intent-zh` (TinyBERT-4 shape), "
        f"graph `{results.get('graph', 'model.onnx')}` for every server and the ceiling unless a row says otherwise.",
        "The load generator (`python -m loadtest`) runs on the same 2 cores as the server; its CPU share is shown.",
        "batcher's defaults in this run (`config.toml`): "
        + ", ".join(f"`{k} = {v}`" for k, v in results.get("defaults", {}).items())
        + ".",
        "Every figure below comes from this one run. Tables compare servers measured minutes apart on this machine, "
        "except the side-by-side section (two servers up, steps alternating), which the targets against mosec at 64 "
        "clients and against the bare aiohttp floor read when it is present.",
        "",
        "## Targets",
        "",
        "| target | measured | |",
        "|---|---|---|",
        f"| batcher ≥ 12× naive padded to 128 (64 clients) | {_ratio(rps[BATCHER], rps[NAIVE_MAX])} "
        f"| {_check(rps[BATCHER] >= 12 * rps[NAIVE_MAX])} |",
        f"| batcher ≥ 2.2× naive with dynamic padding (64 clients) | {_ratio(rps[BATCHER], rps[NAIVE_DYNAMIC])} "
        f"| {_check(rps[BATCHER] >= 2.2 * rps[NAIVE_DYNAMIC])} |",
        f"| batcher ≥ 0.85× in-process ceiling | {_ratio(rps[BATCHER], best['sequences_per_s'])} "
        f"| {_check(rps[BATCHER] >= 0.85 * best['sequences_per_s'])} |",
        f"| open loop at half of batcher's max: p99 ≤ 50 ms | {half['p99_ms']:.1f} ms at {half['load']} "
        f"| {_check(half['p99_ms'] <= 50)} |",
        f"| a lone client pays ≤ 1 ms of median latency for batching | {lone_delta:+.2f} ms "
        f"| {_check(lone_delta <= 1)} |",
        f"| model busy ≥ 95 % of the time at 64 clients (per instance) | {busy_per_instance:.0%} "
        f"| {_check(busy_per_instance >= 0.95)} |",
        *_floor_targets(results, rps[BATCHER]),
        *_peer_targets(results),
        "",
        "## 64 concurrent clients (closed loop)",
        "",
        "| server | req/s | vs naive-128 | p50 ms | p99 ms | errors | mean batch | model busy | server CPU "
        "| loop CPU µs/req | client CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in servers.items():
        row = s["closed64"]
        srv = row["server"]
        errors = sum(v for k, v in row["statuses"].items() if k != "200")
        lines.append(
            f"| {name} | {row['throughput_rps']:.0f} | {_ratio(row['throughput_rps'], rps[NAIVE_MAX])} "
            f"| {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | {errors} | {srv.get('mean_batch_size', '-')} "
            f"| {_pct(srv.get('model_busy_share'))} | {_pct(srv.get('server_cpu_share'))} "
            f"| {srv.get('event_loop_cpu_us_per_request', '-')} | {row['client_cpu_share']:.0%} |"
        )
    lines += [
        "",
        f"In-process ceiling (no HTTP): **{best['sequences_per_s']:.0f} sequences/s** "
        f"({best['layout']}, batch {best['batch_size']}, {best['ordering']}). batcher at 64 clients reaches "
        f"{_ratio(rps[BATCHER], best['sequences_per_s'])} of it while the load generator, on the same cores, used "
        f"{batcher64['client_cpu_share']:.0%} of a core and batcher's event loop "
        f"{server_b.get('event_loop_cpu_us_per_request', '-')} µs of CPU per request.",
        "",
        "| layout | batches from | " + " | ".join(f"batch {b}" for b in sizes) + " |",
        "|---|---|" + "---|" * len(sizes),
    ]
    for layout, ordering in dict.fromkeys((r["layout"], r["ordering"]) for r in results["ceiling"]["all"]):
        cells = [
            f"{r['sequences_per_s']:.0f}"
            for r in results["ceiling"]["all"]
            if r["layout"] == layout and r["ordering"] == ordering
        ]
        lines.append(f"| {layout} | {ordering} | " + " | ".join(cells) + " |")
    lines += _budget_lines(rps, best["sequences_per_s"], batcher64, results["cores"])
    lines += _peer_lines(results)
    lines += _graph_lines(servers)
    lines += _floor_lines(results, batcher64)
    lines += _side_lines(results)
    lines += _cache_lines(results)
    lines += _promises_lines(results)
    lines += _profile_lines(results.get("profile"))
    lone = results["lone_client"]
    rounds = len(lone[BATCHER]["step_medians_ms"])
    lines += ["", "## One client (closed loop): what batching costs a lone client", ""]
    lines += [
        f"Both servers up at once, {rounds} short steps each, interleaved; the median of the steps' "
        "figures, and every step's median latency.",
        "",
    ]
    lines += ["| server | median ms | p99 ms | req/s | step medians ms |", "|---|---|---|---|---|"]
    for name in (BATCHER, UNBATCHED):
        row = lone[name]
        steps = ", ".join(f"{m:.2f}" for m in row["step_medians_ms"])
        lines.append(
            f"| {name} | {row['median_ms']:.2f} | {row['p99_ms']:.2f} | {row['throughput_rps']:.0f} | {steps} |"
        )
    delta = lone[BATCHER]["median_ms"] - lone[UNBATCHED]["median_ms"]
    lines += ["", f"Median difference: {delta:+.2f} ms (target: at most +1 ms): {_check(delta <= 1)}.", ""]
    lines += ["## Open loop (Poisson arrivals), swept from 25 % to 115 % of each server's 64-client throughput", ""]
    lines += [
        f"Latency is measured from each request's scheduled send time. The sweep stops once p99 passes "
        f"{4 * 50:.0f} ms; the highest rate holding p99 ≤ 50 ms is marked.",
        "",
    ]
    lines += [
        "| server | offered req/s | achieved req/s | p50 ms | p99 ms | p99.9 ms | late | errors | mean batch |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in servers.items():
        for row in s["sweep"]:
            held = s["max_within_slo"]
            mark = " ✓" if held is not None and held["load"] == row["load"] else ""
            errors = sum(v for k, v in row["statuses"].items() if k != "200")
            lines.append(
                f"| {name}{mark} | {row['target']:.0f} | {row['throughput_rps']:.0f} | {row['p50_ms']:.1f} "
                f"| {row['p99_ms']:.1f} | {row['p999_ms']:.1f} | {row['late']} | {errors} "
                f"| {(row['server'] or {}).get('mean_batch_size', '-')} |"
            )
    lines += [
        "",
        "![latency vs throughput](bench/results/latency_vs_throughput.png)",
        "",
        "![batch sizes](bench/results/batch_sizes.png)",
        "",
    ]
    if "tuning" in results:
        lines += [
            "## Tuning: max_batch_size × max_wait_s",
            "",
            f"Closed loop at 64 clients (throughput, p99) and open loop at {results['tuning_rate']:g} req/s "
            "(half of the defaults' 64-client throughput: p50, p99), each config its own server process. "
            "`layout` rows vary the thread layout at the default batching settings; `batching` rows vary "
            "max_batch_size and max_wait_s at the default layout. Model busy is summed over instances "
            "(2 instances fully busy = 200 %).",
            "",
            "| sweep | config | 64 clients req/s | 64 clients p99 ms | mean batch | model busy "
            "| open p50 ms | open p99 ms |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in results["tuning"]:
            closed, opened = row["closed64"], row["open"]
            lines.append(
                f"| {row['kind']} | {row['config']} | {closed['throughput_rps']:.0f} "
                f"| {closed['p99_ms']:.1f} | {closed['server'].get('mean_batch_size', '-')} "
                f"| {_pct(closed['server'].get('model_busy_share'))} "
                f"| {opened['p50_ms']:.2f} | {opened['p99_ms']:.1f} |"
            )
        lines.append("")
    lines += ["Raw figures: `bench/results/results.json`.", ""]
    return "\n".join(lines)


FLOOR = "bare aiohttp + uvloop"


def _loop_us(row: dict[str, Any]) -> float:
    return float(row["server"].get("event_loop_cpu_us_per_request") or 0.0)


def _side(results: dict[str, Any], name: str) -> dict[str, dict[str, float]] | None:
    """Medians of batcher's and the other server's alternating 64-client steps (None if not run)."""
    rows = results.get("side_by_side", {}).get(name)
    if not rows:
        return None
    return {
        key: {
            "rps": statistics.median(r["throughput_rps"] for r in steps),
            "p99": statistics.median(r["p99_ms"] for r in steps),
            "loop_us": statistics.median(_loop_us(r) for r in steps),
            "rounds": len(steps),
        }
        for key, steps in rows.items()
    }


def _floor_targets(results: dict[str, Any], rps: float) -> list[str]:
    if "floor" not in results:
        return []
    bare = _loop_us(results["floor"]["bare"])
    ours = _loop_us(results["servers"][BATCHER]["closed64"])
    side = _side(results, FLOOR)
    if side is not None:
        ours, bare = side["batcher"]["loop_us"], side["other"]["loop_us"]
    ceiling = results["ceiling"]["best"]["sequences_per_s"]
    return [
        f"| batcher ≥ 0.9× in-process ceiling (same graph) | {_ratio(rps, ceiling)} | {_check(rps >= 0.9 * ceiling)} |",
        f"| event-loop CPU per request ≤ 1.5× a bare aiohttp server's at the same rate | {ours:.0f} vs {bare:.0f} µs "
        f"= {_ratio(ours, bare)} | {_check(ours <= 1.5 * bare)} |",
    ]


MOSEC = "mosec 0.9.8"


def _field(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """batcher, the peers and the naive servers (those run), in the order the comparison shows them."""
    servers = results["servers"]
    peers = results.get("peers", {}).get("servers", {})
    naive = {name: servers[name] for name in (NAIVE_DYNAMIC, NAIVE_MAX) if name in servers}
    return {BATCHER: servers[BATCHER], **peers, **naive}


def _held(server: dict[str, Any]) -> float:
    """The highest open-loop rate achieved with p99 within the SLO (0 if none held)."""
    best = server.get("max_within_slo")
    return float(best["throughput_rps"]) if best else 0.0


def _peer_targets(results: dict[str, Any]) -> list[str]:
    peers = results.get("peers", {}).get("servers", {})
    if MOSEC not in peers:
        return ["| batcher against mosec | mosec not run (make bench-peers-setup) | **not met** |"]
    ours, theirs = results["servers"][BATCHER], peers[MOSEC]
    o64 = {"rps": ours["closed64"]["throughput_rps"], "p99": ours["closed64"]["p99_ms"]}
    t64 = {"rps": theirs["closed64"]["throughput_rps"], "p99": theirs["closed64"]["p99_ms"]}
    side = _side(results, MOSEC)
    if side is not None:
        o64, t64 = side["batcher"], side["other"]
    o1, t1 = ours["closed1"]["throughput_rps"], theirs["closed1"]["throughput_rps"]
    faster = o64["rps"] >= 1.15 * t64["rps"] and o64["p99"] < t64["p99"]
    return [
        f"| batcher ≥ 1.15× mosec at 64 clients, lower p99 | {_ratio(o64['rps'], t64['rps'])}, "
        f"p99 {o64['p99']:.0f} vs {t64['p99']:.0f} ms | {_check(faster)} |",
        f"| batcher ≥ 1.8× mosec at 1 client | {_ratio(o1, t1)} | {_check(o1 >= 1.8 * t1)} |",
        f"| batcher sustains a higher open-loop rate than mosec at p99 ≤ 50 ms | {_held(ours):.0f} vs "
        f"{_held(theirs):.0f} req/s | {_check(_held(ours) > _held(theirs))} |",
    ]


def _peer_lines(results: dict[str, Any]) -> list[str]:
    peers = results.get("peers")
    if not peers:
        return []
    field = _field(results)
    base = field[BATCHER]
    settings = peers["settings"]
    lines = [
        "",
        "## Against the field",
        "",
        "Same graph, same corpus, same load generator, one server at a time. Each peer runs from its own pinned "
        "virtual environment (`make bench-peers-setup`, `bench/peers/*.txt`) and does per batch what batcher "
        "does (`bench/peers/common.py`: batcher's dialogue text, the bundle's tokenizer truncating from the left "
        "at 128 tokens, padding to the batch's longest row, one ONNX Runtime run, softmax; the peers call the "
        "tokenizer's `encode_batch` once per batch, batcher its exact shortcut per request on the loop, "
        "`batcher.model.tokenization.Shortcut`: the same ids), configured as "
        f"batcher's defaults are: {settings['WORKERS']} workers (mosec) or model instances (Triton) of "
        f"{settings['THREADS']} ONNX Runtime thread, batches of up to {settings['BATCH']}, a {settings['WAIT_MS']} ms "
        "batch wait (the better of 2 × 1 and 1 × 2 threads for both when tried on this machine). mosec takes "
        "batcher's `/predict` body; PyTriton speaks only the Open Inference Protocol, so it gets the same "
        "dialogues as KServe v2 `infer` requests (`--endpoint oip`, a BYTES tensor of shape [1, 1])."
        + (_infinity_sentence(settings, peers.get("parity", {})) if INFINITY in peers["servers"] else "")
        + " Ratios are batcher's figure over the row's. CPU per request is the whole process tree's (every worker, "
        "Triton's stubs), model included.",
        "",
        "| server | 64 clients req/s | p99 ms | batcher × | 1 client req/s | p50 ms | batcher × "
        "| open loop at p99 ≤ 50 ms, req/s | batcher × | CPU µs/req |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, server in field.items():
        c64, c1 = server["closed64"], server["closed1"]
        cpu = c64.get("process_cpu_us_per_request", "-")
        lines.append(
            f"| {name} | {c64['throughput_rps']:.0f} | {c64['p99_ms']:.1f} "
            f"| {_ratio(base['closed64']['throughput_rps'], c64['throughput_rps'])} "
            f"| {c1['throughput_rps']:.0f} | {c1['p50_ms']:.2f} "
            f"| {_ratio(base['closed1']['throughput_rps'], c1['throughput_rps'])} "
            f"| {_held(server):.0f} | {_ratio(_held(base), _held(server))} | {cpu} |"
        )
    if peers["missing"]:
        lines += ["", f"Not run (no environment; `make bench-peers-setup`): {', '.join(peers['missing'])}."]
    return lines


INFINITY = "Infinity 0.0.78 (optimum engine)"


def _infinity_sentence(settings: dict[str, str], parity: dict[str, Any]) -> str:
    described = (
        " Infinity runs its own engine (`bench/peers/infinity_server.py`: `--engine optimum`, CPU, batches of up "
        f"to {settings['BATCH']}, its ONNX Runtime session's default threads, no batch-wait setting; the same graph "
        "renamed `model_quantized.onnx`, served without optimum's graph rewrite) and takes text only, so it gets "
        "the text batcher builds from each dialogue (`用户：` + the user's text, turns joined by [SEP]; "
        "`--endpoint classify`, `POST /classify`)."
    )
    found = parity.get(INFINITY)
    if not found:
        return described
    return described + (
        f" Fed that text, it gave batcher's answers: over the {found['dialogues']} dialogues of "
        f"the test split ({found['multi_turn']} multi-turn), the largest difference of any label's probability "
        f"was {found['max_abs_diff']:.2g}, and {found['same_intent']} of {found['dialogues']} got the same intent "
        "(ONNX Runtime of the server's version in its environment)."
    )


def _partial(results: dict[str, Any]) -> str:
    """One phase run alone (`python -m bench --only PHASE`): its own sections, no targets."""
    lines = [
        f"# Benchmarks: `--only {results['only']}`",
        "",
        f"Measured on {results['date']}, commit `{results['commit']}`, on {results['machine']}.",
        f"Command: `{results['command']}`. Corpus: `{results['corpus']['path']}` "
        f"({results['corpus']['dialogues']} dialogues), graph `{results.get('graph', 'model.onnx')}`.",
        "A phase run alone: only its sections; BENCHMARKS.md comes from a whole `make bench`.",
    ]
    if "servers" in results:
        lines += _peer_lines(results)
        lines += _side_lines(results)
    lines += _promises_lines(results)
    return "\n".join([*lines, ""])


def _graph_lines(servers: dict[str, Any]) -> list[str]:
    if FP32 not in servers:
        return []
    auto, fp32 = servers[BATCHER]["closed64"], servers[FP32]["closed64"]
    return [
        "",
        '## The graph `model.file = "auto"` picks on this CPU',
        "",
        f"64 clients, same run: the default (`auto`: the bundle's `model.int8.onnx` here) "
        f"{auto['throughput_rps']:.0f} req/s, p99 {auto['p99_ms']:.1f} ms; the fp32 `model.onnx` "
        f"{fp32['throughput_rps']:.0f} req/s, p99 {fp32['p99_ms']:.1f} ms: "
        f"{_ratio(auto['throughput_rps'], fp32['throughput_rps'])} (the two score the same accuracy on the test "
        "split and on real utterances, models/intent-zh/README.md).",
    ]


def _floor_lines(results: dict[str, Any], batcher64: dict[str, Any]) -> list[str]:
    if "floor" not in results:
        return []
    floor = results["floor"]
    bare, instant = floor["bare"], floor["instant"]
    ours_us = batcher64["server"].get("event_loop_cpu_us_per_request") or 0.0
    bare_us = bare["server"].get("event_loop_cpu_us_per_request") or 0.0
    return [
        "",
        "## What the server itself costs",
        "",
        f"The floor: a bare aiohttp + uvloop server that only parses the same body and answers a small JSON, each "
        f"answer held {floor['bare_delay_ms']:g} ms so the same 64 clients drive it at batcher's rate "
        f"({bare['throughput_rps']:.0f} req/s against batcher's {batcher64['throughput_rps']:.0f}): its event loop "
        f"spent **{bare_us:.0f} µs** of CPU a request, batcher's **{ours_us:.0f} µs** "
        f"({_ratio(ours_us, bare_us)}).",
        "",
        "The overhead ceiling: each server with an instant model (fixed logits, no ONNX Runtime; benchmark-only: "
        "`bench/instant_server.py`, `INSTANT=1` for the peers), 64 clients. That is what the server can feed a "
        "model that costs nothing (a fast GPU); past it, add workers (SCALING.md). CPU per request is the whole "
        "process tree's.",
        "",
        "| server, instant model | processes | req/s | p99 ms | CPU µs/req | of it on batcher's event loop |",
        "|---|---|---|---|---|---|",
        f"| batcher | 1 | {instant['throughput_rps']:.0f} | {instant['p99_ms']:.1f} "
        f"| {instant.get('process_cpu_us_per_request', '-')} "
        f"| {instant['server'].get('event_loop_cpu_us_per_request', '-')} |",
        *(
            f"| {name.removesuffix(', instant model')} | {_MOSEC_PROCESSES} | {step['throughput_rps']:.0f} "
            f"| {step['p99_ms']:.1f} | {step.get('process_cpu_us_per_request', '-')} | - |"
            for name, step in floor.get("instant_peers", {}).items()
        ),
    ]


_MOSEC_PROCESSES = "4 (Python coordinator, Rust ingress, 2 Python workers)"


def _side_lines(results: dict[str, Any]) -> list[str]:
    pairs = results.get("side_by_side")
    if not pairs:
        return []
    lines = [
        "",
        "## Side by side",
        "",
        "batcher (defaults) and one other server up at once, their 64-client closed-loop steps alternating "
        "(A B A B ...), so the machine's drift between steps hits both alike; medians over the rounds. The floor is "
        "held to batcher's rate of the sequential step above. Loop CPU is the event-loop thread's, per request.",
        "",
        "| against | rounds | batcher req/s | its p99 ms | its loop µs/req | other req/s | its p99 ms "
        "| its loop µs/req | batcher × (req/s) | loop CPU × |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in pairs:
        side = _side(results, name)
        assert side is not None
        ours, other = side["batcher"], side["other"]
        loop_other = f"{other['loop_us']:.0f}" if other["loop_us"] else "-"
        loop_ratio = _ratio(ours["loop_us"], other["loop_us"]) if other["loop_us"] else "-"
        lines.append(
            f"| {name} | {ours['rounds']:.0f} | {ours['rps']:.0f} | {ours['p99']:.1f} | {ours['loop_us']:.0f} "
            f"| {other['rps']:.0f} | {other['p99']:.1f} | {loop_other} | {_ratio(ours['rps'], other['rps'])} "
            f"| {loop_ratio} |"
        )
    return lines


def _cache_lines(results: dict[str, Any]) -> list[str]:
    if "cache" not in results:
        return []
    off, on = results["cache"]["steps"].values()
    hit = on["server"].get("cache_hit_ratio")
    return [
        "",
        f"## The response cache on repeated traffic (Zipf, exponent {results['cache']['zipf']:g})",
        "",
        "The test split replayed with dialogue k drawn with weight 1 / k^"
        f"{results['cache']['zipf']:g} (real query logs repeat like that: a few phrasings most of the time), "
        "64 clients.",
        "",
        "| cache | req/s | p50 ms | p99 ms | hit ratio |",
        "|---|---|---|---|---|",
        f"| off | {off['throughput_rps']:.0f} | {off['p50_ms']:.1f} | {off['p99_ms']:.1f} | - |",
        f"| on, max_entries = 10000 | {on['throughput_rps']:.0f} | {on['p50_ms']:.1f} | {on['p99_ms']:.1f} "
        f"| {_pct(hit)} |",
        "",
        f"Throughput with the cache: {_ratio(on['throughput_rps'], off['throughput_rps'])} of without.",
    ]


def _budget_lines(rps: dict[str, float], ceiling: float, batcher64: dict[str, Any], cores: int) -> list[str]:
    """Why a target can be out of reach, from this run's own figures (`cores`: the run's machine)."""
    loop_us = batcher64["server"].get("event_loop_cpu_us_per_request") or 0.0
    loop_cores = loop_us * rps[BATCHER] / 1e6
    client = batcher64["client_cpu_share"]
    bound = ceiling / cores * (cores - loop_cores - client)
    lines = [
        "",
        "What bounds these ratios on this machine: at 64 clients batcher's event loop used "
        f"{loop_cores:.0%} of a core ({loop_us} µs a request) and the load generator {client:.0%}; the "
        f"{cores - loop_cores - client:.2f} cores left for the model, at the ceiling's {ceiling / cores:.0f} "
        f"sequences/s per core, allow at most about {bound:.0f} req/s = {bound / ceiling:.2f}× the ceiling.",
    ]
    for factor, baseline, label in ((12, NAIVE_MAX, "padded to 128"), (2.2, NAIVE_DYNAMIC, "with dynamic padding")):
        needed = factor * rps[baseline]
        if needed > bound:
            beyond = (
                f"more than the model can compute in-process ({ceiling:.0f} sequences/s)"
                if needed > ceiling
                else f"more than the CPU left for the model allows (about {bound:.0f} req/s)"
            )
            lines[-1] += f" {factor:g}× the naive server {label} would be {needed:.0f} req/s, {beyond}."
        elif rps[BATCHER] < needed:
            lines[-1] += (
                f" {factor:g}× the naive server {label} would be {needed:.0f} req/s, just under that bound: "
                f"batcher reached {rps[BATCHER]:.0f} ({rps[BATCHER] / needed:.0%} of it), so this target is "
                "not ruled out by the CPU budget here."
            )
    return lines


def _profile_lines(profile: dict[str, Any] | None) -> list[str]:
    if not profile:
        return []
    lines = ["", "## Where the time goes (py-spy)", ""]
    if "skipped" in profile:
        return [*lines, f"Not profiled in this run: {profile['skipped']}"]
    step = profile["step"]
    loop_us = step["server"].get("event_loop_cpu_us_per_request") or 0.0
    lines += [
        f"py-spy sampled batcher (defaults) at {profile['rate_hz']} Hz, non-blocking, through a separate "
        f"{profile['seconds']:g} s step at 64 clients ({step['throughput_rps']:.0f} req/s while sampled). "
        f"Busy, as a share of one core: event loop {profile['loop_busy']:.0%}, model threads "
        f"{profile['model_threads_busy']:.0%} (two of them: 200 % at most), other threads "
        f"{profile['other_threads_busy']:.0%}. The loop's samples by part of the request path; µs per request "
        f"apportion the loop CPU measured from /proc in that step ({loop_us} µs):",
        "",
        "| event loop: part | share of samples | ≈ µs per request |",
        "|---|---|---|",
    ]
    for part in profile["loop_parts"]:
        lines.append(f"| {part['part']} | {part['share']:.1%} | {part['share'] * loop_us:.0f} |")
    lines += ["", "| model threads: part | share of samples |", "|---|---|"]
    for part in profile["model_parts"]:
        lines.append(f"| {part['part']} | {part['share']:.1%} |")
    return lines


def _pct(value: object) -> str:
    return f"{value:.0%}" if isinstance(value, float) else "-"


# The promises phase (bench/promises.py, issue 30).
COALESCE_NOISE = 0.03
"""Coalescing on is "no worse" than off when its median req/s is at least 97 % of off's and
its median p99 at most 103 %: the steps of two servers on shared cores move by more than that."""
AB_NOISE = 0.05
"""64-client req/s "within noise" of the commit before: at least 95 % of it (the median of
the rounds' ratios, `_paired`)."""
LONE_SETTING = "batching.lone_threads=0"


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def _rows_per_request(row: dict[str, Any]) -> float:
    """Model rows computed per request answered 200 in a step (the server's batch sizes)."""
    server = row.get("server") or {}
    rows = (server.get("batches") or 0) * (server.get("mean_batch_size") or 0)
    ok = row["statuses"].get("200", 0)
    return rows / ok if ok else float("nan")


def _refused(row: dict[str, Any]) -> int:
    """Requests not answered 200 for want of capacity or time: 429, 503, 504, timeouts."""
    return sum(row["statuses"].get(k, 0) for k in ("429", "503", "504", "timeout"))


def _priority_rows(rounds: list[dict[str, Any]], bounds: tuple[str, ...]) -> list[tuple[str, str, str, str]]:
    """The priorities bounds over the rounds (half load, 2x, 2x without priorities each):
    high's p99 on the medians per load, its refusals over all rounds, low's wait in the
    round where it was longest."""

    def of(step: str, priority: str) -> list[dict[str, Any]]:
        return [one[step]["modes"]["by_priority"].get(priority, {}) for one in rounds]

    nan = float("nan")
    highs = of("over", "high")
    over = [high.get("p99_ms") or nan for high in highs]
    half = [high.get("p99_ms") or nan for high in of("half", "high")]
    a, b = statistics.median(over), statistics.median(half)
    measured = f"{a:.1f} vs {b:.1f} ms = {a / b:.2f}×"
    if len(rounds) > 1:
        each = ", ".join(f"{o:.1f} vs {h:.1f}" for o, h in zip(over, half, strict=True))
        measured = f"medians {measured} (rounds: {each} ms)"
    out = [("Priorities", bounds[0], measured, _check(a <= 2 * b))]
    requests = sum(high.get("requests", 0) for high in highs)
    refused = sum(high.get("statuses", {}).get("429", 0) for high in highs)
    share = refused / requests if requests else nan
    out.append(("Priorities", bounds[1], f"{share:.2%} ({refused} of {requests})", _check(share <= 0.001)))
    waits: list[tuple[float, float, float, float]] = []
    for low, plain in zip(of("over", "low"), of("plain", "none"), strict=True):
        found = (low.get("ok_max_ms"), plain.get("ok_max_ms"), low.get("ok_p99_ms"), plain.get("ok_p99_ms"))
        if None not in found:
            waits.append(cast(tuple[float, float, float, float], found))
    if not waits:
        out.append(("Priorities", bounds[2], "no low-priority request answered 200", "**not met**"))
        return out
    low_max, plain_max, low_p99, plain_p99 = max(waits, key=lambda found: found[0] - found[1])
    extra = low_max - plain_max
    worst = " (the round where it was longest)" if len(rounds) > 1 else ""
    out.append(
        (
            "Priorities",
            bounds[2],
            f"slowest 200: {low_max:.0f} vs {plain_max:.0f} ms ({extra:+.0f} ms){worst}; p99 {low_p99:.0f} vs "
            f"{plain_p99:.0f} ms ({low_p99 - plain_p99:+.0f} ms)",
            _check(extra <= 1000),
        )
    )
    return out


def promise_rows(promises: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(scenario, bound, measured, met / not met / not run) for each of issue 30's bounds."""
    out: list[tuple[str, str, str, str]] = []

    def not_run(scenario: str, bounds: tuple[str, ...], why: str) -> None:
        out.extend((scenario, bound, f"not run: {why}", "not run") for bound in bounds)

    p = promises.get("priorities", {})
    bounds: tuple[str, ...] = (
        "high priority p99 at 2× saturation ≤ 2× its p99 at half load",
        "≤ 0.1 % of high-priority requests refused at 2× saturation",
        "no low-priority request waits > 1 s beyond its wait without priorities",
    )
    if "not_run" in p or not p:
        not_run("Priorities", bounds, p.get("not_run", "not measured"))
    else:
        out.extend(_priority_rows(p["rounds"], bounds))
    d = promises.get("deadlines", {})
    bounds = (
        "no 200 whose server-side total time exceeds its deadline (100 ms, 2× saturation)",
        "≥ 95 % of refused requests refused at admission (≤ 10 ms), not as 504 after waiting",
        "goodput (answers within their deadline per second) ≥ count-based admission's",
    )
    if "not_run" in d or not d:
        not_run("Deadlines", bounds, d.get("not_run", "not measured"))
    else:
        with_, without = d["with"], d["without"]
        dl = with_["modes"]["deadline"]
        ok = with_["statuses"].get("200", 0)
        late = dl["server_late_200"] or 0
        unknown = dl["server_time_unknown"] or 0
        out.append(
            (
                "Deadlines",
                bounds[0],
                f"{late} of {ok}" + (f" ({unknown} without a server time)" if unknown else ""),
                _check(late == 0 and unknown == 0),
            )
        )
        refused, door = _refused(with_), with_["modes"]["refused_at_door"]
        share = door / refused if refused else 1.0
        out.append(("Deadlines", bounds[1], f"{door} of {refused} ({share:.1%})", _check(share >= 0.95)))
        g_with, g_without = dl["goodput_rps"], without["modes"]["deadline"]["goodput_rps"]
        out.append(
            (
                "Deadlines",
                bounds[2],
                f"{g_with:.0f} vs {g_without:.0f} answers/s = {_ratio(g_with, g_without)}",
                _check(g_with >= g_without),
            )
        )
    c = promises.get("coalescing", {})
    bounds = (
        "Zipf replay, cache off, 64 clients: ≤ 0.7 model rows per request",
        "answers identical to coalescing off",
        f"p99 and req/s no worse than coalescing off (medians, {COALESCE_NOISE:.0%} for noise)",
    )
    if "not_run" in c or not c:
        not_run("Coalescing", bounds, c.get("not_run", "not measured"))
    else:
        rows = _median([_rows_per_request(r) for r in c["on"]])
        rows_off = _median([_rows_per_request(r) for r in c["off"]])
        out.append(("Coalescing", bounds[0], f"{rows:.2f} (off: {rows_off:.2f})", _check(rows <= 0.7)))
        a = c["answers"]
        out.append(
            (
                "Coalescing",
                bounds[1],
                f"{a['differing']} of {a['requests']} answers differ ({a['dialogues']} dialogues × {a['copies']} "
                f"identical requests at once; {a['rows_per_request']} rows per request)",
                _check(a["differing"] == 0),
            )
        )
        rps_on, rps_off = (
            _median([r["throughput_rps"] for r in c["on"]]),
            _median([r["throughput_rps"] for r in c["off"]]),
        )
        p99_on, p99_off = _median([r["p99_ms"] for r in c["on"]]), _median([r["p99_ms"] for r in c["off"]])
        held = rps_on >= (1 - COALESCE_NOISE) * rps_off and p99_on <= (1 + COALESCE_NOISE) * p99_off
        out.append(
            (
                "Coalescing",
                bounds[2],
                f"{rps_on:.0f} vs {rps_off:.0f} req/s ({_ratio(rps_on, rps_off)}), "
                f"p99 {p99_on:.1f} vs {p99_off:.1f} ms",
                _check(held),
            )
        )
    s = promises.get("storm", {})
    bounds = (
        "512 connections resending at once on 429 keep ≥ 70 % of the 64-client rate answered 200",
        "a new client during the storm gets its answer (any status) within 100 ms at p99",
    )
    if "not_run" in s or not s:
        not_run("Retry storm", bounds, s.get("not_run", "not measured"))
    else:
        storm_ok = s["storm"]["modes"]["retry"]["ok_rps"]
        polite_ok = s["polite"]["modes"]["retry"]["ok_rps"]
        share = storm_ok / polite_ok if polite_ok else float("nan")
        out.append(
            (
                "Retry storm",
                bounds[0],
                f"{storm_ok:.0f} vs {polite_ok:.0f} 200s/s = {share:.0%}",
                _check(share >= 0.7),
            )
        )
        probe = s["storm"]["modes"]["retry"].get("probe") or {}
        p99 = probe.get("p99_ms")
        out.append(
            (
                "Retry storm",
                bounds[1],
                "no probe" if p99 is None else f"p99 {p99:.1f} ms over {probe['requests']} new connections",
                _check(p99 is not None and p99 <= 100),
            )
        )
    lone, ab = promises.get("lone", {}), promises.get("ab64", {})
    bound = "≥ 1.0× the naive inline server's req/s at 1 client"
    if "not_run" in lone or not lone:
        not_run("Lone client", (bound,), lone.get("not_run", "not measured"))
    else:
        ratio, measured = _paired(lone["batcher"], lone["naive"], "")
        out.append(("Lone client", bound, measured, _check(ratio >= 1)))
    bound = f"64-client req/s within noise ({AB_NOISE:.0%}) of the commit before issue 30 (A/B, same run)"
    if "not_run" in ab or not ab:
        not_run("Lone client", (bound,), ab.get("not_run", "not measured"))
    else:
        ratio, measured = _paired(ab["after"], ab["before"], f" at {ab['baseline']}")
        out.append(("Lone client", bound, measured, _check(ratio >= 1 - AB_NOISE)))
    return out


def _paired(ours: list[dict[str, Any]], theirs: list[dict[str, Any]], where: str) -> tuple[float, str]:
    """The median of each round's req/s ratio (both steps of a round seconds apart, so a slow
    minute of the shared machine hits both), and the words: that, the medians and every round."""
    pairs = [(a["throughput_rps"], b["throughput_rps"]) for a, b in zip(ours, theirs, strict=True)]
    ratio = _median([a / b for a, b in pairs])
    mine, other = _median([a for a, _ in pairs]), _median([b for _, b in pairs])
    rounds = ", ".join(f"{a:.0f}/{b:.0f}" for a, b in pairs)
    return ratio, (
        f"median of the rounds' ratios {ratio:.2f}× (medians {mine:.0f} vs {other:.0f} req/s{where} "
        f"= {_ratio(mine, other)}; rounds {rounds})"
    )


def _promises_lines(results: dict[str, Any]) -> list[str]:
    promises = results.get("promises")
    if not promises:
        return []
    saturation = promises.get("saturation", {}).get("rps")
    lines = [
        "",
        "## Promises kept under load (issue 30)",
        "",
        "`bench/promises.py`, one server at a time unless a scenario says otherwise. The saturation rate is batcher "
        "(defaults)'s 64-client closed-loop rate measured at the phase's start (and again before each priorities "
        "round)"
        + (f": **{saturation:.0f} req/s** in this run" if saturation else "")
        + ". Open-loop latency counts from each request's scheduled send time; a request counts as refused at "
        "admission when its 429 came back within 10 ms of being sent (client-side, so at least the server's own "
        "time). A scenario the server could not run yet says why (a malformed `x-priority` or `x-deadline-ms` "
        "answered other than 422; `batching.coalesce` refused by the settings).",
        "",
        "| scenario | bound | measured | |",
        "|---|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in promise_rows(promises)]
    p = promises.get("priorities", {})
    if p and "not_run" not in p:
        mix = ", ".join(f"{share:.0%} {name}" for name, share in p["mix"].items())
        rounds = p["rounds"]
        lines += [
            "",
            f"Priorities: open loop (Poisson), {mix}; half and twice the saturation rate measured before the "
            "round, and twice it again without priorities"
            + (f", the three in turn, {len(rounds)} rounds (numbered)" if len(rounds) > 1 else "")
            + ". Rates: "
            + "; ".join(
                f"{number}: saturation {one['saturation']:.0f}, half {one['rate_half']:g}, "
                f"2× {one['rate_over']:g} req/s"
                for number, one in enumerate(rounds, 1)
            )
            + '. Latency of every request (any status); "200s" columns of the answered ones only.',
            "",
            "| step | priority | requests | 200/s | 429s | other errors | p50 ms | p99 ms | max ms | 200s p99 ms "
            "| 200s max ms |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        steps = (("half load", "half"), ("2× saturation", "over"), ("2×, no priorities", "plain"))
        for number, one in enumerate(rounds, 1):
            for step, key in steps:
                label = f"{number}: {step}" if len(rounds) > 1 else step
                for name, stats in one[key]["modes"]["by_priority"].items():
                    errors = sum(v for k, v in stats["statuses"].items() if k not in ("200", "429"))
                    lines.append(
                        f"| {label} | {name} | {stats['requests']} | {stats['ok_rps']:.0f} "
                        f"| {stats['statuses'].get('429', 0)} | {errors} | {_num(stats['p50_ms'])} "
                        f"| {_num(stats['p99_ms'])} | {_num(stats['max_ms'])} | {_num(stats['ok_p99_ms'])} "
                        f"| {_num(stats['ok_max_ms'])} |"
                    )
    d = promises.get("deadlines", {})
    if d and "not_run" not in d:
        lines += [
            "",
            f"Deadlines: open loop at {d['rate']:g} req/s; with `x-deadline-ms: {d['deadline_ms']:g}` on every "
            f"request, and without on a second server (count-based admission, `batching.max_queue_wait_s=0`: "
            "`max_queue_size` and the 10 s timeout), both judged "
            f"against {d['deadline_ms']:g} ms.",
            "",
            "| step | 200/s | goodput/s | 200s late (client) | 200s late (server) | 429s by type | 504s "
            "| refused at admission | p99 ms |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for label, key in (("with deadlines", "with"), ("count-based admission", "without")):
            row = d[key]
            m, dl = row["modes"], row["modes"]["deadline"]
            kinds = ", ".join(f"{k} {v}" for k, v in m["refused_by_type"].items()) or "none"
            server_late = "-" if dl["server_late_200"] is None else str(dl["server_late_200"])
            lines.append(
                f"| {label} | {row['statuses'].get('200', 0) / row['duration_s']:.0f} | {dl['goodput_rps']:.0f} "
                f"| {dl['late_200']} | {server_late} | {kinds} | {row['statuses'].get('504', 0)} "
                f"| {m['refused_at_door']} of {_refused(row)} | {row['p99_ms']:.1f} |"
            )
    c = promises.get("coalescing", {})
    if c and "not_run" not in c:
        lines += [
            "",
            f"Coalescing: the test split replayed Zipf-distributed (exponent {c['zipf']:g}), cache off, "
            f"{c['clients']} clients; both servers up, steps alternating, {len(c['on'])} rounds; medians.",
            "",
            "| batching.coalesce | req/s | p99 ms | model rows per request | mean batch |",
            "|---|---|---|---|---|",
        ]
        for label, key in (("true", "on"), ("false", "off")):
            steps = c[key]
            lines.append(
                f"| {label} | {_median([r['throughput_rps'] for r in steps]):.0f} "
                f"| {_median([r['p99_ms'] for r in steps]):.1f} "
                f"| {_median([_rows_per_request(r) for r in steps]):.2f} "
                f"| {_median([(r['server'] or {}).get('mean_batch_size') or 0 for r in steps]):.2f} |"
            )
    s = promises.get("storm", {})
    if s and "not_run" not in s:
        lines += [
            "",
            f"Retry storm: {s['duration_s']:g} s each, closed loop; storm: every 429 resent at once; polite: after "
            "`x-retry-after-ms`. The probe is a separate process opening a new connection every 50 ms "
            "(`loadtest/probe.py`); its latency is to any answer.",
            "",
            "| clients | retry | 200/s | 429s/s | probe requests | probe p50 ms | probe p99 ms | probe max ms "
            "| probe statuses |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for key in ("polite", "storm"):
            row = s[key]
            retry = row["modes"]["retry"]
            probe = retry.get("probe") or {}
            statuses = ", ".join(f"{k} {v}" for k, v in probe.get("statuses", {}).items()) or "-"
            lines.append(
                f"| {row['target']:g} | {retry['mode']} | {retry['ok_rps']:.0f} "
                f"| {row['statuses'].get('429', 0) / row['duration_s']:.0f} | {probe.get('requests', '-')} "
                f"| {_num(probe.get('p50_ms'))} | {_num(probe.get('p99_ms'))} | {_num(probe.get('max_ms'))} "
                f"| {statuses} |"
            )
    lone, ab = promises.get("lone", {}), promises.get("ab64", {})
    if lone and "not_run" not in lone:
        lines += [
            "",
            "A lone client: batcher (defaults: a lone request runs on a second session of one thread per core), "
            f"batcher with `{LONE_SETTING}` (that session off) where the server has it, and the naive inline server "
            "(`bench/baselines/naive_server.py`: FastAPI, one ONNX Runtime session on every core, each request run "
            "alone, padded to its own length, the same graph), all up, 1-client steps alternating, "
            f"{len(lone['batcher'])} rounds; medians (the bound is judged on the median of the rounds' ratios).",
            "",
            "| server | req/s | p50 ms | p99 ms |",
            "|---|---|---|---|",
        ]
        for label, key in (
            ("batcher (defaults)", "batcher"),
            (f"batcher, {LONE_SETTING}", "lone"),
            ("naive, dynamic padding", "naive"),
        ):
            steps = lone.get(key)
            if not steps:
                continue
            lines.append(
                f"| {label} | {_median([r['throughput_rps'] for r in steps]):.0f} "
                f"| {_median([r['p50_ms'] for r in steps]):.2f} | {_median([r['p99_ms'] for r in steps]):.2f} |"
            )
    if ab and "not_run" not in ab:
        lines += [
            "",
            f"64 clients: {ab['baseline']} (the commit before issue 30, in a git worktree) and this checkout, "
            f"with its defaults and with `{LONE_SETTING}` where it has it, all up, steps alternating, "
            f"{len(ab['after'])} rounds; medians (the bound is judged on the median of the rounds' ratios).",
            "",
            "| server | req/s | p99 ms | mean batch |",
            "|---|---|---|---|",
        ]
        for label, key in (
            (f"{ab['baseline']} (before issue 30)", "before"),
            ("this checkout (defaults)", "after"),
            (f"this checkout, {LONE_SETTING}", "lone"),
        ):
            steps = ab.get(key)
            if steps:
                lines.append(
                    f"| {label} | {_median([r['throughput_rps'] for r in steps]):.0f} "
                    f"| {_median([r['p99_ms'] for r in steps]):.1f} "
                    f"| {_median([(r['server'] or {}).get('mean_batch_size') or 0 for r in steps]):.2f} |"
                )
    return lines


def _num(value: object) -> str:
    return f"{value:.1f}" if isinstance(value, int | float) else "-"
