"""Render BENCHMARKS.md (and its plots) from bench/results.json: every figure comes from one run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loadtest import report

BATCHER = "batcher (defaults)"
UNBATCHED = "batcher max_batch_size=1"
NAIVE_MAX = "naive, padded to 128"
NAIVE_DYNAMIC = "naive, dynamic padding"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}×" if b else "n/a"


def _check(ok: bool) -> str:
    return "met" if ok else "**not met**"


def render(results: dict[str, Any], out_dir: Path) -> str:
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
        f"mean {results['ceiling']['mean_tokens']} tokens), bundled model `models/intent-zh` (TinyBERT-4 shape, fp32).",
        "The load generator (`python -m loadtest`) runs on the same 2 cores as the server; its CPU share is shown.",
        "batcher's defaults in this run (`config.toml`): "
        + ", ".join(f"`{k} = {v}`" for k, v in results.get("defaults", {}).items())
        + ".",
        "Every figure below comes from this one run; ratios compare servers measured minutes apart on this machine.",
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
