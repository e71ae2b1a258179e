"""Render RELIABILITY.md (and its soak plot) from reliability/results.json."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from loadtest.report import pyplot

MIB = 2**20


def _ok(condition: bool) -> str:
    return "met" if condition else "**not met**"


def _answers(statuses: dict[str, int]) -> str:
    return ", ".join(f"{status}: {count}" for status, count in sorted(statuses.items()))


def plot_soak(minutes: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    figure, left = plt.subplots(figsize=(7.5, 4))
    x = list(range(1, len(minutes) + 1))
    left.plot(x, [m["p99_ms"] for m in minutes], "-o", color="C0", label="p99 (ms)")
    left.set_xlabel("minute")
    left.set_ylabel("p99 latency (ms)", color="C0")
    right = left.twinx()
    right.plot(x, [m["rss_bytes"] / MIB for m in minutes], "-s", color="C1", label="RSS (MiB)")
    right.set_ylabel("server RSS (MiB)", color="C1")
    left.set_title("soak at 70 % of maximum throughput")
    left.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _delay(shutdown: dict[str, Any]) -> str:
    delay = shutdown.get("drain_delay_ms")
    return "the server's log did not give it" if delay is None else f"{delay} ms in this run"


def _trend(minutes: list[dict[str, Any]]) -> str:
    """Whether the soak drifts (what the first-vs-last bound is after), beside how much a minute swings."""
    p99 = [float(m["p99_ms"]) for m in minutes]
    rss = [m["rss_bytes"] for m in minutes]
    grew = [index for index in range(1, len(rss)) if rss[index] > rss[index - 1]]
    slope = statistics.linear_regression(range(1, len(p99) + 1), p99).slope if len(p99) > 1 else 0.0
    last_growth = f"RSS last grew in minute {grew[-1] + 1}" if grew else "RSS never grew after the first minute"
    return (
        f"Minute by minute the p99 ranged from {min(p99):.1f} to {max(p99):.1f} ms; a straight line fitted "
        f"through all {len(p99)} minutes moves {slope:+.1f} ms a minute, and {last_growth}."
    )


def _late_reads(shutdown: dict[str, Any]) -> str:
    refused = shutdown["before"].get("503", 0)
    if not refused:
        return ""
    return (
        f" The other way round, {refused} request{'s' if refused > 1 else ''} sent just before that instant "
        "reached the server's event loop just after it and got the 503 of a draining server: refused, not "
        "admitted, so none was lost."
    )


def _generator_us(minute: dict[str, Any]) -> float:
    return float(minute["client_cpu_share"]) / float(minute["throughput_rps"]) * 1e6


def _loop_us(minute: dict[str, Any]) -> float:
    return float(minute["server"].get("event_loop_cpu_us_per_request") or 0.0)


def _model_ms(server: dict[str, Any], rps: float) -> float:
    """Model-run time per request (both instances summed; wall time, preemptions included)."""
    return float(server.get("model_busy_share") or 0.0) / rps * 1000 if rps else 0.0


def _against_peak(overload: dict[str, Any], minutes: list[dict[str, Any]]) -> str:
    server = overload.get("peak_server")
    if not server:  # runs before it was recorded
        return ""
    soak_ms = [_model_ms(m["server"], m["throughput_rps"]) for m in minutes]
    return (
        f", against {server.get('mean_batch_size') or 0:.1f} in the 64-client step that measured the maximum; "
        f"the model took {min(soak_ms):.2f} to {max(soak_ms):.2f} ms a request here, against "
        f"{_model_ms(server, overload['peak_rps']):.2f} ms there"
    )


def _batch(minute: dict[str, Any]) -> float:
    return float(minute["server"].get("mean_batch_size") or 0.0)


def _cores_busy(minute: dict[str, Any]) -> float:
    """Cores the server and the load generator used together (of the machine's 2)."""
    return float(minute["server"].get("server_cpu_share") or 0.0) + float(minute["client_cpu_share"])


def _change(minutes: list[dict[str, Any]], per_request: Any) -> str:
    first, last = per_request(minutes[0]), per_request(minutes[-1])
    return f"{last / first - 1:+.0%}" if first else "n/a"


def render(results: dict[str, Any], out_dir: Path) -> str:
    overload = results["overload"]
    spike, after = overload["spike"], overload["after"]
    refused_p99 = spike["p99_ms_by_status"].get("429")
    refused_p99_sent = spike.get("p99_ms_by_status_from_send", {}).get("429")
    unanswered = sum(spike["statuses"].get(k, 0) for k in ("timeout", "refused", "connection_error"))
    storm = results["disconnect"]
    shutdown = results["shutdown"]
    lost = sum(count for status, count in shutdown["before"].items() if not status.isdigit())
    lines = [
        "# Reliability",
        "",
        f"Measured on {results['date']}, commit `{results.get('commit') or 'unknown'}`, on {results['machine']}, "
        "by one run of `make reliability` "
        f"(`{results['command']}`). Server: `app.py` with the shipped `config.toml` (bundled model, defaults), "
        "on loopback; the load generator shares the same 2 cores.",
        "",
        "## Overload: open loop at 3 × the maximum throughput",
        "",
        f"Maximum measured first: {overload['peak_rps']:.0f} req/s (64 clients). Spike: "
        f"{spike['load']} for {spike['duration_s']:.0f} s.",
        "",
        "| bound | measured | |",
        "|---|---|---|",
        f"| every request answered (200, or 429/503/504 with a JSON error) | {_answers(spike['statuses'])}; "
        f"unsent by the generator: {spike['unsent']}, late: {spike['late']} | {_ok(unanswered == 0)} |",
        f"| 429s come back fast: p99 < 5 ms | p99 of 429s {refused_p99} ms from the scheduled send time "
        f"({refused_p99_sent} ms from the moment the generator began sending) | "
        f"{_ok(refused_p99 is not None and refused_p99 < 5)} |",
        f"| admitted requests keep a bounded p99 | p99 of 200s {spike['p99_ms_by_status'].get('200')} ms "
        f"(request_timeout_s bounds it at 10 s) | {_ok((spike['p99_ms_by_status'].get('200') or 1e9) < 10_000)} |",
        f"| RSS stays bounded | {overload['rss_start'] / MIB:.0f} MiB before, {overload['rss_max'] / MIB:.0f} MiB "
        f"max, {overload['rss_end'] / MIB:.0f} MiB at the end "
        f"| {_ok(overload['rss_max'] < 2 * overload['rss_start'])} |",
        f"| throughput back to normal within 5 s | {after['throughput_rps']:.0f} req/s in the 5 s right after "
        f"({after['throughput_rps'] / overload['peak_rps']:.0%} of the maximum) "
        f"| {_ok(after['throughput_rps'] >= 0.9 * overload['peak_rps'])} |",
        f"| the server stays up | answered the 5 s recovery step: {_answers(after['statuses'])} "
        f"| {_ok(after['statuses'].get('200', 0) > 0)} |",
        "",
        f"The generator used {spike['client_cpu_share']:.0%} of a core during the spike. Latency is measured "
        "from each request's scheduled send time, on the same 2 cores as the server and its two model threads, "
        "so the 429 figure includes time the request waited for the generator and for the server's event loop; "
        "the figure from the moment of sending leaves the generator's own lateness out.",
        "",
        "## Disconnect storm",
        "",
        "Clients that send a long request and hang up after 5 ms, 20 at a time, for "
        f"{storm['during']['duration_s']:.0f} s, beside 16 normal closed-loop clients.",
        "",
        "| | measured |",
        "|---|---|",
        f"| hang-up requests sent | {storm['storm_sent']} |",
        f"| normal requests answered | {storm['normal_sent']} |",
        f"| rows the model computed | {storm['rows_computed']:.0f} "
        f"({_ok(storm['normal_sent'] <= storm['rows_computed'] < storm['storm_sent'] + storm['normal_sent'])}: "
        "at least the normal requests, fewer than all requests sent) |",
        f'| `batcher_rejected_total{{reason="disconnected"}}` | {storm["disconnected"]:.0f} |',
        f"| normal clients without the storm: p50 / p99 | {storm['baseline']['p50_ms']:.1f} / "
        f"{storm['baseline']['p99_ms']:.1f} ms, {storm['baseline']['throughput_rps']:.0f} req/s |",
        f"| normal clients during the storm: p50 / p99 | {storm['during']['p50_ms']:.1f} / "
        f"{storm['during']['p99_ms']:.1f} ms, {storm['during']['throughput_rps']:.0f} req/s |",
        "",
        "Hang-ups the server notices before their batch forms are skipped; one that is already in a running "
        "batch is computed and its answer dropped. The normal clients share the event loop with the storm's "
        "connection handling, which is what slows them.",
        "",
        "## Shutdown under load",
        "",
        f"SIGTERM 4 s into an open-loop overload at {shutdown['rate']} req/s (shutdown_timeout_s = 20).",
        "",
        "| bound | measured | |",
        "|---|---|---|",
        f"| no accepted request lost: every request sent before the drain began gets an HTTP answer | "
        f"{_answers(shutdown['before'])} | {_ok(lost == 0)} |",
        f"| new requests after the drain began get 503, or a refused connection once the listener closes; "
        f"none is cut | {_answers(shutdown['after'])} | {_ok(set(shutdown['after']) <= {'503', 'refused'})} |",
        f"| exit 0 within shutdown_timeout_s | exit {shutdown['exit_code']} after {shutdown['exit_s']} s, "
        f"{shutdown['tracebacks']} tracebacks | {_ok(shutdown['exit_code'] == 0 and shutdown['exit_s'] <= 20)} |",
        "",
        '"Before" and "after" split at the instant the server began draining, which it logs on the monotonic '
        "clock the generator also reads: the signal callback itself drops readiness and refuses admission, so "
        "nothing read after it is admitted. A request written between the generator's `kill` and that "
        f"instant ({_delay(shutdown)}) is read before the drain and answered like any other.{_late_reads(shutdown)}",
        "",
    ]
    if "scheduling" in results:
        lines += [
            "## Why the 429s are fast: the model threads' scheduling policy, side by side",
            "",
            "The same overload rate for "
            f"{results['scheduling'][0]['spike']['duration_s']:.0f} s (after 2 s at that rate, not counted: the "
            "steady state, where the overload step above includes the spike's onset) and the same 64 closed-loop "
            "clients against "
            "two servers that differ only in `batching.worker_sched_idle`. Under SCHED_IDLE any runnable thread "
            "of normal priority, the event loop first, takes a core from the model at once; with a niceness the "
            "loop waits in the run queue behind the model's threads.",
            "",
            "| model threads | 64 clients, req/s | 429 p99 ms (from schedule / from send) | 200 p99 ms "
            "| event loop's run-queue wait, ms per s |",
            "|---|---|---|---|---|",
        ]
        for row in results["scheduling"]:
            spike_row = row["spike"]
            lines.append(
                f"| {row['variant']} | {row['closed_64_rps']:.0f} | {spike_row['p99_ms_by_status'].get('429')} / "
                f"{spike_row['p99_ms_by_status_from_send'].get('429')} | {spike_row['p99_ms_by_status'].get('200')} "
                f"| {row['loop_run_queue_wait_ms_per_s']} |"
            )
        lines.append("")
    if "soak" in results:
        soak = results["soak"]
        minutes = soak["minutes"]
        plot_soak(minutes, out_dir / "soak.png")
        growth = minutes[-1]["rss_bytes"] / minutes[0]["rss_bytes"] - 1
        p99_change = minutes[-1]["p99_ms"] / minutes[0]["p99_ms"] - 1
        errors = sum(v for m in minutes for k, v in m["statuses"].items() if k != "200")
        lines += [
            f"## Soak: {len(minutes)} minutes at {soak['rate']} req/s (70 % of the maximum)",
            "",
            "| bound | measured | |",
            "|---|---|---|",
            f"| RSS growth under 5 % | {minutes[0]['rss_bytes'] / MIB:.1f} → {minutes[-1]['rss_bytes'] / MIB:.1f} MiB "
            f"({growth:+.1%}) | {_ok(growth < 0.05)} |",
            f"| p99 of the last minute within 20 % of the first | {minutes[0]['p99_ms']:.1f} → "
            f"{minutes[-1]['p99_ms']:.1f} ms ({p99_change:+.0%}) | {_ok(abs(p99_change) <= 0.2)} |",
            f"| zero errors | {errors} | {_ok(errors == 0)} |",
            "",
            "The load generator does the same work for every request all along, so its CPU per request gauges "
            "how fast the shared machine itself ran: from the first minute to the last it changed by "
            f"{_change(minutes, _generator_us)} (batcher's event loop, per request: {_change(minutes, _loop_us)}).",
            "",
            _trend(minutes),
            "",
            "How close to the machine's limit this rate runs: the server and the generator kept "
            f"{min(map(_cores_busy, minutes)):.2f} to {max(map(_cores_busy, minutes)):.2f} of the 2 cores busy, "
            f"with batches of {min(_batch(m) for m in minutes):.1f} to {max(_batch(m) for m in minutes):.1f} "
            f"requests on average{_against_peak(results['overload'], minutes)}.",
            "",
            "| minute | req/s | p50 ms | p99 ms | RSS MiB | mean batch | cores busy | event loop CPU µs/req "
            "| generator CPU µs/req |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for index, m in enumerate(minutes, 1):
            lines.append(
                f"| {index} | {m['throughput_rps']:.0f} | {m['p50_ms']:.1f} | {m['p99_ms']:.1f} "
                f"| {m['rss_bytes'] / MIB:.1f} | {_batch(m):.1f} | {_cores_busy(m):.2f} | {_loop_us(m):.0f} "
                f"| {_generator_us(m):.0f} |"
            )
        lines += ["", "![RSS and p99 over the soak](reliability/soak.png)", ""]
    lines += [
        "## Fault, hostile-input and shutdown tests (pytest, same run)",
        "",
        "| tests | outcome | seconds |",
        "|---|---|---|",
    ]
    for test in results["tests"]:
        lines.append(
            f"| `{' '.join(test['selection'])}` | {test['summary'] or 'exit ' + str(test['exit_code'])} "
            f"| {test['seconds']} |"
        )
    lines.append("")
    if "fuzz" in results:
        fuzz = results["fuzz"]
        lines += [
            "## Fuzzing (schemathesis against /openapi.json)",
            "",
            f"`{fuzz['command']}`: exit {fuzz['exit_code']}. {fuzz['summary']}",
            "",
        ]
    if "http_fuzz" in results:
        lines += http_fuzz_section(results["http_fuzz"])
    lines += ["Raw figures: `reliability/results.json`.", ""]
    return "\n".join(lines)


def http_fuzz_section(fuzz: dict[str, Any]) -> list[str]:
    """The HTTP layer below the schema: what `bench/http_fuzz.py` sent and what came back."""
    clean = not fuzz["failed"] and fuzz["ready_after"] and not fuzz["log_tracebacks"]
    lines = [
        "## Fuzzing the HTTP layer (raw requests: methods, paths, headers, encodings, framing)",
        "",
        f"`python -m bench.http_fuzz --examples {fuzz['requests']} --seed {fuzz['seed']}` (Hypothesis): "
        f"{fuzz['requests']} requests, {fuzz['failed']} failed (a 5xx, no answer within 5 s, a 4xx not in the "
        f"error shape), server ready afterwards: {'yes' if fuzz['ready_after'] else 'NO'}, tracebacks in its log: "
        f"{fuzz['log_tracebacks']}. {'Met.' if clean else 'NOT met.'}",
        "",
        "| answer | requests |",
        "|---|---|",
    ]
    lines += [f"| {status} | {count} |" for status, count in fuzz["statuses"].items()]
    lines += ["", "A bare status is an answer to HEAD (no body to check)."]
    if fuzz["failures"]:
        lines += ["", "First failures:", ""] + [f"- `{failure[:300]}`" for failure in fuzz["failures"]]
    return [*lines, ""]
